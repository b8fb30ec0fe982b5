//! The dynamic disk header ("cxsparse"): 1024 big-endian bytes at the footer's Data
//! Offset, describing the BAT, the block size and (differencing disks) the parent.

use std::path::Path;

use super::footer::checksum;
use super::locator::{LocatorEntry, ENTRY_SIZE};
use crate::error::{Error, Feature, Result, VhdDefect};

/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// Cookie at offset 0 of the header.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Smallest block size accepted (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted. Real files use 512 KiB (Virtual PC) or 2 MiB; the
/// ceiling bounds the per-block buffers the writer allocates.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

const CHECKSUM_AT: usize = 36;
const NAME_AT: usize = 64;
const NAME_LEN: usize = 512;
const LOCATORS_AT: usize = 576;

/// A parsed dynamic disk header. Field names follow the specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    /// Bytes of data per block (excluding the sector bitmap); a power of two.
    pub block_size: u32,
    pub checksum: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_time_stamp: u32,
    /// Parent Unicode Name decoded from UTF-16BE, NULs trimmed.
    pub parent_unicode_name: String,
    pub parent_locators: [LocatorEntry; 8],
}

impl DynamicHeader {
    /// Parse and check the header read at file offset `at`. Returns the header and
    /// whether its checksum matched.
    pub fn parse(path: &Path, b: &[u8; HEADER_SIZE], at: u64) -> Result<(DynamicHeader, bool)> {
        if &b[0..8] != HEADER_COOKIE {
            return Err(Error::corrupt(path, VhdDefect::HeaderCookie { offset: at }));
        }
        let be32 = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let be64 = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(x)
        };
        let header_version = be32(24);
        if header_version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                Feature::VhdHeaderVersion {
                    offset: at,
                    major: header_version >> 16,
                    minor: header_version & 0xffff,
                },
            ));
        }
        let block_size = be32(32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::corrupt(
                path,
                VhdDefect::BlockSize {
                    offset: at,
                    block_size,
                    min: MIN_BLOCK_SIZE,
                    max: MAX_BLOCK_SIZE,
                },
            ));
        }
        let stored = be32(CHECKSUM_AT);
        let ok = checksum(b, CHECKSUM_AT) == stored;
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = b[NAME_AT..NAME_AT + NAME_LEN]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_unicode_name = String::from_utf16(&units)
            .map_err(|_| Error::corrupt(path, VhdDefect::ParentName { offset: at }))?;
        let mut parent_locators = [LocatorEntry::default(); 8];
        for (i, l) in parent_locators.iter_mut().enumerate() {
            let o = LOCATORS_AT + i * ENTRY_SIZE;
            *l = LocatorEntry::parse(&b[o..o + ENTRY_SIZE]);
        }
        Ok((
            DynamicHeader {
                data_offset: be64(8),
                table_offset: be64(16),
                header_version,
                max_table_entries: be32(28),
                block_size,
                checksum: stored,
                parent_unique_id,
                parent_time_stamp: be32(56),
                parent_unicode_name,
                parent_locators,
            },
            ok,
        ))
    }

    /// Serialise, computing a fresh checksum. A parent name longer than 256 UTF-16 code
    /// units is cut (the field is 512 bytes).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_unique_id);
        b[56..60].copy_from_slice(&self.parent_time_stamp.to_be_bytes());
        for (i, u) in self
            .parent_unicode_name
            .encode_utf16()
            .take(NAME_LEN / 2)
            .enumerate()
        {
            b[NAME_AT + 2 * i..NAME_AT + 2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.parent_locators.iter().enumerate() {
            let o = LOCATORS_AT + i * ENTRY_SIZE;
            b[o..o + ENTRY_SIZE].copy_from_slice(&l.to_bytes());
        }
        let c = checksum(&b, CHECKSUM_AT);
        b[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector, rounded
    /// up to a whole sector.
    pub fn bitmap_size(&self) -> u32 {
        (self.block_size / 512).div_ceil(8).div_ceil(512) * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        let mut locs = [LocatorEntry::default(); 8];
        locs[0] = LocatorEntry {
            platform_code: *b"W2ru",
            platform_data_space: 512,
            platform_data_length: 10,
            platform_data_offset: 4096,
        };
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            header_version: 0x0001_0000,
            max_table_entries: 3,
            block_size: 2 << 20,
            checksum: 0,
            parent_unique_id: [9; 16],
            parent_time_stamp: 77,
            parent_unicode_name: "base.vhd".into(),
            parent_locators: locs,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.to_bytes();
        let (g, ok) = DynamicHeader::parse(Path::new("x"), &b, 512).unwrap();
        assert!(ok);
        assert_eq!(g.parent_unicode_name, "base.vhd");
        assert_eq!(g.parent_locators[0], h.parent_locators[0]);
        assert_eq!(g.bitmap_size(), 512);
        assert_eq!(g.max_table_entries, 3);
        let mut bad = b;
        bad[600] ^= 0x10;
        assert!(!DynamicHeader::parse(Path::new("x"), &bad, 512).unwrap().1);
    }

    #[test]
    fn rejects_bad_block_sizes() {
        for bs in [0u32, 3 << 20, 256, 1 << 30] {
            let mut h = sample();
            h.block_size = bs;
            let b = h.to_bytes();
            let e = DynamicHeader::parse(Path::new("d.vhd"), &b, 512).unwrap_err();
            assert!(
                matches!(
                    e.defect(),
                    Some(crate::error::Defect::Vhd(VhdDefect::BlockSize { block_size, offset: 512, .. })) if *block_size == bs
                ),
                "{e}"
            );
        }
        let mut b = sample().to_bytes();
        b[1] = b'?';
        assert_eq!(
            DynamicHeader::parse(Path::new("d.vhd"), &b, 512)
                .unwrap_err()
                .defect(),
            Some(&VhdDefect::HeaderCookie { offset: 512 }.into())
        );
    }

    #[test]
    fn bitmap_sizes() {
        let mut h = sample();
        h.block_size = 512;
        assert_eq!(h.bitmap_size(), 512);
        h.block_size = 256 << 20;
        assert_eq!(h.bitmap_size(), 65536);
    }
}
