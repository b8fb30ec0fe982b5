//! `compact`: give a dynamic or differencing file's unused space back, in place
//! ([`compact`], the library's verb; `commands/compact.rs` is the command line's adapter).
//!
//! Three phases, each crash-safe on its own (the formats' `Compact` implementations do
//! the writing; this module decides what to do):
//! 1. **Release** blocks whose content is all zeros in the merged view: in a base they
//!    become unallocated, in a child unallocated when the parents read zeros there too
//!    (VHDX: otherwise PAYLOAD_BLOCK_ZERO; VHD has no zero state and keeps the block).
//!    The content of the disk does not change, so any subset of releases that reached
//!    the file is a valid state.
//! 2. **Move** blocks from the end of the file into the lowest holes, in batches of up to
//!    64 MiB: copy -> fdatasync -> the metadata changes pointing at the copies (VHDX: the
//!    BAT pages through the log, one entry per `max_commit_pages`; VHD: the BAT sectors)
//!    -> fdatasync. Until a change is durable the old copy is the one referenced; the
//!    destination was unreferenced space, and no source is ever a destination.
//! 3. **Truncate** after the last structure, once every move is durable (VHD: the footer
//!    is first written at the new end, so the file always ends with a valid footer).
//!
//! Killed at any moment, the file is valid with unchanged content, and a rerun simply
//! starts over: released blocks are not seen again, moved blocks are where they went.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::chain::{Chain, ChainOptions, Intent};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Request, Result};
use crate::image::vhdx::log::ReplayBudget;
use crate::image::{detect_format, open_layer_within, vhd::Vhd, vhdx::Vhdx};
use crate::layer::{Format, Layer};
use crate::progress::Observer;

/// The top file of a chain opened for `compact`, as its format (the chain holds it as a
/// `Layer`).
pub enum Top {
    Vhdx(Arc<Vhdx>),
    Vhd(Arc<Vhd>),
}

impl Top {
    pub fn compact(&self) -> &dyn Compact {
        match self {
            Top::Vhdx(v) => v.as_ref(),
            Top::Vhd(v) => v.as_ref(),
        }
    }
}

/// Open `image`'s chain with `opts` (their intent decides the locks), keeping the top
/// file as its format.
pub fn open_top(image: &Path, opts: &ChainOptions) -> Result<(Chain, Top)> {
    let budget = ReplayBudget::for_chain();
    let top: Mutex<Option<Top>> = Mutex::new(None);
    let chain = Chain::open_with(image, opts, |p, o, raw| {
        let mut slot = top.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return open_layer_within(p, o, raw, &budget);
        }
        let layer: Arc<dyn Layer> = match detect_format(p)? {
            Some(Format::Vhdx) => {
                let v = Arc::new(Vhdx::open_within(p, o, &budget)?);
                *slot = Some(Top::Vhdx(v.clone()));
                v
            }
            Some(Format::Vhd) => {
                let v = Arc::new(Vhd::open(p, o)?);
                *slot = Some(Top::Vhd(v.clone()));
                v
            }
            _ => {
                return Err(Error::Request(Request::NotVhdxOrVhd {
                    path: p.to_path_buf(),
                }))
            }
        };
        Ok(layer)
    })?;
    let top = top
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("the top is opened first");
    Ok((chain, top))
}

/// `compact` of `chain`'s top file (`top`, from `open_top`): the merged views it needs
/// are made here.
pub fn compact_chain(chain: Chain, top: &Top, ctl: &Control) -> Result<CompactReport> {
    let no_cache = DiskOptions {
        cache_bytes: 0,
        ..Default::default()
    };
    let parents = (chain.layers.len() > 1).then(|| {
        Disk::new(
            Chain {
                layers: chain.layers[1..].to_vec(),
                found: chain.found[1..].to_vec(),
                warnings: Vec::new(),
            },
            no_cache,
        )
    });
    let disk = Disk::new(chain, no_cache);
    compact_file(top.compact(), &disk, parents.as_ref(), ctl)
}

/// What [`compact`] is asked to do (`vdiskfs compact`'s arguments).
#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    /// The image whose top file is compacted (a base or a child; parents are only read).
    pub image: PathBuf,
    /// How its chain is found; `intent` is compact's own (the top locked like a writable
    /// mount; a dry run opens the chain as for a copy) and ignored.
    pub chain: ChainOptions,
    /// Only find out what would be freed; change nothing.
    pub dry_run: bool,
}

