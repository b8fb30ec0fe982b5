//! Writing into a VHD opened writable (the top of a chain).
//!
//! Fixed disks are written in place. In dynamic and differencing disks a write to an
//! allocated block goes in place (setting the bitmap bits of the written sectors); a
//! write to an unallocated block takes a new block from space reserved past the data.
//!
//! Metadata is batched, as for VHDX, and the file stays valid at every moment:
//!
//! - **Reserved space.** When a block is needed and no reserved space is left, the
//!   footer is written `k` blocks further on (past a hole) and flushed: one fdatasync
//!   for `k` allocations (`k` doubles from 1 up to 16 blocks or 32 MiB, whichever is
//!   more). The old footer is still at the old end until the flush completes; after it,
//!   the file ends with the new one. The space in between (the reservation) is a hole
//!   that no BAT entry points at; VHD readers ignore unreferenced space.
//! - **Allocation** takes the next reserved slot: the block's sector bitmap and data are
//!   written there, with no flush. The rest of the slot is still a hole, so it reads as
//!   zeros (the zero fill a dynamic disk needs). The first slot of a reservation covers
//!   the old footer with the bitmap (at least one sector). A slot is used up even when
//!   its writes fail, so stale bytes are never exposed by reusing it.
//! - **Deferred metadata.** The new block's BAT entry, and the bitmap sectors of in-place
//!   writes that make new sectors present, change in memory at once (readers see them:
//!   bitmap before BAT entry; bits only after their data was written) and are remembered
//!   as dirty sectors.
//! - **Flush** (fsync, FUSE flush, close, or `MAX_DIRTY` dirty sectors): fdatasync (every
//!   data write so far, including the new blocks' bitmaps and data, is durable), then
//!   write the dirty BAT and bitmap sectors from memory, then fdatasync. All of it runs
//!   under the writer's lock, so everything it writes describes data that the first
//!   fdatasync covered; a crash in between leaves each sector old or new, both of which
//!   only point at durable data. The dirty set is cleared only once everything landed, so
//!   a failed flush is retried in full by the next one.
//! - **Close** gives the unused reservation back: flush, write the footer right after the
//!   last used slot (inside the reservation: the footer at the end is untouched),
//!   fdatasync, truncate the file after it, fdatasync. A crash in between leaves either
//!   the old end (still a valid footer) or the new one.
//!
//! The footer copy at offset 0 never changes: no footer field depends on the file's
//! length, so the footer written at each new end is byte for byte the same.
//!
//! After a crash, what a session had reserved and not given back stays as a sparse,
//! unreferenced hole in front of the footer (at most one reservation).

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::bat::{Bitmap, UNALLOCATED};
use super::footer::{DiskType, FOOTER_SIZE};
use super::{Vhd, SECTOR};
use crate::error::{Error, Request, Result};
use crate::image::durable::POISONED_WRITE;
use crate::layer::{block_pieces, Layer, WritableLayer};

/// Flush on our own when this many metadata sectors are dirty.
const MAX_DIRTY: usize = 256;
/// A reservation holds at most this many blocks, or `RESERVE_BYTES`, whichever is more.
const RESERVE_BLOCKS: u64 = 16;
const RESERVE_BYTES: u64 = 32 << 20;

/// A metadata sector changed in memory and not yet written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dirty {
    /// BAT entries `128 * n .. 128 * n + 128` (one sector's worth).
    Bat(usize),
    /// Sector `sector` of the bitmap of block `block`.
    Bitmap { block: usize, sector: u32 },
}

/// Where the writer stands. Guarded by `Writer::state`, which serialises allocation,
/// bitmap changes and flushes of one writable file.
struct State {
    /// Offset of the footer at the end of the file.
    footer_pos: u64,
    /// Where the next block goes. `[next_block, footer_pos)` is reserved: unreferenced,
    /// never written (a hole).
    next_block: u64,
    /// Blocks the next reservation takes.
    reserve_next: u64,
    dirty: BTreeSet<Dirty>,
    /// Slots of blocks a discard unallocated (their data punched to zeros) that no BAT
    /// entry points at, durably: allocation takes them before reserving more.
    free: Vec<u64>,
    /// Slots unallocated in memory since the last flush; they join `free` once the BAT
    /// sector saying so is durable (reused earlier, a crash could leave two entries
    /// pointing at one slot).
    released: Vec<u64>,
}

