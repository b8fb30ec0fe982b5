//! Hostile VHDX files: every number an image gives that could size an allocation, a loop
//! or a read is bounded, and overlapping structures are refused or reported (never read
//! as disk data). One crafted image per bound; see docs/security.md.

use std::path::Path;

use uuid::Uuid;

use super::bat::{make_entry, PAYLOAD_BLOCK_FULLY_PRESENT, SB_BLOCK_PRESENT};
use super::header::{Header, HEADER_OFFSETS};
use super::log::MAX_REPLAY_LOG_LENGTH;
use super::metadata::{MAX_VIRTUAL_SIZE, VIRTUAL_DISK_SIZE};
use super::region::REGION_TABLE_OFFSETS;
use super::tests::{new_base, open_defect, open_feature, patch, read, TempDir};
use super::Vhdx;
use crate::error::{Error, Feature, Finding, VhdxArea, VhdxDefect};
use crate::image::vhdx::metadata::FILE_PARAMETERS;
use crate::layer::{Layer, OpenOptions, Run};

const MIB: u64 = 1 << 20;
/// Where our `create` puts things.
const META: u64 = 2 * MIB;
const BAT: u64 = 3 * MIB;

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Rewrite both headers from the current one after `edit`, with valid checksums.
fn edit_headers(path: &Path, edit: impl Fn(&mut Header)) {
    let mut h = Header::parse(&read(path, HEADER_OFFSETS[1], 4096)).unwrap();
    edit(&mut h);
    for off in HEADER_OFFSETS {
        patch(path, off, &h.to_bytes());
    }
}

/// Rewrite both region tables after `edit` (of the 64 KiB table), with valid checksums.
fn edit_regions(path: &Path, edit: impl Fn(&mut [u8])) {
    let mut t = read(path, REGION_TABLE_OFFSETS[0], 64 << 10);
    edit(&mut t);
    t[4..8].fill(0);
    let c = crc32c::crc32c(&t);
    t[4..8].copy_from_slice(&c.to_le_bytes());
    for off in REGION_TABLE_OFFSETS {
        patch(path, off, &t);
    }
}

/// (table entry offset, absolute data offset, length) of a metadata item.
fn meta_item(path: &Path, id: Uuid) -> (u64, u64, u32) {
    let t = read(path, META, 64 << 10);
    let count = u16::from_le_bytes([t[10], t[11]]) as usize;
    for i in 0..count {
        let e = 32 + i * 32;
        if Uuid::from_bytes_le(t[e..e + 16].try_into().unwrap()) == id {
            let off = u32::from_le_bytes(t[e + 16..e + 20].try_into().unwrap());
            let len = u32::from_le_bytes(t[e + 20..e + 24].try_into().unwrap());
            return (META + e as u64, META + off as u64, len);
        }
    }
    panic!("item {id} not found");
}

fn set_virtual_size(path: &Path, size: u64) {
    let (_, at, _) = meta_item(path, VIRTUAL_DISK_SIZE);
    patch(path, at, &size.to_le_bytes());
}

fn set_block_size(path: &Path, bs: u32) {
    let (_, at, _) = meta_item(path, FILE_PARAMETERS);
    patch(path, at, &bs.to_le_bytes());
}

fn set_bat_region_length(path: &Path, len: u32) {
    edit_regions(path, |t| {
        // Our create writes the BAT entry first.
        t[16 + 24..16 + 28].copy_from_slice(&len.to_le_bytes());
    });
}

fn set_bat(path: &Path, index: u64, entry: u64) {
    patch(path, BAT + index * 8, &entry.to_le_bytes());
}

fn open(path: &Path) -> crate::error::Result<Vhdx> {
    Vhdx::open(path, OpenOptions::default())
}

pub(super) fn base(d: &TempDir, name: &str, size: u64, block: u32) -> std::path::PathBuf {
    let p = d.join(name);
    new_base(&p, size, block, 512);
    p
}

/// A 512-byte-sector base in `d` refused for each of `sizes` as its virtual size.
fn assert_virtual_sizes_refused(d: &TempDir, sizes: &[u64]) {
    let p = base(d, "b.vhdx", 4 * MIB, MIB as u32);
    for &size in sizes {
        set_virtual_size(&p, size);
        assert_eq!(
            open_defect(&p),
            VhdxDefect::VirtualSize {
                size,
                sector_size: 512
            }
        );
    }
}

#[test]
fn virtual_size_beyond_64_tib_is_refused() {
    let d = TempDir::new("bounds-vsize");
    assert_virtual_sizes_refused(&d, &[MAX_VIRTUAL_SIZE + 512, u64::MAX - 511, 1 << 63]);
}

#[test]
fn virtual_size_not_a_sector_multiple_is_refused() {
    let d = TempDir::new("bounds-vsize-odd");
    assert_virtual_sizes_refused(&d, &[4 * MIB + 1, 4 * MIB - 100, 511]);
    let p4 = d.join("b4.vhdx");
    new_base(&p4, 4 * MIB, MIB as u32, 4096);
    set_virtual_size(&p4, 4 * MIB + 512);
    assert_eq!(
        open_defect(&p4),
        VhdxDefect::VirtualSize {
            size: 4 * MIB + 512,
            sector_size: 4096
        }
    );
}

