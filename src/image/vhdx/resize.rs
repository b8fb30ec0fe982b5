//! Changing a VHDX's virtual size (`vdiskfs resize`), crash-safe.
//!
//! Everything that makes the new size visible is ONE `commit_pages` log entry: the
//! VirtualDiskSize metadata item, the BAT pages that change (or, when the BAT region is
//! too small or too many of its pages change, both region table copies pointing at a new
//! BAT written beforehand to fresh space at the end of the file). What is written before
//! that entry (a new BAT, a fixed disk's new payload blocks, zeros over the old last
//! block's tail) lies where nothing at the old size looks, and `commit_pages` makes it
//! durable before the entry. A crash leaves the old size or the new one, never a mix.
//!
//! BAT indices do not depend on the size (payload index = b + b / chunk_ratio, sector
//! bitmap entries after every chunk_ratio payload entries), so existing entries keep
//! their places; only the count changes. The caller (`commands::resize`) has checked
//! that nothing past the new end holds data when shrinking, and that no parent holds
//! data in the new space when growing a differencing disk.

use super::bat::{
    file_offset, make_entry, state, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
};
use super::header::{crc_with_zeroed_field, guid, le32};
use super::metadata::{MAX_VIRTUAL_SIZE, TABLE_SIZE, VIRTUAL_DISK_SIZE};
use super::region::{BAT_GUID, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};
use super::Vhdx;
use crate::error::{Error, Result};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// What a resize did, for the command's report.
#[derive(Debug, Clone, Default)]
pub struct Resized {
    /// The BAT was moved to a new region at this offset.
    pub bat_moved_to: Option<u64>,
    /// 4 KiB pages in the log entry.
    pub pages: usize,
}

