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
//! with defensive additions that only matter for hand-crafted files:
//! - a chain of entries may not be longer in total than the log itself (so the replayed
//!   sequence is bounded by `LogLength`), and the scan stops once the current tail has
//!   come back to or before the old tail (the spec's "less than" would loop forever on a
//!   sequence that fills the whole log exactly);
//! - the scan is linear in the log: each ring position's first sector is read once, an
//!   entry's header fields (LogGuid, SequenceNumber > 0, EntryLength against
//!   DescriptorCount) and its place in the chain (SequenceNumber one above the previous
//!   entry's) are checked before its body is read, the body is read sector by sector in
//!   growing chunks and each descriptor and data sector is checked as it arrives (so an
//!   entry that overlaps another entry's header fails at that header), and the whole
//!   scan may read at most `SCAN_WORK_FACTOR` x `LogLength` bytes (a genuine log needs
//!   at most twice its length: every first sector once, every entry body once), beyond
//!   which the file is treated as corrupt;
//! - the replayed descriptors are charged to a `ReplayBudget` shared by all layers of a
//!   chain before they are held in memory.
//!
//! Writing (`LogWriter`) uses the simplest policy the spec allows: the caller applies
//! every entry to its final location and flushes before writing the next one, so each
//! entry's Tail points at the entry itself and every sequence is one entry long. The
//! writer never overwrites the newest entry, which stays the active sequence until its
//! successor is durable, so a torn write of a new entry falls back to replaying the
//! previous (already applied, so harmless) one.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use uuid::Uuid;

use crate::error::{Error, Feature, Internal, LogWriteProblem, Result, VhdxDefect};
use crate::image::{ImageFile, OverlayPiece};

/// Log sectors (and the granularity of every log write) are 4 KiB.
pub const LOG_SECTOR_SIZE: u64 = 4096;
const SECTOR: usize = LOG_SECTOR_SIZE as usize;
const ENTRY_HEADER_SIZE: usize = 64;
const DESCRIPTOR_SIZE: usize = 32;
const DESCRIPTORS_PER_SECTOR: u64 = (SECTOR / DESCRIPTOR_SIZE) as u64;
/// Descriptors in the first descriptor sector, after the 64-byte entry header.
const FIRST_SECTOR_DESCRIPTORS: usize = (SECTOR - ENTRY_HEADER_SIZE) / DESCRIPTOR_SIZE;
const MIB: u64 = 1 << 20;
/// The file type identifier and the two headers: never written through the log
/// (2.2.1: the first 64 KiB is never overwritten; 2.2.2: headers cannot go through the log).
const HEADER_AREA_END: u64 = 192 << 10;
/// Largest pending log vdiskfs replays (read-only in memory or to the file). The scan
/// reads at most `SCAN_WORK_FACTOR` times it and the replay holds at most its data
/// sectors. Hyper-V and qemu write 1 MiB logs; MS-VHDX allows up to 4 GiB, which a
/// crafted sparse file could use to make an open read and allocate gigabytes.
pub const MAX_REPLAY_LOG_LENGTH: u64 = 64 * MIB;
/// The scan for the active sequence may read (and checksum) at most this many times
/// `LogLength` bytes, chain walking included (`STEP_WORK` per step); past that the file
/// is treated as corrupt. A genuine log needs at most twice its length.
pub const SCAN_WORK_FACTOR: u64 = 3;
/// Work counted for one step of a chain walk (an entry looked up again in the scan's
/// memo), so that walking chains is bounded by the same limit as reading.
const STEP_WORK: u64 = 64;
/// An entry's sectors are read one, then two, four ... up to this many at a time.
const MAX_READ_SECTORS: u64 = 256;
/// Memory charged per replayed descriptor besides a data descriptor's 4 KiB page: its
/// `LogWrite` while the replay is collected and its entry in the overlay map after.
pub const DESCRIPTOR_MEMORY: u64 = 128;
/// What the in-memory log replays of all layers of one chain open may hold together
/// (see `ReplayBudget`). A Hyper-V or qemu log of 1 MiB holds less than 1 MiB, so even a
/// 256-layer chain of such files with pending logs fits.
pub const CHAIN_REPLAY_MEMORY: u64 = 256 * MIB;

const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
const DESC_SIGNATURE: &[u8; 4] = b"desc";
const DATA_SIGNATURE: &[u8; 4] = b"data";

thread_local! {
    /// Scan work done by `find_replay` on this thread, for tests (`scan_work_on_this_thread`).
    static SCAN_WORK: Cell<u64> = const { Cell::new(0) };
}

