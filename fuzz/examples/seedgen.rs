//! Seed corpus generator (run by fuzz/make_corpus.sh; a normal program, not a fuzz
//! target). Usage: `seedgen OUT_DIR WORK_DIR [IMAGE...]`.
//!
//! Makes, with the library, VHDX and VHD bases and differencing children holding data
//! (including a VHDX copied after a flush and before close, so its log is pending), adds
//! the IMAGE files given (fixtures, qemu-made files), and writes each as a sparse input
//! (fuzz/src/sparse.rs) into OUT_DIR/{vhdx_open,vhd_open,read_anywhere,write_model}.

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vdiskfs::cli::{CreateArgs, FormatArg};
use vdiskfs::image::vhdx::header::read_current_header;
use vdiskfs::image::vhdx::log::testutil::{make_crafted_log_test_file, set_log_guid};
use vdiskfs::image::vhdx::log::{LogUpdate, LogWriter};
use vdiskfs::image::ImageFile;
use vdiskfs::{Chain, ChainOptions, Disk, DiskOptions, Intent};
use vdiskfs_fuzz::sparse;

const MIB: u64 = 1 << 20;

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
    // Hostile pending logs (issue 11), in their own compact encoding.
    for (name, enc) in hostile_logs(work) {
        fs::write(out.join("vhdx_open").join(&name), &enc).unwrap();
        eprintln!("seed {name}: {} bytes", enc.len());
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

/// Give the clean VHDX `path` a pending log of one entry of `updates` with LastFileOffset
/// `last` (our log writer, then the header's LogGuid).
fn pending(path: &Path, updates: &[LogUpdate], last: u64) {
    let f = ImageFile::open(path, true).unwrap();
    let (h, _, _) = read_current_header(&f).unwrap();
    let guid = Uuid::new_v4();
    LogWriter::new(h.log_offset, u64::from(h.log_length), guid, 1)
        .write_updates(&f, updates, f.len() / MIB * MIB, last)
        .unwrap();
    drop(f);
    set_log_guid(path, guid).unwrap();
}

fn fresh(path: &Path, parent: Option<&Path>) {
    let _ = fs::remove_file(path);
    if parent.is_some() {
        create(path, parent, None, "1M", None);
    } else {
        create(path, None, Some("4M"), "1M", Some(512));
    }
}

/// The hostile files of issue 11. Seeds (returned, encoded): `hostile-log2` (a pending
/// 2 MiB log every 4 KiB slot of which claims the whole log; the scan used to read all of
/// it at every slot, quadratic in the log; the seed's log is kept small because a larger
/// one slows every fuzzing run that mutates it: with an 8 MiB log `vhdx_open` ran 2.5
/// times slower), `hostile-grow` (a pending log whose LastFileOffset is 8 TiB)
/// and `hostile-zero` (a log zeroing 245 MiB of a sparse 250 MiB file, within the
/// 256 MiB an input can describe). Left in WORK_DIR to time and measure:
/// `hostile-log16.vhdx` and `hostile-log64.vhdx` (the same with a 16 and a 64 MiB log:
/// 20 and 68 MiB files),
/// `hostile-log64d.vhdx` (the same with descriptors filling the entry),
/// `hostile-grow.vhdx`, and the chain `hostile-zero1.vhdx` (base) ..
/// `hostile-zero7.vhdx` (top), each layer with such a zeroing log.
fn hostile_logs(work: &Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    // The 64 MiB-log image twice: DescriptorCount 0, and DescriptorCount filling the
    // whole log (16,256 data descriptors in 128 descriptor sectors; the first sector's
    // 126 descriptors plausible), which gets past the header checks. Only the 2 MiB one
    // is a seed.
    for (name, log_len, count) in [
        ("hostile-log2", 2 * MIB, 0),
        ("hostile-log16", 16 * MIB, 0),
        ("hostile-log64", 64 * MIB, 0),
        ("hostile-log64d", 64 * MIB, 16_256),
    ] {
        let p = work.join(format!("{name}.vhdx"));
        fresh(&p, None);
        let (log_at, _) = make_crafted_log_test_file(&p, log_len, count).unwrap();
        if name == "hostile-log2" {
            // The usual encoding would spend a 512-byte record per slot; a slot's
            // header is 48 bytes (31 KB for the seed instead of 270 KB).
            let bytes = fs::read(&p).unwrap();
            let mut enc = sparse::encode(&bytes[..log_at as usize]);
            enc[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            for at in (log_at..log_at + log_len).step_by(4096) {
                enc.extend_from_slice(&((at / 512) as u32).to_le_bytes());
                enc.extend_from_slice(&48u16.to_le_bytes());
                enc.extend_from_slice(&bytes[at as usize..at as usize + 48]);
            }
            seeds.push((name.to_string(), enc));
        }
    }
    let grow = work.join("hostile-grow.vhdx");
    fresh(&grow, None);
    let page = vec![0x5au8; 4096];
    pending(
        &grow,
        &[LogUpdate::Data {
            file_offset: 512 << 10,
            data: &page,
        }],
        8 << 40,
    );
    seeds.push((
        "hostile-grow".into(),
        sparse::encode(&fs::read(&grow).unwrap()),
    ));
    let mut parent: Option<PathBuf> = None;
    for i in 1..=7 {
        let p = work.join(format!("hostile-zero{i}.vhdx"));
        fresh(&p, parent.as_deref());
        parent = Some(p);
    }
    for i in 1..=7 {
        let p = work.join(format!("hostile-zero{i}.vhdx"));
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(250 * MIB)
            .unwrap();
        let zero = LogUpdate::Zero {
            file_offset: 4 * MIB,
            len: 245 * MIB,
        };
        pending(&p, &[zero], 250 * MIB);
        if i == 1 {
            seeds.push((
                "hostile-zero".into(),
                sparse::encode(&fs::read(&p).unwrap()),
            ));
        }
    }
    seeds
}