/// Compact `opts.image`'s top file in place (`vdiskfs compact`): release its blocks that
/// read as zeros, move blocks from the end into the holes, cut the file (each phase
/// crash-safe, see the module). `progress` gets the phases `"compact: scan"` (bytes
/// tested for zeros) and, unless a dry run, `"compact: move"` (bytes moved), and the
/// chain's warnings; `cancel` stops between blocks, leaving a consistent file
/// (`CompactReport::interrupted`).
pub fn compact(
    opts: &CompactOptions,
    progress: &dyn Observer,
    cancel: &AtomicBool,
) -> Result<CompactReport> {
    // A dry run writes nothing: the chain is opened as for a copy (shared locks that
    // must be had, so nobody writes it meanwhile); a real run locks the top like a
    // writable mount.
    let intent = if opts.dry_run {
        Intent::Copy
    } else {
        Intent::WriteTop
    };
    let (chain, top) = open_top(
        &opts.image,
        &ChainOptions {
            intent,
            ..opts.chain.clone()
        },
    )?;
    for w in &chain.warnings {
        progress.warning(w);
    }
    let info = chain.top().info()?;
    progress.begin("compact: scan", info.allocated_blocks * info.block_size);
    let ctl = Control {
        dry_run: opts.dry_run,
        cancel,
        scanned: &|n| progress.advance(n),
        moving: &|total| {
            progress.end();
            if !opts.dry_run && total > 0 {
                progress.begin("compact: move", total);
            }
        },
        moved: &|n| progress.advance(n),
    };
    let report = compact_chain(chain, &top, &ctl);
    progress.end();
    Ok(CompactReport {
        allocated_blocks: info.allocated_blocks,
        ..report?
    })
}

/// A structure holding file space: an allocated block (payload or bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Format-specific: the BAT index (VHDX) or block number (VHD).
    pub id: u64,
    pub offset: u64,
    pub len: u64,
}

/// One planned move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub object: Object,
    pub to: u64,
}

/// The file's structures as far as compaction is concerned.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Ranges that never move (headers, log, BAT, metadata, locators).
    pub fixed: Vec<(u64, u64)>,
    /// Blocks that may move.
    pub objects: Vec<Object>,
    /// Where a moved object may start (a multiple of this).
    pub align: u64,
    /// Bytes that follow the last structure (VHD: the footer).
    pub trailer: u64,
}

/// The moves that pack `layout` toward the start, and the length of the file after them.
///
/// The last object goes into the lowest hole below it that fits (first fit), then the
/// next to last, and so on; it stops at the first object that fits nowhere below itself,
/// as moving anything lower would not shorten the file.
pub fn plan(layout: &Layout) -> (Vec<Move>, u64) {
    let align = layout.align.max(1);
    let mut taken: Vec<(u64, u64)> = layout.fixed.clone();
    taken.extend(layout.objects.iter().map(|o| (o.offset, o.offset + o.len)));
    taken.sort_unstable();
    // Holes between the structures, lowest first.
    let mut holes: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    for &(s, e) in &taken {
        if s > at {
            holes.push((at, s));
        }
        at = at.max(e);
    }
    let mut objects = layout.objects.clone();
    objects.sort_unstable_by_key(|o| std::cmp::Reverse(o.offset));
    let mut moves = Vec::new();
    let mut stays_end = 0u64;
    for (k, o) in objects.iter().enumerate() {
        let fit = holes.iter().position(|&(s, e)| {
            let a = s.div_ceil(align) * align;
            a + o.len <= e && a + o.len <= o.offset
        });
        match fit {
            Some(i) => {
                let (s, e) = holes[i];
                let a = s.div_ceil(align) * align;
                holes.remove(i);
                if a + o.len < e {
                    holes.insert(i, (a + o.len, e));
                }
                if s < a {
                    holes.insert(i, (s, a));
                }
                moves.push(Move { object: *o, to: a });
            }
            None => {
                // This one stays, and so does everything below it.
                stays_end = objects[k..]
                    .iter()
                    .map(|o| o.offset + o.len)
                    .max()
                    .unwrap_or(0);
                break;
            }
        }
    }
    let end = layout
        .fixed
        .iter()
        .map(|&(_, e)| e)
        .chain(moves.iter().map(|m| m.to + m.object.len))
        .chain(std::iter::once(stays_end))
        .max()
        .unwrap_or(0);
    (moves, end.div_ceil(align) * align + layout.trailer)
}

