//! `compact` for VHDX (see `crate::compact`): every BAT change goes through
//! `Vhdx::commit_pages`, one log entry each (releases: the changed BAT pages, as many as
//! one entry takes; a move: the one page of its entry, after the copy is durable).

use std::collections::BTreeMap;

use super::bat::{
    file_offset, make_entry, state, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_ZERO, SB_BLOCK_PRESENT,
};
use super::bitmap::{self, BITMAP_BLOCK_SIZE};
use super::header::HEADER_SECTION_SIZE;
use super::Vhdx;
use crate::compact::{Compact, Layout, Move, Object};
use crate::error::{Error, Internal, Request, Result};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const COPY: u64 = 1 << 20;

impl Vhdx {
    /// The BAT page at `page_off` with the in-memory entries in it.
    fn bat_page(&self, page_off: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; PAGE as usize];
        self.file.read_exact_at(&mut buf, page_off)?;
        let first = (page_off - self.bat.region.file_offset) / 8;
        for i in 0..PAGE / 8 {
            let idx = first + i;
            if idx >= self.bat.entries {
                break;
            }
            let v = self.bat.get(&self.file, idx)?;
            buf[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&v.to_le_bytes());
        }
        Ok(buf)
    }

    fn bat_page_of(&self, index: u64) -> u64 {
        let off = self.bat.entry_file_offset(index);
        off - off % PAGE
    }

    fn is_fixed(&self) -> bool {
        self.meta.leave_block_allocated && !self.meta.has_parent
    }
}

impl Compact for Vhdx {
    fn compactable(&self) -> Result<()> {
        let why = if self.is_fixed() {
            "a fixed disk has no unused space to give back (convert it to a dynamic one)"
        } else if self.regions.others != 0 {
            "its region table lists regions vdiskfs does not know; they would be in the way"
        } else {
            return Ok(());
        };
        Err(Error::Request(Request::NotCompactable {
            path: self.file.path.clone(),
            why,
        }))
    }

    fn file_len(&self) -> Result<u64> {
        self.file.stat_len()
    }

    fn held_blocks(&self) -> Result<Vec<(u64, u64, u64)>> {
        let bs = self.block_size();
        let mut out = Vec::new();
        for block in 0..self.bat.data_blocks {
            let e = self.bat.get(&self.file, self.bat.payload_index(block))?;
            if matches!(
                self.check_payload(block, e)?,
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) {
                let off = block * bs;
                out.push((block, off, bs.min(self.meta.virtual_size - off)));
            }
        }
        Ok(out)
    }

