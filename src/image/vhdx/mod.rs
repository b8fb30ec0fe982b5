//! Hyper-V VHDX (MS-VHDX): fixed, dynamic and differencing files.
//!
//! Open order follows the spec: file type identifier, the current header, the log (replayed
//! in memory for read-only opens, to the file for writable ones), then the region table,
//! metadata and BAT as the replayed log left them.

pub mod bat;
pub mod bitmap;
mod compact;
pub mod create;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;
pub mod resize;
pub mod set_parent;
pub mod write;

use std::path::Path;
use std::sync::Mutex;

use uuid::Uuid;

use self::bat::{
    file_offset, state, Bat, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO, SB_BLOCK_PRESENT, SECTORS_PER_BITMAP,
};
use self::bitmap::SectorBitmaps;
use self::header::{Header, HEADER_OFFSETS, HEADER_SECTION_SIZE};
use self::metadata::{parse_guid_string, Metadata};
use self::region::Regions;
use crate::error::{Error, Feature, Finding, LogGrowth, Result, VhdxArea, VhdxDefect, Warning};
use crate::image::ImageFile;
use crate::layer::{block_pieces, push_run, Format, Layer, LayerInfo, OpenOptions, ParentRef, Run};

pub struct Vhdx {
    pub(crate) file: ImageFile,
    /// The current header and which slot (0 = 64 KiB, 1 = 128 KiB) it is in.
    pub(crate) header: Mutex<(Header, usize)>,
    pub(crate) meta: Metadata,
    pub(crate) regions: Regions,
    pub(crate) bat: Bat,
    pub(crate) bitmaps: SectorBitmaps,
    /// The log region (offset, length) of the header at open; length 0 when none.
    log_region: (u64, u64),
    parent: Option<ParentRef>,
    creator: String,
    log_state: String,
    /// What the open tolerated; `check` lists the invalid header copies and a pending log
    /// growing the file too far (`Warning::VhdxLogGrowth`) as damage.
    warnings: Vec<Warning>,
    pub(crate) write_state: Option<Mutex<write::WriteState>>,
}

impl Vhdx {
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Vhdx> {
        Self::open_within(path, opts, &log::ReplayBudget::for_chain())
    }

