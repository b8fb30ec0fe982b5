//! Rewriting a differencing VHDX's parent locator in place (`vdiskfs set-parent`).
//!
//! The new locator item (the entries `create::parent_locator` makes, serialised by
//! `create::locator_item`) goes where the old one was when it fits there, otherwise into
//! the first free space of the metadata region (after the 64 KiB table, between or after
//! the other items, 8-byte aligned). The changed 4 KiB pages (the table page holding the
//! item's entry, and the pages of the item's new bytes) are replaced through the log as
//! ONE entry (`Vhdx::commit_pages`): after a crash the file has the old locator or the new
//! one, never a mix. DataWriteGuid is kept (the disk's content does not change, and this
//! file's own children are linked to it); FileWriteGuid changes.
//!
//! A locator that fits nowhere in the metadata region is refused (the region is not
//! grown: a locator holds three paths of at most a few KiB, and the region of every file
//! Hyper-V, qemu or vdiskfs makes is 1 MiB with a few hundred bytes used).

use std::collections::btree_map::{BTreeMap, Entry};

use super::create::locator_item;
use super::header::{guid, le16, le32};
use super::metadata::{PARENT_LOCATOR, TABLE_SIZE};
use super::Vhdx;
use crate::error::{Error, Request, Result};

const PAGE: u64 = 4096;

/// Where a new item of `len` bytes may go in a metadata region of `region_len` bytes
/// whose other items occupy `taken` (start, end), preferring `old` (the item's current
/// offset). None when it fits nowhere.
fn place(len: u64, old: u64, taken: &[(u64, u64)], region_len: u64) -> Option<u64> {
    let free = |at: u64| {
        at >= TABLE_SIZE as u64
            && at + len <= region_len
            && taken.iter().all(|&(s, e)| at + len <= s || e <= at)
    };
    if free(old) {
        return Some(old);
    }
    let mut starts: Vec<u64> = std::iter::once(TABLE_SIZE as u64)
        .chain(taken.iter().map(|&(_, e)| e.div_ceil(8) * 8))
        .collect();
    starts.sort_unstable();
    starts.into_iter().find(|&at| free(at))
}

impl Vhdx {
    /// The 4 KiB pages (file offset, new content) that make the parent locator item hold
    /// `entries`, from the file's current metadata region.
    pub(crate) fn parent_locator_pages(
        &self,
        entries: &[(String, String)],
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let path = &self.file.path;
        let region = self.regions.metadata;
        let mut table = vec![0u8; TABLE_SIZE];
        self.file.read_exact_at(&mut table, region.file_offset)?;
        let count = le16(&table, 10) as usize;
        let mut target = None;
        let mut taken = Vec::new();
        for i in 0..count.min((TABLE_SIZE - 32) / 32) {
            let e = 32 + i * 32;
            let (off, len) = (le32(&table, e + 16) as u64, le32(&table, e + 20) as u64);
            let is_user = le32(&table, e + 24) & 1 != 0;
            if guid(&table, e) == PARENT_LOCATOR && !is_user && target.is_none() {
                target = Some((e, off, len));
            } else if len != 0 {
                taken.push((off, off + len));
            }
        }
        let Some((entry_at, old_off, old_len)) = target else {
            return Err(Error::Request(Request::NoParentLocator {
                path: path.to_path_buf(),
            }));
        };
        let item = locator_item(entries);
        let new_len = item.len() as u64;
        let Some(new_off) = place(new_len, old_off, &taken, region.length) else {
            return Err(Error::Request(Request::LocatorNoRoom {
                path: path.to_path_buf(),
                len: new_len,
                region_len: region.length,
            }));
        };
        // The bytes to write, by file offset: the item (plus zeros over what is left of
        // the old one when it shrinks in place), and the table entry's offset and length.
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut data = item;
        if new_off == old_off && old_len > new_len {
            data.resize(old_len as usize, 0);
        }
        writes.push((region.file_offset + new_off, data));
        let mut fields = Vec::with_capacity(8);
        fields.extend_from_slice(&(new_off as u32).to_le_bytes());
        fields.extend_from_slice(&(new_len as u32).to_le_bytes());
        writes.push((region.file_offset + entry_at as u64 + 16, fields));

        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (at, bytes) in &writes {
            let mut done = 0usize;
            while done < bytes.len() {
                let pos = at + done as u64;
                let page = pos - pos % PAGE;
                let buf = match pages.entry(page) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        let mut buf = vec![0u8; PAGE as usize];
                        self.file.read_exact_at(&mut buf, page)?;
                        e.insert(buf)
                    }
                };
                let in_page = (pos - page) as usize;
                let n = (PAGE as usize - in_page).min(bytes.len() - done);
                buf[in_page..in_page + n].copy_from_slice(&bytes[done..done + n]);
                done += n;
            }
        }
        if pages.len() > self.max_commit_pages() {
            return Err(Error::Request(Request::LocatorTooLargeForLog {
                path: path.to_path_buf(),
                len: new_len,
            }));
        }
        Ok(pages.into_iter().collect())
    }

    /// Replace the parent locator with `entries`, crash-safe (one log entry), keeping
    /// DataWriteGuid; then close the file cleanly. The file must be opened writable.
    pub fn set_parent_locator(&self, entries: &[(String, String)]) -> Result<()> {
        let pages = self.parent_locator_pages(entries)?;
        self.commit_pages(&pages, false)?;
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_old_place_then_the_first_gap() {
        let t = TABLE_SIZE as u64;
        let taken = [(t, t + 8), (t + 8, t + 16), (t + 200, t + 300)];
        // Fits where it was (t + 16 .. t + 200 is free).
        assert_eq!(place(100, t + 16, &taken, 1 << 20), Some(t + 16));
        // Too long for the old place: after the last item.
        assert_eq!(place(500, t + 16, &taken, 1 << 20), Some(t + 304));
        // Nowhere.
        assert_eq!(place(1 << 20, t + 16, &taken, 1 << 20), None);
        // Exactly up to the end of the region.
        assert_eq!(
            place((1 << 20) - t - 304, t + 16, &taken, 1 << 20),
            Some(t + 304)
        );
    }
}