    fn release(&self, blocks: &[(u64, bool)], dry_run: bool) -> Result<Vec<u64>> {
        // Base: NOT_PRESENT (the state `create` and `convert` give blocks without data;
        // every reader returns zeros for it in a non-differencing file). Child: NOT_PRESENT
        // when the parents read zeros too, else ZERO (MS-VHDX 2.5.1.1: reads return
        // zeros; UNMAPPED and UNDEFINED allow the parent's or stale data).
        // A child's released block also loses its sector bitmap bits (in the same log
        // entry): they mean nothing once the block is not PARTIALLY_PRESENT, our writer
        // clears them before reusing them, and libvhdi reads set bits even then.
        let mut pages: BTreeMap<u64, Option<(u64, u64)>> = BTreeMap::new();
        let mut freed = Vec::new();
        let ss = self.meta.logical_sector_size as u64;
        let spb = self.block_size() / ss;
        for &(block, parent_zero) in blocks {
            let idx = self.bat.payload_index(block);
            let new_state = if !self.meta.has_parent || parent_zero {
                PAYLOAD_BLOCK_NOT_PRESENT
            } else {
                PAYLOAD_BLOCK_ZERO
            };
            freed.push(block);
            if dry_run {
                continue;
            }
            self.bat.set(&self.file, idx, make_entry(new_state, 0))?;
            pages.insert(self.bat_page_of(idx), None);
            let chunk = block / self.bat.chunk_ratio;
            if !self.meta.has_parent
                || state(self.bat.get(&self.file, self.bat.bitmap_index(chunk))?)
                    != SB_BLOCK_PRESENT
            {
                continue;
            }
            let sb_off = self.bitmap_offset(chunk)?;
            let bits = self.bitmaps.get(&self.file, chunk, sb_off)?;
            let first = (block % self.bat.chunk_ratio) * spb;
            if bitmap::run_length(bits, first, spb, false) < spb {
                bitmap::clear_bits(bits, first, spb);
                let (b0, b1) = (first / 8, (first + spb).div_ceil(8));
                let mut p = b0 - b0 % PAGE;
                while p < b1 {
                    pages.insert(sb_off + p, Some((chunk, p)));
                    p += PAGE;
                }
            }
        }
        if dry_run || pages.is_empty() {
            return Ok(freed);
        }
        // BAT pages first: a block's bits may only go once its new state is durable (bits
        // cleared under a still PARTIALLY_PRESENT entry would show the parent's data),
        // while the new state with the old bits is the same content.
        let mut all: Vec<(u64, Option<(u64, u64)>)> = pages.into_iter().collect();
        all.sort_by_key(|&(o, what)| (what.is_some(), o));
        for group in all.chunks(self.max_commit_pages()) {
            let pages = group
                .iter()
                .map(|&(o, what)| {
                    Ok((
                        o,
                        match what {
                            None => self.bat_page(o)?,
                            Some((chunk, byte)) => {
                                let bits = self.bitmaps.loaded(chunk).expect("loaded above");
                                bitmap::to_bytes(bits, (byte / 8) as usize, (PAGE / 8) as usize)
                            }
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            self.commit_pages(&pages, false)?;
        }
        Ok(freed)
    }

    fn layout(&self, freed: &[u64]) -> Result<Layout> {
        let h = self.header();
        let mut fixed = vec![
            (0, HEADER_SECTION_SIZE),
            (self.regions.bat.file_offset, self.regions.bat.end()),
            (
                self.regions.metadata.file_offset,
                self.regions.metadata.end(),
            ),
        ];
        if h.log_length != 0 {
            fixed.push((h.log_offset, h.log_offset + h.log_length as u64));
        }
        let bs = self.block_size();
        let mut objects = Vec::new();
        let freed: std::collections::HashSet<u64> = freed.iter().copied().collect();
        for block in 0..self.bat.data_blocks {
            let idx = self.bat.payload_index(block);
            let e = self.bat.get(&self.file, idx)?;
            if matches!(
                self.check_payload(block, e)?,
                PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT
            ) && !freed.contains(&block)
            {
                objects.push(Object {
                    id: idx,
                    offset: file_offset(e),
                    len: bs,
                });
            }
        }
        if self.meta.has_parent {
            for chunk in 0..self.bat.bitmap_blocks {
                let idx = self.bat.bitmap_index(chunk);
                if idx >= self.bat.entries {
                    break;
                }
                let e = self.bat.get(&self.file, idx)?;
                if state(e) == SB_BLOCK_PRESENT {
                    objects.push(Object {
                        id: idx,
                        offset: file_offset(e),
                        len: BITMAP_BLOCK_SIZE as u64,
                    });
                }
            }
        }
        Ok(Layout {
            fixed,
            objects,
            align: MIB,
            trailer: 0,
        })
    }

    fn move_objects(&self, ms: &[Move]) -> Result<()> {
        let mut buf = vec![0u8; COPY as usize];
        let file_len = self.file_len()?;
        let mut entries = Vec::with_capacity(ms.len());
        for m in ms {
            let o = &m.object;
            let e = self.bat.get(&self.file, o.id)?;
            if file_offset(e) != o.offset {
                return Err(Error::Internal(Internal::MovedUnderCompact {
                    path: self.file.path.clone(),
                    what: "BAT entry",
                    index: o.id,
                }));
            }
            // The last block of a disk may end before its full size in the file.
            let len = o.len.min(file_len.saturating_sub(o.offset));
            let mut p = 0;
            while p < len {
                let n = COPY.min(len - p) as usize;
                self.file.read_exact_at(&mut buf[..n], o.offset + p)?;
                self.file.write_all_at(&buf[..n], m.to + p)?;
                p += n as u64;
            }
            entries.push((o.id, make_entry(state(e), m.to)));
        }
        // In memory first (the pages are built from it), then the BAT pages as few log
        // entries as allow; `commit_pages` makes the copies durable before its entry.
        // (Should a later entry fail, the process stops: `finish` never runs.)
        let mut pages = std::collections::BTreeSet::new();
        for &(id, e) in &entries {
            self.bat.set(&self.file, id, e)?;
            pages.insert(self.bat_page_of(id));
        }
        let pages: Vec<u64> = pages.into_iter().collect();
        for group in pages.chunks(self.max_commit_pages()) {
            let content = group
                .iter()
                .map(|&o| Ok((o, self.bat_page(o)?)))
                .collect::<Result<Vec<_>>>()?;
            self.commit_pages(&content, false)?;
        }
        Ok(())
    }

    fn finish(&self, len: u64) -> Result<()> {
        // LogGuid cleared first: a log whose entries name a longer file must not be
        // replayed over a shorter one.
        self.close()?;
        if self.file_len()? > len {
            self.file
                .file
                .set_len(len)
                .map_err(|e| Error::io(&self.file.path, "truncate", len, e))?;
            self.file.sync_data()?;
        }
        Ok(())
    }
}
