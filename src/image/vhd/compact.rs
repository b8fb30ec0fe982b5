//! `compact` for dynamic and differencing VHDs (see `crate::compact`). VHD has no log:
//! a BAT change is one 512-byte sector write, which the write path (write.rs) also
//! relies on being old-or-new after a crash. Releases write the changed BAT sectors, then
//! fdatasync; a move copies bitmap and data, fdatasyncs, writes the one BAT sector,
//! fdatasyncs. The end: the footer is written after the last structure (unreferenced
//! space), fdatasync, then the file is cut after it, fdatasync, as `close` gives back a
//! reservation.

use std::collections::BTreeSet;

use super::bat::UNALLOCATED;
use super::dynamic::HEADER_SIZE;
use super::footer::{DiskType, FOOTER_SIZE};
use super::{pread, Vhd, SECTOR};
use crate::compact::{Compact, Layout, Move, Object};
use crate::error::{Error, Internal, Request, Result};

const COPY: u64 = 1 << 20;

impl Vhd {
    /// Write BAT sector `n` (entries `128 n ..`) from memory.
    fn write_bat_sector(&self, n: usize) -> Result<()> {
        let bat = self.bat.as_ref().expect("sparse disk");
        let per = SECTOR as usize / 4;
        let first = n * per;
        let end = (first + per).min(bat.len());
        let mut buf = Vec::with_capacity(SECTOR as usize);
        for i in first..end {
            buf.extend_from_slice(&bat.entry(i).to_be_bytes());
        }
        self.file
            .write_all_at(&buf, bat.table_offset + first as u64 * 4)
    }

    fn footer_pos(&self) -> Result<u64> {
        Ok(self.file_len()?.saturating_sub(FOOTER_SIZE as u64))
    }
}

impl Compact for Vhd {
    fn compactable(&self) -> Result<()> {
        if self.bat.is_none() || self.footer.disk_type == DiskType::Fixed {
            return Err(Error::Request(Request::NotCompactable {
                path: self.file.path.clone(),
                why: "a fixed disk has no unused space to give back (convert it to a dynamic one)",
            }));
        }
        Ok(())
    }

    fn file_len(&self) -> Result<u64> {
        self.file.stat_len()
    }

    fn held_blocks(&self) -> Result<Vec<(u64, u64, u64)>> {
        let bat = self.bat.as_ref().expect("compactable");
        let bs = bat.block_size as u64;
        let size = self.footer.current_size;
        Ok((0..bat.len())
            .filter(|&b| bat.entry(b) != UNALLOCATED)
            .map(|b| {
                let off = b as u64 * bs;
                (b as u64, off, bs.min(size - off))
            })
            .collect())
    }

    fn release(&self, blocks: &[(u64, bool)], dry_run: bool) -> Result<Vec<u64>> {
        let bat = self.bat.as_ref().expect("compactable");
        let diff = self.footer.disk_type == DiskType::Differencing;
        // A child's block hides the parent's data: without a zero state it stays unless
        // the parent reads zeros there too.
        let freed: Vec<u64> = blocks
            .iter()
            .filter(|&&(_, parent_zero)| !diff || parent_zero)
            .map(|&(b, _)| b)
            .collect();
        if dry_run || freed.is_empty() {
            return Ok(freed);
        }
        let mut sectors = BTreeSet::new();
        for &b in &freed {
            bat.set_entry(b as usize, UNALLOCATED);
            sectors.insert(b as usize / (SECTOR as usize / 4));
        }
        // Nothing was written that these changes depend on: the content is unchanged
        // whichever of the sectors land.
        self.file.flush_ordered(false, || {
            for &n in &sectors {
                self.write_bat_sector(n)?;
            }
            Ok(true)
        })?;
        Ok(freed)
    }

    fn layout(&self, freed: &[u64]) -> Result<Layout> {
        let h = self.header.as_ref().expect("compactable");
        let bat = self.bat.as_ref().expect("compactable");
        let bat_bytes = (h.max_table_entries as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let mut fixed = vec![
            (0, FOOTER_SIZE as u64),
            (
                self.footer.data_offset,
                self.footer.data_offset + HEADER_SIZE as u64,
            ),
            (bat.table_offset, bat.table_offset + bat_bytes),
        ];
        if self.footer.disk_type == DiskType::Differencing {
            for e in h.parent_locators.iter().filter(|e| !e.is_empty()) {
                let len = e.platform_data_length as u64;
                // Space: bytes as Windows writes it, or sectors as the specification says.
                let space = e.platform_data_space as u64;
                let space = if space >= len { space } else { space * SECTOR };
                let len = len.max(space).div_ceil(SECTOR) * SECTOR;
                fixed.push((e.platform_data_offset, e.platform_data_offset + len));
            }
        }
        let block_len = bat.bitmap_size as u64 + bat.block_size as u64;
        let freed: BTreeSet<u64> = freed.iter().copied().collect();
        let objects = (0..bat.len())
            .filter(|&b| bat.entry(b) != UNALLOCATED && !freed.contains(&(b as u64)))
            .map(|b| Object {
                id: b as u64,
                offset: bat.entry(b) as u64 * SECTOR,
                len: block_len,
            })
            .collect();
        Ok(Layout {
            fixed,
            objects,
            align: SECTOR,
            trailer: FOOTER_SIZE as u64,
        })
    }

    fn move_objects(&self, ms: &[Move]) -> Result<()> {
        let bat = self.bat.as_ref().expect("compactable");
        let mut buf = vec![0u8; COPY as usize];
        let mut entries = Vec::with_capacity(ms.len());
        for m in ms {
            let o = &m.object;
            let b = o.id as usize;
            if bat.entry(b) as u64 * SECTOR != o.offset {
                return Err(Error::Internal(Internal::MovedUnderCompact {
                    path: self.file.path.clone(),
                    what: "block",
                    index: o.id,
                }));
            }
            let to = u32::try_from(m.to / SECTOR)
                .ok()
                .filter(|&s| s != UNALLOCATED);
            let Some(to) = to else {
                return Err(Error::Internal(Internal::MoveTarget {
                    path: self.file.path.clone(),
                    to: m.to,
                }));
            };
            let mut p = 0;
            while p < o.len {
                let n = COPY.min(o.len - p) as usize;
                pread(&self.file, &mut buf[..n], o.offset + p)?;
                self.file.write_all_at(&buf[..n], m.to + p)?;
                p += n as u64;
            }
            entries.push((b, to));
        }
        // The copies durable, then the BAT sectors (each lands whole or not at all, and
        // either way its entries point at a durable copy), then durable again.
        let mut sectors = BTreeSet::new();
        for &(b, to) in &entries {
            bat.set_entry(b, to);
            sectors.insert(b / (SECTOR as usize / 4));
        }
        self.file.flush_ordered(true, || {
            for &n in &sectors {
                self.write_bat_sector(n)?;
            }
            Ok(true)
        })
    }

    fn finish(&self, len: u64) -> Result<()> {
        let end = len.saturating_sub(FOOTER_SIZE as u64);
        if end >= self.footer_pos()? {
            return Ok(());
        }
        // The new footer goes into space nothing references; the old one still ends the
        // file until the cut, which only happens once the new one is durable.
        self.file.write_all_at(&self.footer.to_bytes(), end)?;
        self.file.sync_data()?;
        self.file
            .file
            .set_len(len)
            .map_err(|e| Error::io(&self.file.path, "truncate", len, e))?;
        self.file.sync_data()
    }
}