/// Cut after every write of a set-parent (`crash_sim`): reopened as left, read-only and
/// writable, the file checks clean and records the old locator or the new one, and its
/// DataWriteGuid never changes (its own children stay linked).
#[cfg(test)]
mod crash_tests {
    use super::super::create::{create_base, create_child, parent_locator};
    use super::*;
    use crate::image::crash_sim;
    use crate::image::vhdx::tests::open_vhdx;
    use crate::layer::{Layer, OpenOptions};
    use crate::test_support::TempDir;

    #[test]
    fn a_cut_after_any_write_leaves_the_old_or_the_new_locator() {
        let d = TempDir::new("vhdx-set-parent-cut");
        std::fs::create_dir_all(d.join("a")).unwrap();
        let base = d.join("a/base.vhdx");
        create_base(&base, 8 << 20, 1 << 20, 512).unwrap();
        let template = d.join("a/template.vhdx");
        {
            let p = Vhdx::open(&base, OpenOptions::read_only()).unwrap();
            create_child(&template, &p, 1 << 20).unwrap();
        }
        // The parent moved deep into another tree, under a long name: a larger item.
        let far = d.join(format!("elsewhere/{}/deeper", "x".repeat(120)));
        std::fs::create_dir_all(&far).unwrap();
        let moved = far.join("Renamed base.vhdx");
        std::fs::copy(&base, &moved).unwrap();
        let work = d.join("a/child.vhdx");
        let old = Vhdx::open(&template, OpenOptions::read_only())
            .unwrap()
            .metadata()
            .parent_locator
            .clone();
        let guid = Vhdx::open(&template, OpenOptions::read_only())
            .unwrap()
            .header()
            .data_write_guid;
        let attempt = |limit: Option<usize>| -> (Vec<(String, String)>, usize) {
            let _ = std::fs::remove_file(&work);
            std::fs::copy(&template, &work).unwrap();
            let p = Vhdx::open(&moved, OpenOptions::read_only()).unwrap();
            let new = parent_locator(&work, &p).unwrap();
            crash_sim::fail_after(limit);
            {
                let v = Vhdx::open(&work, OpenOptions::writable()).unwrap();
                let _ = v.set_parent_locator(&new);
            }
            let n = crash_sim::writes();
            crash_sim::fail_after(None);
            (new, n)
        };
        let (new, total) = attempt(None);
        assert_ne!(new, old);
        let v = Vhdx::open(&work, OpenOptions::read_only()).unwrap();
        assert_eq!(v.metadata().parent_locator, new);
        assert!(v.check().unwrap().is_empty());
        assert!(total >= 5, "several writes ({total})");
        let mut saw = [false; 2];
        for cut in 0..=total {
            attempt(Some(cut));
            for writable in [false, true] {
                let v = open_vhdx(&work, writable);
                let got = &v.metadata().parent_locator;
                assert!(*got == old || *got == new, "cut {cut} of {total}: {got:?}");
                saw[usize::from(*got == new)] = true;
                assert!(v.check().unwrap().is_empty(), "cut {cut}");
                assert_eq!(v.header().data_write_guid, guid, "cut {cut}");
                v.close().unwrap();
            }
        }
        assert_eq!(saw, [true, true], "both outcomes occur");
    }

