//! Writing to a VHDX (the top of a writable chain).
//!
//! Ordering is the crash-safety story (MS-VHDX 2.2.2.1, 2.3):
//! 1. Before the first change of a session, both headers get a new FileWriteGuid and
//!    DataWriteGuid (written to the non-current slot with a higher SequenceNumber, flushed).
//! 2. Payload data is written in place, or into a newly allocated block at the 1 MiB
//!    aligned end of the file. The in-memory BAT and sector bitmaps change at once, so
//!    reads see the write; the changed 4 KiB metadata pages are remembered as dirty.
//! 3. On flush (fsync, FUSE flush, unmount, or when many pages are dirty): fdatasync the
//!    data, write the dirty BAT / sector-bitmap pages as one log entry (flushed), set the
//!    header's LogGuid if this is the session's first entry (flushed), copy the pages to
//!    their final place, fdatasync. A crash before the entry is complete leaves the old
//!    metadata; after it, replay brings the new. Data always reaches the disk before any
//!    metadata that points at it.
//! 4. On close, once everything is applied, LogGuid is cleared again.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::bat::{
    file_offset, make_entry, state, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_ZERO, SB_BLOCK_PRESENT,
};
use super::bitmap::{self, BITMAP_BLOCK_SIZE};
use super::log::LogWriter;
use super::{write_header_both, Vhdx};
use crate::error::{Error, Internal, Request, Result};
use crate::image::durable::{POISONED_CLOSE, POISONED_WRITE};
use crate::image::ImageFile;
use crate::layer::{block_pieces, WritableLayer};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Commit on our own, between blocks, once this many metadata pages are dirty. One block
/// dirties at most 18 pages (its BAT page, its chunk's sector-bitmap BAT page, and up to
/// 16 bitmap pages for a 256 MiB block of 512-byte sectors), so a commit holds at most
/// 81 pages, which fits one log entry (see `entry_page_limit`): every commit is a single
/// entry, replayed all or nothing.
const AUTO_COMMIT_PAGES: usize = 63;

/// Most data pages one log entry may carry. The log writer never wraps an entry around
/// the end of the ring and never overwrites the newest entry; with every entry at most a
/// third of the log (descriptor sector included) the next one always fits either after
/// the newest or before it, so the log can never get stuck (1 MiB log: 84 pages).
fn entry_page_limit(log_length: u64) -> usize {
    ((log_length / (3 * PAGE)) as usize)
        .saturating_sub(1)
        .max(1)
}

/// A dirty 4 KiB metadata page, by what it holds.
#[derive(Debug, Clone, Copy)]
enum Dirty {
    /// BAT page starting with this entry index.
    Bat { first_index: u64 },
    /// Page of the sector bitmap of `chunk`, starting at this byte of the bitmap block.
    Bitmap { chunk: u64, byte: u64 },
}

#[derive(Default)]
pub(crate) struct WriteState {
    /// Where the next block goes (1 MiB aligned, at or past the end of the file).
    next_free: u64,
    /// File size known to be stable on disk.
    flushed_len: u64,
    dirty: BTreeMap<u64, Dirty>,
    /// This session gave the file a new FileWriteGuid / DataWriteGuid.
    file_guid_rotated: bool,
    data_guid_rotated: bool,
    log: Option<LogWriter>,
    /// The header's LogGuid is this session's log.
    log_in_header: bool,
    /// Data written since the last fdatasync.
    unsynced: bool,
    /// Payload-block slots (1 MiB aligned, one block long, their bytes punched to zeros)
    /// that no BAT entry points at, durably: new blocks take them before the file grows.
    free: Vec<u64>,
    /// Slots a discard took out of the BAT in memory since the last commit. They join
    /// `free` only once a commit made the BAT change durable: reused earlier, a crash
    /// could leave the old entry and a new one both pointing at the slot.
    released: Vec<u64>,
}

