//! Crafted pending logs (issue 11): the scan for the active sequence is linear in the
//! log, in-memory replays of a whole chain share one memory budget and hold zero
//! descriptors as ranges, and a replay cannot grow a file beyond what its structures
//! can address. See docs/security.md.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::bounds_tests::base;
use super::log::testutil::{make_crafted_log_test_file, make_pending_log_test_file, set_log_guid};
use super::log::{
    scan_work_on_this_thread, set_chain_replay_limit_for_tests, LogUpdate, LogWriter,
    DESCRIPTOR_MEMORY, LOG_SECTOR_SIZE, MAX_REPLAY_LOG_LENGTH, SCAN_WORK_FACTOR,
};
use super::tests::{new_child, open_defect, TempDir};
use super::{addressable_size, Vhdx};
use crate::chain::{Chain, ChainOptions};
use crate::error::{Defect, Error, Feature, Finding, LogGrowth, VhdxDefect, Warning};
use crate::image::ImageFile;
use crate::layer::{Layer, OpenOptions};

const MIB: u64 = 1 << 20;
const SECTOR: usize = LOG_SECTOR_SIZE as usize;
const RO: OpenOptions = OpenOptions::read_only();
const RW: OpenOptions = OpenOptions::writable();

/// Give the clean VHDX at `path` a pending log: one entry of `updates` written by our
/// log writer (FlushedFileOffset = the file length, LastFileOffset = `last`), then the
/// header's LogGuid set.
fn pending(path: &Path, updates: &[LogUpdate], last: u64) {
    let f = ImageFile::open(path, true).unwrap();
    let (h, _, _) = super::header::read_current_header(&f).unwrap();
    let guid = Uuid::new_v4();
    let mut w = LogWriter::new(h.log_offset, u64::from(h.log_length), guid, 1);
    w.write_updates(&f, updates, f.len() / MIB * MIB, last)
        .unwrap();
    drop(f);
    set_log_guid(path, guid).unwrap();
}

fn checksum(path: &Path) -> (u64, u32) {
    let b = std::fs::read(path).unwrap();
    (b.len() as u64, crc32c::crc32c(&b))
}

/// The largest DescriptorCount whose data sectors fill an entry of `sectors` sectors
/// exactly (descriptor sectors + one data sector per descriptor).
fn filling_count(sectors: u64) -> u32 {
    let desc_sectors = |c: u64| (c + 2).div_ceil(128);
    (0..sectors)
        .rev()
        .find(|&c| desc_sectors(c) + c == sectors)
        .unwrap() as u32
}

/// The file of issue 11, item 2 (see `make_crafted_log_test_file`): a 4 MiB VHDX with a
/// pending 64 MiB log (the largest replayed) at 4 MiB, every slot of which claims the
/// whole log.
fn crafted_log_image(d: &TempDir, name: &str, count: u32) -> (PathBuf, Uuid) {
    let p = base(d, name, 4 * MIB, MIB as u32);
    let (at, guid) = make_crafted_log_test_file(&p, MAX_REPLAY_LOG_LENGTH, count).unwrap();
    assert_eq!(at, 4 * MIB);
    (p, guid)
}