/// The length of a file with `layout` as it is (nothing moved).
fn end_of(l: &Layout) -> u64 {
    let align = l.align.max(1);
    l.objects
        .iter()
        .map(|o| o.offset + o.len)
        .chain(l.fixed.iter().map(|&(_, e)| e))
        .max()
        .unwrap_or(0)
        .div_ceil(align)
        * align
        + l.trailer
}

/// What one format does for `compact`.
pub trait Compact {
    /// Refuse files compaction does not apply to (fixed disks, unknown structures).
    fn compactable(&self) -> Result<()>;
    /// The file's current length.
    fn file_len(&self) -> Result<u64>;
    /// Blocks holding data in this file: (block number, offset in the disk, length).
    fn held_blocks(&self) -> Result<Vec<(u64, u64, u64)>>;
    /// Release zero blocks `(block, parent_zero)`: in memory and durably in the file
    /// (unless `dry_run`). Returns the blocks whose file space is freed.
    fn release(&self, blocks: &[(u64, bool)], dry_run: bool) -> Result<Vec<u64>>;
    /// The structures, leaving out the payload blocks in `freed`.
    fn layout(&self, freed: &[u64]) -> Result<Layout>;
    /// Move a batch of objects: copy each into its hole, fdatasync, then the metadata
    /// pointing at the copies, fdatasync. Every destination is a hole and every source a
    /// live object (the plan never reuses a source), so after a crash each entry points
    /// at its old copy or its new, durable one: both hold the same data.
    fn move_objects(&self, ms: &[Move]) -> Result<()>;
    /// Everything is durable: end the file at `len` (and close cleanly).
    fn finish(&self, len: u64) -> Result<()>;
}

/// What a compaction did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// The file's length before, and after (dry run: what it would be).
    pub len_before: u64,
    pub len_after: u64,
    /// Blocks the file held at the start, and how many of them read as zeros.
    pub allocated_blocks: u64,
    pub zero_blocks: u64,
    /// Zero blocks whose file space was (would be) released.
    pub released: u64,
    /// Blocks (and bytes) moved toward the start of the file.
    pub moved: u64,
    pub moved_bytes: u64,
    /// Stopped by a signal before the end (what is done is durable).
    pub interrupted: bool,
}

/// Callbacks: progress of the scan and of the moves, cancellation.
pub struct Control<'a> {
    pub dry_run: bool,
    pub cancel: &'a AtomicBool,
    /// Bytes tested for zeros so far (called as blocks are done).
    pub scanned: &'a dyn Fn(u64),
    /// Called once the moves are known, with their total bytes.
    pub moving: &'a dyn Fn(u64),
    /// Bytes moved so far.
    pub moved: &'a dyn Fn(u64),
}

const PIECE: usize = 1 << 20;
/// Bytes of block copies per durable step of the moves (small in unit tests, so their
/// cuts fall between batches too).
#[cfg(not(test))]
const BATCH: u64 = 64 << 20;
#[cfg(test)]
const BATCH: u64 = 2 << 20;

