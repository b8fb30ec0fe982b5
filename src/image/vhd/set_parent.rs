//! Rewriting a differencing VHD's parent locators (`vdiskfs set-parent`).
//!
//! Order (each step durable before the next; the file is valid at every moment):
//! 1. Fresh space for the new locator data past the data, where no header points
//!    (`reserve_bytes`: the footer moved past it and flushed, as a block reservation).
//! 2. The new W2ru and W2ku data written there, in whole sectors, fdatasynced.
//! 3. The dynamic disk header rewritten in place in one write (new locator entries,
//!    parent Unicode name, and with `--ignore-id-mismatch` the parent's unique id and time
//!    stamp), fdatasynced.
//!
//! The old locator data is never written, so until step 3 lands the old header still
//! points at intact data; afterwards the new one does. The footer does not change.
//!
//! A torn header (power loss in the middle of step 3 on a device that writes 512-byte
//! sectors independently: the header is sectors 1 and 2 of the file): sector 1 holds the
//! checksum, the parent's id and time stamp and the first 224 characters of the parent
//! Unicode name; sector 2 the rest of the name and the locator entries. Either mix points
//! at intact locator data: old sector 2 at the old data, new sector 2 at the new data
//! (durable since step 2), so the chain opens through the old or the new parent path. The
//! checksum no longer matches: read-only opens warn, `check` reports it, writable opens
//! refuse, except set-parent's own (`Vhd::open_rewriting_header`), so running it again
//! writes the whole header anew. Both sectors lie in the first 4 KiB of the file, which file systems write as
//! one block and disks with 4 KiB physical sectors (every 512e and 4Kn disk) write
//! atomically, so this needs a 512-byte-native device. docs/design.md has the reasoning.
//! A SIGKILL never tears it: the header is one pwrite into one page.

use super::create::{lay_out_locators, ParentRecord};
use super::footer::DiskType;
use super::Vhd;
use crate::error::{Error, Internal, Request, Result};

/// The parent's identity to record with `--ignore-id-mismatch`: unique id, time stamp.
pub type ParentIdentity = ([u8; 16], u32);

impl Vhd {
    /// Make this differencing VHD (opened writable) record `record` as its parent's
    /// place, and `identity` as its parent's identity when given. Crash-safe (see the
    /// module). The in-memory header is not updated: drop the file afterwards.
    pub fn set_parent_locator(
        &self,
        record: &ParentRecord,
        identity: Option<ParentIdentity>,
    ) -> Result<()> {
        let path = &self.file.path;
        let (Some(old), Some(_)) = (&self.header, &self.writer) else {
            return Err(Error::Internal(Internal::SetParentNotDynamic {
                path: path.clone(),
            }));
        };
        if self.footer.disk_type != DiskType::Differencing {
            return Err(Error::Request(Request::NoParent { path: path.clone() }));
        }
        let locators = record.locators();
        let mut header = old.clone();
        let (_, len) = lay_out_locators(&mut header, &locators, 0);
        // 1. Fresh space, then 2. the locator data there.
        let start = self.reserve_bytes(len)?;
        let (pieces, _) = lay_out_locators(&mut header, &locators, start);
        for (at, data) in &pieces {
            self.file.write_all_at(data, *at)?;
        }
        header.parent_unicode_name = record.unicode_name.clone();
        if let Some((id, time_stamp)) = identity {
            header.parent_unique_id = id;
            header.parent_time_stamp = time_stamp;
        }
        let bytes = header.to_bytes();
        // 3. Data durable, then the header in one write, then durable.
        self.file.flush_ordered(true, || {
            self.file.write_all_at(&bytes, self.footer.data_offset)?;
            Ok(true)
        })
    }
}

impl Vhd {
    /// What this differencing VHD records about its parent, as `set-parent --dry-run`
    /// shows it: the locator entries (name, decoded path) in file order, the parent
    /// Unicode name, the parent's unique id and time stamp.
    pub fn parent_record_entries(&self) -> Vec<(String, String)> {
        let mut out = self.locator_info.clone();
        if let Some(h) = &self.header {
            out.push(("parent_unicode_name".into(), h.parent_unicode_name.clone()));
            out.push((
                "parent_unique_id".into(),
                uuid::Uuid::from_bytes(h.parent_unique_id).to_string(),
            ));
            out.push(("parent_time_stamp".into(), h.parent_time_stamp.to_string()));
        }
        out
    }
}

/// Cut after every write of a set-parent (`crash_sim`): reopened as left, the file
/// checks clean (header checksum included) and records the old locators or the new
/// ones, never a mix.
#[cfg(test)]
mod tests {
    use super::super::create::{create_differencing, create_dynamic, DEFAULT_BLOCK_SIZE};
    use super::*;
    use crate::image::crash_sim;
    use crate::layer::{Layer, OpenOptions};
    use crate::test_support::TempDir;

    fn record_of(path: &std::path::Path) -> Vec<(String, String)> {
        let v = Vhd::open(path, OpenOptions::read_only()).unwrap();
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        assert!(v.check().unwrap().is_empty());
        v.parent_record_entries()
    }

