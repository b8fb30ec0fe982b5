//! VHDX reader and writer tests on files made by our own `create`, corrupted on purpose.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::create::{write_new, NewVhdx};
use super::header::HEADER_OFFSETS;
use super::region::REGION_TABLE_OFFSETS;
use super::Vhdx;
use crate::error::{
    Defect, Error, Feature, Finding, HeaderProblem, RegionTableCopy, RegionTableProblem,
    VhdxDefect, Warning,
};
use crate::image::create_new_file;
use crate::layer::{Layer, OpenOptions, Run};

pub(crate) use crate::test_support::TempDir;

pub(crate) fn new_base(path: &Path, size: u64, block: u32, lss: u32) {
    let n = NewVhdx {
        virtual_size: size,
        block_size: block,
        logical_sector_size: lss,
        physical_sector_size: 4096,
        parent_locator: None,
        virtual_disk_id: None,
        fixed: false,
    };
    create_new_file(path, |f| write_new(f, path, &n, "test")).unwrap();
}

/// A differencing child of `parent` at `child` (block size as `--block-size` takes it,
/// default 2 MiB), made with the format's own API as `vdiskfs create --parent` makes
/// it. VHDX (VHD when `child` ends in .vhd or .avhd): the parent's size, sector sizes and disk
/// id, a locator with its DataWriteGuid, the relative path and the absolute path in
/// Win32 form on drive Z:.
pub(crate) fn new_child(child: &Path, parent: &Path, block_size: Option<&str>) {
    let block_size = block_size.map_or(2 << 20, |s| crate::cli::parse_size(s).unwrap()) as u32;
    if child.extension().is_some_and(|e| e == "vhd" || e == "avhd") {
        let p = crate::image::vhd::Vhd::open(parent, OpenOptions::read_only()).unwrap();
        crate::image::vhd::create::create_differencing(child, &p, block_size).unwrap();
        return;
    }
    let p = Vhdx::open(parent, OpenOptions::read_only()).unwrap();
    crate::image::vhdx::create::create_child(child, &p, block_size).unwrap();
}

pub(super) fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

pub(super) fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
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

/// `path` opened read-only, or writable (which replays a pending log into the file).
pub(crate) fn open_vhdx(path: &Path, writable: bool) -> Vhdx {
    let opts = OpenOptions {
        writable,
        ..OpenOptions::read_only()
    };
    Vhdx::open(path, opts).unwrap()
}

/// The error an open fails with, checked to be one line naming the file.
fn open_error(path: &Path) -> Error {
    match Vhdx::open(path, OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => {
            // Rendered-message checks, kept on purpose: the line the user reads names
            // the file and is one line.
            let s = e.to_string();
            assert!(
                s.contains(&path.display().to_string()),
                "error names the file: {s}"
            );
            assert!(!s.contains('\n'), "one line: {s}");
            e
        }
    }
}

/// The VHDX defect an open fails with.
pub(crate) fn open_defect(path: &Path) -> VhdxDefect {
    match open_error(path) {
        Error::Corrupt {
            defect: Defect::Vhdx(d),
            ..
        } => d,
        e => panic!("expected a VHDX defect: {e}"),
    }
}

/// The unsupported feature an open fails with.
pub(crate) fn open_feature(path: &Path) -> Feature {
    match open_error(path) {
        Error::Unsupported { feature, .. } => feature,
        e => panic!("expected an unsupported feature: {e}"),
    }
}

const META: u64 = 2 << 20;
const ITEMS: u64 = META + (64 << 10);

#[test]
fn fresh_base_reads_zeros_and_reports_shape() {
    let d = TempDir::new("vhdx-fresh");
    let p = d.join("b.vhdx");
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
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    patch(&p, 0, b"XXXX");
    assert_eq!(open_defect(&p), VhdxDefect::FileIdentifier);
}

#[test]
fn one_bad_header_is_survivable_two_are_not() {
    let d = TempDir::new("vhdx-hdr");
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    patch(&p, HEADER_OFFSETS[1] + 100, &[0xff]);
    let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
    assert!(v.info().unwrap().warnings.iter().any(|w| matches!(
        w,
        Warning::VhdxHeaderInvalid {
            copy: 2,
            problem: HeaderProblem::Checksum { .. }
        }
    )));
    patch(&p, HEADER_OFFSETS[0] + 100, &[0xff]);
    let e = open_defect(&p);
    assert!(
        matches!(
            e,
            VhdxDefect::BothHeaders {
                first: HeaderProblem::Checksum { .. },
                second: HeaderProblem::Checksum { .. }
            }
        ),
        "{e}"
    );
}

