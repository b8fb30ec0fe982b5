//! The Block Allocation Table (MS-VHDX 2.5): payload entries interleaved with one sector
//! bitmap entry per chunk. Loaded lazily in 1 MiB pages so a 64 TiB disk's BAT is not
//! read into memory up front; entries are atomics so a writer can update them while
//! readers map without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::metadata::Metadata;
use super::region::Region;
use crate::error::{Error, Result, VhdxDefect};
use crate::image::ImageFile;

pub const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
pub const PAYLOAD_BLOCK_ZERO: u64 = 2;
pub const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;
pub const SB_BLOCK_NOT_PRESENT: u64 = 0;
pub const SB_BLOCK_PRESENT: u64 = 6;

/// Entries per lazily loaded page (1 MiB of BAT).
pub const PAGE_ENTRIES: u64 = 128 * 1024;
const MIB: u64 = 1 << 20;
/// Sectors described by one sector bitmap block (2^23).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

pub fn state(entry: u64) -> u64 {
    entry & 7
}

/// FileOffsetMB as a byte offset.
pub fn file_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

pub fn make_entry(state: u64, file_offset: u64) -> u64 {
    debug_assert_eq!(file_offset % MIB, 0);
    (file_offset & !(MIB - 1)) | state
}

pub struct Bat {
    pub region: Region,
    /// BAT entries this disk uses (the region may be larger).
    pub entries: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub bitmap_blocks: u64,
    pages: Vec<OnceLock<Box<[AtomicU64]>>>,
    load: Mutex<()>,
}

impl Bat {
    pub fn new(file: &ImageFile, region: Region, meta: &Metadata) -> Result<Bat> {
        let bs = meta.block_size as u64;
        let chunk_ratio = (SECTORS_PER_BITMAP * meta.logical_sector_size as u64) / bs;
        let data_blocks = meta.virtual_size.div_ceil(bs);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let entries = if meta.has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        let need = entries * 8;
        if need > region.length {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::BatSize {
                    length: region.length,
                    virtual_size: meta.virtual_size,
                    block_size: meta.block_size,
                    need,
                },
            ));
        }
        let pages = (0..entries.div_ceil(PAGE_ENTRIES))
            .map(|_| OnceLock::new())
            .collect();
        Ok(Bat {
            region,
            entries,
            chunk_ratio,
            data_blocks,
            bitmap_blocks,
            pages,
            load: Mutex::new(()),
        })
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// The byte offset in the file of BAT entry `index`.
    pub fn entry_file_offset(&self, index: u64) -> u64 {
        self.region.file_offset + index * 8
    }

    fn page(&self, file: &ImageFile, p: usize) -> Result<&[AtomicU64]> {
        if let Some(page) = self.pages[p].get() {
            return Ok(page);
        }
        let _g = self.load.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(page) = self.pages[p].get() {
            return Ok(page);
        }
        let first = p as u64 * PAGE_ENTRIES;
        let n = PAGE_ENTRIES.min(self.entries - first) as usize;
        let mut raw = vec![0u8; n * 8];
        file.read_exact_at(&mut raw, self.entry_file_offset(first))?;
        let page: Box<[AtomicU64]> = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        Ok(self.pages[p].get_or_init(|| page))
    }

    pub fn get(&self, file: &ImageFile, index: u64) -> Result<u64> {
        if index >= self.entries {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::BatIndex {
                    index,
                    entries: self.entries,
                },
            ));
        }
        let page = self.page(file, (index / PAGE_ENTRIES) as usize)?;
        Ok(page[(index % PAGE_ENTRIES) as usize].load(Ordering::Acquire))
    }

    /// Update the in-memory copy (the writer puts the same value in the file).
    pub fn set(&self, file: &ImageFile, index: u64, value: u64) -> Result<()> {
        let page = self.page(file, (index / PAGE_ENTRIES) as usize)?;
        page[(index % PAGE_ENTRIES) as usize].store(value, Ordering::Release);
        Ok(())
    }
}