    #[test]
    fn a_cut_after_any_write_leaves_the_old_or_the_new_locator() {
        let d = TempDir::new("vhd-set-parent-cut");
        std::fs::create_dir_all(d.join("a")).unwrap();
        let base = d.join("a/base.vhd");
        create_dynamic(&base, 8 << 20, DEFAULT_BLOCK_SIZE).unwrap();
        let template = d.join("a/template.vhd");
        {
            let p = Vhd::open(&base, OpenOptions::read_only()).unwrap();
            create_differencing(&template, &p, DEFAULT_BLOCK_SIZE).unwrap();
        }
        let far = d.join(format!("elsewhere/{}/deeper", "y".repeat(150)));
        std::fs::create_dir_all(&far).unwrap();
        let moved = far.join("Renamed base.vhd");
        std::fs::copy(&base, &moved).unwrap();
        let work = d.join("a/child.vhd");
        let old = record_of(&template);
        let attempt = |limit: Option<usize>| -> usize {
            let _ = std::fs::remove_file(&work);
            std::fs::copy(&template, &work).unwrap();
            let p = Vhd::open(&moved, OpenOptions::read_only()).unwrap();
            let rec = ParentRecord::new(&work, &p).unwrap();
            crash_sim::fail_after(limit);
            {
                let v = Vhd::open(&work, OpenOptions::writable()).unwrap();
                let _ = v.set_parent_locator(&rec, None);
            }
            let n = crash_sim::writes();
            crash_sim::fail_after(None);
            n
        };
        let total = attempt(None);
        let new = record_of(&work);
        assert_ne!(new, old);
        assert!(new[0].1.contains("Renamed base.vhd"), "{new:?}");
        assert!(total >= 3, "several writes ({total})");
        let mut saw = [false; 2];
        for cut in 0..=total {
            attempt(Some(cut));
            let got = record_of(&work);
            assert!(got == old || got == new, "cut {cut} of {total}: {got:?}");
            saw[usize::from(got == new)] = true;
            // And writable: the file opens for writing as left.
            Vhd::open(&work, OpenOptions::writable()).unwrap();
        }
        assert_eq!(saw, [true, true], "both outcomes occur");
    }

    /// A header torn by power loss (one of its two sectors new, the other old): each mix
    /// points at intact locator data, so the parent is found at the old or the new place;
    /// the checksum mismatch is a warning for reads, and set-parent again repairs it.
    #[test]
    fn a_torn_header_still_finds_a_parent_and_set_parent_repairs_it() {
        use crate::chain::{resolve_parent, ChainOptions};
        use std::os::unix::fs::FileExt;
        let d = TempDir::new("vhd-set-parent-torn");
        std::fs::create_dir_all(d.join("a")).unwrap();
        let base = d.join("a/base.vhd");
        create_dynamic(&base, 8 << 20, DEFAULT_BLOCK_SIZE).unwrap();
        let old_file = d.join("a/old.vhd");
        {
            let p = Vhd::open(&base, OpenOptions::read_only()).unwrap();
            create_differencing(&old_file, &p, DEFAULT_BLOCK_SIZE).unwrap();
        }
        let far = d.join("b/c");
        std::fs::create_dir_all(&far).unwrap();
        let moved = far.join("Moved.vhd");
        std::fs::copy(&base, &moved).unwrap();
        let new_file = d.join("a/new.vhd");
        std::fs::copy(&old_file, &new_file).unwrap();
        let p = Vhd::open(&moved, OpenOptions::read_only()).unwrap();
        let rec = ParentRecord::new(&new_file, &p).unwrap();
        Vhd::open(&new_file, OpenOptions::writable())
            .unwrap()
            .set_parent_locator(&rec, None)
            .unwrap();
        let sector = |f: &std::path::Path, at: u64| {
            let mut b = vec![0u8; 512];
            std::fs::File::open(f)
                .unwrap()
                .read_exact_at(&mut b, at)
                .unwrap();
            b
        };
        let work = d.join("a/child.vhd");
        for (new_sector, want) in [(512u64, &base), (1024, &moved)] {
            // The new file with one header sector put back as it was.
            std::fs::copy(&new_file, &work).unwrap();
            let other = if new_sector == 512 { 1024 } else { 512 };
            let f = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
            f.write_all_at(&sector(&old_file, other), other).unwrap();
            drop(f);
            let v = Vhd::open(&work, OpenOptions::read_only()).unwrap();
            assert!(!v.warnings.is_empty(), "the checksum mismatch is reported");
            let found =
                resolve_parent(&work, v.parent().unwrap(), 0, &ChainOptions::default()).unwrap();
            assert_eq!(
                std::fs::canonicalize(&found.path).unwrap(),
                std::fs::canonicalize(want).unwrap(),
                "new sector at {new_sector}"
            );
            drop(v);
            assert!(Vhd::open(&work, OpenOptions::writable()).is_err());
            // The repair: set-parent again, over the torn header.
            let rec = ParentRecord::new(&work, &p).unwrap();
            Vhd::open_rewriting_header(&work, OpenOptions::writable())
                .unwrap()
                .set_parent_locator(&rec, None)
                .unwrap();
            let got = record_of(&work);
            assert_eq!(got[0], ("W2ru".to_string(), rec.relative.clone()));
        }
    }
}