#[test]
fn region_table_problems() {
    let d = TempDir::new("vhdx-region");
    let p = d.join("b.vhdx");
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
    assert_eq!(
        open_feature(&p),
        Feature::VhdxRequiredRegion {
            id: uuid::Uuid::from_bytes_le([0x11; 16])
        }
    );
    // Both copies with bad checksums.
    for off in REGION_TABLE_OFFSETS {
        patch(&p, off + 200, &[0xee]);
    }
    let d = open_defect(&p);
    let VhdxDefect::BothRegionTables { problems } = &d else {
        panic!("{d}")
    };
    let checksum = |copy| move |p: &RegionTableCopy| matches!(p, RegionTableCopy::Invalid { copy: c, problem: RegionTableProblem::Checksum { .. }, .. } if *c == copy);
    assert_eq!(problems.len(), 2, "{d}");
    assert!(
        checksum(1)(&problems[0]) && checksum(2)(&problems[1]),
        "{d}"
    );
}

#[test]
fn bad_metadata_values() {
    let cases: [(u64, Vec<u8>, VhdxDefect); 4] = [
        (
            ITEMS,
            (3u32 << 20).to_le_bytes().to_vec(),
            VhdxDefect::BlockSize {
                block_size: 3 << 20,
            },
        ),
        (
            ITEMS,
            (512u32 << 20).to_le_bytes().to_vec(),
            VhdxDefect::BlockSize {
                block_size: 512 << 20,
            },
        ),
        (
            ITEMS + 32,
            1000u32.to_le_bytes().to_vec(),
            VhdxDefect::SectorSize {
                which: "logical",
                size: 1000,
            },
        ),
        (
            ITEMS + 8,
            (65u64 << 40).to_le_bytes().to_vec(),
            VhdxDefect::VirtualSize {
                size: 65 << 40,
                sector_size: 512,
            },
        ),
    ];
    for (i, (off, bytes, want)) in cases.iter().enumerate() {
        let d = TempDir::new(&format!("vhdx-meta{i}"));
        let p = d.join("b.vhdx");
        new_base(&p, 4 << 20, 1 << 20, 512);
        patch(&p, *off, bytes);
        assert_eq!(&open_defect(&p), want, "case {i}");
    }
}

#[test]
fn unknown_required_metadata_item() {
    let d = TempDir::new("vhdx-meta-unknown");
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    // Change the Physical Sector Size item's GUID (entry 5 of the table) to an unknown one.
    patch(&p, META + 32 + 4 * 32, &[0x42; 16]);
    assert_eq!(
        open_feature(&p),
        Feature::VhdxRequiredMetadata {
            id: uuid::Uuid::from_bytes_le([0x42; 16])
        }
    );
}

#[test]
fn bat_entry_past_end_of_file() {
    let d = TempDir::new("vhdx-bat");
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    // Block 1 FULLY_PRESENT at 1000 MiB.
    let entry = (1000u64 << 20) | 6;
    patch(&p, (3 << 20) + 8, &entry.to_le_bytes());
    assert!(matches!(
        open_defect(&p),
        VhdxDefect::BlockOutside { block: 1, offset, .. } if offset == 1000 << 20
    ));
    // A reserved state.
    patch(&p, (3 << 20) + 8, &4u64.to_le_bytes());
    assert_eq!(
        open_defect(&p),
        VhdxDefect::ReservedState { block: 1, state: 4 }
    );
}

