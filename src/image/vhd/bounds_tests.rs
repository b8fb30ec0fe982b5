//! Hostile VHD files: sizes and counts an image gives are bounded before they size an
//! allocation, and no data block may overlap the structures in front of it (the BAT,
//! the dynamic disk header, parent locator data), so a read never returns metadata as
//! disk data. See docs/security.md. (The basic damaged-file cases are in tests.rs.)

use std::path::Path;

use super::bat::MAX_BAT_ENTRIES;
use super::create::create_dynamic;
use super::tests::{fix_checksums as fix, BAT, HDR};
use super::Vhd;
use crate::error::{Defect, Error, Feature, VhdDefect};
use crate::layer::{Layer, OpenOptions, Run};

const RO: OpenOptions = OpenOptions::read_only();

use crate::test_support::TempDir as Tmp;

/// An empty dynamic VHD of `size` bytes in `block`-byte blocks, with `extra` zero bytes
/// in front of the footer (room for blocks).
fn dynamic(t: &Tmp, size: u64, block: u32, extra: usize) -> Vec<u8> {
    let p = t.join("src.vhd");
    let _ = std::fs::remove_file(&p);
    create_dynamic(&p, size, block).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    let footer = b[n - 512..].to_vec();
    b.truncate(n - 512);
    b.resize(n - 512 + extra, 0);
    b.extend_from_slice(&footer);
    b
}

fn open(t: &Tmp, name: &str, b: &[u8]) -> crate::error::Result<Vhd> {
    let p: &Path = &t.join(name);
    std::fs::write(p, b).unwrap();
    Vhd::open(p, RO)
}

/// The VHD defect an open fails with.
fn defect(r: crate::error::Result<Vhd>) -> VhdDefect {
    match r {
        Err(Error::Corrupt {
            defect: Defect::Vhd(d),
            ..
        }) => d,
        Err(e) => panic!("expected a VHD defect: {e}"),
        Ok(_) => panic!("opened but should not"),
    }
}

fn set_current_size(b: &mut [u8], size: u64) {
    let n = b.len();
    b[n - 512 + 48..n - 512 + 56].copy_from_slice(&size.to_be_bytes());
    fix(b);
}

