//! The VHDX log (MS-VHDX 2.3): finding and replaying the active sequence, and writing
//! new log entries.
//!
//! The log is a ring buffer of `LogLength` bytes at `LogOffset`. An entry is a run of
//! 4 KiB sectors starting on a 4 KiB boundary of the ring: descriptor sectors (the first
//! one starts with the 64-byte entry header) followed by one data sector per data
//! descriptor. An entry may wrap from the end of the ring to its start; the reader
//! accepts that, the writer never produces it.
//!
//! Reading follows the spec's "find the active sequence" procedure (2.3.3) literally,
//! with two defensive additions that only matter for hand-crafted files: a chain of
//! entries may not be longer in total than the log itself (so replay memory is bounded
//! by `LogLength`), and the scan stops once the current tail has come back to or before
//! the old tail (the spec's "less than" would loop forever on a sequence that fills the
//! whole log exactly).
//!
//! Writing (`LogWriter`) uses the simplest policy the spec allows: the caller applies
//! every entry to its final location and flushes before writing the next one, so each
//! entry's Tail points at the entry itself and every sequence is one entry long. The
//! writer never overwrites the newest entry, which stays the active sequence until its
//! successor is durable, so a torn write of a new entry falls back to replaying the
//! previous (already applied, so harmless) one.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::image::ImageFile;

/// Log sectors (and the granularity of every log write) are 4 KiB.
pub const LOG_SECTOR_SIZE: u64 = 4096;
const SECTOR: usize = LOG_SECTOR_SIZE as usize;
const ENTRY_HEADER_SIZE: usize = 64;
const DESCRIPTOR_SIZE: usize = 32;
const DESCRIPTORS_PER_SECTOR: u64 = (SECTOR / DESCRIPTOR_SIZE) as u64;
const MIB: u64 = 1 << 20;
/// The file type identifier and the two headers: never written through the log
/// (2.2.1: the first 64 KiB is never overwritten; 2.2.2: headers cannot go through the log).
const HEADER_AREA_END: u64 = 192 << 10;
/// Zero descriptors are 32 bytes however much they zero; an in-memory replay has to hold
/// a zero page for each zeroed page inside the file, so that is capped.
pub const MAX_IN_MEMORY_ZERO_BYTES: u64 = 256 * MIB;

const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
const DESC_SIGNATURE: &[u8; 4] = b"desc";
const DATA_SIGNATURE: &[u8; 4] = b"data";

static ZERO_PAGE: [u8; SECTOR] = [0; SECTOR];

/// What one replayed descriptor writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogData {
    /// A whole 4 KiB sector (leading and trailing bytes already restored).
    Sector(Box<[u8]>),
    /// `len` bytes of zeros (a multiple of 4 KiB).
    Zero { len: u64 },
}

/// One descriptor of the active sequence: write `data` at `file_offset` (4 KiB aligned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogWrite {
    pub file_offset: u64,
    pub data: LogData,
}

/// The active log sequence, ready to replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Every descriptor of every entry, tail entry first, in order.
    pub writes: Vec<LogWrite>,
    /// FlushedFileOffset of the head entry (already checked against the file size).
    pub flushed_file_offset: u64,
    /// LastFileOffset of the head entry: the file must be at least this long after replay.
    pub last_file_offset: u64,
    /// Number of entries in the active sequence.
    pub entries: usize,
    /// SequenceNumber of the head entry (a new log should continue above it).
    pub head_sequence: u64,
}

/// The log region, validated against the file.
#[derive(Debug, Clone, Copy)]
struct Ring {
    offset: u64,
    length: u64,
}

impl Ring {
    fn new(file: &ImageFile, offset: u64, length: u64) -> Result<Ring> {
        let bad = |what: String| Err(Error::corrupt(&file.path, what));
        if length == 0 || length % MIB != 0 || length > u64::from(u32::MAX) {
            return bad(format!(
                "header LogLength {length} is not a non-zero multiple of 1 MiB below 4 GiB"
            ));
        }
        if offset % MIB != 0 || offset < MIB {
            return bad(format!(
                "header LogOffset {offset} is not a multiple of 1 MiB after the header section"
            ));
        }
        match offset.checked_add(length) {
            Some(end) if end <= file.len() => Ok(Ring { offset, length }),
            _ => bad(format!(
                "the log at offset {offset} length {length} lies outside the file ({} bytes)",
                file.len()
            )),
        }
    }

