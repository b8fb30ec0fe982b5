//! A fuzzed sequence of writes and discards to a small differencing child (VHDX or VHD)
//! through `Disk::write_at` and `Disk::discard`, checked against a plain byte model after the writes, and again
//! after closing and reopening the file read-only.
//!
//! Made once per process with the library's `create` (what `vdiskfs create` runs): a
//! 4 MiB dynamic base of each format holding a pattern, and a child of each. Every run
//! copies the child and writes to the copy (the base is only ever a read-only parent).
//!
//! Input: `format:u8` (bit 0: 0 = VHDX, 1 = VHD), then up to 48 ops of 8 bytes:
//! `offset:u32le` (modulo the disk size), `len:u16le` (1..=65536, unaligned allowed),
//! `seed:u8` (the bytes written), `flags:u8` (bit 0: flush after this op; bit 1:
//! close and reopen the child for writing before the next op; bit 2: a discard of
//! `len * 64` bytes instead of a write, so it can cover whole blocks).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vdiskfs::{Chain, ChainOptions, CreateOptions, Disk, DiskOptions, Format, Intent};

const SIZE: u64 = 4 << 20;

struct Fixture {
    child: PathBuf,
    base_bytes: Vec<u8>,
}

fn pattern(seed: u8, len: usize, salt: u64) -> Vec<u8> {
    let mut x = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn create(image: &Path, parent: Option<&Path>, size: Option<u64>, block: u32, f: Format) {
    vdiskfs::create(
        image,
        &CreateOptions {
            format: Some(f),
            parent: parent.map(Path::to_path_buf),
            size: size.unwrap_or(0),
            block_size: Some(block),
            logical_sector_size: None,
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
}

fn open(path: &Path, writable: bool) -> Disk {
    let chain = Chain::open(
        path,
        &ChainOptions {
            intent: if writable {
                Intent::WriteTop
            } else {
                Intent::Inspect
            },
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Disk::new(
        chain,
        DiskOptions {
            cache_bytes: 1 << 20,
            cache_block: 64 << 10,
        },
    )
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut v = vec![0u8; disk.len() as usize];
    let n = disk.read_at(0, &mut v).expect("read the whole disk");
    assert_eq!(n, v.len());
    v
}

fn fixture(vhd: bool) -> &'static Fixture {
    static F: [OnceLock<Fixture>; 2] = [OnceLock::new(), OnceLock::new()];
    F[vhd as usize].get_or_init(|| {
        let dir = vdiskfs_fuzz::scratch();
        let (ext, fmt, block) = if vhd {
            ("vhd", Format::Vhd, 512 << 10)
        } else {
            ("vhdx", Format::Vhdx, 1 << 20)
        };
        let base = dir.join(format!("base.{ext}"));
        let child = dir.join(format!("child.{ext}"));
        create(&base, None, Some(4 << 20), block, fmt);
        {
            // Data in part of the base: blocks 0 and 2 partly, the last sector.
            let d = open(&base, true);
            d.write_at(4096, &pattern(1, 300_000, 1)).unwrap();
            d.write_at(2 << 20, &pattern(2, 70_000, 2)).unwrap();
            d.write_at(SIZE - 512, &pattern(3, 512, 3)).unwrap();
            d.close().unwrap();
        }
        let fmt = if vhd { Format::Vhd } else { Format::Vhdx };
        create(&child, Some(&base), None, block, fmt);
        let base_bytes = read_all(&open(&base, false));
        assert_eq!(base_bytes.len() as u64, SIZE);
        Fixture { child, base_bytes }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&format, ops)) = data.split_first() else {
        return;
    };
    let vhd = format & 1 == 1;
    let fx = fixture(vhd);
    let work = fx
        .child
        .with_file_name(if vhd { "run.vhd" } else { "run.vhdx" });
    let _ = std::fs::remove_file(&work);
    // libFuzzer's timeout timer (SIGALRM, installed without SA_RESTART) can interrupt
    // copy_file_range on the child's sparse file: retry rather than report a crash.
    loop {
        match std::fs::copy(&fx.child, &work) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                let _ = std::fs::remove_file(&work);
            }
            Err(e) => panic!("copy the child: {e:?}"),
        }
    }
    let mut model = fx.base_bytes.clone();
    let mut disk = open(&work, true);
    for (i, op) in ops.chunks_exact(8).take(48).enumerate() {
        let off = u32::from_le_bytes(op[0..4].try_into().unwrap()) as u64 % SIZE;
        let len = u16::from_le_bytes(op[4..6].try_into().unwrap()) as usize + 1;
        if op[7] & 4 != 0 {
            let end = (off + len as u64 * 64).min(SIZE);
            disk.discard(off, end - off).expect("discard");
            model[off as usize..end as usize].fill(0);
        } else {
            let data = pattern(op[6], len, i as u64);
            let n = disk.write_at(off, &data).expect("write");
            assert_eq!(n as u64, (len as u64).min(SIZE - off));
            model[off as usize..off as usize + n].copy_from_slice(&data[..n]);
        }
        if op[7] & 1 != 0 {
            disk.flush().expect("flush");
        }
        if op[7] & 2 != 0 {
            disk.close().expect("close");
            drop(disk);
            disk = open(&work, true);
        }
    }
    assert!(
        read_all(&disk) == model,
        "merged view differs from the model before close"
    );
    disk.close().expect("close");
    drop(disk);
    let ro = open(&work, false);
    assert!(
        read_all(&ro) == model,
        "merged view differs from the model after reopen"
    );
    if vdiskfs_fuzz::seed_of(data) % 16 == 0 {
        // Now and then the full structural check of the written child.
        let problems = ro.layers()[0].check().expect("check");
        assert!(problems.is_empty(), "check after writes: {problems:?}");
    }
});