#[cfg(test)]
thread_local! {
    static TEST_CHAIN_LIMIT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Total work (bytes read and checksummed from logs, plus `STEP_WORK` per chain step)
/// of every `find_replay` on this thread so far, failed ones included. Tests take the
/// difference around an open to check the scan's bound without timing anything.
#[cfg(test)]
pub fn scan_work_on_this_thread() -> u64 {
    SCAN_WORK.with(|w| w.get())
}

/// Tests: make `ReplayBudget::for_chain` on this thread use `limit` (None: the default).
#[cfg(test)]
pub(crate) fn set_chain_replay_limit_for_tests(limit: Option<u64>) {
    TEST_CHAIN_LIMIT.with(|l| l.set(limit));
}

/// The memory the in-memory log replays of one chain open may hold together. Every
/// layer of the chain charges its replayed descriptors here (4 KiB + `DESCRIPTOR_MEMORY`
/// per data sector, `DESCRIPTOR_MEMORY` per zero range) before it allocates them; the
/// open of the layer that would go past the limit fails, naming that file. A writable
/// top replays to the file and gives its charge back once that is done.
#[derive(Debug)]
pub struct ReplayBudget {
    limit: u64,
    used: AtomicU64,
}

impl ReplayBudget {
    pub fn new(limit: u64) -> Self {
        ReplayBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The budget of one chain open: `CHAIN_REPLAY_MEMORY`.
    pub fn for_chain() -> Self {
        #[cfg(test)]
        if let Some(l) = TEST_CHAIN_LIMIT.with(|l| l.get()) {
            return Self::new(l);
        }
        Self::new(CHAIN_REPLAY_MEMORY)
    }

    /// Bytes charged and not given back.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Charge `n` bytes for replaying `path`'s log, or fail when that goes past the limit.
    pub(crate) fn charge(&self, path: &Path, n: u64) -> Result<()> {
        let r = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            });
        r.map(|_| ()).map_err(|used| {
            Error::unsupported(
                path,
                Feature::VhdxReplayBudget {
                    limit_mib: self.limit >> 20,
                    held_kib: used >> 10,
                },
            )
        })
    }

    /// Give back `n` bytes charged before.
    pub(crate) fn refund(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

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

impl LogWrite {
    /// Where the write ends (validated not to overflow).
    pub fn end(&self) -> u64 {
        self.file_offset
            + match self.data {
                LogData::Sector(_) => LOG_SECTOR_SIZE,
                LogData::Zero { len } => len,
            }
    }
}

/// The active log sequence, ready to replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Every descriptor of every entry, tail entry first, in order.
    pub writes: Vec<LogWrite>,
    /// FlushedFileOffset of the head entry (already checked against the file size).
    #[cfg(test)]
    pub flushed_file_offset: u64,
    /// LastFileOffset of the head entry: the file must be at least this long after replay.
    pub last_file_offset: u64,
    /// Number of entries in the active sequence.
    pub entries: usize,
    /// SequenceNumber of the head entry (a new log should continue above it).
    #[cfg(test)]
    pub head_sequence: u64,
    /// What the writes were charged to the `ReplayBudget` (bytes).
    pub memory: u64,
}

impl Replay {
    /// The file length after replaying into a file of `len` bytes: the spec extends the
    /// file to cover every write and LastFileOffset.
    pub fn grown_len(&self, len: u64) -> u64 {
        self.writes
            .iter()
            .map(LogWrite::end)
            .fold(len.max(self.last_file_offset), u64::max)
    }
}

/// The log region, validated against the file.
#[derive(Debug, Clone, Copy)]
struct Ring {
    offset: u64,
    length: u64,
}

impl Ring {
    fn new(file: &ImageFile, offset: u64, length: u64) -> Result<Ring> {
        let bad = |defect: VhdxDefect| Err(Error::corrupt(&file.path, defect));
        if length == 0 || !length.is_multiple_of(MIB) || length > u64::from(u32::MAX) {
            return bad(VhdxDefect::LogLength { length });
        }
        if !offset.is_multiple_of(MIB) || offset < MIB {
            return bad(VhdxDefect::LogOffset { offset });
        }
        match offset.checked_add(length) {
            Some(end) if end <= file.len() => Ok(Ring { offset, length }),
            _ => bad(VhdxDefect::LogOutside {
                offset,
                length,
                file_len: file.len(),
            }),
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
    // An entry is its descriptor sectors and one data sector per data descriptor
    // (2.3.1), so it is at most descriptor sectors + DescriptorCount sectors long.
    let desc_sectors = descriptor_sectors(u64::from(count));
    let ok = guid == *log_guid
        && sequence > 0
        && length >= LOG_SECTOR_SIZE
        && length % LOG_SECTOR_SIZE == 0
        && length <= log_length
        && tail % LOG_SECTOR_SIZE == 0
        && tail < log_length
        && desc_sectors * LOG_SECTOR_SIZE <= length
        && length <= (desc_sectors + u64::from(count)) * LOG_SECTOR_SIZE;
    ok.then_some((info, count))
}

/// Collects the writes of the active sequence while its entries are read a second
/// time, charging each to the chain's budget before allocating it.
struct Collector<'a> {
    budget: &'a ReplayBudget,
    writes: Vec<LogWrite>,
    /// Index in `writes` of each data descriptor of the entry being read, in order.
    pages: Vec<usize>,
    charged: u64,
}

impl Collector<'_> {
    fn charge(&mut self, path: &Path, n: u64) -> Result<()> {
        self.budget.charge(path, n)?;
        self.charged += n;
        Ok(())
    }
}

/// Check one descriptor of an entry with SequenceNumber `seq`; with a collector, record
/// its write (a data descriptor's page gets its leading and trailing bytes now, the rest
/// when its data sector is read). `Ok(false)`: invalid. `data_seen` counts data
/// descriptors; more than `data_sectors` of them is invalid.
fn descriptor(
    path: &Path,
    d: &[u8],
    seq: u64,
    data_seen: &mut u64,
    data_sectors: u64,
    out: &mut Option<&mut Collector>,
) -> Result<bool> {
    let file_offset = le64(d, 16);
    if le64(d, 24) != seq || !file_offset.is_multiple_of(LOG_SECTOR_SIZE) {
        return Ok(false);
    }
    if &d[0..4] == ZERO_SIGNATURE {
        let len = le64(d, 8);
        if !len.is_multiple_of(LOG_SECTOR_SIZE) || file_offset.checked_add(len).is_none() {
            return Ok(false);
        }
        if len > 0 && file_offset < HEADER_AREA_END {
            return Ok(false);
        }
        if let Some(c) = out {
            if len > 0 {
                c.charge(path, DESCRIPTOR_MEMORY)?;
                c.writes.push(LogWrite {
                    file_offset,
                    data: LogData::Zero { len },
                });
            }
        }
        Ok(true)
    } else if &d[0..4] == DESC_SIGNATURE {
        if file_offset < HEADER_AREA_END || file_offset.checked_add(LOG_SECTOR_SIZE).is_none() {
            return Ok(false);
        }
        *data_seen += 1;
        if *data_seen > data_sectors {
            return Ok(false);
        }
        if let Some(c) = out {
            c.charge(path, LOG_SECTOR_SIZE + DESCRIPTOR_MEMORY)?;
            let mut page = vec![0u8; SECTOR].into_boxed_slice();
            page[..8].copy_from_slice(&d[8..16]);
            page[SECTOR - 4..].copy_from_slice(&d[4..8]);
            c.pages.push(c.writes.len());
            c.writes.push(LogWrite {
                file_offset,
                data: LogData::Sector(page),
            });
        }
        Ok(true)
    } else {
        Ok(false)
    }
}

/// One search for the active sequence: what it has read, and its memos.
struct Scanner<'a> {
    file: &'a ImageFile,
    ring: Ring,
    guid: Uuid,
    /// Bytes read (and checksummed) so far, plus `STEP_WORK` per chain step.
    work: u64,
    /// `work` may not go past this (lifted for the final read of the active sequence,
    /// which is bounded by the ring length).
    limit: u64,
    /// Entry headers by ring position (`None`: no valid header there).
    headers: HashMap<u64, Option<(EntryInfo, u32)>>,
    /// Whether the entry at a ring position is valid as a whole (checked lazily).
    valid: HashMap<u64, bool>,
    /// The first sector read last, when it held a valid header (saves reading it again
    /// when the entry is validated right after).
    probed: Option<(u64, Vec<u8>)>,
}

impl<'a> Scanner<'a> {
    fn new(file: &'a ImageFile, ring: Ring, guid: Uuid) -> Self {
        Scanner {
            file,
            ring,
            guid,
            work: 0,
            limit: ring.length.saturating_mul(SCAN_WORK_FACTOR),
            headers: HashMap::new(),
            valid: HashMap::new(),
            probed: None,
        }
    }

    fn charge(&mut self, n: u64) -> Result<()> {
        self.work = self.work.saturating_add(n);
        if self.work > self.limit {
            return Err(Error::corrupt(
                &self.file.path,
                VhdxDefect::LogScanBudget {
                    offset: self.ring.offset,
                    length: self.ring.length,
                    factor: SCAN_WORK_FACTOR,
                },
            ));
        }
        Ok(())
    }

    fn read(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.charge(buf.len() as u64)?;
        self.ring.read(self.file, pos, buf)
    }

    /// The entry header at `pos` (read at most once per scan).
    fn header(&mut self, pos: u64) -> Result<Option<(EntryInfo, u32)>> {
        if let Some(h) = self.headers.get(&pos) {
            return Ok(*h);
        }
        let mut first = vec![0u8; SECTOR];
        self.read(pos, &mut first)?;
        let h = parse_entry_header(&first, pos, self.ring.length, &self.guid);
        self.headers.insert(pos, h);
        if h.is_some() {
            self.probed = Some((pos, first));
        }
        Ok(h)
    }

    /// Whether the entry `info` (whose header is valid) is valid as a whole (checked at
    /// most once per scan).
    fn is_valid(&mut self, info: &EntryInfo, count: u32) -> Result<bool> {
        if let Some(&v) = self.valid.get(&info.pos) {
            return Ok(v);
        }
        let v = self.entry(info, count, None)?;
        self.valid.insert(info.pos, v);
        Ok(v)
    }

    /// Read and check the entry whose header said `info` and `count`: the header again,
    /// every descriptor, every data sector (signature and sequence number), then the
    /// checksum. With a collector, also collect its writes. `Ok(false)`: not valid.
    fn entry(
        &mut self,
        info: &EntryInfo,
        count: u32,
        mut out: Option<&mut Collector>,
    ) -> Result<bool> {
        let first = match self.probed.take() {
            Some((p, s)) if p == info.pos => s,
            _ => {
                let mut s = vec![0u8; SECTOR];
                self.read(info.pos, &mut s)?;
                s
            }
        };
        if parse_entry_header(&first, info.pos, self.ring.length, &self.guid)
            != Some((*info, count))
        {
            return Ok(false);
        }
        if let Some(c) = out.as_deref_mut() {
            c.pages.clear();
        }
        let path = self.file.path.clone();
        let seq = info.sequence;
        let count = count as usize;
        let sectors = info.length / LOG_SECTOR_SIZE;
        let desc_sectors = descriptor_sectors(count as u64);
        let data_sectors = sectors - desc_sectors;
        let stored = le32(&first, 4);
        let mut crc = crc32c::crc32c(&first[..4]);
        crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc = crc32c::crc32c_append(crc, &first[8..]);

        let mut data_seen = 0u64;
        let mut done = count.min(FIRST_SECTOR_DESCRIPTORS);
        for d in first[ENTRY_HEADER_SIZE..]
            .chunks(DESCRIPTOR_SIZE)
            .take(done)
        {
            if !descriptor(&path, d, seq, &mut data_seen, data_sectors, &mut out)? {
                return Ok(false);
            }
        }
        // The number of data sectors must equal the number of data descriptors (2.3.1).
        if desc_sectors == 1 && data_seen != data_sectors {
            return Ok(false);
        }

        let mut k = 1u64; // next sector of the entry
        let mut chunk = 1u64;
        let mut data_index = 0usize;
        let mut buf = Vec::new();
        while k < sectors {
            let n = chunk.min(sectors - k);
            buf.resize(n as usize * SECTOR, 0);
            self.read(
                (info.pos + k * LOG_SECTOR_SIZE) % self.ring.length,
                &mut buf,
            )?;
            crc = crc32c::crc32c_append(crc, &buf);
            for s in buf.chunks(SECTOR) {
                if k < desc_sectors {
                    let m = (count - done).min(DESCRIPTORS_PER_SECTOR as usize);
                    for d in s.chunks(DESCRIPTOR_SIZE).take(m) {
                        if !descriptor(&path, d, seq, &mut data_seen, data_sectors, &mut out)? {
                            return Ok(false);
                        }
                    }
                    done += m;
                    if k + 1 == desc_sectors && data_seen != data_sectors {
                        return Ok(false);
                    }
                } else {
                    if &s[0..4] != DATA_SIGNATURE
                        || le32(s, 4) != (seq >> 32) as u32
                        || le32(s, SECTOR - 4) != seq as u32
                    {
                        return Ok(false);
                    }
                    if let Some(c) = out.as_deref_mut() {
                        if let LogData::Sector(page) = &mut c.writes[c.pages[data_index]].data {
                            page[8..SECTOR - 4].copy_from_slice(&s[8..SECTOR - 4]);
                        }
                    }
                    data_index += 1;
                }
                k += 1;
            }
            chunk = (chunk * 2).min(MAX_READ_SECTORS);
        }
        Ok(crc == stored)
    }