    /// Read `buf.len()` bytes (at most the ring length) starting at ring position `pos`,
    /// wrapping from the end of the ring to its start.
    fn read(&self, file: &ImageFile, pos: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(pos < self.length && buf.len() as u64 <= self.length);
        let first = (self.length - pos).min(buf.len() as u64) as usize;
        let (a, b) = buf.split_at_mut(first);
        file.read_exact_at(a, self.offset + pos)?;
        if !b.is_empty() {
            file.read_exact_at(b, self.offset)?;
        }
        Ok(())
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// Where the header of an entry says it sits in the ring and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryInfo {
    pos: u64,
    length: u64,
    sequence: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// Number of 4 KiB descriptor sectors for `count` descriptors: the first sector holds
/// the 64-byte header and 126 descriptors, the others 128 each.
fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(DESCRIPTORS_PER_SECTOR)
}

/// Check the fields of an entry header (its first 4 KiB sector). `None`: not a valid entry.
fn parse_entry_header(
    first: &[u8],
    pos: u64,
    log_length: u64,
    log_guid: &Uuid,
) -> Option<(EntryInfo, u32)> {
    if &first[0..4] != ENTRY_SIGNATURE {
        return None;
    }
    let length = u64::from(le32(first, 8));
    let tail = u64::from(le32(first, 12));
    let sequence = le64(first, 16);
    let count = le32(first, 24);
    let guid = Uuid::from_bytes_le(first[32..48].try_into().ok()?);
    let info = EntryInfo {
        pos,
        length,
        sequence,
        tail,
        flushed_file_offset: le64(first, 48),
        last_file_offset: le64(first, 56),
    };
    let ok = length >= LOG_SECTOR_SIZE
        && length % LOG_SECTOR_SIZE == 0
        && length <= log_length
        && tail % LOG_SECTOR_SIZE == 0
        && tail < log_length
        && sequence > 0
        && guid == *log_guid
        && descriptor_sectors(u64::from(count)) * LOG_SECTOR_SIZE <= length;
    ok.then_some((info, count))
}

/// Validate a whole entry (`buf` holds exactly EntryLength bytes): checksum, every
/// descriptor, every data sector. With `collect`, also return its writes.
fn parse_entry_body(
    buf: &[u8],
    info: &EntryInfo,
    count: u32,
    collect: bool,
) -> Option<Vec<LogWrite>> {
    let stored = le32(buf, 4);
    let crc = crc32c::crc32c(&buf[..4]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    if crc32c::crc32c_append(crc, &buf[8..]) != stored {
        return None;
    }
    let seq = info.sequence;
    let first_data = descriptor_sectors(u64::from(count)) as usize;
    let mut data_sectors = 0usize;
    let mut writes = Vec::new();
    for i in 0..count as usize {
        let d = &buf[ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE..][..DESCRIPTOR_SIZE];
        let file_offset = le64(d, 16);
        if le64(d, 24) != seq || file_offset % LOG_SECTOR_SIZE != 0 {
            return None;
        }
        if &d[0..4] == ZERO_SIGNATURE {
            let len = le64(d, 8);
            if len % LOG_SECTOR_SIZE != 0 || file_offset.checked_add(len).is_none() {
                return None;
            }
            if len > 0 && file_offset < HEADER_AREA_END {
                return None;
            }
            if collect && len > 0 {
                writes.push(LogWrite {
                    file_offset,
                    data: LogData::Zero { len },
                });
            }
        } else if &d[0..4] == DESC_SIGNATURE {
            if file_offset < HEADER_AREA_END || file_offset.checked_add(LOG_SECTOR_SIZE).is_none() {
                return None;
            }
            let at = (first_data + data_sectors) * SECTOR;
            let s = buf.get(at..at + SECTOR)?;
            data_sectors += 1;
            if &s[0..4] != DATA_SIGNATURE
                || le32(s, 4) != (seq >> 32) as u32
                || le32(s, SECTOR - 4) != seq as u32
            {
                return None;
            }
            if collect {
                let mut page = vec![0u8; SECTOR].into_boxed_slice();
                page[..8].copy_from_slice(&d[8..16]);
                page[8..SECTOR - 4].copy_from_slice(&s[8..SECTOR - 4]);
                page[SECTOR - 4..].copy_from_slice(&d[4..8]);
                writes.push(LogWrite {
                    file_offset,
                    data: LogData::Sector(page),
                });
            }
        } else {
            return None;
        }
    }
    Some(writes)
}

/// Read and validate the entry at ring position `pos`. `Ok(None)`: no valid entry there.
fn read_entry(
    file: &ImageFile,
    ring: &Ring,
    log_guid: &Uuid,
    pos: u64,
    collect: bool,
) -> Result<Option<(EntryInfo, Vec<LogWrite>)>> {
    let mut first = [0u8; SECTOR];
    ring.read(file, pos, &mut first)?;
    let Some((info, count)) = parse_entry_header(&first, pos, ring.length, log_guid) else {
        return Ok(None);
    };
    // EntryLength <= LogLength < 4 GiB was checked: this allocation is bounded by the log.
    let mut buf = vec![0u8; info.length as usize];
    buf[..SECTOR].copy_from_slice(&first);
    if info.length > LOG_SECTOR_SIZE {
        ring.read(
            file,
            (pos + LOG_SECTOR_SIZE) % ring.length,
            &mut buf[SECTOR..],
        )?;
    }
    Ok(parse_entry_body(&buf, &info, count, collect).map(|w| (info, w)))
}

/// Find the active log sequence of a VHDX whose current header has LogGuid `log_guid`
/// (MS-VHDX 2.3.3).
///
/// `Ok(None)` when `log_guid` is nil (the log is empty and must not be replayed).
/// Otherwise the spec leaves no "nothing to replay" case: no valid sequence means the
/// file is corrupt, and so does a file shorter than the head entry's FlushedFileOffset;
/// both are `Error::Corrupt`. Reads only the log; never modifies the file.
pub fn find_replay(
    file: &ImageFile,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
) -> Result<Option<Replay>> {
    if log_guid.is_nil() {
        return Ok(None);
    }
    let ring = Ring::new(file, log_offset, log_length)?;

    // Each ring position is read and validated at most once.
    let mut seen: HashMap<u64, Option<EntryInfo>> = HashMap::new();
    // Starts of chains known to be invalid sequences (see below).
    let mut dead: HashSet<u64> = HashSet::new();
    // The candidate active sequence, tail entry first.
    let mut candidate: Vec<EntryInfo> = Vec::new();
    let mut current_tail = 0u64;
    let mut old_tail = 0u64;
    loop {
        // The current sequence: valid entries with consecutive sequence numbers from
        // the current tail on.
        let mut chain: Vec<EntryInfo> = Vec::new();
        let mut total = 0u64;
        let mut capped = false;
        let mut pos = current_tail;
        while !dead.contains(&current_tail) {
            let entry = match seen.get(&pos) {
                Some(e) => *e,
                None => {
                    let e = read_entry(file, &ring, &log_guid, pos, false)?.map(|(i, _)| i);
                    seen.insert(pos, e);
                    e
                }
            };
            let Some(e) = entry else { break };
            if let Some(prev) = chain.last() {
                if prev.sequence.checked_add(1) != Some(e.sequence) {
                    break;
                }
            }
            if total + e.length > ring.length {
                // A chain cannot be longer than the ring it was written to.
                capped = true;
                break;
            }
            total += e.length;
            chain.push(e);
            pos = (pos + e.length) % ring.length;
        }

        // Valid when the head entry's Tail is one of the chain's entries; the sequence
        // then runs from that entry to the head.
        let tail_index = chain
            .last()
            .and_then(|head| chain.iter().position(|e| e.pos == head.tail));
        let next_tail = match (tail_index, chain.last()) {
            (Some(i), Some(head)) => {
                let best = candidate.last().map_or(0, |c| c.sequence);
                if head.sequence > best {
                    candidate = chain[i..].to_vec();
                }
                (head.pos + head.length) % ring.length
            }
            _ => {
                // Every entry of an invalid, uncapped chain starts a suffix of it with
                // the same head, which is invalid for the same reason: skip them later.
                if !capped {
                    dead.extend(chain.iter().map(|e| e.pos));
                }
                (current_tail + LOG_SECTOR_SIZE) % ring.length
            }
        };
        if next_tail <= old_tail {
            break;
        }
        old_tail = next_tail;
        current_tail = next_tail;
    }

    let Some(head) = candidate.last().copied() else {
        return Err(Error::corrupt(
            &file.path,
            format!(
                "the header's LogGuid {log_guid} is set but the log at offset {log_offset} \
                 holds no valid entry sequence for it, so the file is corrupt (MS-VHDX 2.3.3)"
            ),
        ));
    };
    if file.len() < head.flushed_file_offset {
        return Err(Error::corrupt(
            &file.path,
            format!(
                "the file is {} bytes but its log says it was at least {} bytes \
                 (FlushedFileOffset of log entry {}): the file was truncated",
                file.len(),
                head.flushed_file_offset,
                head.sequence
            ),
        ));
    }

    let mut writes = Vec::new();
    for e in &candidate {
        match read_entry(file, &ring, &log_guid, e.pos, true)? {
            Some((info, w)) if info == *e => writes.extend(w),
            _ => {
                return Err(Error::corrupt(
                    &file.path,
                    format!(
                        "log entry {} at log offset {} changed while it was being read",
                        e.sequence, e.pos
                    ),
                ))
            }
        }
    }
    let zero_inside: u64 = writes
        .iter()
        .map(|w| match w.data {
            LogData::Zero { len } => file.len().saturating_sub(w.file_offset).min(len),
            LogData::Sector(_) => 0,
        })
        .fold(0u64, u64::saturating_add);
    if zero_inside > MAX_IN_MEMORY_ZERO_BYTES {
        return Err(Error::unsupported(
            &file.path,
            format!(
                "the pending log zeroes {zero_inside} bytes of the file; at most \
                 {MAX_IN_MEMORY_ZERO_BYTES} are supported"
            ),
        ));
    }
    Ok(Some(Replay {
        writes,
        flushed_file_offset: head.flushed_file_offset,
        last_file_offset: head.last_file_offset,
        entries: candidate.len(),
        head_sequence: head.sequence,
    }))
}

/// Read-only open: replay into the `ImageFile` overlay (every written page, and every
/// zeroed page inside the file, becomes an overlay page) and extend the logical length
/// to cover every write and LastFileOffset. Never touches the file.
pub fn apply_in_memory(file: &mut ImageFile, replay: &Replay) {
    // Pages past the end of the real file already read as zeros once the logical length
    // covers them, so zeroed ranges there need no page unless this replay wrote one.
    let real_end = if file.has_overlay() {
        u64::MAX
    } else {
        file.len().div_ceil(LOG_SECTOR_SIZE) * LOG_SECTOR_SIZE
    };
    let mut pages: BTreeMap<u64, Option<&[u8]>> = BTreeMap::new();
    let mut end = replay.last_file_offset;
    for w in &replay.writes {
        let off = w.file_offset;
        match &w.data {
            LogData::Sector(d) => {
                pages.insert(off, Some(d));
                end = end.max(off + LOG_SECTOR_SIZE);
            }
            LogData::Zero { len } => {
                let stop = off + len;
                end = end.max(stop);
                let inside = stop.min(real_end).max(off);
                for p in (off..inside).step_by(SECTOR) {
                    pages.insert(p, None);
                }
                let written: Vec<u64> = pages.range(inside..stop).map(|(&p, _)| p).collect();
                for p in written {
                    pages.insert(p, None);
                }
            }
        }
    }
    for (off, data) in pages {
        file.overlay_page(off, data.unwrap_or(&ZERO_PAGE));
    }
    file.extend_logical(end);
}

/// Read-write open: write every descriptor to its final location in order, extend the
/// file to LastFileOffset when it is shorter, then fdatasync. The caller then records an
/// empty log in the header (LogGuid zero) and calls `ImageFile::refresh_len`.
pub fn apply_to_file(file: &ImageFile, replay: &Replay) -> Result<()> {
    let mut size = file
        .file
        .metadata()
        .map_err(|e| Error::file(&file.path, "stat", e))?
        .len();
    let set_len = |len: u64| {
        file.file
            .set_len(len)
            .map_err(|e| Error::file(&file.path, "extend", e))
    };
    for w in &replay.writes {
        let off = w.file_offset;
        match &w.data {
            LogData::Sector(d) => {
                file.write_all_at(d, off)?;
                size = size.max(off + LOG_SECTOR_SIZE);
            }
            LogData::Zero { len } => {
                let stop = off + len;
                let mut at = off;
                let zeros = vec![0u8; (MIB as usize).min(*len as usize)];
                while at < stop.min(size) {
                    let n = (stop.min(size) - at).min(MIB);
                    file.write_all_at(&zeros[..n as usize], at)?;
                    at += n;
                }
                if stop > size {
                    set_len(stop)?;
                    size = stop;
                }
            }
        }
    }
    if size < replay.last_file_offset {
        set_len(replay.last_file_offset)?;
    }
    file.sync_data()
}

/// One update carried by a log entry.
#[derive(Debug, Clone, Copy)]
pub enum LogUpdate<'a> {
    /// Write these 4096 bytes at `file_offset` (4 KiB aligned).
    Data { file_offset: u64, data: &'a [u8] },
    /// Zero `len` bytes (a multiple of 4 KiB) at `file_offset` (4 KiB aligned).
    Zero { file_offset: u64, len: u64 },
}

/// Serialise one log entry (its length is a multiple of 4 KiB).
fn build_entry(
    log_guid: &Uuid,
    sequence: u64,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    updates: &[LogUpdate],
) -> Vec<u8> {
    let count = updates.len() as u64;
    let data_count = updates
        .iter()
        .filter(|u| matches!(u, LogUpdate::Data { .. }))
        .count();
    let desc_sectors = descriptor_sectors(count) as usize;
    let len = (desc_sectors + data_count) * SECTOR;
    let mut buf = vec![0u8; len];
    buf[0..4].copy_from_slice(ENTRY_SIGNATURE);
    buf[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    buf[12..16].copy_from_slice(&tail.to_le_bytes());
    buf[16..24].copy_from_slice(&sequence.to_le_bytes());
    buf[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    buf[32..48].copy_from_slice(&log_guid.to_bytes_le());
    buf[48..56].copy_from_slice(&flushed_file_offset.to_le_bytes());
    buf[56..64].copy_from_slice(&last_file_offset.to_le_bytes());
    let mut data_index = desc_sectors;
    for (i, u) in updates.iter().enumerate() {
        let at = ENTRY_HEADER_SIZE + i * DESCRIPTOR_SIZE;
        match *u {
            LogUpdate::Zero { file_offset, len } => {
                let d = &mut buf[at..at + DESCRIPTOR_SIZE];
                d[0..4].copy_from_slice(ZERO_SIGNATURE);
                d[8..16].copy_from_slice(&len.to_le_bytes());
                d[16..24].copy_from_slice(&file_offset.to_le_bytes());
                d[24..32].copy_from_slice(&sequence.to_le_bytes());
            }
            LogUpdate::Data { file_offset, data } => {
                let d = &mut buf[at..at + DESCRIPTOR_SIZE];
                d[0..4].copy_from_slice(DESC_SIGNATURE);
                d[4..8].copy_from_slice(&data[SECTOR - 4..]);
                d[8..16].copy_from_slice(&data[..8]);
                d[16..24].copy_from_slice(&file_offset.to_le_bytes());
                d[24..32].copy_from_slice(&sequence.to_le_bytes());
                let s = &mut buf[data_index * SECTOR..][..SECTOR];
                s[0..4].copy_from_slice(DATA_SIGNATURE);
                s[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
                s[8..SECTOR - 4].copy_from_slice(&data[8..SECTOR - 4]);
                s[SECTOR - 4..].copy_from_slice(&(sequence as u32).to_le_bytes());
                data_index += 1;
            }
        }
    }
    let crc = crc32c::crc32c(&buf);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Writes log entries for metadata updates (MS-VHDX 2.3).
///
/// Contract with the caller, which makes "Tail = this entry" correct:
/// 1. the header's LogGuid is `log_guid`, a value not used by any entry already in the
///    log (a fresh GUID per open: stale entries of earlier sessions stay invalid);
/// 2. after `write_entry` returns (the entry is durable), the caller writes the same
///    updates to their final locations and flushes them before writing the next entry.
///
/// Every entry is then a complete sequence by itself. Entries are laid out one after the
/// other and never wrap around the end of the log: an entry that does not fit before the
/// end starts again at offset 0, and an entry that would overlap the newest entry is
/// refused (it is the active sequence until its successor is durable).
#[derive(Debug, Clone)]
pub struct LogWriter {
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
    next_sequence: u64,
    /// Ring position just after the newest entry.
    head: u64,
    /// The newest entry (ring position, length).
    newest: Option<(u64, u64)>,
}

impl LogWriter {
    /// Start a fresh log with `log_guid` (also to be written to the header) whose first
    /// entry gets SequenceNumber `first_sequence` (> 0; after a replay, use the replayed
    /// head sequence + 1).
    pub fn new(log_offset: u64, log_length: u64, log_guid: Uuid, first_sequence: u64) -> Self {
        LogWriter {
            log_offset,
            log_length,
            log_guid,
            next_sequence: first_sequence,
            head: 0,
            newest: None,
        }
    }

    pub fn log_guid(&self) -> Uuid {
        self.log_guid
    }

    /// The SequenceNumber the next entry will get.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// Write one entry holding these 4 KiB page updates (file offset, 4096 bytes),
    /// fdatasync it, and return. Does not apply the pages to their final location.
    pub fn write_entry(
        &mut self,
        file: &ImageFile,
        pages: &[(u64, &[u8])],
        flushed_file_offset: u64,
        last_file_offset: u64,
    ) -> Result<()> {
        let updates: Vec<LogUpdate> = pages
            .iter()
            .map(|&(file_offset, data)| LogUpdate::Data { file_offset, data })
            .collect();
        self.write_updates(file, &updates, flushed_file_offset, last_file_offset)
    }

    /// `write_entry` with zero descriptors allowed too.
    pub fn write_updates(
        &mut self,
        file: &ImageFile,
        updates: &[LogUpdate],
        flushed_file_offset: u64,
        last_file_offset: u64,
    ) -> Result<()> {
        let invalid = |msg: String| Err(Error::Invalid(format!("{}: {msg}", file.path.display())));
        let (offset, length) = (self.log_offset, self.log_length);
        if length == 0
            || length % MIB != 0
            || length > u64::from(u32::MAX)
            || offset % MIB != 0
            || offset < MIB
            || !matches!(offset.checked_add(length), Some(e) if e <= file.len())
        {
            return invalid(format!(
                "cannot write a log entry: log at offset {offset} length {length} is not a \
                 valid log region of this file"
            ));
        }
        if self.next_sequence == 0 || self.next_sequence == u64::MAX {
            return invalid(format!(
                "log sequence number {} is unusable",
                self.next_sequence
            ));
        }
        if flushed_file_offset % MIB != 0 || last_file_offset % MIB != 0 {
            return invalid(format!(
                "FlushedFileOffset {flushed_file_offset} and LastFileOffset {last_file_offset} \
                 must be multiples of 1 MiB"
            ));
        }
        for u in updates {
            let (off, len, ok) = match *u {
                LogUpdate::Data { file_offset, data } => {
                    (file_offset, LOG_SECTOR_SIZE, data.len() == SECTOR)
                }
                LogUpdate::Zero { file_offset, len } => {
                    (file_offset, len, len % LOG_SECTOR_SIZE == 0)
                }
            };
            if !ok
                || off % LOG_SECTOR_SIZE != 0
                || off < HEADER_AREA_END
                || off.checked_add(len).is_none()
            {
                return invalid(format!(
                    "log update at file offset {off} length {len} is not 4 KiB aligned \
                     metadata outside the header section"
                ));
            }
        }
        let data_count = updates
            .iter()
            .filter(|u| matches!(u, LogUpdate::Data { .. }))
            .count() as u64;
        let entry_len = (descriptor_sectors(updates.len() as u64) + data_count) * LOG_SECTOR_SIZE;
        let start = if self.head + entry_len <= length {
            self.head
        } else {
            0
        };
        let overlaps_newest = self
            .newest
            .is_some_and(|(p, l)| start < p + l && p < start + entry_len);
        if start + entry_len > length || overlaps_newest {
            return invalid(format!(
                "a log entry of {entry_len} bytes does not fit in the {length}-byte log \
                 beside the newest entry; write fewer updates per entry"
            ));
        }

        let buf = build_entry(
            &self.log_guid,
            self.next_sequence,
            start as u32,
            flushed_file_offset,
            last_file_offset,
            updates,
        );
        file.write_all_at(&buf, offset + start)?;
        file.sync_data()?;
        self.next_sequence += 1;
        self.newest = Some((start, entry_len));
        self.head = (start + entry_len) % length;
        Ok(())
    }
}

/// Helpers to craft VHDX files with a pending log, for this module's tests and for
/// integration tests of the reader. Not part of the supported API.
#[doc(hidden)]
pub mod testutil {
    use std::path::Path;

    use uuid::Uuid;

    use super::{LogWriter, MIB};
    use crate::error::{Error, Result};
    use crate::image::vhdx::header::{read_current_header, HEADER_OFFSETS};
    use crate::image::vhdx::region::read_regions;
    use crate::image::ImageFile;

    /// Give a clean VHDX (LogGuid zero) a pending log: one log entry that writes `pages`
    /// (4 KiB-aligned file offset, 4096 bytes each) without applying them, then a header
    /// update (the non-current header rewritten with SequenceNumber + 1 and a correct
    /// checksum) that sets LogGuid. Returns the new LogGuid.
    pub fn make_pending_log_test_file(path: &Path, pages: &[(u64, Vec<u8>)]) -> Result<Uuid> {
        let file = ImageFile::open(path, true)?;
        let (hdr, _, _) = read_current_header(&file)?;
        if !hdr.log_guid.is_nil() {
            return Err(Error::Invalid(format!(
                "{}: already has a pending log",
                path.display()
            )));
        }
        let guid = Uuid::new_v4();
        let mut writer = LogWriter::new(hdr.log_offset, u64::from(hdr.log_length), guid, 1);
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        let len = file.len();
        writer.write_entry(&file, &refs, len / MIB * MIB, len.div_ceil(MIB) * MIB)?;
        drop(file);
        set_log_guid(path, guid)?;
        Ok(guid)
    }

    /// Set the header's LogGuid by writing the non-current header with SequenceNumber
    /// + 1 (MS-VHDX 2.2.2.1), then flushing.
    pub fn set_log_guid(path: &Path, guid: Uuid) -> Result<()> {
        let file = ImageFile::open(path, true)?;
        let (mut hdr, slot, _) = read_current_header(&file)?;
        hdr.log_guid = guid;
        hdr.sequence_number += 1;
        file.write_all_at(&hdr.to_bytes(), HEADER_OFFSETS[1 - slot])?;
        file.sync_data()
    }

    /// File offset of the BAT region.
    pub fn bat_offset(path: &Path) -> Result<u64> {
        let file = ImageFile::open(path, false)?;
        Ok(read_regions(&file)?.bat.file_offset)
    }
}