#[test]
fn truncated_file() {
    let d = TempDir::new("vhdx-trunc");
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(200 << 10).unwrap();
    let e = open_defect(&p);
    assert!(matches!(e, VhdxDefect::BothRegionTables { .. }), "{e}");
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

/// The chain of `path`, its top opened for writing (`Intent::WriteTop`) or for reading
/// (`Intent::Inspect`).
pub(crate) fn open_chain(path: &Path, writable: bool) -> crate::chain::Chain {
    crate::chain::Chain::open(
        path,
        &crate::chain::ChainOptions {
            intent: if writable {
                crate::chain::Intent::WriteTop
            } else {
                crate::chain::Intent::Inspect
            },
            ..Default::default()
        },
    )
    .unwrap()
}

/// `open_chain` as a `Disk` with the default cache.
pub(crate) fn open_disk(path: &Path, writable: bool) -> crate::disk::Disk {
    crate::disk::Disk::new(
        open_chain(path, writable),
        crate::disk::DiskOptions::default(),
    )
}

pub(crate) fn read_all(disk: &crate::disk::Disk) -> Vec<u8> {
    let mut out = vec![0u8; disk.len() as usize];
    assert_eq!(disk.read_at(0, &mut out).unwrap(), out.len());
    out
}

/// A torn sequence checked at every cut: `attempt(Some(cut))` redoes the sequence on
/// `work` with every write after the first `cut` failing, for each `cut` up to `total`;
/// then `work`, reopened read-only and writable, holds in every sector what `old` or
/// `new` hold there (or zeros, where `may_be_zeros(byte offset)`), and its top checks
/// clean.
pub(crate) fn assert_every_cut_leaves_old_or_new(
    ext: &str,
    work: &Path,
    total: usize,
    attempt: impl Fn(Option<usize>) -> usize,
    old: &[u8],
    new: &[u8],
    may_be_zeros: impl Fn(usize) -> bool,
) {
    for cut in 0..=total {
        attempt(Some(cut));
        for writable in [false, true] {
            let disk = open_disk(work, writable);
            let got = read_all(&disk);
            for s in (0..old.len()).step_by(512) {
                let g = &got[s..s + 512];
                assert!(
                    g == &old[s..s + 512]
                        || g == &new[s..s + 512]
                        || (may_be_zeros(s) && g.iter().all(|&x| x == 0)),
                    "{ext}: cut after {cut} of {total} writes (writable reopen {writable}): sector {} is neither old nor new",
                    s / 512
                );
            }
            let problems = disk.layers()[0].check().unwrap();
            assert!(problems.is_empty(), "{ext}: cut {cut}: {problems:?}");
            disk.close().unwrap();
        }
    }
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
        let base = d.join("base.vhdx");
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

        let child = d.join("child.avhdx");
        new_child(&child, &base, None);
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

fn run(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn qemu_raw(img: &Path, out: &Path) -> Vec<u8> {
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(out));
    std::fs::read(out).unwrap()
}

/// A qemu-made dynamic VHDX with data, given a pending log that changes one data page and
/// turns block 2 into a ZERO block. Returns (path, expected merged view).
fn pending_log_file(d: &TempDir) -> (PathBuf, Vec<u8>) {
    let raw = d.join("in.raw");
    let mut data = vec![0u8; 8 << 20];
    Rng(99).fill(&mut data);
    std::fs::write(&raw, &data).unwrap();
    let img = d.join("p.vhdx");
    run(std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
        ])
        .arg(&raw)
        .arg(&img));
    let v = Vhdx::open(&img, OpenOptions::default()).unwrap();
    // Where virtual offset 5 MiB + 8 KiB lives in the file, and block 2's BAT page.
    let mut runs = Vec::new();
    v.map((5 << 20) + 8192, 4096, &mut runs).unwrap();
    let Run::Held { file_offset, .. } = runs[0] else {
        panic!("block 5 should be allocated: {runs:?}")
    };
    let bat_off = v.regions.bat.file_offset;
    drop(v);
    let mut bat_page = read(&img, bat_off, 4096);
    // Block 2 is BAT index 2 (chunk ratio is 4096 here): state ZERO.
    bat_page[16..24].copy_from_slice(&2u64.to_le_bytes());
    let new_data = vec![0xabu8; 4096];
    super::log::testutil::make_pending_log_test_file(
        &img,
        &[(file_offset, new_data.clone()), (bat_off, bat_page)],
    )
    .unwrap();
    let mut expected = data;
    let o = (5 << 20) + 8192;
    expected[o..o + 4096].copy_from_slice(&new_data);
    expected[2 << 20..3 << 20].fill(0);
    (img, expected)
}

#[test]
fn pending_log_read_only_replays_in_memory_and_never_writes() {
    let d = TempDir::new("vhdx-log-ro");
    let (img, expected) = pending_log_file(&d);
    let before = std::fs::read(&img).unwrap();
    let meta_before = std::fs::metadata(&img).unwrap().modified().unwrap();
    let disk = open_disk(&img, false);
    assert!(
        read_all(&disk) == expected,
        "in-memory replay gives the logged state"
    );
    let info = disk.layers()[0].info().unwrap();
    assert!(info.log_state.unwrap().contains("replayed in memory"));
    drop(disk);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only open never writes"
    );
    assert_eq!(
        std::fs::metadata(&img).unwrap().modified().unwrap(),
        meta_before
    );
    // qemu replays the log on a writable open (check -r all): it must agree with us.
    let q = d.join("q.vhdx");
    std::fs::copy(&img, &q).unwrap();
    run(std::process::Command::new("qemu-img")
        .args(["check", "-r", "all"])
        .arg(&q));
    assert!(qemu_raw(&q, &d.join("q.raw")) == expected, "qemu agrees");
}

#[test]
fn pending_log_writable_open_replays_to_the_file() {
    let d = TempDir::new("vhdx-log-rw");
    let (img, expected) = pending_log_file(&d);
    {
        let disk = open_disk(&img, true);
        assert!(read_all(&disk) == expected);
        disk.close().unwrap();
    }
    // The log is gone from the header and the file itself holds the replayed state.
    let v = Vhdx::open(&img, OpenOptions::default()).unwrap();
    assert!(v.header().log_guid.is_nil());
    assert!(v.info().unwrap().log_state.unwrap().starts_with("clean"));
    drop(v);
    run(std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&img));
    assert!(
        qemu_raw(&img, &d.join("q.raw")) == expected,
        "qemu reads our replayed file"
    );
}

