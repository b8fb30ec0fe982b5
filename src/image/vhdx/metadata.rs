//! The metadata region (MS-VHDX 2.6): table, known items and the parent locator.

use uuid::{uuid, Uuid};

use super::header::{guid, le16, le32, le64};
use super::region::Region;
use crate::error::{Error, Feature, LocatorProblem, Result, VhdxDefect};
use crate::image::ImageFile;

pub const FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub const VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub const VIRTUAL_DISK_ID: Uuid = uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub const LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
pub const PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
pub const VHDX_LOCATOR_TYPE: Uuid = uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");

pub const TABLE_SIZE: usize = 64 << 10;
const MAX_ENTRIES: u16 = 2047;
const MAX_ITEM: u32 = 1 << 20;
/// VirtualDiskSize MUST be at most 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Everything the metadata region says about the disk.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub virtual_disk_id: Uuid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Key/value pairs of the parent locator, in file order.
    pub parent_locator: Vec<(String, String)>,
    /// Optional (not required) items vdiskfs does not know, by GUID.
    pub unknown_items: Vec<Uuid>,
}

struct Item {
    offset: u32,
    length: u32,
}

fn utf16le(
    bytes: &[u8],
    index: usize,
    part: &'static str,
) -> std::result::Result<String, LocatorProblem> {
    if !bytes.len().is_multiple_of(2) {
        return Err(LocatorProblem::OddLength {
            index,
            part,
            length: bytes.len(),
        });
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).map_err(|_| LocatorProblem::Utf16 { index, part })
}