    /// `open` as one layer of a chain: a pending log replayed in memory is charged to
    /// `budget`, which all layers of the chain share.
    pub fn open_within(path: &Path, opts: OpenOptions, budget: &log::ReplayBudget) -> Result<Vhdx> {
        let mut file = ImageFile::open_with(path, opts)?;
        let creator = header::read_file_identifier(&file)?;
        let (mut hdr, mut slot, mut warnings) = header::read_current_header(&file)?;

        let mut log_state = "clean (no pending log)".to_string();
        // A read-only replay's (file length before, after).
        let mut growth = None;
        if !hdr.log_guid.is_nil() {
            // checked_add: LogOffset comes from the file and may be near u64::MAX.
            let log_end = hdr.log_offset.checked_add(hdr.log_length as u64);
            if hdr.log_length == 0 || log_end.is_none_or(|e| e > file.len()) {
                return Err(Error::corrupt(
                    path,
                    VhdxDefect::PendingLogOutside {
                        offset: hdr.log_offset,
                        length: hdr.log_length,
                        file_len: file.len(),
                    },
                ));
            }
            // The scan reads a bounded multiple of the log and replay holds its sectors
            // in memory: bound it (Hyper-V and qemu write 1 MiB logs; MS-VHDX allows up
            // to 4 GiB).
            if hdr.log_length as u64 > log::MAX_REPLAY_LOG_LENGTH {
                return Err(Error::unsupported(
                    path,
                    Feature::VhdxLogLength {
                        length: hdr.log_length,
                        max: log::MAX_REPLAY_LOG_LENGTH,
                    },
                ));
            }
            let log_length = hdr.log_length as u64;
            match log::find_replay_within(&file, hdr.log_offset, log_length, hdr.log_guid, budget)?
            {
                None => log_state = "log GUID set but no valid entries (nothing to replay)".into(),
                Some(replay) => {
                    let n = replay.writes.len();
                    let entries = replay.entries;
                    let real_len = file.len();
                    let grown = replay.grown_len(real_len);
                    if opts.writable {
                        // Before anything is written: how large may the replayed file be?
                        // Replay a copy into memory over a second descriptor to find out.
                        // The replay's memory is given back once it is in the file.
                        let memory = replay.memory;
                        let result = (|| -> Result<()> {
                            budget.charge(path, memory)?;
                            let bound = (|| {
                                let f = file
                                    .file
                                    .try_clone()
                                    .map_err(|e| Error::file(path, "duplicate descriptor", e))?;
                                let mut view = ImageFile::new(path, f)?;
                                log::apply_in_memory(&mut view, replay.clone());
                                addressable_size(&view, log_length)
                            })();
                            budget.refund(memory);
                            let bound = bound?;
                            if grown > real_len.max(bound) {
                                return Err(Error::corrupt(
                                    path,
                                    VhdxDefect::LogGrowth(growth_problem(real_len, grown, bound)),
                                ));
                            }
                            log::apply_to_file(&file, &replay)
                        })();
                        budget.refund(memory);
                        result?;
                        file.refresh_len()?;
                        log_state = format!(
                            "pending log replayed to the file ({entries} entries, {n} writes)"
                        );
                    } else {
                        log::apply_in_memory(&mut file, replay);
                        // Checked once the replayed regions and metadata are read.
                        growth = Some((real_len, grown));
                        log_state = format!(
                            "pending log replayed in memory ({entries} entries, {n} writes; the file was not modified)"
                        );
                    }
                    ::log::info!("{}: {log_state}", path.display());
                }
            }
            if opts.writable {
                // The log is applied: record that in the header (new FileWriteGuid, no log).
                let mut next = hdr.clone();
                next.log_guid = Uuid::nil();
                next.file_write_guid = Uuid::new_v4();
                write_header_both(&file, &mut hdr, &mut slot, next)?;
            }
        }

        let regions = region::read_regions(&file)?;
        if hdr.log_length != 0 {
            let log_region = region::Region {
                file_offset: hdr.log_offset,
                length: hdr.log_length as u64,
            };
            if log_region.overlaps(&regions.bat) || log_region.overlaps(&regions.metadata) {
                return Err(Error::corrupt(path, VhdxDefect::LogOverlapsRegions));
            }
        }
        let meta = metadata::read_metadata(&file, regions.metadata)?;
        for g in &meta.unknown_items {
            warnings.push(Warning::VhdxUnknownMetadata { id: *g });
        }
        if let Some((real_len, grown)) = growth {
            let bound = addressable(&regions, &meta, hdr.log_length as u64);
            if grown > real_len.max(bound) {
                warnings.push(Warning::VhdxLogGrowth(growth_problem(
                    real_len, grown, bound,
                )));
            }
        }
        let bat = Bat::new(&file, regions.bat, &meta)?;
        let bitmaps = SectorBitmaps::new(bat.bitmap_blocks);
        let parent = meta.has_parent.then(|| parent_ref(&meta));
        if let Some(p) = &parent {
            if p.linkage.is_empty() {
                return Err(Error::corrupt(path, VhdxDefect::NoParentLinkage));
            }
            if p.candidates.is_empty() {
                return Err(Error::corrupt(path, VhdxDefect::NoParentPath));
            }
        }
        let log_region = (hdr.log_offset, hdr.log_length as u64);
        let v = Vhdx {
            log_region,
            file,
            header: Mutex::new((hdr, slot)),
            meta,
            regions,
            bat,
            bitmaps,
            parent,
            creator,
            log_state,
            warnings,
            write_state: None,
        };
        // Small BATs (every realistic disk) are checked in full now, so a damaged file
        // fails at open with a clear message rather than in the middle of a read.
        if v.bat.entries * 8 <= 64 << 20 {
            v.validate_bat()?;
        }
        // Warnings are logged only once the file opened: a file that fails gets exactly
        // one line, the error.
        for w in &v.warnings {
            ::log::warn!("{}: {w}", path.display());
        }
        let mut v = v;
        if opts.writable {
            if v.meta.leave_block_allocated && !v.meta.has_parent {
                ::log::info!("{}: fixed VHDX, writes go in place", path.display());
            }
            v.write_state = Some(Mutex::new(write::WriteState::new(v.file.len())));
        }
        Ok(v)
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn header(&self) -> Header {
        self.header
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    fn block_size(&self) -> u64 {
        self.meta.block_size as u64
    }

    fn sectors_per_block(&self) -> u64 {
        self.block_size() / self.meta.logical_sector_size as u64
    }

    /// Check one payload block entry: a known state, and data inside the file.
    fn check_payload(&self, block: u64, entry: u64) -> Result<u64> {
        let st = state(entry);
        match st {
            PAYLOAD_BLOCK_NOT_PRESENT
            | PAYLOAD_BLOCK_UNDEFINED
            | PAYLOAD_BLOCK_ZERO
            | PAYLOAD_BLOCK_UNMAPPED => Ok(st),
            PAYLOAD_BLOCK_FULLY_PRESENT | PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                if st == PAYLOAD_BLOCK_PARTIALLY_PRESENT && !self.meta.has_parent {
                    return Err(Error::corrupt(
                        &self.file.path,
                        VhdxDefect::PartialWithoutParent { block },
                    ));
                }
                let off = file_offset(entry);
                let in_disk = self
                    .block_size()
                    .min(self.meta.virtual_size - block * self.block_size());
                if off < HEADER_SECTION_SIZE
                    || off.checked_add(in_disk).is_none_or(|e| e > self.file.len())
                {
                    return Err(Error::corrupt(
                        &self.file.path,
                        VhdxDefect::BlockOutside {
                            block,
                            offset: off,
                            file_len: self.file.len(),
                        },
                    ));
                }
                // Never hand out the BAT, metadata or log as disk data (`check` reports
                // these overlaps, and overlaps between payload blocks, in full).
                let data = region::Region {
                    file_offset: off,
                    length: in_disk,
                };
                let log = region::Region {
                    file_offset: self.log_region.0,
                    length: self.log_region.1,
                };
                if data.overlaps(&self.regions.bat)
                    || data.overlaps(&self.regions.metadata)
                    || (log.length != 0 && data.overlaps(&log))
                {
                    return Err(Error::corrupt(
                        &self.file.path,
                        VhdxDefect::BlockOverlapsRegions { block, offset: off },
                    ));
                }
                Ok(st)
            }
            _ => Err(Error::corrupt(
                &self.file.path,
                VhdxDefect::ReservedState { block, state: st },
            )),
        }
    }

    fn bitmap_offset(&self, chunk: u64) -> Result<u64> {
        let e = self.bat.get(&self.file, self.bat.bitmap_index(chunk))?;
        let off = file_offset(e);
        if state(e) != SB_BLOCK_PRESENT {
            return Err(Error::corrupt(
                &self.file.path,
                VhdxDefect::BitmapNotPresent { chunk },
            ));
        }
        if off < HEADER_SECTION_SIZE
            || off.saturating_add(bitmap::BITMAP_BLOCK_SIZE as u64) > self.file.len()
        {
            return Err(Error::corrupt(
                &self.file.path,
                VhdxDefect::BitmapOutside { chunk, offset: off },
            ));
        }
        Ok(off)
    }

    /// Check every BAT entry (bounds and states).
    pub fn validate_bat(&self) -> Result<()> {
        for block in 0..self.bat.data_blocks {
            let e = self.bat.get(&self.file, self.bat.payload_index(block))?;
            if self.check_payload(block, e)? == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                self.bitmap_offset(block / self.bat.chunk_ratio)?;
            }
        }
        Ok(())
    }

