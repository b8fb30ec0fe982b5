//! The Block Allocation Table and the per-block sector bitmaps, held in memory.
//!
//! BAT entries are big-endian u32 sector numbers (0xFFFFFFFF = block not allocated).
//! Each allocated block starts with its sector bitmap (one bit per 512-byte sector,
//! rounded up to a whole sector), followed by the block data. Bit order is MSB first:
//! sector 0 of a block is bit 7 (0x80) of byte 0. This follows the specification
//! ("Mapping a Disk Sector to a Sector in the Block") and was checked against libvhdi:
//! clearing 0x80 in byte 0 of a qemu-made block makes vhdimount show zeros in sector 0.
//!
//! Entries are atomics and bitmaps are loaded on first use into a `OnceLock`, so the
//! read path (`map`) takes no lock and does no I/O once a block's bitmap is cached.
//! Invariant relied on by the writer: a bitmap is cached in memory before any change
//! to it is made; changes go to the cache (under the writer's lock, after the data they
//! expose was written) and reach the file from the cache at the next flush, so the cache
//! always holds at least what the file does.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Feature, Result, VhdDefect};
use crate::image::ImageFile;

/// BAT value of a block not allocated in this file.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Most BAT entries accepted (8 Mi: 2040 GiB in 256 KiB blocks). Each costs about 40
/// bytes of memory; real files have at most about a million (2 MiB blocks).
pub const MAX_BAT_ENTRIES: u32 = 1 << 23;

/// A cached sector bitmap.
pub enum Bitmap {
    /// Every sector of the block is present (the usual case: qemu and Hyper-V write
    /// full bitmaps into dynamic disks); no memory beyond the tag.
    Full,
    /// Bits as stored, MSB first.
    Bits(Box<[AtomicU8]>),
}

impl Bitmap {
    /// Is sector `s` (index inside the block) present?
    pub fn get(&self, s: u32) -> bool {
        match self {
            Bitmap::Full => true,
            Bitmap::Bits(b) => b[(s / 8) as usize].load(Ordering::Acquire) & (0x80 >> (s % 8)) != 0,
        }
    }

    /// Length of the run of sectors with the same state as `s`, starting at `s` and
    /// stopping at `end`.
    pub fn run_from(&self, s: u32, end: u32) -> (bool, u32) {
        let state = self.get(s);
        let Bitmap::Bits(b) = self else {
            return (true, end - s);
        };
        let mut i = s + 1;
        while i < end {
            if i.is_multiple_of(8) && i + 8 <= end {
                let byte = b[(i / 8) as usize].load(Ordering::Acquire);
                if byte == if state { 0xFF } else { 0 } {
                    i += 8;
                    continue;
                }
            }
            if self.get(i) != state {
                break;
            }
            i += 1;
        }
        (state, i - s)
    }

    /// Number of present sectors among the first `sectors`.
    pub fn count(&self, sectors: u32) -> u64 {
        match self {
            Bitmap::Full => sectors as u64,
            Bitmap::Bits(_) => (0..sectors).filter(|&s| self.get(s)).count() as u64,
        }
    }

    /// Build from stored bytes (at least ceil(sectors / 8) of them).
    pub fn from_bytes(bytes: &[u8], sectors: u32) -> Bitmap {
        let full_bytes = (sectors / 8) as usize;
        let rem = sectors % 8;
        let full = bytes[..full_bytes].iter().all(|&b| b == 0xFF)
            && (rem == 0 || {
                let mask = 0xFFu8 << (8 - rem);
                bytes[full_bytes] & mask == mask
            });
        if full {
            Bitmap::Full
        } else {
            Bitmap::Bits(bytes.iter().map(|&b| AtomicU8::new(b)).collect())
        }
    }

    /// The stored form, `len` bytes (a `Full` bitmap is all ones, as Hyper-V and qemu
    /// write it, padding included).
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        match self {
            Bitmap::Full => vec![0xFF; len],
            Bitmap::Bits(b) => {
                let mut v: Vec<u8> = b.iter().map(|x| x.load(Ordering::Acquire)).collect();
                v.resize(len, 0);
                v
            }
        }
    }

    /// Set bits for sectors `[s, e)`; only valid on `Bits` (a `Full` map needs no change).
    pub fn set_range(&self, s: u32, e: u32) {
        if let Bitmap::Bits(b) = self {
            for i in s..e {
                b[(i / 8) as usize].fetch_or(0x80 >> (i % 8), Ordering::AcqRel);
            }
        }
    }
}

/// The BAT of one file, with lazily cached bitmaps.
pub struct Bat {
    entries: Box<[AtomicU32]>,
    bitmaps: Box<[OnceLock<Bitmap>]>,
    /// Bytes of block data.
    pub block_size: u32,
    /// Bytes of the bitmap in front of each block (whole sectors).
    pub bitmap_size: u32,
    /// Absolute offset of the BAT in the file.
    pub table_offset: u64,
}