#[test]
fn check_reports_damage_instead_of_failing() {
    let d = TempDir::new("vhdx-check");
    let p = d.join("b.vhdx");
    new_base(&p, 4 << 20, 1 << 20, 512);
    let args = |json| crate::cli::CheckArgs {
        image: p.clone(),
        json,
        azure: false,
        chain: crate::cli::ChainArgs {
            search_dirs: vec![],
            parents: vec![],
            ignore_linkage: false,
            allow_device_parent: false,
        },
    };
    assert_eq!(crate::commands::check::run(&args(true)).unwrap(), 0);
    // Block 1 FULLY_PRESENT far past the end of the file: damage, exit code 2.
    patch(&p, (3 << 20) + 8, &((1000u64 << 20) | 6).to_le_bytes());
    assert_eq!(crate::commands::check::run(&args(true)).unwrap(), 2);
    // One header copy damaged: reported too.
    new_base(&d.join("c.vhdx"), 4 << 20, 1 << 20, 512);
    let c = d.join("c.vhdx");
    patch(&c, HEADER_OFFSETS[0] + 200, &[1]);
    let v = Vhdx::open(&c, OpenOptions::default()).unwrap();
    assert!(v.check_structure().unwrap().iter().any(|f| matches!(
        f,
        Finding::Warning(Warning::VhdxHeaderInvalid { copy: 1, .. })
    )));
}

/// Two chunks sharing one sector bitmap block: the second load is refused (memory for
/// bitmaps stays bounded by the file's size), never a second 1 MiB copy.
#[test]
fn shared_sector_bitmap_block_is_refused() {
    let d = TempDir::new("vhdx-shared-sb");
    let base = d.join("base.vhdx");
    new_base(&base, 9 << 30, 2 << 20, 512);
    let child = d.join("child.vhdx");
    new_child(&child, &base, None);
    {
        let disk = open_disk(&child, true);
        disk.write_at(0, &[9u8; 512]).unwrap();
        disk.close().unwrap();
    }
    let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
    let (cr, bat_off) = (v.bat.chunk_ratio, v.regions.bat.file_offset);
    let sb0 = v.bat.get(&v.file, v.bat.bitmap_index(0)).unwrap();
    let blk0 = v.bat.get(&v.file, v.bat.payload_index(0)).unwrap();
    drop(v);
    // Chunk 1 gets chunk 0's bitmap block, and its first block chunk 0's payload block.
    patch(&child, bat_off + (cr + cr + 1) * 8, &sb0.to_le_bytes());
    patch(&child, bat_off + (cr + 1) * 8, &blk0.to_le_bytes());
    let disk = open_disk_result(&child);
    let mut buf = vec![0u8; 512];
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 512]);
    let e = disk.read_at(cr * (2 << 20), &mut buf).unwrap_err();
    assert!(
        matches!(
            e.defect(),
            Some(Defect::Vhdx(VhdxDefect::BitmapShared { chunk: 1, offset })) if *offset == sb0 & !0xfffff
        ),
        "{e}"
    );
}

fn open_disk_result(path: &Path) -> crate::disk::Disk {
    let chain = crate::chain::Chain::open(path, &crate::chain::ChainOptions::default());
    match chain {
        Ok(c) => crate::disk::Disk::new(c, crate::disk::DiskOptions::default()),
        Err(e) => panic!("open: {e}"),
    }
}

/// A host disk that fills up: writes fail with ENOSPC, the file stays consistent, and
/// every write acknowledged by a successful flush is there after reopening.
#[test]
fn full_host_disk_gives_enospc_and_keeps_the_file_consistent() {
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        eprintln!("SKIPPED: needs root to mount a small tmpfs");
        return;
    }
    let d = TempDir::new("vhdx-enospc");
    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    run(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&small));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _g = Umount(small.clone());
    for ext in ["vhdx", "vhd"] {
        let base = small.join(format!("base.{ext}"));
        if ext == "vhdx" {
            new_base(&base, 64 << 20, 1 << 20, 512);
        } else {
            crate::image::vhd::create::create_dynamic(&base, 64 << 20, 1 << 20).unwrap();
        }
        let child = small.join(format!("child.{ext}"));
        new_child(&child, &base, Some("1M"));
        let mut model = vec![0u8; 64 << 20];
        let mut acked = model.clone();
        let mut rng = Rng(4242);
        let mut hit_enospc = false;
        {
            let disk = open_disk(&child, true);
            for i in 0..200u64 {
                let off = (i * 3 % 64) << 20;
                let mut buf = vec![0u8; 256 << 10];
                rng.fill(&mut buf);
                match disk.write_at(off, &buf) {
                    Ok(_) => model[off as usize..off as usize + buf.len()].copy_from_slice(&buf),
                    Err(e) => {
                        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                        hit_enospc = true;
                        break;
                    }
                }
                if i % 4 == 3 {
                    match disk.flush() {
                        Ok(()) => acked.copy_from_slice(&model),
                        Err(e) => {
                            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                            hit_enospc = true;
                            break;
                        }
                    }
                }
            }
            let _ = disk.close();
        }
        assert!(hit_enospc, "{ext}: the 12 MiB tmpfs should fill up");
        let v = crate::image::open_layer(&child, OpenOptions::default(), false).unwrap();
        assert!(v.check().unwrap().is_empty(), "{ext}: no damage");
        drop(v);
        let got = read_all(&open_disk(&child, false));
        // Every byte is either what the last successful flush acknowledged or a later write.
        for (i, (g, (a, m))) in got.iter().zip(acked.iter().zip(&model)).enumerate() {
            assert!(
                g == a || g == m,
                "{ext} byte {i}: got {g}, acknowledged {a}, later {m}"
            );
        }
        for f in [&child, &base] {
            std::fs::remove_file(f).unwrap();
        }
    }
}