    /// Count blocks with data, and bytes this layer answers itself.
    fn allocation(&self) -> Result<(u64, u64)> {
        let mut allocated = 0;
        let mut held = 0;
        let bs = self.block_size();
        let mut runs = Vec::new();
        for block in 0..self.bat.data_blocks {
            let e = self.bat.get(&self.file, self.bat.payload_index(block))?;
            let len = bs.min(self.meta.virtual_size - block * bs);
            match self.check_payload(block, e)? {
                PAYLOAD_BLOCK_FULLY_PRESENT => {
                    allocated += 1;
                    held += len;
                }
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    allocated += 1;
                    runs.clear();
                    self.map(block * bs, len, &mut runs)?;
                    held += runs
                        .iter()
                        .filter(|r| !matches!(r, Run::Absent { .. }))
                        .map(Run::len)
                        .sum::<u64>();
                }
                PAYLOAD_BLOCK_NOT_PRESENT if self.meta.has_parent => {}
                _ => held += len,
            }
        }
        Ok((allocated, held))
    }
}

/// The largest file the structures of the VHDX in `file` can address: the header
/// section, the log, every region of the region table, and every block the disk can
/// have (each payload block, and for a differencing disk each sector bitmap block) laid
/// out without gaps (MS-VHDX 2.1: every object is 1 MiB aligned, so there is no
/// alignment waste). A replay may extend a file (2.3.3) only up to this: LastFileOffset
/// is "a file size that all allocated file structures fit into" (2.3.1.1), and the
/// allocated structures take at most this much. Reads regions and metadata as `file`
/// shows them (after an in-memory replay: as the replay leaves them).
fn addressable_size(file: &ImageFile, log_length: u64) -> Result<u64> {
    let regions = region::read_regions(file)?;
    let meta = metadata::read_metadata(file, regions.metadata)?;
    Ok(addressable(&regions, &meta, log_length))
}