impl Bat {
    /// Read `count` entries at `table_offset` and check each allocated block lies in
    /// `[min_start, data_end)` without overlapping the BAT or another block.
    pub fn load(
        file: &ImageFile,
        table_offset: u64,
        count: u32,
        block_size: u32,
        bitmap_size: u32,
        min_start: u64,
        data_end: u64,
    ) -> Result<Bat> {
        let path = &file.path;
        if count > MAX_BAT_ENTRIES {
            return Err(Error::unsupported(
                path,
                Feature::VhdBatEntries {
                    count,
                    max: MAX_BAT_ENTRIES,
                },
            ));
        }
        let bytes_len = count as u64 * 4;
        let table_end = table_offset
            .checked_add(bytes_len)
            .filter(|&e| e <= file.len())
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    VhdDefect::BatPastEnd {
                        count,
                        offset: table_offset,
                        file_len: file.len(),
                    },
                )
            })?;
        // Bounded by the file length, checked just above.
        let raw = file.read_vec_at(
            table_offset,
            bytes_len,
            MAX_BAT_ENTRIES as u64 * 4,
            "VHD BAT",
        )?;
        let block_len = bitmap_size as u64 + block_size as u64;
        let mut extents = Vec::new();
        let mut entries = Vec::with_capacity(count as usize);
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            if e != UNALLOCATED {
                let start = e as u64 * 512;
                let end = start + block_len;
                if start < min_start || end > data_end {
                    return Err(Error::corrupt(
                        path,
                        VhdDefect::BlockOutside {
                            entry: i,
                            sector: e,
                            offset: start,
                            block_len,
                            data_end,
                        },
                    ));
                }
                if start < table_end && end > table_offset {
                    return Err(Error::corrupt(
                        path,
                        VhdDefect::BlockOverlapsBat {
                            entry: i,
                            offset: start,
                        },
                    ));
                }
                extents.push((start, i));
            }
            entries.push(AtomicU32::new(e));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[0].0 + block_len > w[1].0 {
                return Err(Error::corrupt(
                    path,
                    VhdDefect::BlocksOverlap {
                        first: w[0].1,
                        second: w[1].1,
                        first_offset: w[0].0,
                        second_offset: w[1].0,
                    },
                ));
            }
        }
        let bitmaps = (0..count).map(|_| OnceLock::new()).collect();
        Ok(Bat {
            entries: entries.into_boxed_slice(),
            bitmaps,
            block_size,
            bitmap_size,
            table_offset,
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The raw BAT entry of block `b`.
    pub fn entry(&self, b: usize) -> u32 {
        self.entries[b].load(Ordering::Acquire)
    }

    /// Publish a newly allocated block (after its bitmap was cached with `set_bitmap`).
    pub fn set_entry(&self, b: usize, sector: u32) {
        self.entries[b].store(sector, Ordering::Release);
    }

    /// Cache the bitmap of a block being allocated. Returns false when one was already
    /// cached (cannot happen for an unallocated block under the writer's mutex).
    pub fn set_bitmap(&self, b: usize, bm: Bitmap) -> bool {
        self.bitmaps[b].set(bm).is_ok()
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u32 {
        self.block_size / 512
    }

    /// The bitmap of allocated block `b`, read from the file on first use.
    pub fn bitmap(&self, file: &ImageFile, b: usize) -> Result<&Bitmap> {
        if let Some(bm) = self.bitmaps[b].get() {
            return Ok(bm);
        }
        let e = self.entry(b);
        debug_assert_ne!(e, UNALLOCATED);
        // bitmap_size <= 64 KiB (block size ceiling).
        let mut buf = vec![0u8; self.bitmap_size as usize];
        super::pread(file, &mut buf, e as u64 * 512)?;
        let bm = Bitmap::from_bytes(&buf, self.sectors_per_block());
        // Another thread may have won the race with an equal (or, for the writer, a
        // newer) value; either way the cached one is right.
        let _ = self.bitmaps[b].set(bm);
        Ok(self.bitmaps[b].get().expect("just set"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_msb_first_and_runs() {
        let mut bytes = vec![0u8; 512];
        bytes[0] = 0b1000_0001; // sectors 0 and 7
        bytes[2] = 0xFF; // sectors 16..24
        let bm = Bitmap::from_bytes(&bytes, 4096);
        assert!(bm.get(0));
        assert!(!bm.get(1));
        assert!(bm.get(7));
        assert_eq!(bm.run_from(0, 4096), (true, 1));
        assert_eq!(bm.run_from(1, 4096), (false, 6));
        assert_eq!(bm.run_from(8, 4096), (false, 8));
        assert_eq!(bm.run_from(16, 4096), (true, 8));
        assert_eq!(bm.run_from(24, 4096), (false, 4096 - 24));
        assert_eq!(bm.run_from(24, 30), (false, 6));
        assert_eq!(bm.count(4096), 10);
        bm.set_range(1, 3);
        assert_eq!(bm.to_bytes(512)[0], 0b1110_0001);
    }

    #[test]
    fn full_detection() {
        let bm = Bitmap::from_bytes(&[0xFF; 512], 4096);
        assert!(matches!(bm, Bitmap::Full));
        // Block of 4 sectors: only the top 4 bits matter.
        let bm = Bitmap::from_bytes(&[0xF0], 4);
        assert!(matches!(bm, Bitmap::Full));
        let bm = Bitmap::from_bytes(&[0xE0], 4);
        assert!(matches!(bm, Bitmap::Bits(_)));
        assert_eq!(bm.count(4), 3);
    }
}