/// Torn sequences: a write that allocates (new block, new sector bitmap, log entry,
/// header updates; VHD: footer, bitmap + data, BAT) is cut after every single file write
/// of its sequence. Each cut must leave a file that opens, checks clean (after the
/// pending log, if any, is replayed), and holds either the old or the new content of
/// every written sector, never anything else; a writable reopen (which replays the log)
/// must agree with the read-only view.
#[test]
fn a_crash_after_any_write_of_an_allocation_leaves_old_or_new() {
    use crate::image::crash_sim;
    for ext in ["vhdx", "vhd"] {
        let d = TempDir::new(&format!("torn-{ext}"));
        let base = d.join(format!("base.{ext}"));
        let size = 8u64 << 20;
        if ext == "vhdx" {
            new_base(&base, size, 1 << 20, 512);
        } else {
            crate::image::vhd::create::create_dynamic(&base, size, 1 << 20).unwrap();
        }
        let mut old = vec![0u8; size as usize];
        Rng(5).fill(&mut old);
        {
            let disk = open_disk(&base, true);
            disk.write_at(0, &old).unwrap();
            disk.close().unwrap();
        }
        let template = d.join(format!("template.{ext}"));
        new_child(&template, &base, Some("1M"));
        // The writes: 3 sectors in block 2, 8 KiB across the end of block 5, 4 KiB in
        // block 7 (VHD: a new reservation that close gives back in part), and 4 KiB more
        // in block 2 (in place, new sectors present: a bitmap change).
        let writes: [(u64, usize); 4] = [
            ((2 << 20) + 4096, 1536),
            ((6 << 20) - 4096, 8192),
            ((7 << 20) + 8192, 4096),
            ((2 << 20) + 65536, 4096),
        ];
        let mut new = old.clone();
        let mut rng = Rng(6);
        let datas: Vec<Vec<u8>> = writes
            .iter()
            .map(|&(off, len)| {
                let mut v = vec![0u8; len];
                rng.fill(&mut v);
                new[off as usize..off as usize + len].copy_from_slice(&v);
                v
            })
            .collect();
        let work = d.join(format!("child.{ext}"));
        let attempt = |limit: Option<usize>| -> usize {
            let _ = std::fs::remove_file(&work);
            std::fs::copy(&template, &work).unwrap();
            crash_sim::fail_after(limit);
            {
                let disk = open_disk(&work, true);
                for ((off, _), data) in writes.iter().zip(&datas) {
                    if disk.write_at(*off, data).is_err() {
                        break;
                    }
                }
                let _ = disk.flush();
                let _ = disk.close();
            }
            let n = crash_sim::writes();
            crash_sim::fail_after(None);
            n
        };
        let total = attempt(None);
        eprintln!("{ext}: {total} writes in the sequence");
        assert!(
            total >= 10,
            "{ext}: the sequence has several writes ({total})"
        );
        assert_every_cut_leaves_old_or_new(ext, &work, total, attempt, &old, &new, |_| false);
        // With no cut, everything is new.
        attempt(None);
        assert!(
            read_all(&open_disk(&work, false)) == new,
            "{ext}: complete write"
        );
    }
}

/// Review finding: log entries of mixed sizes (an fsync of a few pages, then automatic
/// commits) once made the ring writer refuse every further entry, losing all writes
/// after it. Hundreds of commits of varying size must all land.
#[test]
fn log_entries_of_mixed_sizes_never_get_stuck() {
    let d = TempDir::new("vhdx-logwrap");
    let base = d.join("base.vhdx");
    new_base(&base, 12 << 30, 1 << 20, 512);
    let child = d.join("child.vhdx");
    new_child(&child, &base, Some("1M"));
    let mut rng = Rng(31);
    let mut written = Vec::new();
    {
        let disk = open_disk(&child, true);
        for i in 0..700u64 {
            // Every write lands in a new block 16 MiB apart: one BAT page + bitmap page
            // churn per write, commits of every size.
            let off = (i * 16 + rng.below(16)) << 20;
            let mut buf = vec![0u8; 4096];
            rng.fill(&mut buf);
            disk.write_at(off, &buf).unwrap();
            written.push((off, buf));
            if rng.below(40) == 0 {
                disk.flush().unwrap();
            }
        }
        disk.close().unwrap();
    }
    let disk = open_disk(&child, false);
    for (off, buf) in &written {
        let mut got = vec![0u8; 4096];
        disk.read_at(*off, &mut got).unwrap();
        assert!(got == *buf, "write at {off} lost");
    }
    assert!(disk.layers()[0].check().unwrap().is_empty());
}