/// `addressable_size` of parsed regions and metadata.
fn addressable(regions: &Regions, meta: &Metadata, log_length: u64) -> u64 {
    let bs = (meta.block_size as u64).max(1);
    let data_blocks = meta.virtual_size.div_ceil(bs);
    let chunk_ratio = (SECTORS_PER_BITMAP * meta.logical_sector_size as u64 / bs).max(1);
    let bitmap_blocks = if meta.has_parent {
        data_blocks.div_ceil(chunk_ratio)
    } else {
        0
    };
    let size = [
        HEADER_SECTION_SIZE,
        log_length,
        regions.bat.length,
        regions.metadata.length,
        regions.others,
        data_blocks.saturating_mul(bs),
        bitmap_blocks.saturating_mul(bitmap::BITMAP_BLOCK_SIZE as u64),
    ]
    .into_iter()
    .fold(0u64, u64::saturating_add);
    size.saturating_add(MIB - 1) / MIB * MIB
}

const MIB: u64 = 1 << 20;

fn growth_problem(real_len: u64, grown: u64, bound: u64) -> LogGrowth {
    LogGrowth {
        from: real_len,
        to: grown,
        bound,
    }
}

/// Write `next` (SequenceNumber = current + 1) over the non-current header, flush, then
/// again over the other one so both copies are current (MS-VHDX 2.2.2.1).
pub(crate) fn write_header_both(
    file: &ImageFile,
    current: &mut Header,
    slot: &mut usize,
    mut next: Header,
) -> Result<()> {
    for _ in 0..2 {
        next.sequence_number = current.sequence_number + 1;
        let target = 1 - *slot;
        file.write_all_at(&next.to_bytes(), HEADER_OFFSETS[target])?;
        file.sync_data()?;
        *current = next.clone();
        *slot = target;
    }
    Ok(())
}

fn parent_ref(meta: &Metadata) -> ParentRef {
    let get = |k: &str| {
        meta.parent_locator
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let linkage = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| get(k).and_then(|v| parse_guid_string(&v)))
        .collect();
    // The path keys, in the search order (`paths::LOCATORS`).
    let candidates = crate::paths::locators(Format::Vhdx)
        .filter_map(|k| get(k).map(|v| (k.to_string(), v)))
        .collect();
    ParentRef {
        candidates,
        linkage,
        timestamp: None,
    }
}

