//! Parent locator entries of the dynamic disk header (24 bytes each, 8 of them) and the
//! decoding of the locator data they point at.

use std::path::Path;

use crate::error::{Error, Result, VhdDefect};

/// Size of one entry in the dynamic disk header.
pub const ENTRY_SIZE: usize = 24;
/// Longest locator data we accept: a Windows path is at most 32,767 UTF-16 code units.
pub const MAX_LOCATOR_DATA: u32 = 64 * 1024;

/// The platform codes vdiskfs knows, with their display names (the locator names of
/// `paths::LOCATORS`, which says the order they are tried in).
pub const PLATFORM_CODES: [(&[u8; 4], &str); 6] = [
    (b"W2ru", "W2ru"),
    (b"W2ku", "W2ku"),
    (b"Wi2r", "Wi2r"),
    (b"Wi2k", "Wi2k"),
    (b"Mac ", "Mac"),
    (b"MacX", "MacX"),
];

/// One Parent Locator Entry as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocatorEntry {
    pub platform_code: [u8; 4],
    /// Space reserved for the data. The specification says 512-byte sectors, but
    /// Windows writes a byte count (fat-differential.vhd: 4096 and 65536 in a 2 MiB
    /// file), so readers must not rely on it; only `platform_data_length` is used.
    pub platform_data_space: u32,
    /// Bytes of locator data.
    pub platform_data_length: u32,
    /// Absolute file offset of the data.
    pub platform_data_offset: u64,
}

impl LocatorEntry {
    pub fn parse(b: &[u8]) -> LocatorEntry {
        let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[16..24]);
        LocatorEntry {
            platform_code: [b[0], b[1], b[2], b[3]],
            platform_data_space: be32(4),
            platform_data_length: be32(8),
            platform_data_offset: u64::from_be_bytes(off),
        }
    }

    pub fn to_bytes(self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..4].copy_from_slice(&self.platform_code);
        b[4..8].copy_from_slice(&self.platform_data_space.to_be_bytes());
        b[8..12].copy_from_slice(&self.platform_data_length.to_be_bytes());
        b[16..24].copy_from_slice(&self.platform_data_offset.to_be_bytes());
        b
    }

    /// Unused entry (platform code 0).
    pub fn is_empty(&self) -> bool {
        self.platform_code == [0; 4]
    }

    /// The display name of a known platform code.
    pub fn name(&self) -> Option<&'static str> {
        PLATFORM_CODES
            .iter()
            .find(|(c, _)| **c == self.platform_code)
            .map(|(_, n)| *n)
    }

    /// Check that the data lies inside a file of `file_len` bytes and is of a sane size.
    pub fn check_bounds(&self, path: &Path, index: usize, file_len: u64) -> Result<()> {
        let name = self.name().unwrap_or("?");
        if self.platform_data_length > MAX_LOCATOR_DATA {
            return Err(Error::corrupt(
                path,
                VhdDefect::LocatorTooLong {
                    index,
                    code: name.to_string(),
                    length: self.platform_data_length,
                    max: MAX_LOCATOR_DATA,
                },
            ));
        }
        let end = self
            .platform_data_offset
            .checked_add(self.platform_data_length as u64);
        match end {
            Some(e) if e <= file_len => Ok(()),
            _ => Err(Error::corrupt(
                path,
                VhdDefect::LocatorPastEnd {
                    index,
                    code: name.to_string(),
                    offset: self.platform_data_offset,
                    length: self.platform_data_length,
                    file_len,
                },
            )),
        }
    }
}

/// Decode locator data by platform code: W2ru/W2ku are UTF-16LE, Wi2r/Wi2k ANSI bytes
/// (decoded as Latin-1, which keeps every byte), MacX UTF-8 (strict), Mac (an alias
/// blob) lossy UTF-8. Trailing NULs are dropped.
pub fn decode(path: &Path, index: usize, code: &[u8; 4], data: &[u8]) -> Result<String> {
    let s = match code {
        b"W2ru" | b"W2ku" => {
            if !data.len().is_multiple_of(2) {
                return Err(Error::corrupt(
                    path,
                    VhdDefect::LocatorOddLength {
                        index,
                        code: String::from_utf8_lossy(code).into_owned(),
                        length: data.len(),
                    },
                ));
            }
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| {
                Error::corrupt(
                    path,
                    VhdDefect::LocatorUtf16 {
                        index,
                        code: String::from_utf8_lossy(code).into_owned(),
                    },
                )
            })?
        }
        b"Wi2r" | b"Wi2k" => data.iter().map(|&b| b as char).collect(),
        // "Mac " holds a Mac OS alias record, a binary blob; keep what text it has.
        b"Mac " => String::from_utf8_lossy(data).into_owned(),
        _ => String::from_utf8(data.to_vec()).map_err(|_| {
            Error::corrupt(
                path,
                VhdDefect::LocatorUtf8 {
                    index,
                    code: String::from_utf8_lossy(code).into_owned(),
                },
            )
        })?,
    };
    Ok(s.trim_end_matches('\0').to_string())
}

/// Encode a path as W2ru/W2ku locator data (UTF-16LE, no terminator, as Windows writes).
pub fn encode_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_platform() {
        let p = Path::new("c.vhd");
        let w = encode_utf16le(".\\base.vhd\0");
        assert_eq!(decode(p, 0, b"W2ru", &w).unwrap(), ".\\base.vhd");
        assert_eq!(
            decode(p, 0, b"Wi2k", b"C:\\x\xe9.vhd").unwrap(),
            "C:\\x\u{e9}.vhd"
        );
        assert_eq!(
            decode(p, 0, b"MacX", b"file://localhost/a/b.vhd").unwrap(),
            "file://localhost/a/b.vhd"
        );
        let e = decode(p, 3, b"W2ku", &w[..5]).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Corrupt {
                    path,
                    defect: crate::error::Defect::Vhd(VhdDefect::LocatorOddLength {
                        index: 3,
                        length: 5,
                        ..
                    })
                } if path == p
            ),
            "{e}"
        );
        assert!(decode(p, 0, b"MacX", &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn bounds() {
        let p = Path::new("c.vhd");
        let mut e = LocatorEntry {
            platform_code: *b"W2ku",
            platform_data_space: 512,
            platform_data_length: 20,
            platform_data_offset: 1000,
        };
        assert!(e.check_bounds(p, 0, 1020).is_ok());
        assert!(e.check_bounds(p, 0, 1019).is_err());
        e.platform_data_offset = u64::MAX - 5;
        assert!(e.check_bounds(p, 0, u64::MAX).is_err());
        e.platform_data_offset = 0;
        e.platform_data_length = MAX_LOCATOR_DATA + 1;
        assert!(e.check_bounds(p, 0, u64::MAX).is_err());
        let b = e.to_bytes();
        assert_eq!(LocatorEntry::parse(&b), e);
    }
}