/// Review finding: a NOT_PRESENT block whose chunk bitmap still has bits set (a file
/// from elsewhere) must not expose those sectors when the block is first written: only
/// the written sectors come from the child, the rest still from the parent.
#[test]
fn stale_bitmap_bits_of_an_absent_block_are_cleared_on_allocation() {
    let d = TempDir::new("vhdx-stalebits");
    let base = d.join("base.vhdx");
    new_base(&base, 16 << 20, 1 << 20, 512);
    let mut parent = vec![0u8; 16 << 20];
    Rng(8).fill(&mut parent);
    {
        let disk = open_disk(&base, true);
        disk.write_at(0, &parent).unwrap();
        disk.close().unwrap();
    }
    let child = d.join("child.vhdx");
    new_child(&child, &base, Some("1M"));
    {
        let disk = open_disk(&child, true);
        disk.write_at(0, &[1u8; 512]).unwrap();
        disk.close().unwrap();
    }
    // Set every bit of block 3's range in the on-disk bitmap; block 3 stays NOT_PRESENT.
    let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
    let sb = super::bat::file_offset(v.bat.get(&v.file, v.bat.bitmap_index(0)).unwrap());
    drop(v);
    let spb = (1u64 << 20) / 512;
    patch(&child, sb + 3 * spb / 8, &vec![0xffu8; (spb / 8) as usize]);
    assert!(read_all(&open_disk(&child, false))[3 << 20..4 << 20] == parent[3 << 20..4 << 20]);
    {
        let disk = open_disk(&child, true);
        disk.write_at((3 << 20) + 4096, &[2u8; 512]).unwrap();
        disk.close().unwrap();
    }
    let got = read_all(&open_disk(&child, false));
    let mut want = parent.clone();
    want[..512].fill(1);
    want[(3 << 20) + 4096..(3 << 20) + 4608].fill(2);
    assert!(got == want, "only written sectors come from the child");
}

/// Review finding: Linux reports a writeback error once. After a failed fdatasync no
/// metadata may be committed (it could point at lost data), so the writer refuses every
/// later write, flush and close, in both formats, even once syncs work again.
#[test]
fn a_failed_fdatasync_poisons_the_writer() {
    use crate::image::crash_sim;
    for ext in ["vhdx", "vhd"] {
        let d = TempDir::new(&format!("poison-{ext}"));
        let base = d.join(format!("base.{ext}"));
        if ext == "vhdx" {
            new_base(&base, 8 << 20, 1 << 20, 512);
        } else {
            crate::image::vhd::create::create_dynamic(&base, 8 << 20, 1 << 20).unwrap();
        }
        let disk = open_disk(&base, true);
        disk.write_at(0, &[1u8; 4096]).unwrap();
        disk.flush().unwrap();
        disk.write_at(1 << 20, &[2u8; 4096]).unwrap();
        crash_sim::fail_sync(true);
        let e = disk.flush().unwrap_err();
        crash_sim::fail_sync(false);
        assert_eq!(e.errno(), libc::EIO, "{ext}: {e}");
        assert!(disk.flush().is_err(), "{ext}: flush after a failed sync");
        assert!(
            disk.write_at(2 << 20, &[3u8; 4096]).is_err(),
            "{ext}: write after it"
        );
        assert!(disk.close().is_err(), "{ext}: close after it");
        drop(disk);
        // What was flushed before the failure is there; the file is sound.
        let disk = open_disk(&base, false);
        let mut b = vec![0u8; 4096];
        disk.read_at(0, &mut b).unwrap();
        assert_eq!(b, vec![1u8; 4096], "{ext}");
        assert!(disk.layers()[0].check().unwrap().is_empty(), "{ext}");
    }
}

/// Marked 1 MiB extents of a base spread over its chunks, read back through a child.
fn base_with_marks(base: &Path, size: u64, lss: u32, marks: &[u64]) -> Vec<Vec<u8>> {
    new_base(base, size, 2 << 20, lss);
    let disk = open_disk(base, true);
    let mut rng = Rng(77);
    let data: Vec<Vec<u8>> = marks
        .iter()
        .map(|&off| {
            let mut b = vec![0u8; 1 << 20];
            rng.fill(&mut b);
            disk.write_at(off, &b).unwrap();
            b
        })
        .collect();
    disk.close().unwrap();
    data
}

fn read_at_disk(disk: &crate::disk::Disk, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    assert_eq!(disk.read_at(off, &mut b).unwrap(), len);
    b
}