pub(super) struct Writer {
    state: Mutex<State>,
    /// `state.dirty.len()` as of the last change, so a write can see whether a flush is
    /// due without waiting for the lock (which a flush holds across its fdatasyncs).
    dirty_len: AtomicUsize,
}

impl Writer {
    pub(super) fn new(footer_pos: u64) -> Writer {
        Writer {
            state: Mutex::new(State {
                footer_pos,
                // A 511-byte footer of an old tool may end off a sector boundary.
                next_block: footer_pos.div_ceil(SECTOR) * SECTOR,
                reserve_next: 1,
                dirty: BTreeSet::new(),
                free: Vec::new(),
                released: Vec::new(),
            }),
            dirty_len: AtomicUsize::new(0),
        }
    }
}

/// Set bits `[s0, s1)` in stored bitmap bytes (MSB first).
fn set_bits(bytes: &mut [u8], s0: u32, s1: u32) {
    for s in s0..s1 {
        bytes[(s / 8) as usize] |= 0x80 >> (s % 8);
    }
}

impl Vhd {
    fn writer(&self) -> &Writer {
        self.writer.as_ref().expect("writable() checked")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.writer()
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Record a dirty metadata sector (writer's lock held).
    fn mark_dirty(&self, st: &mut State, d: Dirty) {
        st.dirty.insert(d);
        self.writer()
            .dirty_len
            .store(st.dirty.len(), Ordering::Relaxed);
    }

    /// Bytes a block takes in the file (bitmap + data).
    fn block_len(&self) -> u64 {
        let bat = self.bat.as_ref().expect("sparse disk");
        bat.bitmap_size as u64 + bat.block_size as u64
    }

    /// Write `data` (whole sectors) at `boff` inside block `b`.
    fn write_block(&self, b: usize, boff: u64, data: &[u8]) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let e = bat.entry(b);
        if e != UNALLOCATED {
            return self.write_in_place(b, e, boff, data);
        }
        let mut st = self.state();
        let e = bat.entry(b);
        if e != UNALLOCATED {
            // Another thread allocated it meanwhile.
            drop(st);
            return self.write_in_place(b, e, boff, data);
        }
        self.allocate(&mut st, b, boff, data.len() as u64, Some(data))
    }

    fn write_in_place(&self, b: usize, e: u32, boff: u64, data: &[u8]) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let data_start = e as u64 * SECTOR + bat.bitmap_size as u64;
        // Cache the bitmap before anything changes on disk (see bat.rs).
        let bm = bat.bitmap(&self.file, b)?;
        self.file.write_all_at(data, data_start + boff)?;
        let s0 = (boff / SECTOR) as u32;
        let s1 = s0 + (data.len() as u64 / SECTOR) as u32;
        if bm.run_from(s0, s1) == (true, s1 - s0) {
            return Ok(());
        }
        // New sectors become present. Their data is written (in the page cache); the
        // bits go to memory now and to the file at the next flush, after an fdatasync.
        let mut st = self.state();
        bm.set_range(s0, s1);
        let first = s0 / 8 / SECTOR as u32;
        let last = (s1 - 1) / 8 / SECTOR as u32;
        for sector in first..=last {
            self.mark_dirty(&mut st, Dirty::Bitmap { block: b, sector });
        }
        Ok(())
    }

    /// Move the footer past `k` more blocks (see the top of this file).
    fn reserve(&self, st: &mut State) -> Result<()> {
        let path = &self.file.path;
        let block_len = self.block_len();
        // A block must start below sector 0xFFFFFFFF (the BAT's "unallocated").
        let limit = UNALLOCATED as u64 * SECTOR;
        let fit = limit.saturating_sub(st.next_block).div_ceil(block_len);
        let k = st.reserve_next.min(fit);
        if k == 0 {
            return Err(Error::io(
                path,
                "allocate a block (a VHD file cannot grow past 2 TiB)",
                st.next_block,
                io::Error::from_raw_os_error(libc::EFBIG),
            ));
        }
        let old_len = self.file.stat_len()?;
        let new_footer_pos = st.next_block + k * block_len;
        let footer = self.footer.to_bytes();
        let r = self
            .file
            .write_all_at(&footer, new_footer_pos)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = r {
            // Put the file back as it was (a torn footer must not stay at the end).
            let _ = self.file.file.set_len(old_len);
            let _ = self.file.sync_data();
            return Err(e);
        }
        st.footer_pos = new_footer_pos;
        let cap = RESERVE_BLOCKS.max(RESERVE_BYTES / block_len);
        st.reserve_next = (k * 2).min(cap);
        Ok(())
    }