#[test]
fn current_size_beyond_what_the_bat_can_cover_is_refused() {
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 512 << 10, 0);
    for size in [u64::MAX, 1 << 63, (64u64 << 40) + 512] {
        set_current_size(&mut b, size);
        let e = defect(open(&t, "big.vhd", &b));
        assert!(
            matches!(e, VhdDefect::BatTooSmall { current_size, .. } if current_size == size),
            "{size}: {e}"
        );
    }
    // A header that claims enough entries for 64 TiB in 512-byte blocks: refused by the
    // entry ceiling before anything is allocated.
    let mut b = dynamic(&t, 4 << 20, 512, 0);
    b[HDR + 28..HDR + 32].copy_from_slice(&u32::MAX.to_be_bytes());
    set_current_size(&mut b, (MAX_BAT_ENTRIES as u64 + 1) * 512);
    let e = open(&t, "many.vhd", &b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Unsupported {
                feature: Feature::VhdBatEntries {
                    max: MAX_BAT_ENTRIES,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn current_size_not_a_sector_multiple_reads_whole_bytes_without_panic() {
    // VHD sizes are whole sectors in every tool; a crafted odd size is read as given
    // (the tail is zeros) rather than refused, and never panics.
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 512 << 10, 0);
    set_current_size(&mut b, (4 << 20) - 100);
    let v = open(&t, "odd.vhd", &b).unwrap();
    let mut runs = Vec::new();
    v.map(0, v.virtual_size(), &mut runs).unwrap();
    assert_eq!(
        runs,
        vec![Run::Zero {
            len: (4 << 20) - 100
        }]
    );
    v.info().unwrap();
}

#[test]
fn bat_larger_than_the_file_is_refused() {
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 512 << 10, 0);
    // 8 Mi entries would be 32 MiB of BAT in a file of a few KiB.
    b[HDR + 28..HDR + 32].copy_from_slice(&MAX_BAT_ENTRIES.to_be_bytes());
    set_current_size(&mut b, MAX_BAT_ENTRIES as u64 * 512 * 1024);
    let e = defect(open(&t, "batbig.vhd", &b));
    assert!(
        matches!(
            e,
            VhdDefect::BatPastEnd {
                count: MAX_BAT_ENTRIES,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn data_block_overlapping_the_dynamic_header_is_refused() {
    // Regression (found while writing these tests): a block only had to lie inside
    // [512, footer) and off the BAT, so one over the dynamic header was accepted and
    // reads returned header bytes as disk data.
    // Our files put the header right before the BAT, so move it past the BAT first.
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 4096, 64 << 10);
    let moved = 16384;
    b.copy_within(HDR..HDR + 1024, moved);
    let n = b.len();
    b[n - 512 + 16..n - 512 + 24].copy_from_slice(&(moved as u64).to_be_bytes());
    fix(&mut b);
    open(&t, "moved.vhd", &b).unwrap();
    // Block 0 at sector 31: its bitmap at 15872, its data from 16384, over the header.
    b[BAT..BAT + 4].copy_from_slice(&31u32.to_be_bytes());
    assert_eq!(
        defect(open(&t, "onhdr.vhd", &b)),
        VhdDefect::BlockOverlaps {
            entry: 0,
            offset: 31 * 512,
            structure: "the dynamic disk header".into()
        }
    );
}

#[test]
fn data_block_overlapping_parent_locator_data_is_refused() {
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 4096, 64 << 10);
    let n = b.len();
    // Make it differencing with a W2ru locator whose data sits at 8 KiB.
    b[n - 512 + 60..n - 512 + 64].copy_from_slice(&4u32.to_be_bytes());
    let loc = HDR + 576;
    b[loc..loc + 4].copy_from_slice(b"W2ru");
    b[loc + 4..loc + 8].copy_from_slice(&512u32.to_be_bytes());
    b[loc + 8..loc + 12].copy_from_slice(&8u32.to_be_bytes());
    b[loc + 16..loc + 24].copy_from_slice(&8192u64.to_be_bytes());
    b[8192..8200].copy_from_slice(b"x\0.\0v\0h\0");
    fix(&mut b);
    open(&t, "locok.vhd", &b).unwrap();
    // Block 0 at sector 15: bitmap at 7680, data from 8192, over the locator.
    b[BAT..BAT + 4].copy_from_slice(&15u32.to_be_bytes());
    assert_eq!(
        defect(open(&t, "onloc.vhd", &b)),
        VhdDefect::BlockOverlaps {
            entry: 0,
            offset: 15 * 512,
            structure: "parent locator 0's data".into()
        }
    );
}

#[test]
fn every_bat_entry_value_is_an_error_or_a_run_never_a_panic() {
    let t = Tmp::new("vhd-bounds");
    let base = dynamic(&t, 4 << 20, 4096, 16 << 10);
    for e in [0u32, 1, 2, 3, 4, 0x7FFF_FFFF, 0xFFFF_FFFE, u32::MAX] {
        let mut b = base.clone();
        b[BAT..BAT + 4].copy_from_slice(&e.to_be_bytes());
        if let Ok(v) = open(&t, "e.vhd", &b) {
            let mut runs = Vec::new();
            let _ = v.map(0, 8192, &mut runs);
            let _ = v.info();
        }
    }
}

#[test]
fn check_of_a_dynamic_disk_with_a_locator_at_the_end_of_the_address_space() {
    // Regression (fuzz/regressions/vhd_check_locator_overflow.bin, found by vhd_open):
    // a dynamic disk's parent locators are not bounds-checked at open (they are not
    // used), and `check` added offset + length with overflow (a panic in debug builds).
    let t = Tmp::new("vhd-bounds");
    let mut b = dynamic(&t, 4 << 20, 4096, 16 << 10);
    let loc = HDR + 576;
    b[loc..loc + 4].copy_from_slice(b"W2ru");
    b[loc + 8..loc + 12].copy_from_slice(&4096u32.to_be_bytes());
    b[loc + 16..loc + 24].copy_from_slice(&(u64::MAX - 100).to_be_bytes());
    fix(&mut b);
    let v = open(&t, "locmax.vhd", &b).unwrap();
    v.check().unwrap();
}
