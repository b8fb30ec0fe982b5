//! Seed corpus generator (run by fuzz/make_corpus.sh; a normal program, not a fuzz
//! target). Usage: `seedgen OUT_DIR WORK_DIR [IMAGE...]`.
//!
//! Makes, with the library, VHDX and VHD bases and differencing children holding data
//! (including a VHDX copied after a flush and before close, so its log is pending), adds
//! the IMAGE files given (fixtures, qemu-made files), and writes each as a sparse input
//! (fuzz/src/sparse.rs) into OUT_DIR/{vhdx_open,vhd_open,read_anywhere,write_model}.

use std::fs;
use std::path::{Path, PathBuf};

use vdiskfs::cli::{CreateArgs, FormatArg};
use vdiskfs::{Chain, ChainOptions, Disk, DiskOptions, Intent};
use vdiskfs_fuzz::sparse;

fn create(image: &Path, parent: Option<&Path>, size: Option<&str>, block: &str, lss: Option<u32>) {
    let fmt = if image.extension().is_some_and(|e| e == "vhd") {
        FormatArg::Vhd
    } else {
        FormatArg::Vhdx
    };
    vdiskfs::commands::create::run(&CreateArgs {
        image: image.to_path_buf(),
        parent: parent.map(Path::to_path_buf),
        size: size.map(str::to_string),
        block_size: Some(block.to_string()),
        logical_sector_size: lss,
        format: Some(fmt),
    })
    .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
}

fn writable(p: &Path) -> Disk {
    let c = Chain::open(
        p,
        &ChainOptions {
            intent: Intent::WriteTop,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    Disk::new(c, DiskOptions::default())
}

fn fill(d: &Disk, writes: &[(u64, usize, u8)]) {
    for &(off, len, b) in writes {
        let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8)).collect();
        d.write_at(off, &data).expect("write");
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (out, work) = (&args[0], &args[1]);
    fs::create_dir_all(work).unwrap();
    let mut images: Vec<PathBuf> = args[2..].to_vec();

    for (ext, block, lss) in [
        ("vhdx", "1M", 512),
        ("vhdx", "1M", 4096),
        ("vhd", "512K", 512),
    ] {
        let tag = format!("{ext}{lss}");
        let base = work.join(format!("base{tag}.{ext}"));
        let child = work.join(format!("child{tag}.{ext}"));
        let _ = fs::remove_file(&base);
        let _ = fs::remove_file(&child);
        let lss_arg = (ext == "vhdx").then_some(lss);
        create(&base, None, Some("4M"), block, lss_arg);
        let empty = work.join(format!("empty{tag}.{ext}"));
        let _ = fs::remove_file(&empty);
        fs::copy(&base, &empty).unwrap();
        images.push(empty);
        let d = writable(&base);
        fill(&d, &[(0, 8192, 1), ((3 << 20) - 4096, 4096, 2)]);
        d.close().unwrap();
        drop(d);
        let with_data = work.join(format!("data{tag}.{ext}"));
        fs::copy(&base, &with_data).unwrap();
        images.push(with_data);
        create(&child, Some(&base), None, block, None);
        let d = writable(&child);
        fill(&d, &[(4096, 4096, 3), ((1 << 20) + 512 * 7, 512 * 3, 4)]);
        d.flush().unwrap();
        if ext == "vhdx" {
            // Flushed but not closed: the metadata updates sit in a pending log.
            let pending = work.join(format!("pending{tag}.{ext}"));
            let _ = fs::remove_file(&pending);
            fs::copy(&child, &pending).unwrap();
            images.push(pending);
        }
        d.close().unwrap();
        drop(d);
        images.push(child);
    }

    for t in ["vhdx_open", "vhd_open", "read_anywhere", "write_model"] {
        fs::create_dir_all(out.join(t)).unwrap();
    }
    for img in &images {
        let bytes = fs::read(img).unwrap_or_else(|e| panic!("read {}: {e}", img.display()));
        let enc = sparse::encode(&bytes);
        let name = img.file_name().unwrap().to_string_lossy().to_string();
        let vhdx = bytes.starts_with(b"vhdxfile");
        let t = if vhdx { "vhdx_open" } else { "vhd_open" };
        fs::write(out.join(t).join(&name), &enc).unwrap();
        // read_anywhere: the image, three ranges, the count.
        let mut ra = enc.clone();
        for (off, len) in [(0u64, 65536u32), (4096 + 17, 9000), (u64::MAX, 1 << 20)] {
            ra.extend_from_slice(&off.to_le_bytes());
            ra.extend_from_slice(&len.to_le_bytes());
        }
        ra.push(3);
        fs::write(out.join("read_anywhere").join(&name), &ra).unwrap();
        eprintln!("seed {name}: {} bytes from {}", enc.len(), bytes.len());
    }
    // write_model: both formats, aligned and unaligned writes, flushes and reopens.
    for fmt in [0u8, 1] {
        let mut v = vec![fmt];
        for (off, len, seed, flags) in [
            (0u32, 4095u16, 1u8, 0u8),
            (1 << 20, 511, 2, 1),
            ((2 << 20) + 3, 65535, 3, 2),
            ((4 << 20) - 100, 200, 4, 3),
            (700_000, 20_000, 5, 0),
        ] {
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.push(seed);
            v.push(flags);
        }
        fs::write(out.join("write_model").join(format!("ops{fmt}")), &v).unwrap();
    }
}