impl Layer for Vhdx {
    fn path(&self) -> &Path {
        &self.file.path
    }
    fn written_by(&self) -> Option<&str> {
        self.file.writer.as_deref()
    }
    fn format(&self) -> Format {
        Format::Vhdx
    }
    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }
    fn logical_sector_size(&self) -> u32 {
        self.meta.logical_sector_size
    }

    fn map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        let ss = self.meta.logical_sector_size as u64;
        for (block, in_block, n) in block_pieces(offset, len, self.block_size()) {
            let e = self.bat.get(&self.file, self.bat.payload_index(block))?;
            match self.check_payload(block, e)? {
                PAYLOAD_BLOCK_NOT_PRESENT if self.meta.has_parent => {
                    push_run(runs, Run::Absent { len: n })
                }
                PAYLOAD_BLOCK_FULLY_PRESENT => push_run(
                    runs,
                    Run::Held {
                        len: n,
                        file_offset: file_offset(e) + in_block,
                    },
                ),
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    let chunk = block / self.bat.chunk_ratio;
                    let bits = match self.bitmaps.loaded(chunk) {
                        Some(b) => b,
                        None => self
                            .bitmaps
                            .get(&self.file, chunk, self.bitmap_offset(chunk)?)?,
                    };
                    let chunk_first_sector =
                        (block % self.bat.chunk_ratio) * self.sectors_per_block();
                    let base = file_offset(e);
                    let mut p = in_block;
                    let stop = in_block + n;
                    while p < stop {
                        let sector = chunk_first_sector + p / ss;
                        debug_assert!(sector < SECTORS_PER_BITMAP);
                        let present = bitmap::get_bit(bits, sector);
                        // Whole sectors with the same presence, from this one on.
                        let max_sectors = (stop - p).div_ceil(ss) + 1;
                        let same = bitmap::run_length(bits, sector, max_sectors, present);
                        let run_end = ((p / ss + same) * ss).min(stop);
                        let rl = run_end - p;
                        if present {
                            push_run(
                                runs,
                                Run::Held {
                                    len: rl,
                                    file_offset: base + p,
                                },
                            );
                        } else {
                            push_run(runs, Run::Absent { len: rl });
                        }
                        p = run_end;
                    }
                }
                // NOT_PRESENT in a base, UNDEFINED, ZERO, UNMAPPED: we return zeros, which
                // the spec allows for each and MUST do for ZERO.
                _ => push_run(runs, Run::Zero { len: n }),
            }
        }
        Ok(())
    }

    fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, file_offset)
    }

    fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_ref()
    }

    fn linkage_id(&self) -> Option<Uuid> {
        Some(self.header().data_write_guid)
    }

    fn writable(&self) -> Option<&dyn crate::layer::WritableLayer> {
        self.write_state
            .as_ref()
            .map(|_| self as &dyn crate::layer::WritableLayer)
    }

    fn check(&self) -> Result<Vec<Finding>> {
        self.check_structure()
    }

    fn info(&self) -> Result<LayerInfo> {
        let h = self.header();
        let (allocated, held) = self.allocation()?;
        let fixed = self.meta.leave_block_allocated && !self.meta.has_parent;
        Ok(LayerInfo {
            disk_type: if self.meta.has_parent {
                "differencing"
            } else if fixed {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
            virtual_size: self.meta.virtual_size,
            block_size: self.block_size(),
            logical_sector_size: self.meta.logical_sector_size,
            physical_sector_size: self.meta.physical_sector_size,
            ids: vec![
                (
                    "virtual_disk_id".into(),
                    self.meta.virtual_disk_id.to_string(),
                ),
                ("data_write_guid".into(), h.data_write_guid.to_string()),
                ("file_write_guid".into(), h.file_write_guid.to_string()),
                ("log_guid".into(), h.log_guid.to_string()),
            ],
            has_parent: self.meta.has_parent,
            parent_locator: self.meta.parent_locator.clone(),
            log_state: Some(self.log_state.clone()),
            allocated_blocks: allocated,
            total_blocks: self.bat.data_blocks,
            bytes_held: held,
            extra: vec![
                ("creator".into(), self.creator.clone()),
                (
                    "header_sequence_number".into(),
                    h.sequence_number.to_string(),
                ),
                ("chunk_ratio".into(), self.bat.chunk_ratio.to_string()),
                (
                    "bat_offset".into(),
                    self.regions.bat.file_offset.to_string(),
                ),
                (
                    "metadata_offset".into(),
                    self.regions.metadata.file_offset.to_string(),
                ),
                ("log_offset".into(), h.log_offset.to_string()),
                ("log_length".into(), h.log_length.to_string()),
                (
                    "leave_block_allocated".into(),
                    self.meta.leave_block_allocated.to_string(),
                ),
            ],
            warnings: self.warnings.clone(),
        })
    }
}
#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod log_bounds_tests;
#[cfg(test)]
pub(crate) mod tests;

