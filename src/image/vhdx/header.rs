//! File type identifier and the two VHDX headers (MS-VHDX 2.2.1, 2.2.2).

use uuid::Uuid;

use crate::error::{Error, Feature, HeaderProblem, Result, VhdxDefect, Warning};
use crate::image::ImageFile;

pub const FILE_TYPE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// The two header copies, each a 4 KiB structure on a 64 KiB boundary.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
pub const HEADER_SIZE: usize = 4096;
/// Everything before 1 MiB belongs to the header section.
pub const HEADER_SECTION_SIZE: u64 = 1 << 20;

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
/// GUIDs are stored in Microsoft's mixed-endian binary form.
pub fn guid(b: &[u8], o: usize) -> Uuid {
    Uuid::from_bytes_le(b[o..o + 16].try_into().expect("16 bytes"))
}

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zeroed_field(buf: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[at + 4..])
}

/// One VHDX header (MS-VHDX 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parse a 4 KiB header; Err says why it is not valid (signature or checksum).
    pub fn parse(buf: &[u8]) -> std::result::Result<Header, HeaderProblem> {
        if buf.len() < HEADER_SIZE {
            return Err(HeaderProblem::Short);
        }
        let buf = &buf[..HEADER_SIZE];
        if &buf[0..4] != HEADER_SIGNATURE {
            return Err(HeaderProblem::Signature);
        }
        let stored = le32(buf, 4);
        let computed = crc_with_zeroed_field(buf, 4);
        if stored != computed {
            return Err(HeaderProblem::Checksum { stored, computed });
        }
        Ok(Header {
            sequence_number: le64(buf, 8),
            file_write_guid: guid(buf, 16),
            data_write_guid: guid(buf, 32),
            log_guid: guid(buf, 48),
            log_version: le16(buf, 64),
            version: le16(buf, 66),
            log_length: le32(buf, 68),
            log_offset: le64(buf, 72),
        })
    }

    /// Serialise with a correct checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.to_bytes_le());
        b[32..48].copy_from_slice(&self.data_write_guid.to_bytes_le());
        b[48..64].copy_from_slice(&self.log_guid.to_bytes_le());
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Check the file type identifier and return the creator string.
pub fn read_file_identifier(file: &ImageFile) -> Result<String> {
    let mut buf = vec![0u8; 8 + 512];
    file.read_exact_at(&mut buf, 0)?;
    if &buf[0..8] != FILE_TYPE_SIGNATURE {
        return Err(Error::corrupt(&file.path, VhdxDefect::FileIdentifier));
    }
    let units: Vec<u16> = buf[8..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// Read both headers and pick the current one (MS-VHDX 2.2.2: the only valid one, or
/// the valid one with the greater SequenceNumber). Returns the header, its index (0 for
/// 64 KiB, 1 for 128 KiB) and warnings about an invalid copy.
pub fn read_current_header(file: &ImageFile) -> Result<(Header, usize, Vec<Warning>)> {
    let mut parsed = Vec::with_capacity(2);
    for off in HEADER_OFFSETS {
        let mut buf = vec![0u8; HEADER_SIZE];
        let r = match file.read_exact_at(&mut buf, off) {
            Ok(()) => Header::parse(&buf),
            Err(_) => Err(HeaderProblem::PastEnd),
        };
        parsed.push(r);
    }
    let mut warnings = Vec::new();
    let chosen = match (&parsed[0], &parsed[1]) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                1
            } else {
                0
            }
        }
        (Ok(_), Err(e)) => {
            warnings.push(Warning::VhdxHeaderInvalid {
                copy: 2,
                problem: e.clone(),
            });
            0
        }
        (Err(e), Ok(_)) => {
            warnings.push(Warning::VhdxHeaderInvalid {
                copy: 1,
                problem: e.clone(),
            });
            1
        }
        (Err(a), Err(b)) => {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::BothHeaders {
                    first: a.clone(),
                    second: b.clone(),
                },
            ))
        }
    };
    let h = parsed.swap_remove(chosen).expect("checked Ok");
    if h.version != 1 {
        return Err(Error::unsupported(
            &file.path,
            Feature::VhdxVersion { version: h.version },
        ));
    }
    if !h.log_guid.is_nil() && h.log_version != 0 {
        return Err(Error::unsupported(
            &file.path,
            Feature::VhdxLogVersion {
                version: h.log_version,
            },
        ));
    }
    if !(h.log_length as u64).is_multiple_of(1 << 20) || h.log_offset % (1 << 20) != 0 {
        return Err(Error::corrupt(
            &file.path,
            VhdxDefect::LogAlignment {
                offset: h.log_offset,
                length: h.log_length,
            },
        ));
    }
    if h.log_length != 0 && h.log_offset < HEADER_SECTION_SIZE {
        return Err(Error::corrupt(
            &file.path,
            VhdxDefect::LogInHeaderSection {
                offset: h.log_offset,
            },
        ));
    }
    Ok((h, chosen, warnings))
}
