//! The hard disk footer ("conectix"): 512 big-endian bytes at the end of every VHD,
//! with a copy at offset 0 in dynamic and differencing disks.

use std::path::Path;

use crate::error::{Error, Feature, Result, VhdDefect};

/// Size of the footer as written today.
pub const FOOTER_SIZE: usize = 512;
/// Cookie at offset 0 of the footer.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD time stamp epoch.
pub const VHD_EPOCH: u64 = 946_684_800;

const CHECKSUM_AT: usize = 64;

/// The Disk Type field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    /// The value stored in the footer.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `info` shows.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Disk Geometry: cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The CHS geometry for a disk of `total_sectors` 512-byte sectors, following the
    /// algorithm in the appendix of the VHD specification ("CHS Calculation").
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(65535 * 16 * 255);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255u64;
            heads = 16u64;
            cth = total / spt;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            // Bounded by the clamp above: cth / heads <= 65535.
            cylinders: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// Bytes addressed by this geometry (what old readers take as the disk size).
    pub fn bytes(self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64 * 512
    }
}

/// A parsed hard disk footer. Field names follow the specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub file_format_version: u32,
    /// Absolute offset of the dynamic disk header; `u64::MAX` for fixed disks.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub time_stamp: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub disk_geometry: Geometry,
    pub disk_type: DiskType,
    /// The checksum as stored.
    pub checksum: u32,
    /// Stored bytes; a child records them as its parent unique id.
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

/// One's complement of the byte sum of `buf`, skipping the 4 bytes at `skip`.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < skip || *i >= skip + 4)
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(b as u32));
    !sum
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Four-character code for display ("qemu", "win ", "Wi2k").
pub fn fourcc(code: &[u8; 4]) -> String {
    code.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect::<String>()
}

impl Footer {
    /// Parse a footer from `buf` (512 bytes, or 511 for footers written by old tools,
    /// where the missing last byte is reserved). `at` is the file offset, for messages.
    /// Returns the footer and whether its checksum matched.
    pub fn parse(path: &Path, buf: &[u8], at: u64) -> Result<(Footer, bool)> {
        if buf.len() < FOOTER_SIZE - 1 {
            return Err(Error::corrupt(
                path,
                VhdDefect::FooterShort {
                    offset: at,
                    len: buf.len(),
                },
            ));
        }
        let mut b = [0u8; FOOTER_SIZE];
        let n = buf.len().min(FOOTER_SIZE);
        b[..n].copy_from_slice(&buf[..n]);
        if &b[0..8] != FOOTER_COOKIE {
            return Err(Error::corrupt(path, VhdDefect::FooterCookie { offset: at }));
        }
        let disk_type = match be32(&b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::unsupported(
                    path,
                    Feature::VhdDiskType {
                        offset: at,
                        disk_type: t,
                    },
                ))
            }
        };
        let version = be32(&b, 12);
        if version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                Feature::VhdFooterVersion {
                    offset: at,
                    major: version >> 16,
                    minor: version & 0xffff,
                },
            ));
        }
        let stored = be32(&b, CHECKSUM_AT);
        let ok = checksum(&b, CHECKSUM_AT) == stored;
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        let footer = Footer {
            features: be32(&b, 8),
            file_format_version: version,
            data_offset: be64(&b, 16),
            time_stamp: be32(&b, 24),
            creator_application: [b[28], b[29], b[30], b[31]],
            creator_version: be32(&b, 32),
            creator_host_os: [b[36], b[37], b[38], b[39]],
            original_size: be64(&b, 40),
            current_size: be64(&b, 48),
            disk_geometry: Geometry {
                cylinders: u16::from_be_bytes([b[56], b[57]]),
                heads: b[58],
                sectors_per_track: b[59],
            },
            disk_type,
            checksum: stored,
            unique_id,
            saved_state: b[84],
        };
        Ok((footer, ok))
    }

    /// Serialise, computing a fresh checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.file_format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.time_stamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_application);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.disk_geometry.cylinders.to_be_bytes());
        b[58] = self.disk_geometry.heads;
        b[59] = self.disk_geometry.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let c = checksum(&b, CHECKSUM_AT);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }
}

/// The current time as a VHD time stamp (seconds since 2000-01-01 UTC).
pub fn now_time_stamp() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    secs.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: 2,
            file_format_version: 0x0001_0000,
            data_offset: 512,
            time_stamp: 12345,
            creator_application: *b"vdfs",
            creator_version: 0x0001_0000,
            creator_host_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            disk_geometry: Geometry::for_sectors(2048),
            disk_type: DiskType::Dynamic,
            checksum: 0,
            unique_id: [7; 16],
            saved_state: 0,
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let f = sample();
        let b = f.to_bytes();
        let (g, ok) = Footer::parse(Path::new("x"), &b, 0).unwrap();
        assert!(ok);
        assert_eq!(g.current_size, 1 << 20);
        assert_eq!(g.disk_type, DiskType::Dynamic);
        assert_eq!(g.unique_id, [7; 16]);
        // 511-byte old-style footer parses too.
        let (h, ok) = Footer::parse(Path::new("x"), &b[..511], 0).unwrap();
        assert!(ok);
        assert_eq!(h.data_offset, 512);
    }

    #[test]
    fn bad_checksum_is_reported() {
        let mut b = sample().to_bytes();
        b[100] ^= 1;
        let (_, ok) = Footer::parse(Path::new("x"), &b, 0).unwrap();
        assert!(!ok);
    }

    #[test]
    fn bad_cookie_and_type() {
        let mut b = sample().to_bytes();
        b[0] = b'X';
        let e = Footer::parse(Path::new("img.vhd"), &b, 0).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Corrupt {
                    path,
                    defect: crate::error::Defect::Vhd(VhdDefect::FooterCookie { offset: 0 })
                } if path == Path::new("img.vhd")
            ),
            "{e}"
        );
        let mut b = sample().to_bytes();
        b[63] = 9;
        let e = Footer::parse(Path::new("img.vhd"), &b, 0).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unsupported {
                    feature: Feature::VhdDiskType { disk_type: 9, .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(Footer::parse(Path::new("x"), &b[..100], 0).is_err());
    }

    #[test]
    fn chs_matches_known_values() {
        // ext2.vhd fixture (qemu): 4,212,736 bytes -> 0x0079 cylinders, 4 heads, 17 spt.
        let g = Geometry::for_sectors(4_212_736 / 512);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (0x79, 4, 17));
        // fat-differential.vhd (Windows): 4 MiB -> 0x78, 4, 17.
        let g = Geometry::for_sectors(4 << 11);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (0x78, 4, 17));
        // Huge disks clamp to the maximum geometry.
        let g = Geometry::for_sectors(u64::MAX / 512);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (65535, 16, 255)
        );
    }
}
