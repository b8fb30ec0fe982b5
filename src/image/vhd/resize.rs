//! Growing a VHD (`vdiskfs resize`), crash-safe without a log.
//!
//! VHD has no journal, so every step leaves a file that opens at the old size or the
//! new one, and each step is flushed before the next (the write path's order: data, then
//! what points at it). Single 512-byte sector writes are taken to be atomic, as the write
//! path does for BAT sectors.
//!
//! Dynamic and differencing disks:
//! 1. zeros over the old last block's bytes past the old end (if it is allocated), and
//!    0xFFFFFFFF over BAT entries the new size starts to use, where the BAT's sectors
//!    already have room (unreferenced at the old size); flush;
//! 2. when the BAT's sectors are too small: the footer is copied (unchanged) to where the
//!    file will end, flush; the new BAT (old entries, then unallocated ones) goes where
//!    the footer was, flush; the dynamic header's first sector (Table Offset, Max Table
//!    Entries, checksum: all in that sector) points at it, flush. The old BAT stays as
//!    unreferenced space. Until the footer changes the disk has the old size;
//! 3. the footer at the end with the new Current Size, Original Size (libvhdi reads the
//!    disk's size from it) and geometry (the specification's CHS algorithm), flush; then its copy
//!    at offset 0, flush. Between these two `check` reports that the copy differs (the end
//!    footer is the one readers use); running `resize` again rewrites the copy.
//!
//! Fixed disks (raw data, then the footer at Current Size):
//! 1. the old footer is copied to the new end (and the file cut after it, when a crashed
//!    earlier run left it longer), flush: the disk still has the old size, and the old
//!    footer bytes at the old end lie outside it;
//! 2. zeros over `[old size, new size)` (the old footer's bytes included; holes are
//!    zeros already and stay holes), flush;
//! 3. the footer with the new size at the end, flush.
//!
//! So the old footer's bytes are never disk data. A crash after step 1 or 2 leaves a
//! valid fixed disk of the old size with unreferenced bytes after it; `resize` run again
//! finishes (or redoes) the job.
//!
//! Shrinking a VHD is refused by the command (Hyper-V shrinks only VHDX).

use super::bat::{MAX_BAT_ENTRIES, UNALLOCATED};
use super::dynamic::HEADER_SIZE;
use super::footer::{checksum, DiskType, Geometry, FOOTER_SIZE};
use super::{Vhd, SECTOR};
use crate::error::{Error, Request, Result};

/// Largest virtual size a VHD can describe (2040 GiB, the specification's limit).
pub const MAX_SIZE: u64 = super::create::MAX_SIZE;
const MIB: u64 = 1 << 20;

/// What a resize did, for the command's report.
#[derive(Debug, Clone, Default)]
pub struct Resized {
    /// The BAT was moved to this offset.
    pub bat_moved_to: Option<u64>,
}

impl Vhd {
    /// Virtual PC and qemu (creator "vpc " / "qemu") size a VHD by its CHS geometry,
    /// not by Current Size: for files they made, `size` is rounded up to the next size
    /// the geometry describes exactly (as `qemu-img create` does), so they read the same
    /// disk; other files (Hyper-V, vdiskfs, qemu with force_size) only to whole sectors.
    /// Past the largest geometry (about 127 GiB) every reader uses Current Size.
    /// Returns the size and, when the geometry decided it, the creator.
    pub fn round_size(&self, size: u64) -> (u64, Option<String>) {
        let sectors = size.div_ceil(SECTOR);
        let chs_sized = matches!(&self.footer.creator_application, b"vpc " | b"qemu");
        if !chs_sized {
            return (sectors * SECTOR, None);
        }
        let max = Geometry::for_sectors(u64::MAX / SECTOR);
        for i in 0..(1u64 << 20) {
            let g = Geometry::for_sectors(sectors + i);
            if g == max {
                break;
            }
            if g.bytes() >= sectors * SECTOR {
                return (
                    g.bytes(),
                    Some(super::footer::fourcc(&self.footer.creator_application)),
                );
            }
        }
        (sectors * SECTOR, None)
    }

    /// Grow to `new_size` (a multiple of 512, larger than the current size). Writable
    /// opens only.
    pub(crate) fn grow_to(&self, new_size: u64) -> Result<Resized> {
        let path = &self.file.path;
        let old = self.footer.current_size;
        if !new_size.is_multiple_of(SECTOR) || new_size < old || new_size > MAX_SIZE {
            return Err(Error::Request(Request::VhdResizeSize {
                path: path.to_path_buf(),
                asked: new_size,
            }));
        }
        let len = self.real_len()?;
        let footer_pos = len.saturating_sub(FOOTER_SIZE as u64);
        let mut end = [0u8; FOOTER_SIZE];
        if len >= FOOTER_SIZE as u64 {
            self.file.read_exact_at(&mut end, footer_pos)?;
        }
        if &end[..8] != b"conectix" {
            return Err(Error::Request(Request::FooterNotLast {
                path: path.to_path_buf(),
            }));
        }
        let mut next = self.footer.clone();
        next.current_size = new_size;
        // Original Size too: libvhdi (20210425) takes the disk's size from it.
        next.original_size = new_size;
        next.disk_geometry = Geometry::for_sectors(new_size / SECTOR);
        let new_footer = next.to_bytes();
        match self.footer.disk_type {
            DiskType::Fixed => {
                self.grow_fixed(old, new_size, footer_pos, len, &end, &new_footer)?;
                Ok(Resized::default())
            }
            DiskType::Dynamic | DiskType::Differencing => {
                self.grow_sparse(old, new_size, footer_pos, &end, &new_footer)
            }
        }
    }