#[test]
fn crafted_64_mib_log_is_scanned_in_linear_work_and_refused() {
    let d = TempDir::new("logscan");
    let log_len = MAX_REPLAY_LOG_LENGTH;
    let limit = SCAN_WORK_FACTOR * log_len;
    for (what, count) in [
        ("DescriptorCount 0", 0),
        (
            "DescriptorCount filling the entry",
            filling_count(log_len / LOG_SECTOR_SIZE),
        ),
    ] {
        let (p, _) = crafted_log_image(&d, &format!("{}.vhdx", count), count);
        let before = scan_work_on_this_thread();
        let e = open_defect(&p);
        let work = scan_work_on_this_thread() - before;
        eprintln!("{what}: {work} bytes of scan work for a {log_len}-byte log");
        assert!(matches!(e, VhdxDefect::LogNoSequence { .. }), "{what}: {e}");
        // Every slot's first sector is read, and not much more (the old scan read the
        // whole claimed entry at every slot: 16384 x 64 MiB).
        assert!(
            (log_len..=limit).contains(&work),
            "{what}: the scan did {work} bytes of work on a {log_len}-byte log"
        );
        // Writable: refused the same way, before anything is written.
        let sum = checksum(&p);
        let before = scan_work_on_this_thread();
        match Vhdx::open(&p, RW) {
            Err(Error::Corrupt { .. }) => {}
            Err(e) => panic!("{what}: writable open: {e}"),
            Ok(_) => panic!("{what}: writable open succeeded"),
        }
        assert!(scan_work_on_this_thread() - before <= limit);
        assert_eq!(
            checksum(&p),
            sum,
            "{what}: the refused open modified the file"
        );
    }

    // The same slots after one genuine entry at the start of the log: that entry is the
    // active sequence (replayed, nothing to write), found within the same bound.
    let (p, guid) = crafted_log_image(&d, "genuine.vhdx", filling_count(16384));
    let f = ImageFile::open(&p, true).unwrap();
    LogWriter::new(4 * MIB, log_len, guid, 7)
        .write_updates(&f, &[], 4 * MIB, 4 * MIB)
        .unwrap();
    drop(f);
    let before = scan_work_on_this_thread();
    let v = Vhdx::open(&p, RO).unwrap();
    let work = scan_work_on_this_thread() - before;
    eprintln!("after a genuine entry: {work} bytes of scan work");
    assert!(work <= limit, "the scan did {work} bytes of work");
    let info = v.info().unwrap();
    let state = info.log_state.unwrap();
    assert!(state.contains("(1 entries, 0 writes"), "{state}");
}

/// A 4 MiB VHDX chain: base `l0` and children `l1`..`l{n-1}`, top last.
fn chain_of(d: &TempDir, n: usize) -> Vec<PathBuf> {
    let mut layers = vec![base(d, "l0.vhdx", 4 * MIB, MIB as u32)];
    for i in 1..n {
        let c = d.join(format!("l{i}.vhdx"));
        new_child(&c, layers.last().unwrap(), Some("1M"));
        layers.push(c);
    }
    layers
}

/// Resets the test override of the chain budget when dropped.
struct LimitGuard;

impl LimitGuard {
    fn set(limit: u64) -> LimitGuard {
        set_chain_replay_limit_for_tests(Some(limit));
        LimitGuard
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        set_chain_replay_limit_for_tests(None);
    }
}

#[test]
fn in_memory_log_replays_of_a_chain_share_one_memory_budget() {
    let d = TempDir::new("chainbudget");
    let layers = chain_of(&d, 4);
    // 100 pages per layer, into the unused part of the header section (after the
    // region tables), so the replays change nothing the reader looks at.
    let pages: Vec<(u64, Vec<u8>)> = (0..100u64)
        .map(|i| ((512 << 10) + i * LOG_SECTOR_SIZE, vec![i as u8; SECTOR]))
        .collect();
    for l in &layers {
        make_pending_log_test_file(l, &pages).unwrap();
    }
    let per_layer = 100 * (LOG_SECTOR_SIZE + DESCRIPTOR_MEMORY);
    let top = layers.last().unwrap();
    let opts = ChainOptions::default();
    {
        let _g = LimitGuard::set(3 * per_layer + per_layer / 2);
        // Opened top first: the fourth layer (the base) no longer fits.
        let e = match Chain::open(top, &opts) {
            Ok(_) => panic!("a chain of four replays opened within the budget of three"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, Error::Unsupported { path, feature: Feature::VhdxReplayBudget { .. } } if path == &layers[0]),
            "names the base: {e}"
        );
        // Rendered-message check, kept on purpose: the user reads one line.
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        // Three layers fit, and each file alone always does.
        Chain::open(&layers[2], &opts).unwrap();
        for l in &layers {
            Vhdx::open(l, RO).unwrap();
        }
    }
    // The default budget holds all four (and 256 such layers).
    let chain = Chain::open(top, &opts).unwrap();
    assert_eq!(chain.layers.len(), 4);
}