#[test]
fn bat_larger_than_its_region_or_the_file_is_refused() {
    let d = TempDir::new("bounds-bat");
    // 64 TiB in 1 MiB blocks needs a 512 MiB BAT; the file's BAT region is 1 MiB.
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    set_virtual_size(&p, MAX_VIRTUAL_SIZE);
    let e = open_defect(&p);
    assert!(
        matches!(e, VhdxDefect::BatSize { length, need, .. } if length == MIB && need > 512 * MIB),
        "{e}"
    );
    // A BAT region that claims 4 GiB - 1 MiB in a 4 MiB file.
    let p = base(&d, "c.vhdx", 4 * MIB, MIB as u32);
    set_bat_region_length(&p, (4096 - 1) * MIB as u32);
    let e = open_defect(&p);
    assert!(
        matches!(e, VhdxDefect::RegionPastEnd { name: "BAT", .. }),
        "{e}"
    );
}

#[test]
fn huge_sparse_disk_opens_with_a_lazily_paged_bat() {
    // 64 TiB in 256 MiB blocks: 256 Ki payload entries plus one sector bitmap entry per
    // 16 (about 2.1 MiB of BAT), read lazily; the file is sparse. Open, map and info work and touch only what they need.
    let d = TempDir::new("bounds-huge");
    let p = base(&d, "b.vhdx", 4 * MIB, 256 << 20);
    set_virtual_size(&p, MAX_VIRTUAL_SIZE);
    set_bat_region_length(&p, 3 * MIB as u32);
    set_len(&p, BAT + 3 * MIB);
    let v = open(&p).unwrap();
    assert_eq!(v.virtual_size(), MAX_VIRTUAL_SIZE);
    let mut runs = Vec::new();
    v.map(MAX_VIRTUAL_SIZE - 4096, 4096, &mut runs).unwrap();
    assert_eq!(runs, vec![Run::Zero { len: 4096 }]);
    let info = v.info().unwrap();
    assert_eq!(info.total_blocks, 256 * 1024);
    assert!(v.check().unwrap().is_empty());
}

#[test]
fn log_offset_near_the_end_of_the_address_space_is_an_error_not_an_overflow() {
    // Regression (found by review while writing the fuzz targets): LogOffset + LogLength
    // overflowed (a panic in debug builds) when LogOffset was near u64::MAX.
    let d = TempDir::new("bounds-logoff");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    edit_headers(&p, |h| {
        h.log_offset = u64::MAX - MIB + 1;
        h.log_length = MIB as u32;
        h.log_guid = Uuid::new_v4();
    });
    let e = open_defect(&p);
    assert!(
        matches!(e, VhdxDefect::PendingLogOutside { offset, .. } if offset == u64::MAX - MIB + 1),
        "{e}"
    );
    // Without a pending log the log region is not read: a read-only open works, and
    // check runs over it without an overflow either.
    edit_headers(&p, |h| h.log_guid = Uuid::nil());
    let v = open(&p).unwrap();
    let _ = v.check().unwrap();
}

#[test]
fn pending_log_too_long_to_replay_is_refused_before_any_allocation() {
    // A sparse file of 4 GiB whose header claims a pending 4 GiB - 1 MiB log: replay
    // would read a 4 GiB entry and hold every sector in memory. Refused up front.
    let d = TempDir::new("bounds-loglen");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    let log_len = (4096 - 1) * MIB;
    set_len(&p, 4 * MIB + log_len);
    edit_headers(&p, |h| {
        h.log_offset = 4 * MIB;
        h.log_length = log_len as u32;
        h.log_guid = Uuid::new_v4();
    });
    assert_eq!(
        open_feature(&p),
        Feature::VhdxLogLength {
            length: log_len as u32,
            max: MAX_REPLAY_LOG_LENGTH
        }
    );
    // At the ceiling itself the log is scanned (and found empty: corrupt, not a panic).
    edit_headers(&p, |h| h.log_length = MAX_REPLAY_LOG_LENGTH as u32);
    let e = open_defect(&p);
    assert!(
        matches!(e, VhdxDefect::LogNoSequence { offset, .. } if offset == 4 * MIB),
        "{e}"
    );
}