    /// Reserve `len` bytes (a multiple of the sector size) of fresh space for structures
    /// (set-parent's locator data): pending metadata is committed, the footer is moved
    /// past the space (flushed, as for a block reservation), and the space is used up at
    /// once. Returns its offset; it starts over the old footer, and nothing points at it
    /// until the caller's header does.
    pub(super) fn reserve_bytes(&self, len: u64) -> Result<u64> {
        let mut st = self.state();
        self.file.check_poison(POISONED_WRITE)?;
        self.commit(&mut st)?;
        let start = st.next_block;
        let end = start + len.div_ceil(SECTOR) * SECTOR;
        if end > st.footer_pos {
            let old_len = self.file.stat_len()?;
            let r = self
                .file
                .write_all_at(&self.footer.to_bytes(), end)
                .and_then(|_| self.file.sync_data());
            if let Err(e) = r {
                // Put the file back as it was (a torn footer must not stay at the end).
                let _ = self.file.file.set_len(old_len);
                let _ = self.file.sync_data();
                return Err(e);
            }
            st.footer_pos = end;
        }
        st.next_block = end;
        Ok(start)
    }

    /// Allocate block `b` in a reserved slot and write `data` at `boff` in it. The BAT
    /// entry reaches the file at the next flush. Called with the writer's lock held.
    /// `data: None` marks `len` bytes at `boff` present without writing them: a slot's
    /// data area reads zeros (a reservation is a hole, a freed slot was punched).
    fn allocate(
        &self,
        st: &mut State,
        b: usize,
        boff: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let block_len = self.block_len();
        // A slot is used up from here on, whatever happens: a slot that may hold bytes of
        // a failed write is never handed out again.
        let new_block = match st.free.pop() {
            Some(slot) => slot,
            None => {
                if st.next_block + block_len > st.footer_pos {
                    self.reserve(st)?;
                }
                let b = st.next_block;
                st.next_block += block_len;
                b
            }
        };
        let sector = (new_block / SECTOR) as u32; // < UNALLOCATED: checked by reserve

        // A dynamic disk's block is zero around the data and every sector is marked
        // present (as qemu and Hyper-V do); a differencing disk marks exactly the
        // written sectors.
        let bitmap_size = bat.bitmap_size as u64;
        let sectors = bat.sectors_per_block();
        let (bitmap, bytes) = if self.footer.disk_type == DiskType::Differencing {
            let s0 = (boff / SECTOR) as u32;
            let s1 = s0 + (len / SECTOR) as u32;
            let mut bytes = vec![0u8; bitmap_size as usize];
            set_bits(&mut bytes, s0, s1);
            (Bitmap::from_bytes(&bytes, sectors), bytes)
        } else {
            (Bitmap::Full, vec![0xFF; bitmap_size as usize])
        };
        self.file.write_all_at(&bytes, new_block)?;
        if let Some(data) = data {
            self.file
                .write_all_at(data, new_block + bitmap_size + boff)?;
        }

        // Publish: bitmap before entry, so a reader that sees the entry finds the bitmap.
        let fresh = bat.set_bitmap(b, bitmap);
        // A dynamic block unallocated by a discard may keep its cached bitmap, which the
        // discard set in full (as the one written here).
        debug_assert!(
            fresh || self.footer.disk_type != DiskType::Differencing,
            "bitmap cached for an unallocated block"
        );
        bat.set_entry(b, sector);
        self.mark_dirty(st, Dirty::Bat(b / (SECTOR as usize / 4)));
        Ok(())
    }