#[test]
fn zero_descriptors_cost_a_range_not_pages() {
    // Issue 11, item 4: each layer's log zeroes 255 MiB of its (sparse, 260 MiB) file.
    // As pages that was 255 MiB of memory per layer; as ranges the four replays fit in
    // a budget of 1 KiB.
    let d = TempDir::new("zeroranges");
    let layers = chain_of(&d, 4);
    for l in &layers {
        std::fs::OpenOptions::new()
            .write(true)
            .open(l)
            .unwrap()
            .set_len(260 * MIB)
            .unwrap();
        let zero = LogUpdate::Zero {
            file_offset: 4 * MIB,
            len: 255 * MIB,
        };
        pending(l, &[zero], 260 * MIB);
    }
    let _g = LimitGuard::set(4 * DESCRIPTOR_MEMORY);
    let chain = Chain::open(layers.last().unwrap(), &ChainOptions::default()).unwrap();
    assert_eq!(chain.layers.len(), 4);
}

#[test]
fn a_replay_never_grows_the_file_beyond_what_its_structures_address() {
    // Issue 11, item 6: a pending log whose LastFileOffset is 8 TiB made a writable open
    // turn a 4 MiB file into an 8 TiB sparse file, and `check` said OK.
    let d = TempDir::new("replaygrowth");
    let p = base(&d, "b.vhdx", 4 * MIB, MIB as u32);
    let clean = std::fs::read(&p).unwrap();
    // Header section, log, BAT and metadata regions (1 MiB each), 4 blocks of 1 MiB.
    let bound = addressable_size(&ImageFile::open(&p, false).unwrap(), MIB).unwrap();
    assert_eq!(bound, 8 * MIB);
    let page = vec![0x5au8; SECTOR];
    let tib8 = 8u64 << 40;
    let data = |file_offset| LogUpdate::Data {
        file_offset,
        data: &page,
    };
    let cases: Vec<(&str, Vec<LogUpdate>, u64)> = vec![
        ("LastFileOffset 8 TiB", vec![data(512 << 10)], tib8),
        ("a data sector at 8 TiB", vec![data(tib8)], 4 * MIB),
        (
            "zeros up to 8 TiB",
            vec![LogUpdate::Zero {
                file_offset: 4 * MIB,
                len: tib8 - 4 * MIB,
            }],
            4 * MIB,
        ),
        (
            "LastFileOffset 1 MiB past the bound",
            vec![data(512 << 10)],
            bound + MIB,
        ),
    ];
    for (what, updates, last) in &cases {
        std::fs::write(&p, &clean).unwrap();
        pending(&p, updates, *last);
        let sum = checksum(&p);
        // Writable: refused with one line naming the file; nothing modified.
        match Vhdx::open(&p, RW) {
            Err(
                e @ Error::Corrupt {
                    defect: Defect::Vhdx(VhdxDefect::LogGrowth(LogGrowth { bound: b, .. })),
                    ..
                },
            ) if b == bound => {
                // Rendered-message check, kept on purpose: one line, naming the file.
                let e = e.to_string();
                assert!(
                    e.starts_with(&p.display().to_string()) && !e.contains('\n'),
                    "{what}: {e}"
                );
            }
            Err(e) => panic!("{what}: writable open: {e}"),
            Ok(_) => panic!("{what}: writable open replayed it"),
        }
        assert_eq!(
            checksum(&p),
            sum,
            "{what}: the refused open modified the file"
        );
        // Read-only: opens (the replay is in memory), and `check` reports it.
        let v = Vhdx::open(&p, RO).unwrap();
        let problems = v.check().unwrap();
        assert_eq!(
            problems
                .iter()
                .filter(|f| matches!(f, Finding::Warning(Warning::VhdxLogGrowth(_))))
                .count(),
            1,
            "{what}: {problems:?}"
        );
        drop(v);
        assert_eq!(
            checksum(&p),
            sum,
            "{what}: the read-only open modified the file"
        );
    }

    // Up to the bound itself: replayed, and the file grows to exactly it.
    std::fs::write(&p, &clean).unwrap();
    pending(&p, &[data(512 << 10)], bound);
    drop(Vhdx::open(&p, RW).unwrap());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), bound);
    let v = Vhdx::open(&p, RO).unwrap();
    assert_eq!(v.check().unwrap(), Vec::<Finding>::new());
}
