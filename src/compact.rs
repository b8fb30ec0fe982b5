//! `compact`: give a dynamic or differencing file's unused space back, in place.
//!
//! Three phases, each crash-safe on its own (the formats' `Compact` implementations do
//! the writing; this module decides what to do):
//! 1. **Release** blocks whose content is all zeros in the merged view: in a base they
//!    become unallocated, in a child unallocated when the parents read zeros there too
//!    (VHDX: otherwise PAYLOAD_BLOCK_ZERO; VHD has no zero state and keeps the block).
//!    The content of the disk does not change, so any subset of releases that reached
//!    the file is a valid state.
//! 2. **Move** blocks from the end of the file into the lowest holes, one at a time:
//!    copy -> fdatasync -> the one metadata change pointing at the copy (VHDX: one log
//!    entry; VHD: the BAT sector) -> fdatasync. Until the metadata change is durable the
//!    old copy is the one referenced; the destination was unreferenced space.
//! 3. **Truncate** after the last structure, once every move is durable (VHD: the footer
//!    is first written at the new end, so the file always ends with a valid footer).
//!
//! Killed at any moment, the file is valid with unchanged content, and a rerun simply
//! starts over: released blocks are not seen again, moved blocks are where they went.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::disk::Disk;
use crate::error::Result;

/// What the merged view holds in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroTest {
    /// Some byte is not zero: keep the block.
    Data,
    /// All zeros; `parent_zero`: the parents (if any) read zeros there too.
    Zero { parent_zero: bool },
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
    /// Move one object (copy, fdatasync, metadata, fdatasync).
    fn move_object(&self, m: &Move) -> Result<()>;
    /// Everything is durable: end the file at `len` (and close cleanly).
    fn finish(&self, len: u64) -> Result<()>;
}

/// What a compaction did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub len_before: u64,
    pub len_after: u64,
    pub zero_blocks: u64,
    pub released: u64,
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
pub fn compact(
    top: &dyn Compact,
    disk: &Disk,
    parents: Option<&Disk>,
    ctl: &Control,
) -> Result<Report> {
    top.compactable()?;
    let mut report = Report {
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
        for m in &moves {
            if ctl.cancel.load(Ordering::Relaxed) {
                report.interrupted = true;
                break;
            }
            top.move_object(m)?;
            report.moved += 1;
            report.moved_bytes += m.object.len;
            (ctl.moved)(m.object.len);
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
}