    /// Discard `len` bytes at `boff` inside block `b` (whole sectors; 4 KiB units in a
    /// differencing disk, see `write_granularity`).
    ///
    /// A dynamic disk's whole block becomes unallocated (BAT entry 0xFFFFFFFF) and its
    /// data is punched out of the file; the slot is reused once the BAT sector is
    /// durable. VHD has no zero-block state, so in a differencing disk the range gets
    /// zeros with its bitmap bits set (punched where the block exists, a new block
    /// otherwise). Part of a dynamic block: zeros in place (punched).
    fn discard_block(&self, b: usize, boff: u64, len: u64) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let diff = self.footer.disk_type == DiskType::Differencing;
        let e = bat.entry(b);
        if e == UNALLOCATED && !diff {
            return Ok(());
        }
        let mut st = self.state();
        let e = bat.entry(b);
        if e == UNALLOCATED {
            // A new block in a reserved or freed slot (its data area reads zeros), the
            // range marked present; nothing written but the bitmap.
            return self.allocate(&mut st, b, boff, len, None);
        }
        drop(st);
        let data_start = e as u64 * SECTOR + bat.bitmap_size as u64;
        // Cached before the lock (a read), as `write_in_place` does.
        let bm = bat.bitmap(&self.file, b)?;
        let mut st = self.state();
        if !diff && boff == 0 && len == bat.block_size as u64 {
            // Readers see the block unallocated first, then its data is punched. A
            // cached bitmap stays (a OnceLock), set in full as a new block's will be.
            bm.set_range(0, bat.sectors_per_block());
            bat.set_entry(b, UNALLOCATED);
            self.mark_dirty(&mut st, Dirty::Bat(b / (SECTOR as usize / 4)));
            // Punched before the flush: a crash before it leaves the old entry
            // pointing at zeros, which is what a discard not yet flushed may read.
            self.file
                .zero_range(data_start, bat.block_size as u64, false)?;
            st.released.push(e as u64 * SECTOR);
            return Ok(());
        }
        self.file.zero_range(data_start + boff, len, false)?;
        let s0 = (boff / SECTOR) as u32;
        let s1 = s0 + (len / SECTOR) as u32;
        if bm.run_from(s0, s1) != (true, s1 - s0) {
            bm.set_range(s0, s1);
            for sector in s0 / 8 / SECTOR as u32..=(s1 - 1) / 8 / SECTOR as u32 {
                self.mark_dirty(&mut st, Dirty::Bitmap { block: b, sector });
            }
        }
        Ok(())
    }

    /// Write one dirty metadata sector from the in-memory tables.
    fn write_dirty(&self, d: Dirty) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        match d {
            Dirty::Bat(n) => {
                let per = SECTOR as usize / 4;
                let first = n * per;
                let end = (first + per).min(bat.len());
                let mut buf = Vec::with_capacity((end - first) * 4);
                for i in first..end {
                    buf.extend_from_slice(&bat.entry(i).to_be_bytes());
                }
                self.file
                    .write_all_at(&buf, bat.table_offset + first as u64 * 4)
            }
            Dirty::Bitmap { block, sector } => {
                let e = bat.entry(block);
                let bm = bat.bitmap(&self.file, block)?;
                let bytes = bm.to_bytes(bat.bitmap_size as usize);
                let from = sector as usize * SECTOR as usize;
                let to = (from + SECTOR as usize).min(bytes.len());
                self.file
                    .write_all_at(&bytes[from..to], e as u64 * SECTOR + from as u64)
            }
        }
    }

    /// Make every write so far durable: data first, then the metadata that exposes it
    /// (an ordered flush point, `ImageFile::flush_ordered`; a failed fdatasync poisons
    /// the file, and every later write, flush and close fails).
    fn commit(&self, st: &mut State) -> Result<()> {
        self.file.flush_ordered(true, || {
            // Cleared only when every sector reached its place: after a failure the next
            // flush writes them all again (rewriting one that did land is harmless).
            for &d in &st.dirty {
                self.write_dirty(d)?;
            }
            Ok(!st.dirty.is_empty())
        })?;
        st.dirty.clear();
        // The BAT no longer points at discarded slots, durably: they may be reused.
        let released = std::mem::take(&mut st.released);
        st.free.extend(released);
        self.writer().dirty_len.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Give back the unused reservation: the footer right after the last used slot,
    /// then the file cut after it. The file ends with a valid footer at every step.
    fn shrink(&self, st: &mut State) -> Result<()> {
        if st.next_block >= st.footer_pos {
            return Ok(());
        }
        let end = st.next_block;
        self.file.write_all_at(&self.footer.to_bytes(), end)?;
        self.file.sync_data()?;
        let new_len = end + FOOTER_SIZE as u64;
        self.file
            .file
            .set_len(new_len)
            .map_err(|e| Error::io(&self.file.path, "truncate", new_len, e))?;
        st.footer_pos = end;
        self.file.sync_data()
    }
}

