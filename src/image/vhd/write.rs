//! Writing into a VHD opened writable (the top of a chain).
//!
//! Fixed disks are written in place. In dynamic and differencing disks a write to an
//! allocated block goes in place and then sets the bitmap bits of the written sectors;
//! a write to an unallocated block allocates a new block where the footer is.
//!
//! Crash-safety order for a new block (each step flushed before the next):
//! 1. write the footer at its new place, after the space the new block will take. The
//!    old footer is still intact at its old place, and the file is valid throughout:
//!    a reader sees a valid footer at the end, and the BAT does not point at the new
//!    space yet. (Writing the block first, as the issue text orders it, would leave a
//!    window where the end of the file holds block data instead of a footer; putting
//!    the footer first removes that window and keeps every other guarantee.)
//! 2. write the sector bitmap and the data into the new block. The rest of the block
//!    lies past the old end of the file, so it reads as zeros (a hole), which is the
//!    zero-fill a dynamic disk needs; the old footer's bytes are covered by the bitmap.
//! 3. write the BAT entry (4 bytes; one sector write, atomic).
//!
//! A crash before 3 leaves an orphan block that nothing points at; after 3 the block is
//! fully written. For an in-place write that makes new sectors present, the data is
//! flushed before the bitmap sector that exposes it is written.

use std::io;
use std::sync::Mutex;

use super::bat::{Bitmap, UNALLOCATED};
use super::footer::DiskType;
use super::{Vhd, SECTOR};
use crate::error::{Error, Result};
use crate::layer::{Layer, WritableLayer};

/// Serialises allocation and bitmap updates of one writable file.
pub(super) struct Writer {
    /// Offset of the footer at the end of the file.
    footer_pos: Mutex<u64>,
}

impl Writer {
    pub(super) fn new(footer_pos: u64) -> Writer {
        Writer {
            footer_pos: Mutex::new(footer_pos),
        }
    }
}

impl Vhd {
    fn writer(&self) -> &Writer {
        self.writer.as_ref().expect("writable() checked")
    }

    /// Write `data` (whole sectors) at `boff` inside block `b`.
    fn write_block(&self, b: usize, boff: u64, data: &[u8]) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let e = bat.entry(b);
        if e != UNALLOCATED {
            return self.write_in_place(b, e, boff, data);
        }
        let mut footer_pos = self
            .writer()
            .footer_pos
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let e = bat.entry(b);
        if e != UNALLOCATED {
            // Another thread allocated it meanwhile.
            drop(footer_pos);
            return self.write_in_place(b, e, boff, data);
        }
        self.allocate(&mut footer_pos, b, boff, data)
    }

    fn write_in_place(&self, b: usize, e: u32, boff: u64, data: &[u8]) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let block = e as u64 * SECTOR;
        let data_start = block + bat.bitmap_size as u64;
        // Cache the bitmap before anything changes on disk (see bat.rs).
        let bm = bat.bitmap(&self.file, b)?;
        self.file.write_all_at(data, data_start + boff)?;
        let s0 = (boff / SECTOR) as u32;
        let s1 = s0 + (data.len() as u64 / SECTOR) as u32;
        if bm.run_from(s0, s1) == (true, s1 - s0) {
            return Ok(());
        }
        // New sectors become present: data durable first, then the bitmap.
        self.file.sync_data()?;
        let _g = self
            .writer()
            .footer_pos
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut bytes = bm.to_bytes(bat.bitmap_size as usize);
        for s in s0..s1 {
            bytes[(s / 8) as usize] |= 0x80 >> (s % 8);
        }
        let first = (s0 / 8) as usize / 512 * 512;
        let last = ((s1 - 1) / 8) as usize / 512 * 512 + 512;
        self.file
            .write_all_at(&bytes[first..last], block + first as u64)?;
        bm.set_range(s0, s1);
        Ok(())
    }

    /// Allocate block `b` at the footer's place and write `data` at `boff` in it, in the
    /// order described at the top of this file. Called with the writer's lock held.
    fn allocate(&self, footer_pos: &mut u64, b: usize, boff: u64, data: &[u8]) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let path = &self.file.path;
        let old_len = self
            .file
            .file
            .metadata()
            .map_err(|e| Error::file(path, "stat", e))?
            .len();
        let new_block = footer_pos.div_ceil(SECTOR) * SECTOR;
        let sector = new_block / SECTOR;
        if sector >= UNALLOCATED as u64 {
            return Err(Error::io(
                path,
                "allocate a block (a VHD file cannot grow past 2 TiB)",
                new_block,
                io::Error::from_raw_os_error(libc::EFBIG),
            ));
        }
        let bitmap_size = bat.bitmap_size as u64;
        let new_footer_pos = new_block + bitmap_size + bat.block_size as u64;

        // 1. The footer after the new block; the old one stays valid until step 2.
        let footer = self.footer.to_bytes();
        let step1 = self
            .file
            .write_all_at(&footer, new_footer_pos)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = step1 {
            // Put the file back as it was (a torn footer must not stay at the end).
            let _ = self.file.file.set_len(old_len);
            let _ = self.file.sync_data();
            return Err(e);
        }

        // 2. Bitmap and data. A dynamic disk's block is zero around the data and every
        //    sector is marked present (as qemu and Hyper-V do); a differencing disk marks
        //    exactly the written sectors.
        let sectors = bat.sectors_per_block();
        let (bitmap, bytes) = if self.footer.disk_type == DiskType::Differencing {
            let s0 = (boff / SECTOR) as u32;
            let s1 = s0 + (data.len() as u64 / SECTOR) as u32;
            let mut bytes = vec![0u8; bitmap_size as usize];
            for s in s0..s1 {
                bytes[(s / 8) as usize] |= 0x80 >> (s % 8);
            }
            (Bitmap::from_bytes(&bytes, sectors), bytes)
        } else {
            (Bitmap::Full, vec![0xFF; bitmap_size as usize])
        };
        // If this fails the footer written in step 1 keeps the file valid, and the next
        // allocation reuses the same place.
        self.file.write_all_at(&bytes, new_block)?;
        self.file
            .write_all_at(data, new_block + bitmap_size + boff)?;
        self.file.sync_data()?;

        // 3. The BAT entry.
        let bat_at = bat.table_offset + 4 * b as u64;
        self.file
            .write_all_at(&(sector as u32).to_be_bytes(), bat_at)?;
        self.file.sync_data()?;

        // Publish: bitmap before entry, so a reader that sees the entry finds the bitmap.
        let fresh = bat.set_bitmap(b, bitmap);
        debug_assert!(fresh, "bitmap cached for an unallocated block");
        bat.set_entry(b, sector as u32);
        *footer_pos = new_footer_pos;
        Ok(())
    }
}

impl WritableLayer for Vhd {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let size = self.footer.current_size;
        if !offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || !matches!(offset.checked_add(len), Some(e) if e <= size)
        {
            return Err(Error::Invalid(format!(
                "{}: write of {len} bytes at {offset} is not sector-aligned or lies past the virtual size {size}",
                self.path().display()
            )));
        }
        let Some(bat) = &self.bat else {
            return self.file.write_all_at(data, offset);
        };
        let bs = bat.block_size as u64;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let b = (pos / bs) as usize;
            let boff = pos % bs;
            let n = (bs - boff).min(len - done);
            self.write_block(b, boff, &data[done as usize..(done + n) as usize])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data()
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