/// The sector bitmap entry of every chunk of `v`.
fn sb_entries(v: &Vhdx) -> Vec<u64> {
    (0..v.bat.bitmap_blocks)
        .map(|c| v.bat.get(&v.file, v.bat.bitmap_index(c)).unwrap())
        .collect()
}

/// Issue 10: `create` gives every chunk of a differencing file its own SB_BLOCK_PRESENT
/// sector bitmap block, all zeros, after the BAT, as a hole (no disk space), so readers
/// that do not honour SB_BLOCK_NOT_PRESENT (libvhdi) read the parent's data.
#[test]
fn create_gives_every_chunk_of_a_child_a_present_zero_sector_bitmap() {
    use super::bat::{file_offset, state, SB_BLOCK_PRESENT};
    use std::os::unix::fs::MetadataExt;
    const GIB: u64 = 1 << 30;
    // 512-byte sectors: 4 GiB chunks, 3 of them (the last partial); 4096: 32 GiB, 2.
    for (lss, size, chunks) in [(512u32, 9 * GIB, 3u64), (4096, 33 * GIB, 2)] {
        let d = TempDir::new(&format!("vhdx-sb-{lss}"));
        let base = d.join("base.vhdx");
        let chunk = (1u64 << 23) * lss as u64;
        let marks: Vec<u64> = (0..chunks).map(|c| c * chunk + (3 << 20)).collect();
        let data = base_with_marks(&base, size, lss, &marks);
        let child = d.join("child.vhdx");
        new_child(&child, &base, None);
        let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
        assert_eq!(v.bat.bitmap_blocks, chunks);
        let bat_end = v.regions.bat.end();
        let len = v.file.len();
        assert_eq!(len, bat_end + chunks * (1 << 20), "{lss}: file length");
        for (c, e) in sb_entries(&v).into_iter().enumerate() {
            assert_eq!(state(e), SB_BLOCK_PRESENT, "{lss}: chunk {c}");
            assert_eq!(
                file_offset(e),
                bat_end + c as u64 * (1 << 20),
                "{lss}: chunk {c}"
            );
            assert!(
                read(&child, file_offset(e), 1 << 20)
                    .iter()
                    .all(|&b| b == 0),
                "{lss}: bitmap of chunk {c} is all zeros"
            );
        }
        assert!(v.check().unwrap().is_empty(), "{lss}: {:?}", v.check());
        drop(v);
        // The bitmap blocks were never written: they take no disk space.
        let allocated = std::fs::metadata(&child).unwrap().blocks() * 512;
        assert!(
            allocated <= bat_end,
            "{lss}: {allocated} bytes allocated, the BAT ends at {bat_end}"
        );
        let disk = open_disk(&child, false);
        for (off, want) in marks.iter().zip(&data) {
            assert!(
                read_at_disk(&disk, *off, 1 << 20) == *want,
                "{lss} at {off}"
            );
        }
    }
}

/// Writes into a fresh child use the bitmap block `create` made: no second one, the
/// sector bitmap entries do not change, the file grows by the payload block only.
#[test]
fn writes_into_a_fresh_child_use_its_bitmap_blocks() {
    const GIB: u64 = 1 << 30;
    let d = TempDir::new("vhdx-sb-write");
    let base = d.join("base.vhdx");
    let marks = [3 << 20, 4 * GIB + (3 << 20)];
    let data = base_with_marks(&base, 9 * GIB, 512, &marks);
    let child = d.join("child.vhdx");
    new_child(&child, &base, None);
    let (before, len_before) = {
        let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
        (sb_entries(&v), v.file.len())
    };
    // 4 KiB in the middle of chunk 1's mark (block 2 of chunk 1, 2 MiB blocks).
    let at = 4 * GIB + (3 << 20) + (512 << 10);
    {
        let disk = open_disk(&child, true);
        disk.write_at(at, &[0x5a; 4096]).unwrap();
        disk.close().unwrap();
    }
    let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
    assert_eq!(sb_entries(&v), before, "sector bitmap entries unchanged");
    assert_eq!(
        v.file.len(),
        len_before + (2 << 20),
        "one payload block added"
    );
    assert!(v.check().unwrap().is_empty(), "{:?}", v.check());
    drop(v);
    let disk = open_disk(&child, false);
    let mut want = data[1].clone();
    want[512 << 10..(512 << 10) + 4096].fill(0x5a);
    assert!(read_at_disk(&disk, marks[1], 1 << 20) == want);
    assert!(read_at_disk(&disk, marks[0], 1 << 20) == data[0]);
}