impl Vhd {
    /// What `write` and `discard` (`what`) check first: whole sectors inside the virtual
    /// size, and a writer not poisoned by a failed flush.
    fn check_change(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.footer.current_size;
        if !offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || !matches!(offset.checked_add(len), Some(e) if e <= size)
        {
            return Err(Error::Request(Request::OutOfRange {
                path: self.path().to_path_buf(),
                op: what,
                len,
                offset,
                size,
            }));
        }
        if self.writer.is_some() {
            self.file.check_poison(POISONED_WRITE)?;
        }
        Ok(())
    }

    /// `change(block, offset in the block, length)` for each block piece of a dynamic or
    /// differencing file's range, then a commit when enough metadata is dirty.
    fn change_blocks(
        &self,
        block_size: u32,
        offset: u64,
        len: u64,
        mut change: impl FnMut(usize, u64, u64) -> Result<()>,
    ) -> Result<()> {
        for (b, boff, n) in block_pieces(offset, len, block_size as u64) {
            change(b as usize, boff, n)?;
        }
        if self.writer().dirty_len.load(Ordering::Relaxed) >= MAX_DIRTY {
            let mut st = self.state();
            if st.dirty.len() >= MAX_DIRTY {
                self.commit(&mut st)?;
            }
        }
        Ok(())
    }
}

impl WritableLayer for Vhd {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.check_change("write", offset, len)?;
        let Some(bat) = &self.bat else {
            return self.file.write_all_at(data, offset);
        };
        let bs = bat.block_size as u64;
        self.change_blocks(bat.block_size, offset, len, |b, boff, n| {
            let done = (b as u64 * bs + boff - offset) as usize;
            self.write_block(b, boff, &data[done..done + n as usize])
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_change("discard", offset, len)?;
        let Some(bat) = &self.bat else {
            // Fixed: zeros in place, the space stays allocated.
            return self.file.zero_range(offset, len, true);
        };
        self.change_blocks(bat.block_size, offset, len, |b, boff, n| {
            self.discard_block(b, boff, n)
        })
    }

    fn flush(&self) -> Result<()> {
        if self.bat.is_none() {
            return self.file.flush_ordered(true, || Ok(false));
        }
        let mut st = self.state();
        self.commit(&mut st)
    }

    /// Flush, then give back the unused reservation. A failure to give it back leaves
    /// a valid file (the footer at the end is untouched until the cut), so it is only
    /// a warning.
    fn close(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        if self.bat.is_none() {
            return self.file.flush_ordered(true, || Ok(false));
        }
        let mut st = self.state();
        self.commit(&mut st)?;
        if let Err(e) = self.shrink(&mut st) {
            log::warn!(
                "{}: could not give back reserved space: {e}",
                self.path().display()
            );
        }
        Ok(())
    }

    /// 4 KiB (eight sectors, one bitmap byte) for a differencing disk, so every bitmap
    /// byte we write is all-set or all-clear: libvhdi 20210425 reads a partly set byte
    /// wrongly (from its first set bit to the end of the byte, every sector comes from
    /// the child). Per-sector writes stay correct for vdiskfs and the specification; this
    /// only keeps the files readable by libvhdi. 512 otherwise.
    fn write_granularity(&self) -> u32 {
        if self.footer.disk_type == DiskType::Differencing {
            4096
        } else {
            SECTOR as u32
        }
    }
}

impl Drop for Vhd {
    /// A writable file is closed (flushed, reservation given back) when dropped, so
    /// nothing acknowledged by a write is left only in memory at a clean end.
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = WritableLayer::close(self) {
                ::log::error!("{}: closing: {e}", self.file.path.display());
            }
        }
    }
}