    /// A locator that outgrows its place (another item right after it, as in files
    /// other tools lay out differently) moves to free space of the region.
    #[test]
    fn a_locator_that_outgrows_its_place_moves() {
        use crate::image::vhdx::metadata::PHYSICAL_SECTOR_SIZE;
        use std::os::unix::fs::FileExt;
        let d = TempDir::new("vhdx-set-parent-move");
        let base = d.join("base.vhdx");
        create_base(&base, 8 << 20, 1 << 20, 512).unwrap();
        let child = d.join("child.vhdx");
        let p = Vhdx::open(&base, OpenOptions::read_only()).unwrap();
        create_child(&child, &p, 1 << 20).unwrap();
        // Move the physical sector size item to just after the locator item.
        let region = Vhdx::open(&child, OpenOptions::read_only())
            .unwrap()
            .regions
            .metadata;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&child)
            .unwrap();
        let mut table = vec![0u8; TABLE_SIZE];
        f.read_exact_at(&mut table, region.file_offset).unwrap();
        let entry = |id| {
            (0..le16(&table, 10) as usize)
                .map(|i| 32 + i * 32)
                .find(|&e| guid(&table, e) == id)
                .unwrap()
        };
        let (loc, pss) = (entry(PARENT_LOCATOR), entry(PHYSICAL_SECTOR_SIZE));
        let loc_end = (le32(&table, loc + 16) + le32(&table, loc + 20)).div_ceil(8) * 8;
        let mut value = [0u8; 4];
        f.read_exact_at(
            &mut value,
            region.file_offset + le32(&table, pss + 16) as u64,
        )
        .unwrap();
        f.write_all_at(&value, region.file_offset + loc_end as u64)
            .unwrap();
        f.write_all_at(&loc_end.to_le_bytes(), region.file_offset + pss as u64 + 16)
            .unwrap();
        drop(f);
        // A longer parent path than the original.
        let far = d.join(format!("{}/x", "z".repeat(200)));
        std::fs::create_dir_all(&far).unwrap();
        let moved = far.join("base.vhdx");
        std::fs::copy(&base, &moved).unwrap();
        let new = parent_locator(
            &child,
            &Vhdx::open(&moved, OpenOptions::read_only()).unwrap(),
        )
        .unwrap();
        Vhdx::open(&child, OpenOptions::writable())
            .unwrap()
            .set_parent_locator(&new)
            .unwrap();
        let v = Vhdx::open(&child, OpenOptions::read_only()).unwrap();
        assert_eq!(v.metadata().parent_locator, new);
        assert_eq!(v.metadata().physical_sector_size, 4096);
        assert!(v.check().unwrap().is_empty());
        let mut table = vec![0u8; TABLE_SIZE];
        v.file
            .read_exact_at(&mut table, region.file_offset)
            .unwrap();
        let at = (0..le16(&table, 10) as usize)
            .map(|i| 32 + i * 32)
            .find(|&e| guid(&table, e) == PARENT_LOCATOR)
            .map(|e| le32(&table, e + 16))
            .unwrap();
        assert!(
            at > loc_end,
            "moved past the other item ({at} <= {loc_end})"
        );
    }
}