    fn real_len(&self) -> Result<u64> {
        self.file.stat_len()
    }

    fn grow_fixed(
        &self,
        old: u64,
        new_size: u64,
        footer_pos: u64,
        len: u64,
        old_footer: &[u8; FOOTER_SIZE],
        new_footer: &[u8; FOOTER_SIZE],
    ) -> Result<()> {
        let f = &self.file;
        if footer_pos != new_size {
            f.write_all_at(old_footer, new_size)?;
            f.sync_data()?;
            let want = new_size + FOOTER_SIZE as u64;
            if len > want {
                f.file
                    .set_len(want)
                    .map_err(|e| Error::io(&f.path, "truncate", want, e))?;
                f.sync_data()?;
            }
        }
        // Zeros over whatever is not a hole in [old, new) (the old footer, and what an
        // interrupted earlier run left); where the file system cannot tell, over all.
        let zeros = vec![0u8; MIB.min(new_size - old) as usize];
        let mut at = old;
        while at < new_size {
            use crate::image::raw::seek;
            use nix::unistd::Whence;
            let start = match seek(&f.file, at, Whence::SeekData) {
                None => at,
                Some(None) => new_size,
                Some(Some(d)) => d.min(new_size),
            };
            let end = match seek(&f.file, start, Whence::SeekHole) {
                Some(Some(h)) if start < new_size => h.clamp(start, new_size),
                _ => new_size,
            };
            let mut p = start;
            while p < end {
                let n = (end - p).min(MIB);
                f.write_all_at(&zeros[..n as usize], p)?;
                p += n;
            }
            if end >= new_size {
                break;
            }
            at = end.max(at + 1);
        }
        f.sync_data()?;
        f.write_all_at(new_footer, new_size)?;
        f.sync_data()
    }

    fn grow_sparse(
        &self,
        old: u64,
        new_size: u64,
        footer_pos: u64,
        old_footer: &[u8; FOOTER_SIZE],
        new_footer: &[u8; FOOTER_SIZE],
    ) -> Result<Resized> {
        let f = &self.file;
        let path = &f.path;
        let h = self.header.as_ref().expect("sparse disk");
        let bat = self.bat.as_ref().expect("sparse disk");
        let bs = h.block_size as u64;
        let old_needed = bat.len() as u64;
        let needed = new_size.div_ceil(bs);
        if needed > MAX_BAT_ENTRIES as u64 {
            return Err(Error::Request(Request::VhdResizeBlocks {
                path: path.to_path_buf(),
                needed,
                block_size: bs,
                max: MAX_BAT_ENTRIES,
            }));
        }
        // Step 1: the old last block's tail, and spare BAT entries in place.
        if !old.is_multiple_of(bs) {
            let lb = (old / bs) as usize;
            let e = bat.entry(lb);
            if e != UNALLOCATED {
                let data = e as u64 * SECTOR + bat.bitmap_size as u64;
                let from = old % bs;
                let to = bs.min(new_size - lb as u64 * bs);
                f.write_all_at(&vec![0u8; (to - from) as usize], data + from)?;
            }
        }
        let capacity = (h.max_table_entries as u64 * 4).div_ceil(SECTOR) * SECTOR / 4;
        let mut header = [0u8; HEADER_SIZE];
        f.read_exact_at(&mut header, footer_header_at(self))?;
        let mut moved = None;
        if needed <= capacity {
            let n = (needed - old_needed) as usize;
            let at = h.table_offset + old_needed * 4;
            let mut cur = vec![0u8; n * 4];
            f.read_exact_at(&mut cur, at)?;
            if cur.iter().any(|&b| b != 0xFF) {
                f.write_all_at(&vec![0xFF; n * 4], at)?;
            }
            f.sync_data()?;
            if needed > h.max_table_entries as u64 {
                self.write_header_sector(&mut header, h.table_offset, needed as u32)?;
            }
        } else {
            f.sync_data()?;
            // Step 2: move the BAT to where the footer is, the footer past it.
            let bat_at = footer_pos.div_ceil(SECTOR) * SECTOR;
            let bat_len = (needed * 4).div_ceil(SECTOR) * SECTOR;
            let new_footer_pos = bat_at + bat_len;
            if new_footer_pos / SECTOR >= UNALLOCATED as u64 {
                return Err(Error::Request(Request::VhdFileTooLarge {
                    path: path.to_path_buf(),
                }));
            }
            f.write_all_at(old_footer, new_footer_pos)?;
            f.sync_data()?;
            let mut table = vec![0xFFu8; bat_len as usize];
            for b in 0..old_needed as usize {
                table[b * 4..b * 4 + 4].copy_from_slice(&bat.entry(b).to_be_bytes());
            }
            f.write_all_at(&table, bat_at)?;
            f.sync_data()?;
            self.write_header_sector(&mut header, bat_at, needed as u32)?;
            moved = Some(bat_at);
            return self.finish_sparse(new_footer_pos, new_footer, moved);
        }
        self.finish_sparse(footer_pos, new_footer, moved)
    }