/// BAT entries a disk of `data_blocks` blocks uses (MS-VHDX 2.5; as `Bat::new`).
fn entries_for(data_blocks: u64, chunk_ratio: u64, has_parent: bool) -> u64 {
    if data_blocks == 0 {
        return 0;
    }
    if has_parent {
        data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else {
        data_blocks + (data_blocks - 1) / chunk_ratio
    }
}

impl Vhdx {
    /// Sizes a VHDX can have: a multiple of the logical sector size, 64 TiB at most.
    pub fn size_granularity(&self) -> u64 {
        self.meta.logical_sector_size as u64
    }

    /// Set the virtual size to `new_size` (a multiple of the logical sector size; the
    /// caller's checks done). Writable opens only; close the image afterwards.
    pub(crate) fn resize_to(&self, new_size: u64) -> Result<Resized> {
        let path = &self.file.path;
        let ss = self.meta.logical_sector_size as u64;
        if new_size == 0 || !new_size.is_multiple_of(ss) || new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid(format!(
                "{}: a VHDX's size must be a multiple of its {ss}-byte sectors, from {ss} bytes to 64 TiB (asked: {new_size})",
                path.display()
            )));
        }
        let old_size = self.meta.virtual_size;
        let bs = self.meta.block_size as u64;
        let cr = self.bat.chunk_ratio;
        let parent = self.meta.has_parent;
        let fixed = self.meta.leave_block_allocated && !parent;
        let old_blocks = self.bat.data_blocks;
        let new_blocks = new_size.div_ceil(bs);
        let old_entries = self.bat.entries;
        let new_entries = entries_for(new_blocks, cr, parent);

        // A fixed disk's new blocks get payload now (contiguous, zeros: fresh space).
        let mut payload = if fixed && new_blocks > old_blocks {
            Some(self.allocate_space((new_blocks - old_blocks) * bs)?)
        } else {
            None
        };

        // The new BAT, entry by entry.
        let mut table = Vec::with_capacity(new_entries as usize);
        for i in 0..new_entries {
            let v = if i % (cr + 1) == cr {
                // A sector bitmap entry: kept while its chunk exists.
                if i < old_entries {
                    self.bat.get(&self.file, i)?
                } else {
                    0
                }
            } else {
                let block = i - i / (cr + 1);
                if block >= new_blocks {
                    make_entry(PAYLOAD_BLOCK_NOT_PRESENT, 0)
                } else if block < old_blocks && i < old_entries {
                    self.bat.get(&self.file, i)?
                } else if let Some(p) = payload.as_mut() {
                    let e = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, *p);
                    *p += bs;
                    e
                } else {
                    make_entry(PAYLOAD_BLOCK_NOT_PRESENT, 0)
                }
            };
            table.push(v);
        }
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();

        // Growing: the old last block's bytes past the old end become disk data; make
        // them zeros (a writer may have left anything there).
        if new_size > old_size && !old_size.is_multiple_of(bs) {
            let lb = old_blocks - 1;
            let e = self.bat.get(&self.file, self.bat.payload_index(lb))?;
            if matches!(
                state(e),
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) {
                let from = old_size % bs;
                let to = bs.min(new_size - lb * bs);
                write_zeros(self, file_offset(e) + from, to - from)?;
            }
        }

        let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
        // The VirtualDiskSize item.
        let size_at = self.size_item_offset()?;
        let page_at = size_at - size_at % PAGE;
        let mut page = vec![0u8; PAGE as usize];
        self.file.read_exact_at(&mut page, page_at)?;
        let o = (size_at - page_at) as usize;
        page[o..o + 8].copy_from_slice(&new_size.to_le_bytes());
        pages.push((page_at, page));

        // The BAT in place, when it fits its region and few pages change.
        let region = self.regions.bat;
        let limit = self.max_commit_pages();
        let mut in_place = Vec::new();
        let mut fits = (bytes.len() as u64) <= region.length;
        if fits {
            let mut off = 0u64;
            while off < bytes.len() as u64 {
                let n = PAGE.min(region.length - off) as usize;
                let mut cur = vec![0u8; PAGE as usize];
                self.file
                    .read_exact_at(&mut cur[..n], region.file_offset + off)?;
                let end = (bytes.len() as u64).min(off + PAGE) as usize;
                let want = &bytes[off as usize..end];
                if &cur[..want.len()] != want {
                    if n as u64 != PAGE {
                        fits = false;
                        break;
                    }
                    cur[..want.len()].copy_from_slice(want);
                    in_place.push((region.file_offset + off, cur));
                    if in_place.len() + pages.len() > limit {
                        fits = false;
                        break;
                    }
                }
                off += PAGE;
            }
        }
        let mut moved = None;
        if fits {
            pages.extend(in_place);
        } else {
            // A new BAT region at the end of the file, then both region tables point at it.
            let len = (bytes.len() as u64).div_ceil(MIB).max(1) * MIB;
            let len32 = u32::try_from(len).map_err(|_| {
                Error::Invalid(format!(
                    "{}: a BAT of {len} bytes does not fit a region table entry",
                    path.display()
                ))
            })?;
            let at = self.allocate_space(len)?;
            self.file.write_all_at(&bytes, at)?;
            for table_at in REGION_TABLE_OFFSETS {
                let mut t = vec![0u8; REGION_TABLE_SIZE];
                self.file.read_exact_at(&mut t, table_at)?;
                let count = le32(&t, 8) as usize;
                let Some(i) = (0..count.min(2047)).find(|&i| guid(&t, 16 + i * 32) == BAT_GUID)
                else {
                    return Err(Error::Invalid(format!(
                        "{}: region table at {table_at} has no BAT entry",
                        path.display()
                    )));
                };
                let old = t.clone();
                let e = 16 + i * 32;
                t[e + 16..e + 24].copy_from_slice(&at.to_le_bytes());
                t[e + 24..e + 28].copy_from_slice(&len32.to_le_bytes());
                let crc = crc_with_zeroed_field(&t, 4);
                t[4..8].copy_from_slice(&crc.to_le_bytes());
                for p in 0..REGION_TABLE_SIZE / PAGE as usize {
                    let r = p * PAGE as usize..(p + 1) * PAGE as usize;
                    if old[r.clone()] != t[r.clone()] {
                        pages.push((table_at + r.start as u64, t[r].to_vec()));
                    }
                }
            }
            moved = Some(at);
        }
        let n = pages.len();
        self.commit_pages(&pages, true)?;
        Ok(Resized {
            bat_moved_to: moved,
            pages: n,
        })
    }

    /// The file offset of the VirtualDiskSize item (8 bytes).
    fn size_item_offset(&self) -> Result<u64> {
        let region = self.regions.metadata;
        let mut t = vec![0u8; TABLE_SIZE];
        self.file.read_exact_at(&mut t, region.file_offset)?;
        let count = u16::from_le_bytes([t[10], t[11]]) as usize;
        for i in 0..count.min(2047) {
            let e = 32 + i * 32;
            let is_user = le32(&t, e + 24) & 1 != 0;
            if guid(&t, e) == VIRTUAL_DISK_SIZE && !is_user && le32(&t, e + 20) >= 8 {
                return Ok(region.file_offset + le32(&t, e + 16) as u64);
            }
        }
        Err(Error::Invalid(format!(
            "{}: no VirtualDiskSize metadata item",
            self.file.path.display()
        )))
    }
}

fn write_zeros(v: &Vhdx, mut at: u64, mut len: u64) -> Result<()> {
    let zeros = vec![0u8; MIB.min(len) as usize];
    while len > 0 {
        let n = len.min(MIB);
        v.file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
        len -= n;
    }
    Ok(())
}