impl Vhdx {
    /// Every structural problem found (empty when the file is sound): invalid header or
    /// region table copies, BAT entries out of bounds or in wrong states, blocks that
    /// overlap each other or the header section, log, BAT or metadata, and
    /// PARTIALLY_PRESENT blocks without a sector bitmap.
    pub fn check_structure(&self) -> Result<Vec<Finding>> {
        // The open puts the header copies' warnings first, a log's growth last.
        let mut problems: Vec<Finding> = self
            .warnings
            .iter()
            .filter(|w| {
                matches!(
                    w,
                    Warning::VhdxHeaderInvalid { .. } | Warning::VhdxLogGrowth(_)
                )
            })
            .cloned()
            .map(Finding::Warning)
            .collect();
        // Both region table copies must be valid and equal.
        let mut copies = Vec::new();
        for off in region::REGION_TABLE_OFFSETS {
            let mut b = vec![0u8; region::REGION_TABLE_SIZE];
            self.file.read_exact_at(&mut b, off)?;
            copies.push(b);
        }
        for (i, c) in copies.iter().enumerate() {
            let stored = header::le32(c, 4);
            if &c[0..4] != b"regi" || header::crc_with_zeroed_field(c, 4) != stored {
                problems.push(VhdxDefect::RegionTableInvalid { copy: i as u64 + 1 }.into());
            }
        }
        if copies[0] != copies[1] {
            problems.push(VhdxDefect::RegionTablesDiffer.into());
        }
        let h = self.header();
        let bs = self.block_size();
        let mut ranges: Vec<(u64, u64, VhdxArea)> = vec![
            (0, HEADER_SECTION_SIZE, VhdxArea::HeaderSection),
            (
                self.regions.bat.file_offset,
                self.regions.bat.end(),
                VhdxArea::BatRegion,
            ),
            (
                self.regions.metadata.file_offset,
                self.regions.metadata.end(),
                VhdxArea::MetadataRegion,
            ),
        ];
        if h.log_length != 0 {
            ranges.push((
                h.log_offset,
                h.log_offset.saturating_add(h.log_length as u64),
                VhdxArea::Log,
            ));
        }
        for block in 0..self.bat.data_blocks {
            let e = self.bat.get(&self.file, self.bat.payload_index(block))?;
            match self.check_payload(block, e) {
                Err(err) => problems.push(err.into()),
                Ok(PAYLOAD_BLOCK_FULLY_PRESENT) | Ok(PAYLOAD_BLOCK_PARTIALLY_PRESENT) => {
                    let off = file_offset(e);
                    ranges.push((
                        off,
                        off.saturating_add(bs),
                        VhdxArea::PayloadBlock { block },
                    ));
                    if state(e) == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                        if let Err(err) = self.bitmap_offset(block / self.bat.chunk_ratio) {
                            problems.push(err.into());
                        }
                    }
                }
                Ok(_) => {}
            }
        }
        for chunk in 0..self.bat.bitmap_blocks {
            let idx = self.bat.bitmap_index(chunk);
            if idx >= self.bat.entries {
                break;
            }
            let e = self.bat.get(&self.file, idx)?;
            match state(e) {
                bat::SB_BLOCK_NOT_PRESENT => {}
                SB_BLOCK_PRESENT if self.meta.has_parent => {
                    let off = file_offset(e);
                    let end = off.saturating_add(bitmap::BITMAP_BLOCK_SIZE as u64);
                    if off < HEADER_SECTION_SIZE || end > self.file.len() {
                        problems.push(VhdxDefect::BitmapBlockOutside { chunk, offset: off }.into());
                    } else {
                        ranges.push((off, end, VhdxArea::BitmapBlock { chunk }));
                    }
                }
                s => problems.push(
                    VhdxDefect::BitmapState {
                        chunk,
                        state: s,
                        differencing: self.meta.has_parent,
                    }
                    .into(),
                ),
            }
        }
        // Ties broken by the areas' names, as `check` has always listed them.
        ranges.sort_by_cached_key(|(start, end, area)| (*start, *end, area.to_string()));
        let mut furthest: Option<(u64, VhdxArea)> = None;
        for (start, end, name) in ranges {
            if let Some((fend, fname)) = &furthest {
                if start < *fend {
                    problems.push(
                        VhdxDefect::Overlap {
                            area: name,
                            offset: start,
                            other: *fname,
                        }
                        .into(),
                    );
                }
            }
            if furthest.as_ref().is_none_or(|(fend, _)| end > *fend) {
                furthest = Some((end, name));
            }
        }
        Ok(problems)
    }
}