impl WriteState {
    pub(crate) fn new(file_len: u64) -> Self {
        WriteState {
            next_free: file_len.div_ceil(MIB) * MIB,
            flushed_len: file_len,
            ..Default::default()
        }
    }
}

impl Vhdx {
    fn state_lock(&self) -> Result<std::sync::MutexGuard<'_, WriteState>> {
        match &self.write_state {
            Some(m) => {
                let st = m.lock().unwrap_or_else(|e| e.into_inner());
                // After a failed fdatasync nothing more is committed (`durable::Poison`).
                self.file.check_poison(POISONED_WRITE)?;
                Ok(st)
            }
            None => Err(Error::Request(Request::ReadOnlyOpen {
                path: self.file.path.clone(),
            })),
        }
    }

    /// New FileWriteGuid and DataWriteGuid before the first change of this session.
    fn start_session(&self, st: &mut WriteState) -> Result<()> {
        self.start_session_with(st, true)
    }

    /// Before the first change of this session: a new FileWriteGuid (MS-VHDX 2.2.2.1:
    /// the file is about to be modified), and a new DataWriteGuid too when `data` (the
    /// disk's user-visible content is about to change). A change that leaves the content
    /// alone (a parent locator) keeps DataWriteGuid, so this file's own children stay
    /// linked to it.
    fn start_session_with(&self, st: &mut WriteState, data: bool) -> Result<()> {
        if st.file_guid_rotated && (st.data_guid_rotated || !data) {
            return Ok(());
        }
        let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
        let (cur, slot) = &mut *h;
        let mut next = cur.clone();
        next.file_write_guid = Uuid::new_v4();
        if data {
            next.data_write_guid = Uuid::new_v4();
        }
        write_header_both(&self.file, cur, slot, next)?;
        st.file_guid_rotated = true;
        st.data_guid_rotated |= data;
        Ok(())
    }

    /// Allocate `len` bytes (a multiple of 1 MiB) at the end of the file.
    fn allocate(&self, st: &mut WriteState, len: u64) -> Result<u64> {
        let off = st.next_free;
        let end = off + len;
        self.file.grow(end)?;
        st.next_free = end;
        st.unsynced = true;
        Ok(off)
    }

    /// Space for a new payload block: a freed slot (zeros, see `discard_block`), else the
    /// end of the file.
    fn allocate_block(&self, st: &mut WriteState) -> Result<u64> {
        if let Some(off) = st.free.pop() {
            st.unsynced = true;
            return Ok(off);
        }
        self.allocate(st, self.meta.block_size as u64)
    }

    fn mark_bat_dirty(&self, st: &mut WriteState, index: u64) {
        let off = self.bat.entry_file_offset(index);
        let page = off - off % PAGE;
        let first_index = (page - self.bat.region.file_offset) / 8;
        st.dirty.insert(page, Dirty::Bat { first_index });
    }

    fn mark_bitmap_dirty(&self, st: &mut WriteState, chunk: u64, sb_off: u64, first: u64, n: u64) {
        // Bytes of the bitmap block holding bits [first, first + n).
        let b0 = first / 8;
        let b1 = (first + n).div_ceil(8);
        let mut p = b0 - b0 % PAGE;
        while p < b1 {
            st.dirty
                .insert(sb_off + p, Dirty::Bitmap { chunk, byte: p });
            p += PAGE;
        }
    }

    /// The sector bitmap of `chunk`, allocating its block when the chunk has none.
    fn bitmap_for_write(&self, st: &mut WriteState, chunk: u64) -> Result<(u64, &bitmap::Bits)> {
        let idx = self.bat.bitmap_index(chunk);
        let e = self.bat.get(&self.file, idx)?;
        if state(e) == SB_BLOCK_PRESENT {
            let off = self.bitmap_offset(chunk)?;
            let bits = self.bitmaps.get(&self.file, chunk, off)?;
            return Ok((off, bits));
        }
        let off = self.allocate(st, BITMAP_BLOCK_SIZE as u64)?;
        let bits = self.bitmaps.install(chunk, off, bitmap::empty());
        self.bat
            .set(&self.file, idx, make_entry(SB_BLOCK_PRESENT, off))?;
        self.mark_bat_dirty(st, idx);
        Ok((off, bits))
    }

    /// Set the sector bitmap bits of `len` bytes at `in_block` of `block` (in memory at
    /// once, in the file at the next commit).
    fn mark_present(&self, st: &mut WriteState, block: u64, in_block: u64, len: u64) -> Result<()> {
        let ss = self.meta.logical_sector_size as u64;
        let sectors_per_block = self.meta.block_size as u64 / ss;
        let chunk = block / self.bat.chunk_ratio;
        let (sb_off, bits) = self.bitmap_for_write(st, chunk)?;
        let first = (block % self.bat.chunk_ratio) * sectors_per_block + in_block / ss;
        bitmap::set_bits(bits, first, len / ss);
        self.mark_bitmap_dirty(st, chunk, sb_off, first, len / ss);
        Ok(())
    }

    /// Clear every sector bitmap bit of `block`.
    fn mark_absent(&self, st: &mut WriteState, block: u64) -> Result<()> {
        let ss = self.meta.logical_sector_size as u64;
        let sectors_per_block = self.meta.block_size as u64 / ss;
        let chunk = block / self.bat.chunk_ratio;
        let (sb_off, bits) = self.bitmap_for_write(st, chunk)?;
        let first = (block % self.bat.chunk_ratio) * sectors_per_block;
        if bitmap::run_length(bits, first, sectors_per_block, false) < sectors_per_block {
            bitmap::clear_bits(bits, first, sectors_per_block);
            self.mark_bitmap_dirty(st, chunk, sb_off, first, sectors_per_block);
        }
        Ok(())
    }

    /// Point `block` (not present, in a differencing file) at the new slot `off` as
    /// PARTIALLY_PRESENT with exactly the sectors of `[in_block, in_block + len)` marked
    /// present. Bits of a block that was not present are meaningless (a file from
    /// elsewhere may have left some set): the block's range is cleared first, or sectors
    /// never written here would hide the parent's data.
    fn set_partially_present(
        &self,
        st: &mut WriteState,
        block: u64,
        off: u64,
        in_block: u64,
        len: u64,
    ) -> Result<()> {
        self.mark_absent(st, block)?;
        self.mark_present(st, block, in_block, len)?;
        let idx = self.bat.payload_index(block);
        self.bat.set(
            &self.file,
            idx,
            make_entry(PAYLOAD_BLOCK_PARTIALLY_PRESENT, off),
        )?;
        self.mark_bat_dirty(st, idx);
        Ok(())
    }

    /// Write within one block.
    fn write_block(
        &self,
        st: &mut WriteState,
        block: u64,
        in_block: u64,
        data: &[u8],
    ) -> Result<()> {
        let idx = self.bat.payload_index(block);
        let e = self.bat.get(&self.file, idx)?;
        let st_now = self.check_payload(block, e)?;
        match st_now {
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                self.file.write_all_at(data, file_offset(e) + in_block)?;
            }
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                self.file.write_all_at(data, file_offset(e) + in_block)?;
                self.mark_present(st, block, in_block, data.len() as u64)?;
            }
            _ => {
                // A new block. In a differencing file a NOT_PRESENT block becomes
                // PARTIALLY_PRESENT with exactly the written sectors marked; everything
                // else (a base's unallocated block, ZERO/UNMAPPED/UNDEFINED blocks that
                // read as zeros) becomes FULLY_PRESENT, the rest of it zeros from the
                // file extension.
                let partial = self.meta.has_parent && st_now == PAYLOAD_BLOCK_NOT_PRESENT;
                let off = self.allocate_block(st)?;
                self.file.write_all_at(data, off + in_block)?;
                if partial {
                    let len = data.len() as u64;
                    self.set_partially_present(st, block, off, in_block, len)?;
                } else {
                    self.bat.set(
                        &self.file,
                        idx,
                        make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, off),
                    )?;
                    self.mark_bat_dirty(st, idx);
                }
            }
        }
        st.unsynced = true;
        Ok(())
    }

    /// Discard `len` bytes at `in_block` of `block` (within the block).
    ///
    /// A whole block of a dynamic or differencing file becomes PAYLOAD_BLOCK_ZERO
    /// (MS-VHDX 2.5.1.1: "implementations MUST return zeros"; the one state with a tightly
    /// defined read, and a differencing file's reads do not go to the parent) with
    /// FileOffsetMB 0; its slot is punched out of the file and reused once the BAT change
    /// is committed. A fixed file's blocks stay allocated (LeaveBlockAllocated) and are
    /// zeroed in place. Part of a block: zeros in place (punched where the host file
    /// system can), or, in a differencing file where the block is not present, a new
    /// block whose sectors in the range are marked present (zeros, not the parent).
    fn discard_block(
        &self,
        st: &mut WriteState,
        block: u64,
        in_block: u64,
        len: u64,
    ) -> Result<()> {
        let bs = self.meta.block_size as u64;
        let idx = self.bat.payload_index(block);
        let e = self.bat.get(&self.file, idx)?;
        let now = self.check_payload(block, e)?;
        let fixed = self.meta.leave_block_allocated && !self.meta.has_parent;
        let in_disk = bs.min(self.meta.virtual_size - block * bs);
        let whole = in_block == 0 && len >= in_disk;
        let held = matches!(
            now,
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
        );
        // States that read zeros already: a base's blocks not held, a child's zero,
        // unmapped and undefined blocks (we read zeros for each; MS-VHDX allows it).
        let reads_zeros = !held && (!self.meta.has_parent || now != PAYLOAD_BLOCK_NOT_PRESENT);
        if whole && !fixed {
            if now == PAYLOAD_BLOCK_ZERO || (reads_zeros && now == PAYLOAD_BLOCK_NOT_PRESENT) {
                return Ok(());
            }
            // Readers see the zero block first, then the slot is punched.
            self.bat
                .set(&self.file, idx, make_entry(PAYLOAD_BLOCK_ZERO, 0))?;
            self.mark_bat_dirty(st, idx);
            if held {
                let off = file_offset(e);
                // Punched before the commit: a crash before it leaves the old entry
                // pointing at zeros, which is what a discard not yet flushed may read.
                self.file.zero_range(off, bs, false)?;
                st.unsynced = true;
                st.released.push(off);
            }
            return Ok(());
        }
        if reads_zeros {
            return Ok(());
        }
        match now {
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                self.file
                    .zero_range(file_offset(e) + in_block, len, fixed)?;
            }
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                self.file
                    .zero_range(file_offset(e) + in_block, len, false)?;
                self.mark_present(st, block, in_block, len)?;
            }
            _ => {
                // Not present in a differencing file: a new block whose space reads
                // zeros (fresh file extension or a punched slot), nothing written but
                // the range marked present, as a write into it would leave it.
                let off = self.allocate_block(st)?;
                self.set_partially_present(st, block, off, in_block, len)?;
            }
        }
        st.unsynced = true;
        Ok(())
    }

    /// The current content of a dirty page, from the in-memory tables.
    fn page_content(&self, page_off: u64, what: Dirty) -> Result<Vec<u8>> {
        match what {
            Dirty::Bat { first_index } => {
                let mut buf = vec![0u8; PAGE as usize];
                // Entries past the ones this disk uses keep what the file has.
                self.file.read_exact_at(&mut buf, page_off)?;
                for i in 0..(PAGE / 8) {
                    let idx = first_index + i;
                    if idx >= self.bat.entries {
                        break;
                    }
                    let v = self.bat.get(&self.file, idx)?;
                    buf[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&v.to_le_bytes());
                }
                Ok(buf)
            }
            Dirty::Bitmap { chunk, byte } => {
                let bits = self
                    .bitmaps
                    .loaded(chunk)
                    .ok_or(Error::Internal(Internal::BitmapNotLoaded { chunk }))?;
                Ok(bitmap::to_bytes(
                    bits,
                    (byte / 8) as usize,
                    (PAGE / 8) as usize,
                ))
            }
        }
    }

    /// Make data durable, then log and apply the dirty metadata (an ordered flush point:
    /// `ImageFile::flush_ordered`; a failed fdatasync poisons the file).
    fn commit(&self, st: &mut WriteState) -> Result<()> {
        let unsynced = st.unsynced;
        self.file
            .flush_ordered(unsynced, || self.commit_metadata(st, unsynced))?;
        st.dirty.clear();
        // The BAT no longer points at discarded slots, durably: they may be reused.
        let released = std::mem::take(&mut st.released);
        st.free.extend(released);
        Ok(())
    }

    /// The metadata half of `commit`, once the data is durable. Returns whether it wrote
    /// anything (which `flush_ordered` then makes durable).
    fn commit_metadata(&self, st: &mut WriteState, synced_now: bool) -> Result<bool> {
        if synced_now {
            st.unsynced = false;
            st.flushed_len = self.file.stat_len()?;
        }
        if st.dirty.is_empty() {
            return Ok(false);
        }
        // The dirty set is cleared only when every page reached its place: after a failure
        // (a full disk, an I/O error) the next flush tries them all again. Re-applying a
        // page that did land is harmless.
        let pages: Vec<(u64, Vec<u8>)> = st
            .dirty
            .iter()
            .map(|(&off, &what)| Ok((off, self.page_content(off, what)?)))
            .collect::<Result<_>>()?;
        self.log_and_apply(st, &pages)?;
        Ok(true)
    }

    /// Write `pages` (4 KiB aligned offset, 4096 bytes) through the log: one entry per
    /// group of at most `entry_page_limit` pages (durable), LogGuid into the header on
    /// the session's first entry, then the pages to their places. The caller makes the
    /// result durable (`flush_ordered`).
    fn log_and_apply(&self, st: &mut WriteState, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        let log = st.log.get_or_insert_with(|| {
            let h = self.header();
            LogWriter::new(h.log_offset, h.log_length as u64, Uuid::new_v4(), 1)
        });
        let log_guid = log.log_guid();
        let flushed = st.flushed_len / MIB * MIB;
        let last = st.next_free.div_ceil(MIB) * MIB;
        let limit = entry_page_limit(self.header().log_length as u64);
        for (i, group) in pages.chunks(limit).enumerate() {
            if i > 0 {
                // The previous group's pages are in place before the next entry.
                self.file.sync_data()?;
            }
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, d)| (*o, d.as_slice())).collect();
            st.log
                .as_mut()
                .expect("created above")
                .write_entry(&self.file, &refs, flushed, last)?;
            if !st.log_in_header {
                // The session's first entry is durable; now make the header point at
                // this log.
                let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
                let (cur, slot) = &mut *h;
                let mut next = cur.clone();
                next.log_guid = log_guid;
                write_header_both(&self.file, cur, slot, next)?;
                st.log_in_header = true;
            }
            for (off, data) in group {
                self.file.write_all_at(data, *off)?;
            }
        }
        Ok(())
    }

    /// Most 4 KiB pages `commit_pages` takes in one (atomic) call.
    pub(crate) fn max_commit_pages(&self) -> usize {
        entry_page_limit(self.header().log_length as u64)
    }

    /// Reserve `len` bytes (rounded up to 1 MiB) at the 1 MiB aligned end of the file for
    /// a structural rewrite (a new BAT, a moved block, a larger metadata region). The
    /// space is unreferenced until a `commit_pages` points at it; whatever the caller
    /// writes there is made durable by that call before its log entry.
    pub(crate) fn allocate_space(&self, len: u64) -> Result<u64> {
        let mut st = self.state_lock()?;
        self.allocate(&mut st, len.div_ceil(MIB) * MIB)
    }

    /// The structural-rewrite primitive the verbs share (set-parent, resize, compact,
    /// merge records): commit pending writes, make data written with `file().write_all_at`
    /// durable, then replace the given 4 KiB pages (4 KiB aligned offsets, 4096 bytes
    /// each, at most `max_commit_pages`) as ONE log entry: after a crash the file has
    /// all of them or none. `data_changes`: the disk's content changes (new
    /// DataWriteGuid; false keeps it, e.g. for a new parent locator, so this file's
    /// children stay linked).
    ///
    /// The in-memory tables (metadata, regions, BAT) are NOT updated from the pages: after
    /// a structural rewrite, `close` the image and open it again.
    pub(crate) fn commit_pages(&self, pages: &[(u64, Vec<u8>)], data_changes: bool) -> Result<()> {
        let mut st = self.state_lock()?;
        let limit = entry_page_limit(self.header().log_length as u64);
        if pages.len() > limit
            || pages
                .iter()
                .any(|(o, d)| o % PAGE != 0 || d.len() != PAGE as usize)
        {
            return Err(Error::Internal(Internal::StructuralUpdate {
                path: self.file.path.clone(),
                pages: pages.len(),
                limit,
            }));
        }
        self.start_session_with(&mut st, data_changes)?;
        self.commit(&mut st)?;
        st.unsynced = true;
        self.file.flush_ordered(true, || {
            st.unsynced = false;
            st.flushed_len = self.file.stat_len()?;
            self.log_and_apply(&mut st, pages)?;
            Ok(true)
        })
    }

    /// Rotate FileWriteGuid (and DataWriteGuid when `data_changes`) before a structural
    /// rewrite writes anything to the file (MS-VHDX 2.2.2.1: before the first change);
    /// `commit_pages` does it too, this is for data written before it.
    pub(crate) fn start_structural_change(&self, data_changes: bool) -> Result<()> {
        let mut st = self.state_lock()?;
        self.start_session_with(&mut st, data_changes)
    }

    /// The image file, for a structural rewrite's data (see `commit_pages`).
    #[allow(dead_code)] // used by the structural verbs as they land
    pub(crate) fn file(&self) -> &ImageFile {
        &self.file
    }

    /// Commit everything and clear the header's LogGuid (clean close).
    pub fn close(&self) -> Result<()> {
        let Some(m) = &self.write_state else {
            return Ok(());
        };
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        self.file.check_poison(POISONED_CLOSE)?;
        self.commit(&mut st)?;
        st.log = None;
        if st.log_in_header {
            let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner());
            let (cur, slot) = &mut *h;
            let mut next = cur.clone();
            next.log_guid = Uuid::nil();
            write_header_both(&self.file, cur, slot, next)?;
            // Only now: if the header write failed, a later close tries again.
            st.log_in_header = false;
        }
        Ok(())
    }
}

impl WritableLayer for Vhdx {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state_lock()?;
        self.start_session(&mut st)?;
        let bs = self.meta.block_size as u64;
        for (block, in_block, n) in block_pieces(offset, data.len() as u64, bs) {
            let done = (block * bs + in_block - offset) as usize;
            self.write_block(&mut st, block, in_block, &data[done..done + n as usize])?;
            // Between blocks, so one block's BAT and bitmap pages share a commit.
            if st.dirty.len() >= AUTO_COMMIT_PAGES {
                self.commit(&mut st)?;
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.state_lock()?;
        self.start_session(&mut st)?;
        let bs = self.meta.block_size as u64;
        for (block, in_block, n) in block_pieces(offset, len, bs) {
            self.discard_block(&mut st, block, in_block, n)?;
            if st.dirty.len() >= AUTO_COMMIT_PAGES {
                self.commit(&mut st)?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.state_lock()?;
        self.commit(&mut st)
    }

    fn close(&self) -> Result<()> {
        Vhdx::close(self)
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        if self.write_state.is_some() {
            if let Err(e) = self.close() {
                ::log::error!("{}: closing: {e}", self.file.path.display());
            }
        }
    }
}
