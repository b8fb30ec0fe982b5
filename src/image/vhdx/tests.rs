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
            assert!(
                s.contains(&path.display().to_string()),
                "error names the file: {s}"
            );
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
    assert!(v
        .info()
        .unwrap()
        .warnings
        .iter()
        .any(|w| w.contains("checksum")));
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
        (
            ITEMS + 32,
            1000u32.to_le_bytes().to_vec(),
            "sector size 1000",
        ),
        (
            ITEMS + 8,
            (65u64 << 40).to_le_bytes().to_vec(),
            "virtual disk size",
        ),
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
    assert!(
        e.contains("block 1") && e.contains("outside the file"),
        "{e}"
    );
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

/// A small deterministic PRNG (xorshift) so failures reproduce.
pub(crate) struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn open_disk(path: &Path, writable: bool) -> crate::disk::Disk {
    let chain = crate::chain::Chain::open(
        path,
        &crate::chain::ChainOptions {
            writable,
            ..Default::default()
        },
    )
    .unwrap();
    crate::disk::Disk::new(chain, crate::disk::DiskOptions::default())
}

fn read_all(disk: &crate::disk::Disk) -> Vec<u8> {
    let mut out = vec![0u8; disk.len() as usize];
    assert_eq!(disk.read_at(0, &mut out).unwrap(), out.len());
    out
}

/// Apply random writes (sector-aligned and not, straddling blocks) to `disk` and `model`.
pub(crate) fn random_writes(
    disk: &crate::disk::Disk,
    model: &mut [u8],
    rng: &mut Rng,
    n: usize,
    sector: u64,
) {
    let size = model.len() as u64;
    for i in 0..n {
        let (off, len) = match i % 4 {
            0 => (rng.below(size / sector) * sector, sector),
            1 => (rng.below(size / 4096) * 4096, 4096 * (1 + rng.below(8))),
            // Across a 1 MiB block boundary.
            2 => {
                let b = (1 + rng.below(size / (1 << 20) - 1)) << 20;
                (b - sector * (1 + rng.below(4)), sector * (2 + rng.below(8)))
            }
            _ => (rng.below(size - 10_000), 1 + rng.below(9_000)),
        };
        let len = len.min(size - off);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        assert_eq!(disk.write_at(off, &data).unwrap(), data.len());
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

#[test]
fn writes_to_base_and_child_match_a_model() {
    for lss in [512u32, 4096] {
        let d = TempDir::new("vhdx-write");
        let base = d.0.join("base.vhdx");
        let size = 24u64 << 20;
        new_base(&base, size, 1 << 20, lss);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0x1234_5678 + lss as u64);
        {
            let disk = open_disk(&base, true);
            random_writes(&disk, &mut model, &mut rng, 60, lss as u64);
            assert!(read_all(&disk) == model, "base before close");
            disk.flush().unwrap();
        }
        assert!(
            read_all(&open_disk(&base, false)) == model,
            "base after reopen"
        );
        let base_sum = std::fs::read(&base).unwrap();

        let child = d.0.join("child.avhdx");
        crate::commands::create::run(&crate::cli::CreateArgs {
            image: child.clone(),
            parent: Some(base.clone()),
            size: None,
            block_size: None,
            logical_sector_size: None,
            format: None,
        })
        .unwrap();
        {
            let disk = open_disk(&child, true);
            assert!(read_all(&disk) == model, "child sees the parent");
            random_writes(&disk, &mut model, &mut rng, 200, lss as u64);
            assert!(read_all(&disk) == model, "child before close");
        }
        let disk = open_disk(&child, false);
        assert!(read_all(&disk) == model, "child after reopen (lss {lss})");
        let info = disk.layers()[0].info().unwrap();
        assert!(info.allocated_blocks > 0);
        assert_eq!(info.log_state.as_deref(), Some("clean (no pending log)"));
        assert!(
            std::fs::read(&base).unwrap() == base_sum,
            "the parent never changes"
        );
    }
}