    /// The current sequence of the spec's scan: valid entries with consecutive sequence
    /// numbers from ring position `start` on. Also says whether it was cut short because
    /// it would have been longer than the ring.
    fn chain_from(&mut self, start: u64) -> Result<(Vec<EntryInfo>, bool)> {
        let mut chain: Vec<EntryInfo> = Vec::new();
        let mut total = 0u64;
        let mut pos = start;
        loop {
            self.charge(STEP_WORK)?;
            let Some((e, count)) = self.header(pos)? else {
                break;
            };
            // The cheap test first: an entry that does not continue the sequence ends
            // it whether or not its body is valid.
            if let Some(prev) = chain.last() {
                if prev.sequence.checked_add(1) != Some(e.sequence) {
                    break;
                }
            }
            if !self.is_valid(&e, count)? {
                break;
            }
            if total + e.length > self.ring.length {
                // A chain cannot be longer than the ring it was written to.
                return Ok((chain, true));
            }
            total += e.length;
            chain.push(e);
            pos = (pos + e.length) % self.ring.length;
        }
        Ok((chain, false))
    }

    /// The spec's scan (2.3.3), then the active sequence read once more to collect it.
    fn find(&mut self, budget: &ReplayBudget) -> Result<Option<Replay>> {
        let ring = self.ring;
        // Starts of chains known to be invalid sequences (see below).
        let mut dead: HashSet<u64> = HashSet::new();
        // The candidate active sequence, tail entry first.
        let mut candidate: Vec<EntryInfo> = Vec::new();
        let mut current_tail = 0u64;
        let mut old_tail = 0u64;
        loop {
            let (chain, capped) = if dead.contains(&current_tail) {
                (Vec::new(), false)
            } else {
                self.chain_from(current_tail)?
            };

            // Valid when the head entry's Tail is one of the chain's entries; the
            // sequence then runs from that entry to the head.
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
                    // Every entry of an invalid, uncapped chain starts a suffix of it
                    // with the same head, which is invalid for the same reason: skip
                    // them later.
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

        let path = &self.file.path;
        let Some(head) = candidate.last().copied() else {
            return Err(Error::corrupt(
                path,
                VhdxDefect::LogNoSequence {
                    guid: self.guid,
                    offset: ring.offset,
                },
            ));
        };
        if self.file.len() < head.flushed_file_offset {
            return Err(Error::corrupt(
                path,
                VhdxDefect::LogTruncated {
                    file_len: self.file.len(),
                    flushed: head.flushed_file_offset,
                    sequence: head.sequence,
                },
            ));
        }

        // The active sequence is at most the ring long (chain_from caps chains).
        self.limit = u64::MAX;
        self.probed = None;
        let mut c = Collector {
            budget,
            writes: Vec::new(),
            pages: Vec::new(),
            charged: 0,
        };
        let result = self.collect(&candidate, &mut c);
        if result.is_err() {
            budget.refund(c.charged);
        }
        result?;
        Ok(Some(Replay {
            writes: c.writes,
            #[cfg(test)]
            flushed_file_offset: head.flushed_file_offset,
            last_file_offset: head.last_file_offset,
            entries: candidate.len(),
            #[cfg(test)]
            head_sequence: head.sequence,
            memory: c.charged,
        }))
    }

    fn collect(&mut self, candidate: &[EntryInfo], c: &mut Collector) -> Result<()> {
        for e in candidate {
            let count = self.headers.get(&e.pos).copied().flatten().map(|h| h.1);
            let ok = match count {
                Some(count) => self.entry(e, count, Some(&mut *c))?,
                None => false,
            };
            if !ok {
                return Err(Error::corrupt(
                    &self.file.path,
                    VhdxDefect::LogEntryChanged {
                        sequence: e.sequence,
                        pos: e.pos,
                    },
                ));
            }
        }
        Ok(())
    }
}

/// Find the active log sequence of a VHDX whose current header has LogGuid `log_guid`
/// (MS-VHDX 2.3.3), with a budget of its own for the replayed writes.
#[cfg(test)]
pub fn find_replay(
    file: &ImageFile,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
) -> Result<Option<Replay>> {
    find_replay_within(
        file,
        log_offset,
        log_length,
        log_guid,
        &ReplayBudget::for_chain(),
    )
}

/// Find the active log sequence of a VHDX whose current header has LogGuid `log_guid`
/// (MS-VHDX 2.3.3), charging the replayed writes to `budget`.
///
/// `Ok(None)` when `log_guid` is nil (the log is empty and must not be replayed).
/// Otherwise the spec leaves no "nothing to replay" case: no valid sequence means the
/// file is corrupt, and so does a file shorter than the head entry's FlushedFileOffset,
/// and so (here) does a log the scan cannot finish within `SCAN_WORK_FACTOR` x its
/// length; these are `Error::Corrupt`. Going past the budget is `Error::Unsupported`.
/// Reads only the log; never modifies the file.
pub fn find_replay_within(
    file: &ImageFile,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
    budget: &ReplayBudget,
) -> Result<Option<Replay>> {
    if log_guid.is_nil() {
        return Ok(None);
    }
    let ring = Ring::new(file, log_offset, log_length)?;
    let mut scanner = Scanner::new(file, ring, log_guid);
    let result = scanner.find(budget);
    SCAN_WORK.with(|w| w.set(w.get().saturating_add(scanner.work)));
    result
}

/// Remove `[start, stop)` from non-overlapping overlay pieces, trimming a zero run that
/// sticks out on either side (pages and ranges are 4 KiB aligned, so pages never do).
fn carve(pieces: &mut BTreeMap<u64, OverlayPiece>, start: u64, stop: u64) {
    if let Some((&s, p)) = pieces.range_mut(..start).next_back() {
        let e = s + p.len();
        if e > start {
            if let OverlayPiece::Zeros(len) = p {
                *len = start - s;
            }
            if e > stop {
                pieces.insert(stop, OverlayPiece::Zeros(e - stop));
            }
        }
    }
    let inside: Vec<u64> = pieces.range(start..stop).map(|(&s, _)| s).collect();
    for s in inside {
        if let Some(p) = pieces.remove(&s) {
            let e = s + p.len();
            if e > stop {
                pieces.insert(stop, OverlayPiece::Zeros(e - stop));
            }
        }
    }
}

/// Read-only open: replay into the `ImageFile` overlay and extend the logical length to
/// cover every write and LastFileOffset. Later writes override earlier ones; a data
/// sector becomes one 4 KiB page (moved, not copied) and a zero descriptor one range,
/// whatever its length. Never touches the file.
pub fn apply_in_memory(file: &mut ImageFile, replay: Replay) {
    let mut pieces: BTreeMap<u64, OverlayPiece> = BTreeMap::new();
    let mut end = replay.last_file_offset;
    for w in replay.writes {
        let start = w.file_offset;
        let piece = match w.data {
            LogData::Sector(d) => OverlayPiece::Page(d),
            LogData::Zero { len } => OverlayPiece::Zeros(len),
        };
        let stop = start + piece.len();
        end = end.max(stop);
        carve(&mut pieces, start, stop);
        pieces.insert(start, piece);
    }
    for (off, piece) in pieces {
        file.overlay_piece(off, piece);
    }
    file.extend_logical(end);
}

/// Read-write open: write every descriptor to its final location in order, extend the
/// file to LastFileOffset when it is shorter, then fdatasync. The caller then records an
/// empty log in the header (LogGuid zero) and calls `ImageFile::refresh_len`.
pub fn apply_to_file(file: &ImageFile, replay: &Replay) -> Result<()> {
    let mut size = file.stat_len()?;
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
    /// Zero `len` bytes (a multiple of 4 KiB) at `file_offset` (4 KiB aligned). Written
    /// by tests and the fuzz seeds; the writer logs whole pages only.
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
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
    #[cfg(test)]
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
        let invalid = |problem| {
            Err(Error::Internal(Internal::LogWrite {
                path: file.path.clone(),
                problem,
            }))
        };
        let (offset, length) = (self.log_offset, self.log_length);
        if length == 0
            || length % MIB != 0
            || length > u64::from(u32::MAX)
            || offset % MIB != 0
            || offset < MIB
            || !matches!(offset.checked_add(length), Some(e) if e <= file.len())
        {
            return invalid(LogWriteProblem::Region { offset, length });
        }
        if self.next_sequence == 0 || self.next_sequence == u64::MAX {
            return invalid(LogWriteProblem::Sequence {
                sequence: self.next_sequence,
            });
        }
        if !flushed_file_offset.is_multiple_of(MIB) || !last_file_offset.is_multiple_of(MIB) {
            return invalid(LogWriteProblem::FileOffsets {
                flushed: flushed_file_offset,
                last: last_file_offset,
            });
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
                return invalid(LogWriteProblem::Update { offset: off, len });
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
            return invalid(LogWriteProblem::NoRoom { entry_len, length });
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

/// Helpers to craft VHDX files with a pending log, for this module's tests, the fuzz
/// seeds and integration tests of the reader (`vdiskfs::testing`, cargo feature
/// `testing`). Not part of the supported API.
#[cfg(any(test, feature = "testing"))]
pub mod testutil {
    use std::path::Path;

    use uuid::Uuid;

    use super::{LogWriter, MIB};
    use crate::error::{Error, Request, Result};
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
            return Err(Error::Request(Request::PendingLog {
                path: path.to_path_buf(),
            }));
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

    /// Turn a clean VHDX into the hostile file of issue 11 (item 2): its header points at
    /// a pending log of `log_len` bytes placed after the file's end (1 MiB aligned),
    /// every 4 KiB slot of which holds an entry header claiming the whole log
    /// (EntryLength = LogLength) with the header's LogGuid, SequenceNumber 1, Tail 0 and
    /// DescriptorCount `count` (the descriptors in the first sector plausible too), but
    /// a wrong checksum and no valid body. Only the first 48 bytes of a slot are
    /// non-zero when `count` is 0. Returns (log offset, LogGuid).
    pub fn make_crafted_log_test_file(
        path: &Path,
        log_len: u64,
        count: u32,
    ) -> Result<(u64, Uuid)> {
        let file = ImageFile::open(path, true)?;
        let log_at = file.len().div_ceil(MIB) * MIB;
        let guid = Uuid::new_v4();
        let mut chunk = vec![0u8; MIB as usize];
        for h in chunk.chunks_mut(super::SECTOR) {
            h[0..4].copy_from_slice(super::ENTRY_SIGNATURE);
            h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
            h[8..12].copy_from_slice(&(log_len as u32).to_le_bytes());
            h[16..24].copy_from_slice(&1u64.to_le_bytes());
            h[24..28].copy_from_slice(&count.to_le_bytes());
            h[32..48].copy_from_slice(&guid.to_bytes_le());
            let descriptors = h[super::ENTRY_HEADER_SIZE..].chunks_mut(super::DESCRIPTOR_SIZE);
            for d in descriptors.take(count as usize) {
                d[0..4].copy_from_slice(super::DESC_SIGNATURE);
                d[16..24].copy_from_slice(&MIB.to_le_bytes());
                d[24..32].copy_from_slice(&1u64.to_le_bytes());
            }
        }
        for at in (0..log_len).step_by(MIB as usize) {
            file.write_all_at(&chunk, log_at + at)?;
        }
        let (mut hdr, slot, _) = read_current_header(&file)?;
        hdr.log_offset = log_at;
        hdr.log_length = log_len as u32;
        hdr.log_guid = guid;
        hdr.sequence_number += 1;
        file.write_all_at(&hdr.to_bytes(), HEADER_OFFSETS[1 - slot])?;
        file.sync_data()?;
        Ok((log_at, guid))
    }

    /// File offset of the BAT region.
    pub fn bat_offset(path: &Path) -> Result<u64> {
        let file = ImageFile::open(path, false)?;
        Ok(read_regions(&file)?.bat.file_offset)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;

    const LOG_OFF: u64 = MIB;
    const LOG_LEN: u64 = MIB;
    const FILE_LEN: u64 = 4 * MIB;
    const FLUSHED: u64 = FILE_LEN;

    use crate::test_support::TempDir;

    /// Deterministic bytes that differ between pages and within a page.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|j| ((seed << 32 | j).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    /// A 4 MiB file full of pattern bytes (log region included, zeroed) at `name`.
    fn synthetic(dir: &TempDir, name: &str) -> PathBuf {
        let path = dir.join(name);
        let mut bytes = pattern(1, FILE_LEN as usize);
        bytes[LOG_OFF as usize..(LOG_OFF + LOG_LEN) as usize].fill(0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Without ImageFile::open's flock: these tests hold a reader and a writer of the
    /// same file at once on purpose.
    fn open(path: &Path, writable: bool) -> ImageFile {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .unwrap();
        ImageFile::new(path, f).unwrap()
    }

    fn read(file: &ImageFile, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, off).unwrap();
        b
    }

    fn real_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
        std::fs::read(path).unwrap()[off as usize..off as usize + len].to_vec()
    }

    /// Write raw entry bytes at ring position `pos`, wrapping like the ring does.
    fn put(path: &Path, pos: u64, entry: &[u8]) {
        let file = open(path, true);
        for (i, s) in entry.chunks(SECTOR).enumerate() {
            let at = (pos + (i * SECTOR) as u64) % LOG_LEN;
            file.write_all_at(s, LOG_OFF + at).unwrap();
        }
    }

    fn entry(guid: &Uuid, seq: u64, tail: u64, updates: &[LogUpdate]) -> Vec<u8> {
        build_entry(guid, seq, tail as u32, FLUSHED, FILE_LEN, updates)
    }

    fn data(file_offset: u64, data: &[u8]) -> LogUpdate<'_> {
        LogUpdate::Data { file_offset, data }
    }

    /// Recompute the checksum of a hand-edited entry.
    fn recrc(e: &mut [u8]) {
        e[4..8].fill(0);
        let crc = crc32c::crc32c(e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    fn replay(path: &Path, guid: Uuid) -> Result<Option<Replay>> {
        find_replay(&open(path, false), LOG_OFF, LOG_LEN, guid)
    }

    fn sector(w: &LogWrite) -> (u64, &[u8]) {
        match &w.data {
            LogData::Sector(d) => (w.file_offset, d),
            LogData::Zero { .. } => panic!("expected a data write, got {w:?}"),
        }
    }

    fn corrupt_defect(r: Result<Option<Replay>>) -> VhdxDefect {
        match r {
            Err(Error::Corrupt {
                defect: crate::error::Defect::Vhdx(d),
                ..
            }) => d,
            Err(e) => panic!("expected a corrupt-file error, got {e}"),
            Ok(r) => panic!("expected a corrupt-file error, got {r:?}"),
        }
    }

    #[test]
    fn writer_entry_round_trips_through_find_replay() {
        let dir = TempDir::new("roundtrip");
        let path = synthetic(&dir, "f");
        let before = std::fs::read(&path).unwrap();
        let (a, b) = (pattern(10, SECTOR), pattern(11, SECTOR));
        let guid = Uuid::new_v4();
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN, guid, 1);
        w.write_entry(
            &open(&path, true),
            &[(2 * MIB, &a), (2 * MIB + 8192, &b)],
            FLUSHED,
            FILE_LEN,
        )
        .unwrap();
        assert_eq!(w.next_sequence(), 2);
        // Only the log region changed: the pages are not applied by the writer.
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after[..LOG_OFF as usize], before[..LOG_OFF as usize]);
        assert_eq!(
            after[(LOG_OFF + LOG_LEN) as usize..],
            before[(LOG_OFF + LOG_LEN) as usize..]
        );

        let r = replay(&path, guid).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (1, 1));
        assert_eq!(
            (r.flushed_file_offset, r.last_file_offset),
            (FLUSHED, FILE_LEN)
        );
        assert_eq!(r.writes.len(), 2);
        assert_eq!(sector(&r.writes[0]), (2 * MIB, &a[..]));
        assert_eq!(sector(&r.writes[1]), (2 * MIB + 8192, &b[..]));

        // In memory: visible through the ImageFile, the file untouched.
        let mut f = open(&path, false);
        apply_in_memory(&mut f, r.clone());
        assert_eq!(read(&f, 2 * MIB, SECTOR), a);
        assert_eq!(read(&f, 2 * MIB + 8192, SECTOR), b);
        assert_eq!(
            read(&f, 2 * MIB + 4096, SECTOR),
            before[(2 * MIB + 4096) as usize..][..SECTOR]
        );
        assert_eq!(f.len(), FILE_LEN);
        assert_eq!(std::fs::read(&path).unwrap(), after);

        // To the file.
        apply_to_file(&open(&path, true), &r).unwrap();
        assert_eq!(real_bytes(&path, 2 * MIB, SECTOR), a);
        assert_eq!(real_bytes(&path, 2 * MIB + 8192, SECTOR), b);
    }

    #[test]
    fn nil_log_guid_means_nothing_to_replay() {
        let dir = TempDir::new("nil");
        let path = synthetic(&dir, "f");
        assert!(replay(&path, Uuid::nil()).unwrap().is_none());
    }

    #[test]
    fn writer_keeps_the_newest_entry_active_while_it_wraps() {
        let dir = TempDir::new("wrapwriter");
        let path = synthetic(&dir, "f");
        let guid = Uuid::new_v4();
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN, guid, 100);
        let file = open(&path, true);
        // 60 pages: 1 descriptor sector + 60 data sectors = 244 KiB, 4 entries per lap.
        for i in 0..13u64 {
            let pages: Vec<Vec<u8>> = (0..60).map(|p| pattern(i * 1000 + p, SECTOR)).collect();
            let refs: Vec<(u64, &[u8])> = pages
                .iter()
                .enumerate()
                .map(|(p, d)| (2 * MIB + p as u64 * 4096, d.as_slice()))
                .collect();
            w.write_entry(&file, &refs, FLUSHED, FILE_LEN).unwrap();
            let r = replay(&path, guid).unwrap().unwrap();
            assert_eq!(
                (r.entries, r.head_sequence),
                (1, 100 + i),
                "after entry {i}"
            );
            assert_eq!(r.writes.len(), 60);
            assert_eq!(sector(&r.writes[59]).1, &pages[59][..]);
        }
        // An entry that fits neither after the newest one nor before it is refused.
        let big = vec![0u8; SECTOR];
        let refs: Vec<(u64, &[u8])> = (0..200).map(|p| (2 * MIB + p * 4096, &big[..])).collect();
        let err = w.write_entry(&file, &refs, FLUSHED, FILE_LEN).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Internal(Internal::LogWrite {
                    problem: LogWriteProblem::NoRoom { .. },
                    ..
                })
            ),
            "{err}"
        );
        // ... and the log is unchanged by the refusal.
        assert_eq!(replay(&path, guid).unwrap().unwrap().head_sequence, 112);
    }

    #[test]
    fn writer_rejects_bad_updates() {
        let dir = TempDir::new("badupdates");
        let path = synthetic(&dir, "f");
        let file = open(&path, true);
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN, Uuid::new_v4(), 1);
        let p = vec![0u8; SECTOR];
        for (off, d, flushed) in [
            (2 * MIB + 1, &p[..], FLUSHED),    // unaligned
            (2 * MIB, &p[..100], FLUSHED),     // short page
            (64 << 10, &p[..], FLUSHED),       // header section
            (2 * MIB, &p[..], FLUSHED + 4096), // FlushedFileOffset not 1 MiB aligned
        ] {
            assert!(w
                .write_entry(&file, &[(off, d)], flushed, FILE_LEN)
                .is_err());
        }
        let mut w = LogWriter::new(LOG_OFF, LOG_LEN, Uuid::new_v4(), 0);
        assert!(w
            .write_entry(&file, &[(2 * MIB, &p)], FLUSHED, FILE_LEN)
            .is_err());
        let mut w = LogWriter::new(FILE_LEN, LOG_LEN, Uuid::new_v4(), 1);
        assert!(w
            .write_entry(&file, &[(2 * MIB, &p)], FLUSHED, FILE_LEN)
            .is_err());
        // Nothing was written to the log.
        assert!(real_bytes(&path, LOG_OFF, LOG_LEN as usize)
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn multi_entry_sequence_replays_from_tail_in_order() {
        let dir = TempDir::new("multi");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let (a1, a2, b) = (pattern(1, SECTOR), pattern(2, SECTOR), pattern(3, SECTOR));
        let (p, q) = (2 * MIB, 3 * MIB);
        let e1 = entry(&g, 10, 0, &[data(p, &a1), data(q, &a2)]);
        let l1 = e1.len() as u64;
        let e2 = entry(&g, 11, 0, &[data(p, &b)]);
        let l2 = e2.len() as u64;
        let e3 = entry(
            &g,
            12,
            0,
            &[LogUpdate::Zero {
                file_offset: q + 4096,
                len: 8192,
            }],
        );
        put(&path, 0, &e1);
        put(&path, l1, &e2);
        put(&path, l1 + l2, &e3);
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (3, 12));
        assert_eq!(r.writes.len(), 4);
        assert_eq!(sector(&r.writes[0]), (p, &a1[..]));
        assert_eq!(sector(&r.writes[2]), (p, &b[..]));
        assert_eq!(
            r.writes[3],
            LogWrite {
                file_offset: q + 4096,
                data: LogData::Zero { len: 8192 }
            }
        );

        let mut f = open(&path, false);
        apply_in_memory(&mut f, r.clone());
        assert_eq!(
            read(&f, p, SECTOR),
            b,
            "the newer entry overrides the older"
        );
        assert_eq!(read(&f, q, SECTOR), a2);
        assert!(read(&f, q + 4096, 8192).iter().all(|&x| x == 0));

        apply_to_file(&open(&path, true), &r).unwrap();
        assert_eq!(real_bytes(&path, p, SECTOR), b);
        assert_eq!(real_bytes(&path, q, SECTOR), a2);
        assert!(real_bytes(&path, q + 4096, 8192).iter().all(|&x| x == 0));
    }

    #[test]
    fn tail_entry_starts_the_replay_not_the_scan_start() {
        let dir = TempDir::new("tailmid");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let (a, b) = (pattern(1, SECTOR), pattern(2, SECTOR));
        // Three consecutive entries; the head's Tail names the second one, so the first
        // (already applied) is not part of the active sequence.
        let e1 = entry(&g, 1, 0, &[data(2 * MIB, &a)]);
        let l = e1.len() as u64;
        put(&path, 0, &e1);
        put(&path, l, &entry(&g, 2, l, &[data(3 * MIB, &b)]));
        put(&path, 2 * l, &entry(&g, 3, l, &[]));
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 3));
        assert_eq!(r.writes.len(), 1);
        assert_eq!(sector(&r.writes[0]), (3 * MIB, &b[..]));
    }

    #[test]
    fn torn_head_entry_makes_the_previous_sequence_active() {
        let dir = TempDir::new("torn");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let (a, b, c) = (pattern(1, SECTOR), pattern(2, SECTOR), pattern(3, SECTOR));
        let e1 = entry(&g, 1, 0, &[data(2 * MIB, &a)]);
        let l = e1.len() as u64;
        put(&path, 0, &e1);
        put(&path, l, &entry(&g, 2, 0, &[data(2 * MIB, &b)]));
        let mut e3 = entry(&g, 3, 0, &[data(2 * MIB, &c)]);
        e3[SECTOR + 100] ^= 1; // torn data sector: checksum mismatch
        put(&path, 2 * l, &e3);
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 2));
        let mut f = open(&path, false);
        apply_in_memory(&mut f, r.clone());
        assert_eq!(read(&f, 2 * MIB, SECTOR), b);

        // A data sector whose sequence number does not match is invalid even with a
        // correct checksum (a misdirected write).
        let mut e3 = entry(&g, 3, 0, &[data(2 * MIB, &c)]);
        e3[2 * SECTOR - 4] ^= 1;
        recrc(&mut e3);
        put(&path, 2 * l, &e3);
        assert_eq!(replay(&path, g).unwrap().unwrap().head_sequence, 2);

        // Repaired, the third entry wins.
        put(&path, 2 * l, &entry(&g, 3, 0, &[data(2 * MIB, &c)]));
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (3, 3));
    }

    #[test]
    fn entries_with_another_log_guid_are_ignored() {
        let dir = TempDir::new("guid");
        let path = synthetic(&dir, "f");
        let (g, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (a, b) = (pattern(1, SECTOR), pattern(2, SECTOR));
        let e1 = entry(&g, 5, 0, &[data(2 * MIB, &a)]);
        let l = e1.len() as u64;
        put(&path, 0, &e1);
        // Stale entries of an earlier log: consecutive or newer, but another LogGuid.
        put(&path, l, &entry(&other, 6, l, &[data(2 * MIB, &b)]));
        put(
            &path,
            512 << 10,
            &entry(&other, 50, 512 << 10, &[data(2 * MIB, &b)]),
        );
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (1, 5));
        assert_eq!(sector(&r.writes[0]).1, &a[..]);
        // With a LogGuid no entry carries, there is no valid sequence: corrupt (2.3.3).
        let d = corrupt_defect(replay(&path, Uuid::new_v4()));
        assert!(matches!(d, VhdxDefect::LogNoSequence { .. }), "{d}");
    }

    #[test]
    fn sequences_and_entries_wrap_around_the_ring() {
        let dir = TempDir::new("wrap");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let (a, b, c) = (pattern(1, SECTOR), pattern(2, SECTOR), pattern(3, SECTOR));
        // A stale older sequence in the middle.
        put(
            &path,
            512 << 10,
            &entry(&g, 3, 512 << 10, &[data(2 * MIB, &c)]),
        );
        // Entry 7 in the last 8 KiB, entry 8 at offset 0: one sequence across the end.
        let t = LOG_LEN - 8192;
        put(&path, t, &entry(&g, 7, t, &[data(2 * MIB, &a)]));
        put(
            &path,
            0,
            &entry(&g, 8, t, &[data(2 * MIB, &b), data(3 * MIB, &c)]),
        );
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 8));
        assert_eq!(r.writes.len(), 3);
        assert_eq!(sector(&r.writes[0]).1, &a[..]);
        assert_eq!(sector(&r.writes[1]).1, &b[..]);

        // One entry whose own sectors wrap: header in the last sector, data at 0 and 4K.
        let dir = TempDir::new("wrap2");
        let path = synthetic(&dir, "f");
        let t = LOG_LEN - 4096;
        put(
            &path,
            t,
            &entry(&g, 9, t, &[data(2 * MIB, &a), data(3 * MIB, &b)]),
        );
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence), (1, 9));
        assert_eq!(sector(&r.writes[0]), (2 * MIB, &a[..]));
        assert_eq!(sector(&r.writes[1]), (3 * MIB, &b[..]));
    }

    #[test]
    fn sequence_whose_head_tail_is_outside_it_is_invalid() {
        let dir = TempDir::new("badtail");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let a = pattern(1, SECTOR);
        let e1 = entry(&g, 5, 0, &[data(2 * MIB, &a)]);
        let l = e1.len() as u64;
        put(&path, 0, &e1);
        // Entry 6 continues entry 5 but names a tail that is not in the sequence: the
        // maximal sequence [5, 6] is invalid, and so is [6] alone.
        put(&path, l, &entry(&g, 6, 512 << 10, &[data(2 * MIB, &a)]));
        corrupt_defect(replay(&path, g));
        put(&path, l, &entry(&g, 6, 0, &[data(2 * MIB, &a)]));
        assert_eq!(replay(&path, g).unwrap().unwrap().entries, 2);
    }

    #[test]
    fn zero_descriptors_and_file_extension() {
        let dir = TempDir::new("zero");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let (a, b) = (pattern(1, SECTOR), pattern(2, SECTOR));
        let last = FILE_LEN + MIB;
        let e = build_entry(
            &g,
            1,
            0,
            FLUSHED,
            last,
            &[
                LogUpdate::Zero {
                    file_offset: 2 * MIB,
                    len: 8192,
                },
                data(3 * MIB, &a),
                // Past the end of the file: a data page, then zeros over part of it.
                data(FILE_LEN + 16384, &b),
                data(FILE_LEN + 20480, &b),
                LogUpdate::Zero {
                    file_offset: FILE_LEN + 12288,
                    len: 8192,
                },
            ],
        );
        put(&path, 0, &e);
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!(r.last_file_offset, last);
        let check = |f: &ImageFile| {
            assert_eq!(f.len(), last);
            assert!(read(f, 2 * MIB, 8192).iter().all(|&x| x == 0));
            assert_eq!(
                read(f, 2 * MIB + 8192, SECTOR),
                pattern(1, FILE_LEN as usize)[(2 * MIB + 8192) as usize..][..SECTOR]
            );
            assert_eq!(read(f, 3 * MIB, SECTOR), a);
            assert!(read(f, FILE_LEN, 20480).iter().all(|&x| x == 0));
            assert_eq!(read(f, FILE_LEN + 20480, SECTOR), b);
            assert!(
                read(f, FILE_LEN + 24576, (last - FILE_LEN - 24576) as usize)
                    .iter()
                    .all(|&x| x == 0)
            );
        };
        let mut f = open(&path, false);
        apply_in_memory(&mut f, r.clone());
        check(&f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_LEN);

        let f = open(&path, true);
        apply_to_file(&f, &r).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), last);
        check(&open(&path, false));
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let dir = TempDir::new("trunc");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let a = pattern(1, SECTOR);
        put(
            &path,
            0,
            &build_entry(
                &g,
                1,
                0,
                FILE_LEN + MIB,
                FILE_LEN + MIB,
                &[data(2 * MIB, &a)],
            ),
        );
        let d = corrupt_defect(replay(&path, g));
        assert!(matches!(d, VhdxDefect::LogTruncated { .. }), "{d}");
    }

    #[test]
    fn bad_log_region_is_corrupt() {
        let dir = TempDir::new("region");
        let path = synthetic(&dir, "f");
        let f = open(&path, false);
        let g = Uuid::new_v4();
        for (off, len) in [
            (LOG_OFF, 0),
            (LOG_OFF, 4096),
            (4096, LOG_LEN),
            (0, LOG_LEN),
            (FILE_LEN, LOG_LEN),
            (u64::MAX - MIB + 1, MIB),
        ] {
            assert!(
                matches!(find_replay(&f, off, len, g), Err(Error::Corrupt { .. })),
                "{off} {len}"
            );
        }
    }

    #[test]
    fn corrupt_entry_fields_are_invalid_not_panics() {
        let dir = TempDir::new("fields");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let a = pattern(1, SECTOR);
        let good = entry(
            &g,
            1,
            0,
            &[
                data(2 * MIB, &a),
                LogUpdate::Zero {
                    file_offset: 3 * MIB,
                    len: 4096,
                },
            ],
        );
        put(&path, 0, &good);
        assert!(replay(&path, g).unwrap().is_some());
        let d0 = ENTRY_HEADER_SIZE; // first descriptor (data)
        let d1 = ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE; // second descriptor (zero)
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("signature", Box::new(|e| e[0] = b'x')),
            (
                "EntryLength beyond the log",
                Box::new(|e| e[8..12].copy_from_slice(&(2 * MIB as u32).to_le_bytes())),
            ),
            ("EntryLength zero", Box::new(|e| e[8..12].fill(0))),
            (
                "EntryLength unaligned",
                Box::new(|e| e[8..12].copy_from_slice(&8000u32.to_le_bytes())),
            ),
            ("EntryLength u32::MAX", Box::new(|e| e[8..12].fill(0xff))),
            (
                "Tail outside the log",
                Box::new(|e| e[12..16].copy_from_slice(&(LOG_LEN as u32).to_le_bytes())),
            ),
            (
                "Tail unaligned",
                Box::new(|e| e[12..16].copy_from_slice(&100u32.to_le_bytes())),
            ),
            ("SequenceNumber zero", Box::new(|e| e[16..24].fill(0))),
            (
                "DescriptorCount u32::MAX",
                Box::new(|e| e[24..28].fill(0xff)),
            ),
            (
                "DescriptorCount too large",
                Box::new(|e| e[24..28].copy_from_slice(&200u32.to_le_bytes())),
            ),
            (
                "DescriptorCount 3",
                Box::new(|e| e[24..28].copy_from_slice(&3u32.to_le_bytes())),
            ),
            ("descriptor signature", Box::new(move |e| e[d0] = b'x')),
            ("descriptor sequence", Box::new(move |e| e[d0 + 24] ^= 1)),
            (
                "descriptor offset unaligned",
                Box::new(move |e| e[d0 + 16] = 1),
            ),
            (
                "descriptor in the header section",
                Box::new(move |e| {
                    e[d0 + 16..d0 + 24].copy_from_slice(&(64u64 << 10).to_le_bytes())
                }),
            ),
            (
                "descriptor offset overflows",
                Box::new(move |e| {
                    e[d0 + 16..d0 + 24].copy_from_slice(&(u64::MAX - 4095).to_le_bytes())
                }),
            ),
            ("zero length unaligned", Box::new(move |e| e[d1 + 8] = 1)),
            (
                "zero range overflows",
                Box::new(move |e| {
                    e[d1 + 8..d1 + 16].copy_from_slice(&(u64::MAX - 4095).to_le_bytes())
                }),
            ),
            ("data sector signature", Box::new(|e| e[SECTOR] = b'x')),
            ("data sector SequenceHigh", Box::new(|e| e[SECTOR + 4] = 1)),
            (
                "two data descriptors, one data sector",
                Box::new(move |e| e[d1..d1 + 4].copy_from_slice(DESC_SIGNATURE)),
            ),
            (
                "a sector more than its descriptors use",
                Box::new(|e| {
                    e.extend_from_slice(&[0; SECTOR]);
                    let len = e.len() as u32;
                    e[8..12].copy_from_slice(&len.to_le_bytes());
                }),
            ),
            (
                "EntryLength beyond DescriptorCount's sectors",
                Box::new(|e| {
                    e[24..28].copy_from_slice(&0u32.to_le_bytes());
                }),
            ),
        ];
        for (what, edit) in &edits {
            let mut e = good.clone();
            edit(&mut e);
            recrc(&mut e);
            put(&path, 0, &e);
            let r = replay(&path, g);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{what}: {r:?}");
        }
        // Reserved fields are ignored.
        let mut e = good.clone();
        e[28] = 1;
        recrc(&mut e);
        put(&path, 0, &e);
        assert!(replay(&path, g).unwrap().is_some());
    }

    #[test]
    fn random_logs_never_panic() {
        let dir = TempDir::new("random");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20 {
            let mut log = vec![0u8; LOG_LEN as usize];
            for b in log.iter_mut() {
                *b = next() as u8;
            }
            // Plausible entry headers at random sector starts, some with valid checksums.
            for _ in 0..40 {
                let pos = (next() % (LOG_LEN / 4096)) as usize * SECTOR;
                let h = &mut log[pos..pos + SECTOR];
                h[0..4].copy_from_slice(ENTRY_SIGNATURE);
                let len = ((next() % 4) + 1) as u32 * 4096;
                h[8..12].copy_from_slice(&len.to_le_bytes());
                h[12..16].copy_from_slice(&((next() % 256) as u32 * 4096).to_le_bytes());
                h[16..24].copy_from_slice(&(next() % 4 + 1).to_le_bytes());
                h[24..28].copy_from_slice(&((next() % 3) as u32).to_le_bytes());
                h[32..48].copy_from_slice(&g.to_bytes_le());
                h[48..64].fill(0);
                if next() % 2 == 0 && pos + len as usize <= log.len() {
                    recrc(&mut log[pos..pos + len as usize]);
                }
            }
            put(&path, 0, &log);
            if let Ok(Some(r)) = replay(&path, g) {
                let mut f = open(&path, false);
                apply_in_memory(&mut f, r.clone());
                assert!(r.entries > 0, "round {round}");
            }
        }
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run {cmd:?} (install qemu-utils: scripts/setup.sh): {e}")
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?} failed: {text}");
        text
    }

    fn qemu_to_raw(vhdx: &Path, raw: &Path) -> Vec<u8> {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(vhdx)
            .arg(raw));
        std::fs::read(raw).unwrap()
    }

    /// The virtual disk of a small dynamic VHDX (1 MiB blocks, chunk ratio 4096 so BAT
    /// index = block number), read through `file` (and so through its overlay).
    fn read_disk(file: &ImageFile, bat: u64, blocks: u64) -> Vec<u8> {
        let mut disk = Vec::new();
        for b in 0..blocks {
            let e = le64(&read(file, bat + 8 * b, 8), 0);
            match e & 7 {
                6 => disk.extend(read(file, e >> 20 << 20, MIB as usize)),
                0 | 2 | 3 => disk.extend(vec![0u8; MIB as usize]),
                s => panic!("block {b}: unexpected BAT state {s}"),
            }
        }
        disk
    }

    /// A real pending-log VHDX (one data sector and one BAT page changed through the
    /// log), judged by qemu, which replays logs when it opens a file writable.
    #[test]
    fn qemu_agrees_with_our_replay_of_a_crafted_pending_log() {
        use crate::image::vhdx::header::read_current_header;

        let dir = TempDir::new("qemu");
        let blocks = 8u64;
        let raw = pattern(7, (blocks * MIB) as usize);
        std::fs::write(dir.join("in.raw"), &raw).unwrap();
        let clean = dir.join("clean.vhdx");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx", "-o"])
            .arg("subformat=dynamic,block_size=1M,log_size=1M")
            .arg(dir.join("in.raw"))
            .arg(&clean));

        // Where qemu put the blocks.
        let bat = testutil::bat_offset(&clean).unwrap();
        let f = open(&clean, false);
        let mut bat_page = read(&f, bat, SECTOR);
        let entries: Vec<u64> = (0..blocks as usize)
            .map(|b| le64(&bat_page, 8 * b))
            .collect();
        assert!(
            entries.iter().all(|e| e & 7 == 6),
            "all blocks present: {entries:x?}"
        );
        drop(f);

        // The logged changes: one data sector of block 3, and blocks 5 and 6 swapped in
        // the BAT.
        let sector_at = 3 * MIB + 8192;
        let new_sector = pattern(99, SECTOR);
        let data_off = (entries[3] >> 20 << 20) + 8192;
        bat_page[40..48].copy_from_slice(&entries[6].to_le_bytes());
        bat_page[48..56].copy_from_slice(&entries[5].to_le_bytes());
        let pending = dir.join("pending.vhdx");
        std::fs::copy(&clean, &pending).unwrap();
        let guid = testutil::make_pending_log_test_file(
            &pending,
            &[(data_off, new_sector.clone()), (bat, bat_page.clone())],
        )
        .unwrap();
        let pending_bytes = std::fs::read(&pending).unwrap();
        assert_eq!(
            real_bytes(&pending, data_off, SECTOR),
            real_bytes(&clean, data_off, SECTOR)
        );

        let mut expected = raw.clone();
        expected[sector_at as usize..][..SECTOR].copy_from_slice(&new_sector);
        let (b5, b6) = (5 * MIB as usize, 6 * MIB as usize);
        expected[b5..b6 + MIB as usize]
            .copy_from_slice(&[&raw[b6..b6 + MIB as usize], &raw[b5..b6]].concat());

        // qemu: replay on a writable open (check -r all), then read.
        let q = dir.join("q.vhdx");
        std::fs::copy(&pending, &q).unwrap();
        run(Command::new("qemu-img")
            .args(["check", "-r", "all"])
            .arg(&q));
        let qemu_view = qemu_to_raw(&q, &dir.join("q.raw"));
        assert!(
            qemu_view == expected,
            "qemu does not see the logged changes"
        );

        // Ours, in memory: same bytes, file untouched.
        let mut f = open(&pending, false);
        let (hdr, _, _) = read_current_header(&f).unwrap();
        assert_eq!(hdr.log_guid, guid);
        let r = find_replay(&f, hdr.log_offset, u64::from(hdr.log_length), hdr.log_guid)
            .unwrap()
            .unwrap();
        assert_eq!((r.entries, r.writes.len()), (1, 2));
        apply_in_memory(&mut f, r.clone());
        assert!(
            read_disk(&f, bat, blocks) == qemu_view,
            "in-memory replay differs from qemu"
        );
        assert!(
            std::fs::read(&pending).unwrap() == pending_bytes,
            "read-only replay wrote to the file"
        );

        // Ours, to the file; then mark the log empty and let qemu read it read-only.
        let w = dir.join("w.vhdx");
        std::fs::copy(&pending, &w).unwrap();
        let f = open(&w, true);
        let r = find_replay(&f, hdr.log_offset, u64::from(hdr.log_length), hdr.log_guid)
            .unwrap()
            .unwrap();
        apply_to_file(&f, &r).unwrap();
        drop(f);
        testutil::set_log_guid(&w, Uuid::nil()).unwrap();
        run(Command::new("qemu-img").arg("check").arg(&w));
        assert!(
            qemu_to_raw(&w, &dir.join("w.raw")) == qemu_view,
            "replay to the file differs from qemu"
        );
    }

    #[test]
    fn sequence_filling_the_whole_log_ends_the_scan() {
        // With the spec's "current tail < old tail" stop rule this scan would never end:
        // the sequence starts at 0 and its head ends exactly at the end of the ring.
        let dir = TempDir::new("full");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let pages: Vec<Vec<u8>> = (0..63).map(|p| pattern(p, SECTOR)).collect();
        let ups: Vec<LogUpdate> = pages
            .iter()
            .enumerate()
            .map(|(i, d)| data(2 * MIB + i as u64 * 4096, d))
            .collect();
        for i in 0..4u64 {
            let e = entry(&g, 1 + i, 0, &ups);
            assert_eq!(e.len() as u64, LOG_LEN / 4);
            put(&path, i * LOG_LEN / 4, &e);
        }
        let r = replay(&path, g).unwrap().unwrap();
        assert_eq!((r.entries, r.head_sequence, r.writes.len()), (4, 4, 4 * 63));
    }

    #[test]
    fn huge_zero_range_past_the_end_costs_no_memory() {
        let dir = TempDir::new("hugezero");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let len = 1u64 << 40;
        put(
            &path,
            0,
            &entry(
                &g,
                1,
                0,
                &[LogUpdate::Zero {
                    file_offset: FILE_LEN,
                    len,
                }],
            ),
        );
        let r = replay(&path, g).unwrap().unwrap();
        let mut f = open(&path, false);
        apply_in_memory(&mut f, r.clone());
        assert_eq!(f.len(), FILE_LEN + len);
        assert!(read(&f, FILE_LEN + len - 4096, 4096)
            .iter()
            .all(|&x| x == 0));
        assert_eq!(read(&f, 0, 4096), pattern(1, 4096));
    }

    /// A sequence of data pages and zero ranges, overlapping each other and the end of
    /// the file, replayed in memory: every byte reads as applying them in order would
    /// leave it, and each write is one overlay piece at most.
    #[test]
    fn in_memory_replay_matches_applying_the_writes_in_order() {
        let dir = TempDir::new("overlaymodel");
        let path = synthetic(&dir, "f");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Pages 0..96 of an area whose page 64 is the end of the file.
        let area = FILE_LEN - 64 * LOG_SECTOR_SIZE;
        for round in 0..40 {
            let mut model = std::fs::read(&path).unwrap()[area as usize..].to_vec();
            model.resize(96 * SECTOR, 0);
            let mut writes = Vec::new();
            for _ in 0..1 + next() % 12 {
                let page = next() % 96;
                let file_offset = area + page * LOG_SECTOR_SIZE;
                let at = page as usize * SECTOR;
                if next() % 2 == 0 {
                    let d = pattern(next(), SECTOR);
                    model[at..at + SECTOR].copy_from_slice(&d);
                    writes.push(LogWrite {
                        file_offset,
                        data: LogData::Sector(d.into_boxed_slice()),
                    });
                } else {
                    let pages = 1 + next() % (96 - page);
                    model[at..at + pages as usize * SECTOR].fill(0);
                    writes.push(LogWrite {
                        file_offset,
                        data: LogData::Zero {
                            len: pages * LOG_SECTOR_SIZE,
                        },
                    });
                }
            }
            let n = writes.len();
            let replay = Replay {
                writes,
                flushed_file_offset: FLUSHED,
                last_file_offset: FILE_LEN,
                entries: 1,
                head_sequence: 1,
                memory: 0,
            };
            let end = replay.grown_len(FILE_LEN);
            let mut f = open(&path, false);
            apply_in_memory(&mut f, replay);
            assert!(f.overlay_pieces() <= 2 * n, "round {round}");
            assert_eq!(f.len(), end.max(area + 64 * LOG_SECTOR_SIZE));
            let got = read(&f, area, (end - area) as usize);
            assert!(
                got == model[..got.len()],
                "round {round}: in-memory replay differs from the writes applied in order"
            );
            // Unaligned reads across pieces and the file too.
            let (o, l) = (next() % (end - area - 1), 1 + next() % 20000);
            let l = l.min(end - area - o) as usize;
            assert!(read(&f, area + o, l) == model[o as usize..o as usize + l]);
        }
    }

    #[test]
    fn a_huge_zero_range_inside_the_file_is_one_piece() {
        // Issue 11, item 4: a zero descriptor over 255 MiB of a file became 65,280 pages.
        let dir = TempDir::new("zerorange");
        let path = synthetic(&dir, "f");
        let big = 300 * MIB;
        open(&path, true).file.set_len(big).unwrap();
        let g = Uuid::new_v4();
        let zero = LogUpdate::Zero {
            file_offset: 2 * MIB,
            len: 255 * MIB,
        };
        put(&path, 0, &build_entry(&g, 1, 0, big, big, &[zero]));
        let budget = ReplayBudget::new(u64::MAX);
        let r = find_replay_within(&open(&path, false), LOG_OFF, LOG_LEN, g, &budget)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.memory, budget.used()),
            (DESCRIPTOR_MEMORY, DESCRIPTOR_MEMORY)
        );
        let mut f = open(&path, false);
        apply_in_memory(&mut f, r);
        assert_eq!(f.overlay_pieces(), 1);
        assert!(read(&f, 2 * MIB, MIB as usize).iter().all(|&b| b == 0));
        assert!(read(&f, 257 * MIB - 4096, 4096).iter().all(|&b| b == 0));
        assert_eq!(read(&f, 0, 4096), pattern(1, 4096));
    }

    #[test]
    fn the_replay_is_charged_to_the_budget_and_refused_past_it() {
        let dir = TempDir::new("budget");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let pages: Vec<Vec<u8>> = (0..10).map(|p| pattern(p, SECTOR)).collect();
        let ups: Vec<LogUpdate> = pages
            .iter()
            .enumerate()
            .map(|(i, d)| data(2 * MIB + i as u64 * 4096, d))
            .collect();
        put(&path, 0, &entry(&g, 1, 0, &ups));
        let cost = 10 * (LOG_SECTOR_SIZE + DESCRIPTOR_MEMORY);
        let f = open(&path, false);
        let budget = ReplayBudget::new(2 * cost);
        let r = find_replay_within(&f, LOG_OFF, LOG_LEN, g, &budget).unwrap();
        assert_eq!((r.unwrap().memory, budget.used()), (cost, cost));
        find_replay_within(&f, LOG_OFF, LOG_LEN, g, &budget).unwrap();
        // A third replay goes past the limit: refused, and its partial charge given back.
        match find_replay_within(&f, LOG_OFF, LOG_LEN, g, &budget) {
            Err(Error::Unsupported {
                feature: Feature::VhdxReplayBudget { .. },
                ..
            }) => {}
            r => panic!("expected the budget to refuse: {r:?}"),
        }
        assert_eq!(budget.used(), 2 * cost);
    }

    #[test]
    fn the_scan_gives_up_past_its_work_limit() {
        // Every slot claims the whole log and fills it with plausible descriptors: the
        // scan reads each slot's first sector and the next (whose header ends the
        // entry), twice the log. Below that limit it gives up: corrupt.
        let dir = TempDir::new("worklimit");
        let path = synthetic(&dir, "f");
        let g = Uuid::new_v4();
        let count = 256 - 2u32; // 2 descriptor sectors + 254 data sectors = the log
        let mut log = vec![0u8; LOG_LEN as usize];
        for h in log.chunks_mut(SECTOR) {
            h[0..4].copy_from_slice(ENTRY_SIGNATURE);
            h[8..12].copy_from_slice(&(LOG_LEN as u32).to_le_bytes());
            h[16..24].copy_from_slice(&1u64.to_le_bytes());
            h[24..28].copy_from_slice(&count.to_le_bytes());
            h[32..48].copy_from_slice(&g.to_bytes_le());
            for d in h[ENTRY_HEADER_SIZE..].chunks_mut(DESCRIPTOR_SIZE) {
                d[0..4].copy_from_slice(DESC_SIGNATURE);
                d[16..24].copy_from_slice(&(2 * MIB).to_le_bytes());
                d[24..32].copy_from_slice(&1u64.to_le_bytes());
            }
        }
        put(&path, 0, &log);
        let f = open(&path, false);
        let ring = Ring::new(&f, LOG_OFF, LOG_LEN).unwrap();
        let mut s = Scanner::new(&f, ring, g);
        let d = corrupt_defect(s.find(&ReplayBudget::new(0)));
        assert!(matches!(d, VhdxDefect::LogNoSequence { .. }), "{d}");
        assert!(s.work > 2 * LOG_LEN && s.work < SCAN_WORK_FACTOR * LOG_LEN);
        let mut s = Scanner::new(&f, ring, g);
        s.limit = LOG_LEN;
        let d = corrupt_defect(s.find(&ReplayBudget::new(0)));
        assert!(matches!(d, VhdxDefect::LogScanBudget { .. }), "{d}");
        assert!(s.work <= LOG_LEN + 4096, "{}", s.work);
    }
}
