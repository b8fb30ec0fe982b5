//! `vdiskfs check` for VHD. Bounds and overlaps of blocks are already enforced when the
//! BAT is loaded (a damaged BAT fails the open); this adds what an open tolerates.

use super::footer::{DiskType, FOOTER_SIZE};
use super::Vhd;
use crate::error::{Finding, Result, VhdDefect, Warning};

impl Vhd {
    pub(crate) fn check_structure(&self) -> Result<Vec<Finding>> {
        // Checksum mismatches and a missing end footer are tolerated read-only: report them.
        let mut problems: Vec<Finding> = self
            .warnings
            .iter()
            .filter(|w| matches!(w, Warning::VhdChecksum { .. } | Warning::VhdFooterMissing))
            .cloned()
            .map(Finding::Warning)
            .collect();
        if self.footer.disk_type == DiskType::Fixed {
            return Ok(problems);
        }
        // The copy of the footer at offset 0 must equal the one at the end.
        let len = self.file.len();
        if len >= 2 * FOOTER_SIZE as u64 {
            let mut head = [0u8; FOOTER_SIZE];
            let mut tail = [0u8; FOOTER_SIZE];
            self.file.read_exact_at(&mut head, 0)?;
            self.file
                .read_exact_at(&mut tail, len - FOOTER_SIZE as u64)?;
            if &tail[..8] == b"conectix" && head != tail {
                problems.push(VhdDefect::FooterCopyDiffers.into());
            }
        }
        // Parent locator data must not lie inside a data block.
        if let (Some(h), Some(bat)) = (&self.header, &self.bat) {
            let block_len = bat.bitmap_size as u64 + bat.block_size as u64;
            let mut blocks: Vec<u64> = (0..bat.len())
                .map(|b| bat.entry(b))
                .filter(|&e| e != super::bat::UNALLOCATED)
                .map(|e| e as u64 * 512)
                .collect();
            blocks.sort_unstable();
            for (i, e) in h.parent_locators.iter().enumerate() {
                if e.platform_data_length == 0 {
                    continue;
                }
                let (s, end) = (
                    e.platform_data_offset,
                    // Saturating: a dynamic disk's locators are not bounds-checked at open.
                    e.platform_data_offset
                        .saturating_add(e.platform_data_length as u64),
                );
                let hit = blocks.partition_point(|&b| b + block_len <= s);
                if blocks.get(hit).is_some_and(|&b| b < end) {
                    problems.push(
                        VhdDefect::LocatorOverlapsBlock {
                            index: i,
                            offset: s,
                        }
                        .into(),
                    );
                }
            }
        }
        Ok(problems)
    }
}
