//! The region table (MS-VHDX 2.2.3): where the BAT and the metadata region are.

use uuid::{uuid, Uuid};

use super::header::{crc_with_zeroed_field, guid, le32, le64, HEADER_SECTION_SIZE};
use crate::error::{Error, Feature, RegionTableCopy, RegionTableProblem, Result, VhdxDefect};
use crate::image::ImageFile;

pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
pub const REGION_TABLE_SIZE: usize = 64 << 10;
pub const BAT_GUID: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub const METADATA_GUID: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const MAX_ENTRIES: u32 = 2047;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub file_offset: u64,
    pub length: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        // Saturating: a header's LogOffset is checked only for alignment before this.
        self.file_offset.saturating_add(self.length)
    }
    pub fn overlaps(&self, other: &Region) -> bool {
        self.file_offset < other.end() && other.file_offset < self.end()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Regions {
    pub bat: Region,
    pub metadata: Region,
    /// Total length of the other (optional, unknown) regions the table lists.
    pub others: u64,
}

fn parse(buf: &[u8]) -> std::result::Result<Vec<(Uuid, Region, bool)>, RegionTableProblem> {
    if &buf[0..4] != b"regi" {
        return Err(RegionTableProblem::Signature);
    }
    let stored = le32(buf, 4);
    let computed = crc_with_zeroed_field(buf, 4);
    if stored != computed {
        return Err(RegionTableProblem::Checksum { stored, computed });
    }
    let count = le32(buf, 8);
    if count > MAX_ENTRIES {
        return Err(RegionTableProblem::Entries {
            count,
            max: MAX_ENTRIES,
        });
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let o = 16 + i * 32;
        let required = le32(buf, o + 28) & 1 == 1;
        out.push((
            guid(buf, o),
            Region {
                file_offset: le64(buf, o + 16),
                length: le32(buf, o + 24) as u64,
            },
            required,
        ));
    }
    Ok(out)
}

/// Read the region table (the first valid copy; both should be equal) and find the
/// BAT and metadata regions. An unknown required region makes the open fail.
pub fn read_regions(file: &ImageFile) -> Result<Regions> {
    let mut errors = Vec::new();
    let mut entries = None;
    for (i, off) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        match file.read_exact_at(&mut buf, *off).map_err(|e| e.detail()) {
            Ok(()) => match parse(&buf) {
                Ok(e) => {
                    if i == 1 {
                        let first: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        log::warn!(
                            "{}: region table 1 is invalid ({}); using region table 2",
                            file.path.display(),
                            first.join("")
                        );
                    }
                    entries = Some(e);
                    break;
                }
                Err(problem) => errors.push(RegionTableCopy::Invalid {
                    copy: i as u64 + 1,
                    offset: *off,
                    problem,
                }),
            },
            Err(error) => errors.push(RegionTableCopy::Read {
                copy: i as u64 + 1,
                error,
            }),
        }
    }
    let Some(entries) = entries else {
        return Err(Error::corrupt(
            &file.path,
            VhdxDefect::BothRegionTables { problems: errors },
        ));
    };
    let mut bat = None;
    let mut metadata = None;
    let mut others = 0u64;
    for (g, r, required) in entries {
        let slot = if g == BAT_GUID {
            &mut bat
        } else if g == METADATA_GUID {
            &mut metadata
        } else {
            if required {
                return Err(Error::unsupported(
                    &file.path,
                    Feature::VhdxRequiredRegion { id: g },
                ));
            }
            others = others.saturating_add(r.length);
            continue;
        };
        if slot.is_some() {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::RegionTwice { id: g },
            ));
        }
        *slot = Some(r);
    }
    let name_check = |name: &'static str, r: Option<Region>| -> Result<Region> {
        let r = r.ok_or_else(|| Error::corrupt(&file.path, VhdxDefect::RegionMissing { name }))?;
        if r.file_offset % (1 << 20) != 0 || r.file_offset < HEADER_SECTION_SIZE || r.length == 0 {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::RegionMisplaced {
                    name,
                    offset: r.file_offset,
                    length: r.length,
                },
            ));
        }
        if r.file_offset
            .checked_add(r.length)
            .is_none_or(|e| e > file.len())
        {
            return Err(Error::corrupt(
                &file.path,
                VhdxDefect::RegionPastEnd {
                    name,
                    offset: r.file_offset,
                    length: r.length,
                    file_len: file.len(),
                },
            ));
        }
        Ok(r)
    };
    let bat = name_check("BAT", bat)?;
    let metadata = name_check("metadata", metadata)?;
    if bat.overlaps(&metadata) {
        return Err(Error::corrupt(&file.path, VhdxDefect::RegionsOverlap));
    }
    Ok(Regions {
        bat,
        metadata,
        others,
    })
}