    /// Step 3: the footer at the end, then its copy at offset 0.
    fn finish_sparse(
        &self,
        footer_pos: u64,
        new_footer: &[u8; FOOTER_SIZE],
        moved: Option<u64>,
    ) -> Result<Resized> {
        let f = &self.file;
        f.write_all_at(new_footer, footer_pos)?;
        f.sync_data()?;
        f.write_all_at(new_footer, 0)?;
        f.sync_data()?;
        Ok(Resized {
            bat_moved_to: moved,
        })
    }

    /// Rewrite the dynamic header's first sector with a new Table Offset and Max Table
    /// Entries (and checksum, all three in that sector), flushed.
    fn write_header_sector(
        &self,
        header: &mut [u8; HEADER_SIZE],
        table_offset: u64,
        entries: u32,
    ) -> Result<()> {
        header[16..24].copy_from_slice(&table_offset.to_be_bytes());
        header[28..32].copy_from_slice(&entries.to_be_bytes());
        let c = checksum(header, 36);
        header[36..40].copy_from_slice(&c.to_be_bytes());
        self.file
            .write_all_at(&header[..SECTOR as usize], footer_header_at(self))?;
        self.file.sync_data()
    }

    /// Finish a resize a crash interrupted between the footer at the end and its copy
    /// at offset 0: rewrite the copy from the end footer when only the size fields
    /// differ. Returns whether it did.
    pub(crate) fn repair_footer_copy(&self) -> Result<bool> {
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(false);
        }
        let len = self.real_len()?;
        if len < 2 * FOOTER_SIZE as u64 {
            return Ok(false);
        }
        let mut head = [0u8; FOOTER_SIZE];
        self.file.read_exact_at(&mut head, 0)?;
        let mut tail = [0u8; FOOTER_SIZE];
        self.file
            .read_exact_at(&mut tail, len - FOOTER_SIZE as u64)?;
        if head == tail || &head[..8] != b"conectix" {
            return Ok(false);
        }
        // Only the sizes (40..56), Disk Geometry (56..60) and the checksum may differ.
        let same = |r: std::ops::Range<usize>| head[r.clone()] == tail[r];
        if !(same(0..40) && same(60..64) && same(68..FOOTER_SIZE)) {
            return Ok(false);
        }
        self.file.write_all_at(&tail, 0)?;
        self.file.sync_data()?;
        Ok(true)
    }
}

fn footer_header_at(v: &Vhd) -> u64 {
    v.footer.data_offset
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::create::{create_dynamic, fixed_footer};
    use super::super::Vhd;
    use crate::error::{Finding, VhdDefect};
    use crate::image::vhdx::resize::tests::{cut_everywhere, write_with_hole};
    use crate::layer::{OpenOptions, WritableLayer};
    use crate::test_support::TempDir;

    fn vhd_resize(new: u64) -> impl Fn(&Path) -> bool {
        move |p: &Path| match Vhd::open(p, OpenOptions::writable()) {
            Ok(v) => {
                let r = v
                    .repair_footer_copy()
                    .and_then(|_| v.grow_to(new))
                    .and_then(|_| WritableLayer::close(&v));
                r.is_ok()
            }
            Err(_) => false,
        }
    }

    /// Between the end footer and its copy at offset 0 `check` names the copy, and the
    /// size is the new one (the end footer rules).
    fn copy_behind(new: u64) -> impl Fn(&[Finding], u64) -> bool {
        move |p: &[Finding], size: u64| {
            size == new && p == [Finding::from(VhdDefect::FooterCopyDiffers)]
        }
    }

    #[test]
    fn a_cut_vhd_grow_leaves_old_or_new_size() {
        let d = TempDir::new("vhd-resize-cut");
        let size: u64 = (8 << 20) + 1536;
        let dynamic = d.join("t.vhd");
        create_dynamic(&dynamic, size, 1 << 20).unwrap();
        let data = write_with_hole(&dynamic, size, 4);
        // In the BAT's sectors (odd growth), then past them (the BAT moves).
        for new in [size + (3 << 20) + 512, 140 << 20] {
            cut_everywhere(
                &d,
                &dynamic,
                &data,
                new,
                &vhd_resize(new),
                &copy_behind(new),
            );
        }

        let fixed = d.join("f.vhd");
        let mut bytes = data.clone();
        bytes.extend_from_slice(&fixed_footer(&fixed, size).unwrap());
        std::fs::write(&fixed, &bytes).unwrap();
        let none = |_: &[Finding], _: u64| false;
        for new in [size + 512, size + (3 << 20) + 512] {
            cut_everywhere(&d, &fixed, &data, new, &vhd_resize(new), &none);
        }
    }
}