#[test]
fn metadata_items_past_the_region_are_refused() {
    let d = TempDir::new("bounds-meta");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    let (entry, _, _) = meta_item(&p, VIRTUAL_DISK_SIZE);
    let orig = read(&p, entry + 16, 8);
    // Offset past the 1 MiB region; offset + length past it; offset inside the table.
    for (off, len) in [
        (2 * MIB as u32, 8u32),
        (MIB as u32 - 4, 8),
        (32, 8),
        (u32::MAX - 3, 8),
    ] {
        patch(&p, entry + 16, &off.to_le_bytes());
        patch(&p, entry + 20, &len.to_le_bytes());
        let e = open_defect(&p);
        assert!(
            matches!(e, VhdxDefect::MetadataItemOutside { offset, length, .. } if offset == off && length == len),
            "{off} {len}: {e}"
        );
    }
    // Longer than any item may be.
    patch(&p, entry + 16, &(64u32 << 10).to_le_bytes());
    patch(&p, entry + 20, &u32::MAX.to_le_bytes());
    assert!(matches!(
        open_defect(&p),
        VhdxDefect::MetadataItemTooLarge {
            length: u32::MAX,
            ..
        }
    ));
    patch(&p, entry + 16, &orig);
    open(&p).unwrap();
    // An entry count past the table's capacity.
    patch(&p, META + 10, &u16::MAX.to_le_bytes());
    assert_eq!(
        open_defect(&p),
        VhdxDefect::MetadataEntries {
            count: u16::MAX,
            max: 2047
        }
    );
}

#[test]
fn payload_blocks_overlapping_headers_bat_or_metadata_are_never_read_as_data() {
    let d = TempDir::new("bounds-overlap");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    set_len(&p, 8 * MIB);
    for (what, off) in [
        ("header section", 0),
        ("log", MIB),
        ("metadata", META),
        ("BAT", BAT),
    ] {
        set_bat(&p, 1, make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, off));
        let e = open_defect(&p);
        assert!(
            match what {
                "header section" => matches!(e, VhdxDefect::BlockOutside { block: 1, .. }),
                _ =>
                    e == VhdxDefect::BlockOverlapsRegions {
                        block: 1,
                        offset: off
                    },
            },
            "{what}: {e}"
        );
    }
}

#[test]
fn payload_blocks_overlapping_each_other_are_reported_by_check() {
    // Both blocks read the same bytes: no metadata is exposed, so open and read work
    // (forensic use) and `check` names the overlap.
    let d = TempDir::new("bounds-overlap2");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    set_len(&p, 8 * MIB);
    set_bat(&p, 0, make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, 5 * MIB));
    set_bat(&p, 2, make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, 5 * MIB));
    patch(&p, 5 * MIB, b"shared");
    let v = open(&p).unwrap();
    let problems = v.check().unwrap();
    assert!(
        problems.contains(&Finding::from(VhdxDefect::Overlap {
            area: VhdxArea::PayloadBlock { block: 2 },
            offset: 5 * MIB,
            other: VhdxArea::PayloadBlock { block: 0 },
        })),
        "{problems:?}"
    );
}

/// A differencing child of `base` (our create, through the command code).
fn child_of(d: &TempDir, base: &Path, name: &str) -> std::path::PathBuf {
    let c = d.join(name);
    crate::commands::create::run(&crate::cli::CreateArgs {
        image: c.clone(),
        parent: Some(base.to_path_buf()),
        size: None,
        block_size: Some("1M".into()),
        logical_sector_size: None,
        format: None,
    })
    .unwrap();
    c
}

#[test]
fn sector_bitmap_block_pointing_at_a_payload_block_is_reported_by_check() {
    let d = TempDir::new("bounds-sb");
    let b = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    let c = child_of(&d, &b, "c.vhdx");
    let v = open(&c).unwrap();
    let sb_index = v.bat.bitmap_index(0);
    let bat_off = v.regions.bat.file_offset;
    drop(v);
    set_len(&c, 10 * MIB);
    patch(
        &c,
        bat_off,
        &make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, 8 * MIB).to_le_bytes(),
    );
    patch(
        &c,
        bat_off + sb_index * 8,
        &make_entry(SB_BLOCK_PRESENT, 8 * MIB).to_le_bytes(),
    );
    let v = open(&c).unwrap();
    let problems = v.check().unwrap();
    let bitmap = VhdxArea::BitmapBlock { chunk: 0 };
    assert!(
        problems.iter().any(|f| matches!(
            f,
            Finding::Defect(crate::error::Defect::Vhdx(VhdxDefect::Overlap { area, other, .. }))
                if *area == bitmap || *other == bitmap
        )),
        "{problems:?}"
    );
}

#[test]
fn every_bat_state_and_offset_bit_pattern_is_an_error_or_a_run_never_a_panic() {
    // The high bits of FileOffsetMB, reserved states and offsets near u64::MAX.
    let d = TempDir::new("bounds-states");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    set_block_size(&p, MIB as u32);
    for entry in [
        u64::MAX,
        u64::MAX - 1,
        (u64::MAX >> 20) << 20 | 6,
        (u64::MAX >> 20) << 20 | 7,
        4,
        5,
        6,
        7,
    ] {
        set_bat(&p, 0, entry);
        match open(&p) {
            Err(Error::Corrupt { .. }) => {}
            Err(e) => panic!("{entry:#x}: unexpected error kind {e}"),
            Ok(v) => {
                let mut runs = Vec::new();
                let _ = v.map(0, 4 * MIB, &mut runs);
                let _ = v.check();
            }
        }
    }
}
