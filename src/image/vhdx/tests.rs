//! VHDX reader and writer tests on files made by our own `create`, corrupted on purpose.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::create::{write_new, NewVhdx};
use super::header::HEADER_OFFSETS;
use super::region::REGION_TABLE_OFFSETS;
use super::Vhdx;
use crate::error::Error;
use crate::image::create_new_file;
use crate::layer::{Layer, OpenOptions, Run};

pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vdiskfs-test-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn new_base(path: &Path, size: u64, block: u32, lss: u32) {
    let n = NewVhdx {
        virtual_size: size,
        block_size: block,
        logical_sector_size: lss,
        physical_sector_size: 4096,
        parent_locator: None,
        virtual_disk_id: None,
    };
    create_new_file(path, |f| write_new(f, path, &n, "test")).unwrap();
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Re-checksum a 64 KiB region table after patching it.
fn fix_region_crc(path: &Path, off: u64) {
    let mut t = read(path, off, 64 << 10);
    t[4..8].fill(0);
    let c = crc32c::crc32c(&t);
    patch(path, off + 4, &c.to_le_bytes());
}

fn open_err(path: &Path) -> String {
    match Vhdx::open(path, OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains(&path.display().to_string()), "error names the file: {s}");
            assert!(!s.contains('\n'), "one line: {s}");
            s
        }
    }
}

const META: u64 = 2 << 20;
const ITEMS: u64 = META + (64 << 10);

#[test]
fn fresh_base_reads_zeros_and_reports_shape() {
    let d = TempDir::new("vhdx-fresh");
    let p = d.0.join("b.vhdx");
    new_base(&p, 10 << 20, 1 << 20, 4096);
    let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
    assert_eq!(v.virtual_size(), 10 << 20);
    assert_eq!(v.logical_sector_size(), 4096);
    let mut runs = Vec::new();
    v.map(0, 10 << 20, &mut runs).unwrap();
    assert_eq!(runs, vec![Run::Zero { len: 10 << 20 }]);
    let info = v.info().unwrap();
    assert_eq!(info.disk_type, "dynamic");
    assert_eq!(info.allocated_blocks, 0);
    assert_eq!(info.total_blocks, 10);
}

#[test]
fn bad_signature() {
    let d = TempDir::new("vhdx-sig");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    patch(&p, 0, b"XXXX");
    assert!(open_err(&p).contains("file type identifier"));
}

#[test]
fn one_bad_header_is_survivable_two_are_not() {
    let d = TempDir::new("vhdx-hdr");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    patch(&p, HEADER_OFFSETS[1] + 100, &[0xff]);
    let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
    assert!(v.info().unwrap().warnings.iter().any(|w| w.contains("checksum")));
    patch(&p, HEADER_OFFSETS[0] + 100, &[0xff]);
    let e = open_err(&p);
    assert!(e.contains("both VHDX headers are invalid"), "{e}");
    assert!(e.contains("checksum mismatch"), "{e}");
}

#[test]
fn region_table_problems() {
    let d = TempDir::new("vhdx-region");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    // An unknown required region (third entry) in both copies.
    for off in REGION_TABLE_OFFSETS {
        patch(&p, off + 8, &3u32.to_le_bytes());
        let e = off + 16 + 2 * 32;
        patch(&p, e, &[0x11; 16]);
        patch(&p, e + 16, &(16u64 << 20).to_le_bytes());
        patch(&p, e + 24, &(1u32 << 20).to_le_bytes());
        patch(&p, e + 28, &1u32.to_le_bytes());
        fix_region_crc(&p, off);
    }
    assert!(open_err(&p).contains("unknown required region"));
    // Both copies with bad checksums.
    for off in REGION_TABLE_OFFSETS {
        patch(&p, off + 200, &[0xee]);
    }
    assert!(open_err(&p).contains("region tables are invalid"));
}

#[test]
fn bad_metadata_values() {
    let cases: [(u64, Vec<u8>, &str); 4] = [
        (ITEMS, (3u32 << 20).to_le_bytes().to_vec(), "block size"),
        (ITEMS, (512u32 << 20).to_le_bytes().to_vec(), "block size"),
        (ITEMS + 32, 1000u32.to_le_bytes().to_vec(), "sector size 1000"),
        (ITEMS + 8, (65u64 << 40).to_le_bytes().to_vec(), "virtual disk size"),
    ];
    for (i, (off, bytes, want)) in cases.iter().enumerate() {
        let d = TempDir::new(&format!("vhdx-meta{i}"));
        let p = d.0.join("b.vhdx");
        new_base(&p, 4 << 20, 1 << 20, 512);
        patch(&p, *off, bytes);
        let e = open_err(&p);
        assert!(e.contains(want), "case {i}: {e}");
    }
}

#[test]
fn unknown_required_metadata_item() {
    let d = TempDir::new("vhdx-meta-unknown");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    // Change the Physical Sector Size item's GUID (entry 5 of the table) to an unknown one.
    patch(&p, META + 32 + 4 * 32, &[0x42; 16]);
    let e = open_err(&p);
    assert!(e.contains("unknown required metadata item"), "{e}");
    assert!(matches!(
        Vhdx::open(&p, OpenOptions::default()),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn bat_entry_past_end_of_file() {
    let d = TempDir::new("vhdx-bat");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    // Block 1 FULLY_PRESENT at 1000 MiB.
    let entry = (1000u64 << 20) | 6;
    patch(&p, (3 << 20) + 8, &entry.to_le_bytes());
    let e = open_err(&p);
    assert!(e.contains("block 1") && e.contains("outside the file"), "{e}");
    // A reserved state.
    patch(&p, (3 << 20) + 8, &4u64.to_le_bytes());
    assert!(open_err(&p).contains("reserved state"));
}

#[test]
fn truncated_file() {
    let d = TempDir::new("vhdx-trunc");
    let p = d.0.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(200 << 10).unwrap();
    let e = open_err(&p);
    assert!(e.contains("region"), "{e}");
}