fn all_zero(b: &[u8]) -> bool {
    // OR-folding fixed pieces vectorises; stop at the first piece with a set byte.
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// Whether `[off, off + len)` of `disk` reads all zeros; only the ranges some layer
/// holds are read.
fn range_is_zero(disk: &Disk, off: u64, len: u64, buf: &mut [u8]) -> Result<bool> {
    let mut ranges = Vec::new();
    disk.data_ranges(off, len, &mut ranges)?;
    for (s, l) in ranges {
        let mut p = s;
        while p < s + l {
            let n = (PIECE as u64).min(s + l - p) as usize;
            disk.read_at(p, &mut buf[..n])?;
            if !all_zero(&buf[..n]) {
                return Ok(false);
            }
            p += n as u64;
        }
    }
    Ok(true)
}

/// Compact `top`, the top file of `disk`'s chain; `parents` is the merged view of the
/// chain below it (None for a base).
pub fn compact_file(
    top: &dyn Compact,
    disk: &Disk,
    parents: Option<&Disk>,
    ctl: &Control,
) -> Result<CompactReport> {
    top.compactable()?;
    let mut report = CompactReport {
        len_before: top.file_len()?,
        ..Default::default()
    };
    let mut buf = vec![0u8; PIECE];
    // 1. Zero blocks.
    let mut zero = Vec::new();
    for (block, off, len) in top.held_blocks()? {
        if ctl.cancel.load(Ordering::Relaxed) {
            report.interrupted = true;
            break;
        }
        if range_is_zero(disk, off, len, &mut buf)? {
            let parent_zero = match parents {
                Some(p) => range_is_zero(p, off, len, &mut buf)?,
                None => true,
            };
            zero.push((block, parent_zero));
        }
        (ctl.scanned)(len);
    }
    report.zero_blocks = zero.len() as u64;
    let freed = top.release(&zero, ctl.dry_run)?;
    report.released = freed.len() as u64;
    // 2. Moves.
    let layout = top.layout(if ctl.dry_run { &freed } else { &[] })?;
    let (moves, end) = plan(&layout);
    (ctl.moving)(moves.iter().map(|m| m.object.len).sum());
    let mut done_end = None;
    if !ctl.dry_run && !report.interrupted {
        let mut rest = &moves[..];
        while !rest.is_empty() {
            if ctl.cancel.load(Ordering::Relaxed) {
                report.interrupted = true;
                break;
            }
            // Up to BATCH bytes of copies share one fdatasync and one metadata update.
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len() && (n == 0 || bytes + rest[n].object.len <= BATCH) {
                bytes += rest[n].object.len;
                n += 1;
            }
            top.move_objects(&rest[..n])?;
            report.moved += n as u64;
            report.moved_bytes += bytes;
            (ctl.moved)(bytes);
            rest = &rest[n..];
        }
        if !report.interrupted {
            done_end = Some(end);
        }
    }
    // 3. The end of the file.
    if ctl.dry_run {
        report.moved = moves.len() as u64;
        report.moved_bytes = moves.iter().map(|m| m.object.len).sum();
        report.len_after = end.min(report.len_before);
    } else {
        // Interrupted: cut only behind what is in place now.
        let len = match done_end {
            Some(e) => e,
            None => end_of(&top.layout(&[])?),
        };
        top.finish(len.min(report.len_before))?;
        report.len_after = top.file_len()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    fn obj(id: u64, mib: u64, len_mib: u64) -> Object {
        Object {
            id,
            offset: mib * M,
            len: len_mib * M,
        }
    }

    #[test]
    fn plan_fills_the_lowest_holes_from_the_end() {
        // Fixed 0..4 MiB; blocks at 4, 6, 9, 12 (2 MiB each); holes at 8..9, 11..12.
        let layout = Layout {
            fixed: vec![(0, 4 * M)],
            objects: vec![obj(1, 4, 2), obj(2, 6, 2), obj(3, 9, 2), obj(4, 12, 2)],
            align: M,
            trailer: 0,
        };
        let (moves, end) = plan(&layout);
        // 12..14 cannot go to 8..9 (1 MiB) nor 11..12; nothing below fits a 2 MiB block
        // except none: so nothing moves.
        assert!(moves.is_empty());
        assert_eq!(end, 14 * M);

        let layout = Layout {
            fixed: vec![(0, 4 * M)],
            objects: vec![obj(1, 4, 2), obj(3, 10, 2), obj(4, 12, 2)],
            align: M,
            trailer: 0,
        };
        let (moves, end) = plan(&layout);
        assert_eq!(
            moves
                .iter()
                .map(|m| (m.object.id, m.to))
                .collect::<Vec<_>>(),
            vec![(4, 6 * M), (3, 8 * M)]
        );
        assert_eq!(end, 10 * M);
    }

    #[test]
    fn plan_aligns_and_keeps_a_trailer() {
        let layout = Layout {
            fixed: vec![(0, 1536), (1536, 2048)],
            objects: vec![Object {
                id: 7,
                offset: 10_000 * 512,
                len: 4096 + 512,
            }],
            align: 512,
            trailer: 512,
        };
        let (moves, end) = plan(&layout);
        assert_eq!(moves[0].to, 2048);
        assert_eq!(end, 2048 + 4608 + 512);
    }

    #[test]
    fn zero_test() {
        assert!(all_zero(&[0u8; 37]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!all_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!all_zero(&b));
    }

    fn open(path: &Path, intent: crate::chain::Intent) -> Chain {
        Chain::open(
            path,
            &ChainOptions {
                intent,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn content(path: &Path) -> Vec<u8> {
        let disk = Disk::new(
            open(path, crate::chain::Intent::Inspect),
            DiskOptions::default(),
        );
        let mut v = vec![0u8; disk.len() as usize];
        disk.read_at(0, &mut v).unwrap();
        v
    }

    fn run(path: &Path) -> Result<CompactReport> {
        let (chain, top) = open_top(
            path,
            &ChainOptions {
                intent: crate::chain::Intent::WriteTop,
                ..Default::default()
            },
        )?;
        let cancel = AtomicBool::new(false);
        let ctl = Control {
            dry_run: false,
            cancel: &cancel,
            scanned: &|_| {},
            moving: &|_| {},
            moved: &|_| {},
        };
        compact_chain(chain, &top, &ctl)
    }

    /// Cut a compact after each of its writes (`crash_sim`: every later write fails, as
    /// if the machine stopped there), for bases and children of both formats: the file
    /// left behind checks clean and reads as before, and a rerun finishes with the same
    /// length as an uninterrupted run.
    #[test]
    fn a_crash_after_any_write_of_a_compact_leaves_the_content() {
        use crate::image::crash_sim;
        use crate::image::vhdx::tests::{new_base, new_child, Rng};
        for ext in ["vhdx", "vhd"] {
            for child in [false, true] {
                let d = crate::test_support::TempDir::new(&format!("compact-cut-{ext}-{child}"));
                let base = d.join(format!("base.{ext}"));
                let size = 12u64 << 20;
                if ext == "vhdx" {
                    new_base(&base, size, 1 << 20, 512);
                } else {
                    crate::image::vhd::create::create_dynamic(&base, size, 1 << 20).unwrap();
                }
                let mut data = vec![0u8; size as usize];
                Rng(7 + child as u64).fill(&mut data);
                // Whole zero blocks (some over parent data), a partly zero one.
                for b in [1u64, 2, 4, 7, 8] {
                    data[(b << 20) as usize..((b + 1) << 20) as usize].fill(0);
                }
                data[(5 << 20) as usize..(5 << 20) as usize + 8192].fill(0);
                let top = if child {
                    {
                        let disk = Disk::new(
                            open(&base, crate::chain::Intent::WriteTop),
                            DiskOptions::default(),
                        );
                        disk.write_at(0, &data[..(6 << 20)]).unwrap();
                        disk.close().unwrap();
                    }
                    let c = d.join(format!("child.{ext}"));
                    new_child(&c, &base, Some("1M"));
                    c
                } else {
                    base.clone()
                };
                {
                    let disk = Disk::new(
                        open(&top, crate::chain::Intent::WriteTop),
                        DiskOptions::default(),
                    );
                    disk.write_at(0, &data).unwrap();
                    disk.close().unwrap();
                }
                let want = content(&top);
                assert!(want == data);
                let template = d.join("template");
                std::fs::copy(&top, &template).unwrap();
                crash_sim::fail_after(None);
                let report = run(&top).unwrap();
                let total = crash_sim::writes();
                let final_len = std::fs::metadata(&top).unwrap().len();
                assert!(
                    report.released >= 3 && report.moved >= 1,
                    "{ext} {child}: {report:?}"
                );
                assert!(final_len < report.len_before);
                assert!(content(&top) == want);
                for n in 0..total {
                    std::fs::copy(&template, &top).unwrap();
                    crash_sim::fail_after(Some(n));
                    let r = run(&top);
                    crash_sim::fail_after(None);
                    assert!(
                        r.is_err(),
                        "{ext} child={child}: cut after {n} of {total} writes did not fail"
                    );
                    let chain = open(&top, crate::chain::Intent::Inspect);
                    let problems = chain.top().check().unwrap();
                    assert!(
                        problems.is_empty(),
                        "{ext} child={child} cut after {n}: {problems:?}"
                    );
                    drop(chain);
                    assert!(
                        content(&top) == want,
                        "{ext} child={child}: content after a cut after {n} of {total} writes"
                    );
                    run(&top).unwrap();
                    assert!(
                        content(&top) == want,
                        "{ext} child={child}: content after the rerun (cut {n})"
                    );
                    assert_eq!(
                        std::fs::metadata(&top).unwrap().len(),
                        final_len,
                        "{ext} child={child} cut {n}"
                    );
                }
                eprintln!("{ext} child={child}: cut after each of {total} writes");
            }
        }
    }
}