/// A child from another tool, with SB_BLOCK_NOT_PRESENT entries (MS-VHDX needs a bitmap
/// block only for chunks with PARTIALLY_PRESENT blocks): read from the parent, and a
/// first write gives the chunk a bitmap block of its own.
#[test]
fn a_child_without_bitmap_blocks_reads_and_writes() {
    use super::bat::{file_offset, state, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT};
    const GIB: u64 = 1 << 30;
    let d = TempDir::new("vhdx-sb-foreign");
    let base = d.join("base.vhdx");
    let marks = [3 << 20, 4 * GIB + (3 << 20), 8 * GIB + (3 << 20)];
    let data = base_with_marks(&base, 9 * GIB, 512, &marks);
    let child = d.join("child.vhdx");
    new_child(&child, &base, None);
    let (bat_off, indexes) = {
        let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
        let idx: Vec<u64> = (0..3).map(|c| v.bat.bitmap_index(c)).collect();
        (v.regions.bat.file_offset, idx)
    };
    for &i in &indexes {
        patch(&child, bat_off + i * 8, &0u64.to_le_bytes());
    }
    let disk = open_disk(&child, false);
    for (off, want) in marks.iter().zip(&data) {
        assert!(read_at_disk(&disk, *off, 1 << 20) == *want, "at {off}");
    }
    drop(disk);
    let len_before = std::fs::metadata(&child).unwrap().len();
    let at = 8 * GIB + (3 << 20) + 4096;
    {
        let disk = open_disk(&child, true);
        disk.write_at(at, &[7u8; 512]).unwrap();
        disk.close().unwrap();
    }
    let v = Vhdx::open(&child, OpenOptions::default()).unwrap();
    let sb = sb_entries(&v);
    assert_eq!(state(sb[0]), SB_BLOCK_NOT_PRESENT);
    assert_eq!(state(sb[1]), SB_BLOCK_NOT_PRESENT);
    assert_eq!(state(sb[2]), SB_BLOCK_PRESENT);
    assert!(
        file_offset(sb[2]) >= len_before,
        "a new bitmap block at the end"
    );
    assert!(v.check().unwrap().is_empty(), "{:?}", v.check());
    drop(v);
    let disk = open_disk(&child, false);
    let mut want = data[2].clone();
    want[4096..4608].fill(7);
    assert!(read_at_disk(&disk, marks[2], 1 << 20) == want);
    assert!(read_at_disk(&disk, marks[1], 1 << 20) == data[1]);
}

/// The structural-rewrite primitive (`commit_pages`): one log entry, all or nothing at
/// every cut; FileWriteGuid changes, DataWriteGuid only when the content does.
#[test]
fn commit_pages_is_all_or_nothing_and_keeps_data_write_guid() {
    use crate::image::crash_sim;
    let d = TempDir::new("commit-pages");
    let template = d.join("template.vhdx");
    new_base(&template, 8 << 20, 1 << 20, 512);
    let before = Vhdx::open(&template, OpenOptions::read_only())
        .unwrap()
        .header();
    let work = d.join("work.vhdx");
    // Two pages in space allocated for the purpose: an all-or-nothing pair.
    let attempt = |limit: Option<usize>, data_changes: bool| -> (Option<u64>, usize) {
        let _ = std::fs::remove_file(&work);
        std::fs::copy(&template, &work).unwrap();
        crash_sim::fail_after(limit);
        let mut at = None;
        {
            let v = Vhdx::open(&work, OpenOptions::writable()).unwrap();
            if let Ok(off) = v.allocate_space(8192) {
                at = Some(off);
                let pages = vec![(off, vec![0xAB; 4096]), (off + 4096, vec![0xCD; 4096])];
                let _ = v.commit_pages(&pages, data_changes);
            }
            let _ = v.close();
        }
        let n = crash_sim::writes();
        crash_sim::fail_after(None);
        (at, n)
    };
    let (off, total) = attempt(None, false);
    let off = off.unwrap();
    let after = Vhdx::open(&work, OpenOptions::read_only())
        .unwrap()
        .header();
    assert_ne!(after.file_write_guid, before.file_write_guid);
    assert_eq!(after.data_write_guid, before.data_write_guid);
    assert_eq!(read(&work, off, 8192)[..4096], [0xAB; 4096]);
    attempt(None, true);
    let after = Vhdx::open(&work, OpenOptions::read_only())
        .unwrap()
        .header();
    assert_ne!(after.data_write_guid, before.data_write_guid);
    assert!(total >= 5, "several writes ({total})");
    for cut in 0..=total {
        attempt(Some(cut), false);
        for writable in [false, true] {
            let v = open_vhdx(&work, writable);
            let mut got = vec![0u8; 8192];
            let _ = v.file().read_exact_at(&mut got, off);
            let old = got.iter().all(|&b| b == 0);
            let new =
                got[..4096].iter().all(|&b| b == 0xAB) && got[4096..].iter().all(|&b| b == 0xCD);
            assert!(
                old || new,
                "cut {cut} of {total} (writable {writable}): a mix"
            );
            assert!(v.check().unwrap().is_empty(), "cut {cut}");
            v.close().unwrap();
        }
    }
}
