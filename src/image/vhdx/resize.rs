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
//! their places; only the count changes. The caller (`crate::resize`) has checked
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
use crate::error::{Error, Internal, Request, Result};

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
            return Err(Error::Request(Request::VhdxResizeSize {
                path: path.to_path_buf(),
                sector_size: ss,
                asked: new_size,
            }));
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

        // Where the size is, checked before anything is written.
        let size_at = self.size_item_offset()?;
        if size_at % PAGE > PAGE - 8 {
            return Err(Error::Request(Request::SizeItemCrossesPage {
                path: path.to_path_buf(),
                at: size_at,
            }));
        }
        // New FileWriteGuid and DataWriteGuid before anything is written (the content
        // changes: new space, or space cut off).
        self.start_structural_change(true)?;
        // A fixed disk's new blocks get payload now (contiguous, zeros: fresh space).
        let mut payload = if fixed && new_blocks > old_blocks {
            Some(self.allocate_space((new_blocks - old_blocks) * bs)?)
        } else {
            None
        };

        // The new BAT, entry by entry (8 bytes per entry in memory: 512 MiB at worst, for
        // 64 TiB in 1 MiB blocks).
        let mut bytes = Vec::with_capacity(new_entries as usize * 8);
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
            bytes.extend_from_slice(&v.to_le_bytes());
        }

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
                Error::Request(Request::BatTooLarge {
                    path: path.to_path_buf(),
                    len,
                })
            })?;
            let at = self.allocate_space(len)?;
            self.file.write_all_at(&bytes, at)?;
            for table_at in REGION_TABLE_OFFSETS {
                let mut t = vec![0u8; REGION_TABLE_SIZE];
                self.file.read_exact_at(&mut t, table_at)?;
                let count = le32(&t, 8) as usize;
                let Some(i) = (0..count.min(2047)).find(|&i| guid(&t, 16 + i * 32) == BAT_GUID)
                else {
                    return Err(Error::Internal(Internal::NoBatRegionEntry {
                        path: path.to_path_buf(),
                        at: table_at,
                    }));
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
        Err(Error::Internal(Internal::NoSizeItem {
            path: self.file.path.clone(),
        }))
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

/// `image::crash_sim` cuts after every write of a resize, for both formats (the VHD
/// side is `vhd::resize`'s): the file left must check clean and show the old size or
/// the new one, with the data below the smaller of the two intact and the new space
/// zeros.
#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use crate::disk::Disk;
    use crate::error::Finding;
    use crate::image::crash_sim;
    use crate::image::durable::create_new_file;
    use crate::image::vhdx::create::{write_new, NewVhdx};
    use crate::image::vhdx::tests::{open_disk, Rng};
    use crate::image::vhdx::Vhdx;
    use crate::layer::OpenOptions;
    use crate::test_support::TempDir;

    fn open(path: &Path) -> Disk {
        open_disk(path, false)
    }

    fn read(disk: &Disk, off: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        let mut done = 0;
        while done < b.len() {
            let n = disk.read_at(off + done as u64, &mut b[done..]).unwrap();
            assert!(n > 0);
            done += n;
        }
        b
    }

    /// Run `resize` on a copy of `template` with a cut after every write in turn, and
    /// judge each result. `data` is the disk's content at the old size `old`.
    pub(crate) fn cut_everywhere(
        d: &TempDir,
        template: &Path,
        data: &[u8],
        new: u64,
        resize: &dyn Fn(&Path) -> bool,
        tolerated: &dyn Fn(&[Finding], u64) -> bool,
    ) {
        let old = data.len() as u64;
        let work = d.join(format!(
            "work-{}",
            template.file_name().unwrap().to_string_lossy()
        ));
        let attempt = |limit: Option<usize>| -> usize {
            let _ = std::fs::remove_file(&work);
            std::fs::copy(template, &work).unwrap();
            crash_sim::fail_after(limit);
            let done = resize(&work);
            let n = crash_sim::writes();
            crash_sim::fail_after(None);
            assert!(done || limit.is_some(), "an uncut resize failed");
            n
        };
        let total = attempt(None);
        assert!(total >= 3, "several writes ({total})");
        for cut in 0..=total {
            attempt(Some(cut));
            let disk = open(&work);
            let size = disk.layers()[0].virtual_size();
            assert!(
                size == old || size == new,
                "cut {cut} of {total}: size {size}, neither {old} nor {new}"
            );
            let problems = disk.layers()[0].check().unwrap();
            assert!(
                problems.is_empty() || tolerated(&problems, size),
                "cut {cut} of {total}: {problems:?}"
            );
            let keep = old.min(size);
            assert!(
                read(&disk, 0, keep) == data[..keep as usize],
                "cut {cut}: data"
            );
            if size > old {
                let n = (size - old).min(8 << 20);
                assert!(
                    read(&disk, old, n).iter().all(|&b| b == 0),
                    "cut {cut}: new space not zeros"
                );
            }
        }
    }

    fn vhdx_with_data(path: &Path, size: u64, fixed: bool, seed: u64) -> Vec<u8> {
        let n = NewVhdx {
            virtual_size: size,
            block_size: 1 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            parent_locator: None,
            virtual_disk_id: None,
            fixed,
        };
        create_new_file(path, |f| write_new(f, path, &n, "test")).unwrap();
        write_with_hole(path, size, seed)
    }

    /// Random bytes from `seed` written over the disk of `path` (`size` bytes, more than
    /// 4 MiB) but for a hole of zeros at [2 MiB, 4 MiB), never written (unallocated in a
    /// dynamic disk). Returns the content.
    pub(crate) fn write_with_hole(path: &Path, size: u64, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; size as usize];
        Rng(seed).fill(&mut data);
        data[(2 << 20)..(4 << 20)].fill(0);
        let disk = open_disk(path, true);
        disk.write_at(0, &data[..2 << 20]).unwrap();
        disk.write_at(4 << 20, &data[4 << 20..]).unwrap();
        disk.close().unwrap();
        data
    }

    fn vhdx_resize(new: u64) -> impl Fn(&Path) -> bool {
        move |p: &Path| match Vhdx::open(p, OpenOptions::writable()) {
            Ok(v) => {
                let r = v.resize_to(new).and_then(|_| v.close());
                r.is_ok()
            }
            Err(_) => false,
        }
    }

    #[test]
    fn a_cut_vhdx_resize_leaves_old_or_new_size() {
        let d = TempDir::new("vhdx-resize-cut");
        let size = (8 << 20) + 1536;
        for fixed in [false, true] {
            let t = d.join(format!("t-{fixed}.vhdx"));
            let data = vhdx_with_data(&t, size, fixed, 3);
            let none = |_: &[Finding], _: u64| false;
            // Odd growth in place; past the BAT region (moved), not for fixed disks
            // (300 GiB of payload); and a shrink.
            let mut cases = vec![size + (3 << 20) + 512];
            if !fixed {
                cases.push(300 << 30);
            }
            for new in cases {
                cut_everywhere(&d, &t, &data, new, &vhdx_resize(new), &none);
            }
            let small = 5 << 20;
            cut_everywhere(&d, &t, &data, small, &vhdx_resize(small), &none);
        }
    }
}
