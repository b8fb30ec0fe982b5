//! Sector bitmap blocks (MS-VHDX 2.4): one bit per logical sector, bit 0 of byte 0 for
//! the first sector of the chunk; 1 = the sector is in this file, 0 = ask the parent.
//! Each 1 MiB bitmap block is loaded on first use and kept as little-endian 64-bit words
//! (so bit `i` of the chunk is bit `i % 64` of word `i / 64`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result, VhdxDefect};
use crate::image::ImageFile;

pub const BITMAP_BLOCK_SIZE: usize = 1 << 20;

pub struct SectorBitmaps {
    chunks: Vec<OnceLock<Box<[AtomicU64]>>>,
    /// File offsets of the bitmap blocks loaded so far. Two chunks may not share one:
    /// besides being corrupt, that is how a crafted file would make us hold a 1 MiB
    /// copy per chunk of a 64 TiB disk. With distinct offsets, bitmap memory is bounded
    /// by the size of the file itself.
    load: Mutex<HashSet<u64>>,
}

pub type Bits = [AtomicU64];

impl SectorBitmaps {
    pub fn new(chunks: u64) -> Self {
        SectorBitmaps {
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            load: Mutex::new(HashSet::new()),
        }
    }

    /// The bitmap of `chunk`, read from `file_offset` the first time.
    pub fn get(&self, file: &ImageFile, chunk: u64, file_offset: u64) -> Result<&Bits> {
        let slot = &self.chunks[chunk as usize];
        if let Some(b) = slot.get() {
            return Ok(b);
        }
        let mut loaded = self.load.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.get() {
            return Ok(b);
        }
        if !loaded.insert(file_offset) {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::BitmapShared {
                    chunk,
                    offset: file_offset,
                },
            ));
        }
        let mut raw = vec![0u8; BITMAP_BLOCK_SIZE];
        file.read_exact_at(&mut raw, file_offset)?;
        Ok(slot.get_or_init(|| from_bytes(&raw)))
    }

    /// Install a bitmap for a chunk (a writer that just allocated it at `file_offset`).
    pub fn install(&self, chunk: u64, file_offset: u64, bits: Box<[AtomicU64]>) -> &Bits {
        self.load
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file_offset);
        self.chunks[chunk as usize].get_or_init(|| bits)
    }

    pub fn loaded(&self, chunk: u64) -> Option<&Bits> {
        self.chunks[chunk as usize].get().map(|b| &**b)
    }
}

pub fn from_bytes(raw: &[u8]) -> Box<[AtomicU64]> {
    raw.chunks_exact(8)
        .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
        .collect()
}

pub fn empty() -> Box<[AtomicU64]> {
    (0..BITMAP_BLOCK_SIZE / 8)
        .map(|_| AtomicU64::new(0))
        .collect()
}

pub fn get_bit(bits: &Bits, i: u64) -> bool {
    (bits[(i / 64) as usize].load(Ordering::Acquire) >> (i % 64)) & 1 == 1
}

/// Call `f(word, mask)` for the words covering bits `[start, start + n)`.
fn for_each_mask(start: u64, n: u64, mut f: impl FnMut(usize, u64)) {
    let mut i = start;
    let end = start + n;
    while i < end {
        let w = i / 64;
        let lo = i % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        f(w as usize, mask);
        i = w * 64 + hi;
    }
}

/// Set bits `[start, start + n)`.
pub fn set_bits(bits: &Bits, start: u64, n: u64) {
    for_each_mask(start, n, |w, m| {
        bits[w].fetch_or(m, Ordering::AcqRel);
    });
}

/// Clear bits `[start, start + n)`.
pub fn clear_bits(bits: &Bits, start: u64, n: u64) {
    for_each_mask(start, n, |w, m| {
        bits[w].fetch_and(!m, Ordering::AcqRel);
    });
}

/// How many bits from `start` (at most `max`, and never past the bitmap) equal `value`.
pub fn run_length(bits: &Bits, start: u64, max: u64, value: bool) -> u64 {
    let mut i = start;
    let end = (start + max).min(bits.len() as u64 * 64);
    let max = end.saturating_sub(start);
    while i < end {
        let w = i / 64;
        let word = bits[w as usize].load(Ordering::Acquire);
        let word = if value { !word } else { word };
        // Bits at or after position i%64 that differ from `value`.
        let differing = word >> (i % 64);
        if differing == 0 {
            i = (w + 1) * 64;
        } else {
            i += differing.trailing_zeros() as u64;
            return (i - start).min(max);
        }
    }
    max
}

/// The bitmap of one 1 MiB block as bytes (for writing it back).
pub fn to_bytes(bits: &Bits, first_word: usize, words: usize) -> Vec<u8> {
    bits[first_word..first_word + words]
        .iter()
        .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_is_lsb_first() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0b0000_0101; // sectors 0 and 2
        raw[9] = 0x80; // sector 79
        let bits = from_bytes(&raw);
        assert!(get_bit(&bits, 0) && !get_bit(&bits, 1) && get_bit(&bits, 2));
        assert!(get_bit(&bits, 79) && !get_bit(&bits, 78));
    }

    #[test]
    fn runs_and_sets() {
        let bits: Box<Bits> = (0..8).map(|_| AtomicU64::new(0)).collect();
        set_bits(&bits, 3, 130);
        assert_eq!(run_length(&bits, 0, 500, false), 3);
        assert_eq!(run_length(&bits, 3, 500, true), 130);
        assert_eq!(run_length(&bits, 133, 500, false), 512 - 133);
        assert_eq!(run_length(&bits, 10, 5, true), 5);
        set_bits(&bits, 0, 512);
        assert_eq!(run_length(&bits, 0, 512, true), 512);
        clear_bits(&bits, 70, 100);
        assert_eq!(run_length(&bits, 0, 512, true), 70);
        assert_eq!(run_length(&bits, 70, 512, false), 100);
        assert_eq!(run_length(&bits, 170, 512, true), 512 - 170);
    }
}