/// Parse a parent locator item (MS-VHDX 2.6.2.6).
pub fn parse_parent_locator(
    item: &[u8],
) -> std::result::Result<Vec<(String, String)>, LocatorProblem> {
    if item.len() < 20 {
        return Err(LocatorProblem::Short { len: item.len() });
    }
    let ltype = guid(item, 0);
    if ltype != VHDX_LOCATOR_TYPE {
        return Err(LocatorProblem::UnknownType { id: ltype });
    }
    let count = le16(item, 18) as usize;
    let table_end = 20 + count * 12;
    if table_end > item.len() {
        return Err(LocatorProblem::TooManyEntries {
            count,
            len: item.len(),
        });
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + i * 12;
        let (ko, vo) = (le32(item, e) as usize, le32(item, e + 4) as usize);
        let (kl, vl) = (le16(item, e + 8) as usize, le16(item, e + 10) as usize);
        let slice = |o: usize, l: usize, part: &'static str| {
            if o == 0 || l == 0 || o.checked_add(l).is_none_or(|end| end > item.len()) {
                Err(LocatorProblem::EntryOutside {
                    index: i,
                    part,
                    offset: o,
                    length: l,
                    len: item.len(),
                })
            } else {
                Ok(&item[o..o + l])
            }
        };
        let key = utf16le(slice(ko, kl, "key")?, i, "key")?;
        let value = utf16le(slice(vo, vl, "value")?, i, "value")?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(LocatorProblem::KeyTwice { key });
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Parse "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}" (braces optional).
pub fn parse_guid_string(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    Uuid::parse_str(t).ok()
}

pub fn read_metadata(file: &ImageFile, region: Region) -> Result<Metadata> {
    let bad = |defect: VhdxDefect| Error::corrupt(&file.path, defect);
    let mut table = vec![0u8; TABLE_SIZE];
    file.read_exact_at(&mut table, region.file_offset)?;
    if &table[0..8] != b"metadata" {
        return Err(bad(VhdxDefect::MetadataSignature {
            offset: region.file_offset,
        }));
    }
    let count = le16(&table, 10);
    if count > MAX_ENTRIES {
        return Err(bad(VhdxDefect::MetadataEntries {
            count,
            max: MAX_ENTRIES,
        }));
    }
    let mut items: Vec<(Uuid, bool, Item)> = Vec::new();
    for i in 0..count as usize {
        let e = 32 + i * 32;
        let id = guid(&table, e);
        let offset = le32(&table, e + 16);
        let length = le32(&table, e + 20);
        let flags = le32(&table, e + 24);
        let is_user = flags & 1 != 0;
        let is_required = flags & 4 != 0;
        if length > MAX_ITEM {
            return Err(bad(VhdxDefect::MetadataItemTooLarge { id, length }));
        }
        if length != 0 {
            let end = offset as u64 + length as u64;
            if (offset as usize) < TABLE_SIZE || end > region.length {
                return Err(bad(VhdxDefect::MetadataItemOutside {
                    id,
                    offset,
                    length,
                    region_length: region.length,
                }));
            }
        }
        let known = !is_user
            && [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&id);
        if !known && is_required {
            return Err(Error::unsupported(
                &file.path,
                Feature::VhdxRequiredMetadata { id },
            ));
        }
        if items.iter().any(|(g, u, _)| *g == id && *u == is_user) {
            return Err(bad(VhdxDefect::MetadataItemTwice { id }));
        }
        items.push((id, !known, Item { offset, length }));
    }
    let read_item = |id: Uuid, min: u32| -> Result<Option<Vec<u8>>> {
        let Some((_, _, it)) = items.iter().find(|(g, unknown, _)| *g == id && !unknown) else {
            return Ok(None);
        };
        if it.length < min {
            return Err(bad(VhdxDefect::MetadataItemShort {
                id,
                length: it.length,
                min,
            }));
        }
        let buf = file.read_vec_at(
            region.file_offset + it.offset as u64,
            it.length as u64,
            region.length,
            "metadata item",
        )?;
        Ok(Some(buf))
    };
    let need = |id: Uuid, min: u32, name: &'static str| -> Result<Vec<u8>> {
        read_item(id, min)?.ok_or_else(|| bad(VhdxDefect::MetadataItemMissing { name }))
    };

    let fp = need(FILE_PARAMETERS, 8, "File Parameters")?;
    let block_size = le32(&fp, 0);
    let flags = le32(&fp, 4);
    if !block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&block_size) {
        return Err(bad(VhdxDefect::BlockSize { block_size }));
    }
    let logical_sector_size = le32(&need(LOGICAL_SECTOR_SIZE, 4, "Logical Sector Size")?, 0);
    let physical_sector_size = le32(&need(PHYSICAL_SECTOR_SIZE, 4, "Physical Sector Size")?, 0);
    for (which, size) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if size != 512 && size != 4096 {
            return Err(bad(VhdxDefect::SectorSize { which, size }));
        }
    }
    let virtual_size = le64(&need(VIRTUAL_DISK_SIZE, 8, "Virtual Disk Size")?, 0);
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(logical_sector_size as u64)
    {
        return Err(bad(VhdxDefect::VirtualSize {
            size: virtual_size,
            sector_size: logical_sector_size,
        }));
    }
    let virtual_disk_id = guid(&need(VIRTUAL_DISK_ID, 16, "Virtual Disk ID")?, 0);
    let has_parent = flags & 2 != 0;
    let parent_locator = if has_parent {
        let item = need(PARENT_LOCATOR, 20, "Parent Locator")?;
        parse_parent_locator(&item).map_err(|p| bad(VhdxDefect::ParentLocator(p)))?
    } else {
        Vec::new()
    };
    Ok(Metadata {
        block_size,
        leave_block_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        virtual_disk_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
        unknown_items: items
            .iter()
            .filter(|(_, unknown, _)| *unknown)
            .map(|(g, _, _)| *g)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locator(entries: &[(&str, &str)]) -> Vec<u8> {
        let owned: Vec<(String, String)> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::image::vhdx::create::locator_item(&owned)
    }

    #[test]
    fn parses_locator_entries() {
        let item = locator(&[
            ("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"),
            ("relative_path", "..\\base.vhdx"),
        ]);
        let kv = parse_parent_locator(&item).unwrap();
        assert_eq!(kv[1], ("relative_path".into(), "..\\base.vhdx".into()));
        assert_eq!(
            parse_guid_string(&kv[0].1).unwrap().to_string(),
            "83ed0ec3-24c8-49a6-a959-5e4bf1288bfb"
        );
    }

    #[test]
    fn rejects_bad_locators() {
        let mut item = locator(&[("relative_path", "x.vhdx")]);
        // Value length past the end.
        let e = 20 + 10;
        item[e..e + 2].copy_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            parse_parent_locator(&item).unwrap_err(),
            LocatorProblem::EntryOutside {
                index: 0,
                part: "value",
                length: 1000,
                ..
            }
        ));
        // Odd UTF-16 length.
        let mut item = locator(&[("relative_path", "x.vhdx")]);
        item[e..e + 2].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(
            parse_parent_locator(&item).unwrap_err(),
            LocatorProblem::OddLength {
                index: 0,
                part: "value",
                length: 3
            }
        );
        // Entry count larger than the item.
        let mut item = locator(&[("relative_path", "x.vhdx")]);
        item[18..20].copy_from_slice(&5000u16.to_le_bytes());
        assert!(matches!(
            parse_parent_locator(&item).unwrap_err(),
            LocatorProblem::TooManyEntries { count: 5000, .. }
        ));
        // Wrong locator type.
        let mut item = locator(&[("relative_path", "x.vhdx")]);
        item[0] ^= 1;
        assert!(matches!(
            parse_parent_locator(&item).unwrap_err(),
            LocatorProblem::UnknownType { .. }
        ));
        // Duplicate key.
        let item = locator(&[("a", "1"), ("a", "2")]);
        assert_eq!(
            parse_parent_locator(&item).unwrap_err(),
            LocatorProblem::KeyTwice { key: "a".into() }
        );
    }
}
