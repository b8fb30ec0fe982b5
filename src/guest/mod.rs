//! What is inside the virtual disk: the guest's partition table (MBR with extended and
//! logical partitions, or GPT) and the file system at the start of each partition.
//!
//! `scan` reads the table of any `ReadAt` (the merged `Disk`, or bytes in memory) and
//! returns a `Layout`: the scheme, the partitions with their byte ranges (always inside
//! the disk), the file system found at each one's start, and warnings about anything odd.
//! The mount turns the partitions into files (`p1`, `p2`, ...) and `info` reports them.
//!
//! The on-disk structures are parsed by the `mbrman` (MBR, and each EBR, which has the
//! MBR's layout) and `gptman` (GPT header and entry array, with their CRCs) crates. What
//! is ours is the policy for guest-controlled input, which the crates' own whole-table
//! readers do not have: every header is checked before its entry array is read (at most
//! `MAX_GPT_ENTRIES` entries of 128 bytes, inside the disk), a damaged primary GPT falls
//! back to the backup, the chain of EBRs is followed at most `MAX_LOGICAL` links, never
//! twice through one sector and never outside the extended partition, and a partition
//! reaching past the disk's end is cut at the end (one starting past it gets no file).
//! Every problem is a warning in the layout; nothing here fails, panics or loops.

pub(crate) mod fs;
mod types;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashSet;
use std::io::{self, Cursor, Read, Seek, SeekFrom};

use gptman::{GPTHeader, GPTPartitionEntry};
use mbrman::{MBRHeader, MBRPartitionEntry};
use serde_json::{json, Value};

pub use fs::FsInfo;
pub use types::{gpt_type_name, mbr_type_name};

/// Most entries a GPT header may declare (Windows and Linux write 128; sgdisk allows
/// more); a header declaring more is treated as damaged.
pub const MAX_GPT_ENTRIES: u32 = 4096;
/// Most logical partitions followed in an extended partition.
pub const MAX_LOGICAL: usize = 256;
/// Most warnings kept in a layout (a hostile table could otherwise make thousands).
pub const MAX_WARNINGS: usize = 64;

/// Positioned reads of a disk.
pub trait ReadAt {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Read at `offset`; returns the bytes read, short only at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.as_slice().read_at(offset, buf)
    }
}

impl ReadAt for crate::disk::Disk {
    fn size(&self) -> u64 {
        self.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        crate::disk::Disk::read_at(self, offset, buf).map_err(io::Error::other)
    }
}

/// Exactly `n` bytes at `off`, or an error (UnexpectedEof past the end).
pub(crate) fn read_vec(src: &dyn ReadAt, off: u64, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut done = 0;
    while done < n {
        let pos = off
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        match src.read_at(pos, &mut buf[done..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            k => done += k,
        }
    }
    Ok(buf)
}

/// `Read + Seek` over a `ReadAt`, for the crates' readers.
struct Stream<'a> {
    src: &'a dyn ReadAt,
    pos: u64,
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read_at(self.pos, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Stream<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.src.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

/// Bytes `[base, base + data.len())` of a disk held in memory (a GPT entry array read in
/// one request instead of one per entry).
struct Slice {
    base: u64,
    data: Vec<u8>,
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.base + self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let rel = offset
            .checked_sub(self.base)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.data.as_slice().read_at(rel, buf)
    }
}

/// The kind of partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// No partition table (perhaps a file system on the whole disk).
    None,
    Mbr,
    Gpt,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::None => "none",
            Scheme::Mbr => "mbr",
            Scheme::Gpt => "gpt",
        }
    }
}

/// What a partition is in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of the MBR's four entries.
    Primary,
    /// The MBR entry holding the logical partitions (not a file system; gets no file).
    Extended,
    /// A partition in an extended partition's chain of EBRs.
    Logical,
    /// A GPT entry.
    Gpt,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Primary => "primary",
            Kind::Extended => "extended",
            Kind::Logical => "logical",
            Kind::Gpt => "gpt",
        }
    }
}

/// A partition's type: the MBR type byte or the GPT type GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartType {
    Mbr(u8),
    /// Upper-case text form.
    Gpt(String),
}

impl PartType {
    /// `0x07` or the GUID.
    pub fn id(&self) -> String {
        match self {
            PartType::Mbr(t) => format!("0x{t:02x}"),
            PartType::Gpt(g) => g.clone(),
        }
    }

    pub fn common_name(&self) -> Option<&'static str> {
        match self {
            PartType::Mbr(t) => mbr_type_name(*t),
            PartType::Gpt(g) => gpt_type_name(g),
        }
    }
}

/// One partition of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux's numbering: MBR entries 1-4 by slot, logical partitions from 5 in chain
    /// order, GPT entries by their index in the array (from 1).
    pub number: u32,
    pub kind: Kind,
    /// First sector and sector count as the table records them.
    pub first_sector: u64,
    pub sectors: u64,
    /// The byte range shown: `start` is `first_sector` in bytes; `size` is cut at the
    /// disk's end (0 when the partition starts past it).
    pub start: u64,
    pub size: u64,
    pub part_type: PartType,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT unique partition GUID.
    pub guid: Option<String>,
    /// GPT attribute bits.
    pub attributes: u64,
    /// MBR active flag; GPT legacy-BIOS-bootable attribute (bit 2).
    pub bootable: bool,
    /// The file system at the partition's start (only from `scan`).
    pub fs: Option<FsInfo>,
}

impl Partition {
    /// The name of its file in the mount: `p<number>`. None for an extended partition
    /// (a container, not a volume) and for one starting past the disk's end.
    pub fn file_name(&self) -> Option<String> {
        (self.kind != Kind::Extended && self.size > 0).then(|| format!("p{}", self.number))
    }
}

/// GPT header facts worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptInfo {
    /// LBA of the header used (1, or the backup's).
    pub header_lba: u64,
    pub entries: u32,
    pub first_usable: u64,
    pub last_usable: u64,
}

/// The guest's view of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub scheme: Scheme,
    pub sector_size: u64,
    pub disk_size: u64,
    /// GPT disk GUID, or the MBR disk signature as 8 hex digits.
    pub disk_id: Option<String>,
    pub gpt: Option<GptInfo>,
    /// In table order (MBR: primaries, then logicals; GPT: by entry index).
    pub partitions: Vec<Partition>,
    /// With no partition table: the file system at sector 0, if any.
    pub whole_disk: Option<FsInfo>,
    pub warnings: Vec<TableWarning>,
    /// Byte ranges (start, length) whose change can change this layout: where a table
    /// is or could be written (the first 34 and last 33 sectors, entry arrays, EBRs).
    pub watch: Vec<(u64, u64)>,
}

/// A finding about the guest's partition table, kept in `Layout::warnings` and logged.
/// `Display` is the line users see (`info --partitions`, the mount's log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableWarning {
    /// `error` is the read's message.
    #[error("cannot read sector 0: {error}")]
    ReadSector0 { error: String },
    #[error("partition {number}: starts at sector {first}, past the end of the disk ({disk_sectors} sectors); it gets no file")]
    PastEnd {
        number: u32,
        first: u64,
        disk_sectors: u64,
    },
    #[error("partition {number}: sectors {first}+{sectors} reach past the end of the disk ({disk_sectors} sectors); its file is cut at the disk's end")]
    CutAtEnd {
        number: u32,
        first: u64,
        sectors: u64,
        disk_sectors: u64,
    },
    /// MBR entry `index` starts at sector 0.
    #[error("partition {index}: starts at sector 0, over the partition table itself")]
    AtSectorZero { index: usize },
    #[error("partition {index}: a second extended partition; only the first one's logical partitions are read")]
    SecondExtended { index: usize },
    #[error("extended partition: more than {max} logical partitions; the rest are not read")]
    TooManyLogical { max: usize },
    #[error("extended partition: the chain of logical partitions loops back to sector {ebr}; stopped there")]
    EbrLoop { ebr: u64 },
    #[error("extended partition: an EBR at sector {ebr} is outside the extended partition or the disk; stopped there")]
    EbrOutside { ebr: u64 },
    #[error("cannot read the EBR at sector {ebr}: {error}")]
    ReadEbr { ebr: u64, error: String },
    /// `error` is the MBR parser's message.
    #[error("the EBR at sector {ebr} is not valid ({error}); the logical partitions stop there")]
    EbrInvalid { ebr: u64, error: String },
    #[error("logical partition {number}: sectors {first}+{sectors} are not inside its extended partition (sectors {ext}+{len})")]
    LogicalOutside {
        number: u32,
        first: u64,
        sectors: u32,
        ext: u64,
        len: u64,
    },
    #[error("protective MBR on a disk too small for a GPT")]
    GptDiskTooSmall,
    #[error("the GPT header records its backup at LBA {recorded}, but the disk's last LBA is {last} (was the disk resized?)")]
    GptBackupLba { recorded: u64, last: u64 },
    #[error("the primary GPT and its backup at LBA {backup_lba} differ; the primary is used")]
    GptCopiesDiffer { backup_lba: u64 },
    /// `error` is the GPT parser's message.
    #[error(
        "the backup GPT header at LBA {backup_lba} is not valid ({error}); the primary is used"
    )]
    GptBackupInvalid { backup_lba: u64, error: GptProblem },
    #[error("the primary GPT header at LBA 1 is not valid ({error}); the backup at LBA {backup_lba} is used")]
    GptPrimaryInvalid { backup_lba: u64, error: GptProblem },
    #[error("the disk has a protective MBR but no valid GPT: primary header at LBA 1: {primary}; backup header at LBA {backup_lba}: {backup}")]
    NoValidGpt {
        primary: GptProblem,
        backup_lba: u64,
        backup: GptProblem,
    },
    #[error(
        "the GPT's usable sectors {first}..{last} are not inside the disk ({disk_sectors} sectors)"
    )]
    GptUsableOutside {
        first: u64,
        last: u64,
        disk_sectors: u64,
    },
    #[error(
        "partition {number}: ends (LBA {end}) before it starts (LBA {start}); it gets no file"
    )]
    EndsBeforeStart { number: u32, start: u64, end: u64 },
    #[error("partition {number}: LBA {start}..{end} is outside the GPT's usable sectors {first_usable}..{last_usable}")]
    OutsideUsable {
        number: u32,
        start: u64,
        end: u64,
        first_usable: u64,
        last_usable: u64,
    },
    #[error("partitions {first} and {second} overlap; writing to one changes the other")]
    Overlap { first: u32, second: u32 },
    /// More than `MAX_WARNINGS` findings: the rest are dropped.
    #[error("more warnings about the partition table not shown")]
    MoreNotShown,
}

/// Why a GPT header (with its entry array) is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GptProblem {
    /// The header does not parse (`error`: the GPT library's message: signature,
    /// checksum...).
    #[error("{error}")]
    Header { error: String },
    #[error("it records its own place as LBA {recorded} (it was read at LBA {lba})")]
    OwnPlace { recorded: u64, lba: u64 },
    #[error("{count} partition entries (more than {max})")]
    TooManyEntries { count: u32, max: u32 },
    #[error("partition entries of {size} bytes (only 128 is supported)")]
    EntrySize { size: u32 },
    #[error("its entry array (LBA {first}, {count} entries) is not inside the disk")]
    ArrayOutside { first: u64, count: u32 },
    #[error("entry array: {error}")]
    ArrayRead { error: String },
    /// The entries do not parse (`error`: the GPT library's message).
    #[error("{error}")]
    Entries { error: String },
}

impl Layout {
    fn warn(&mut self, w: TableWarning) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        } else if self.warnings.len() == MAX_WARNINGS {
            self.warnings.push(TableWarning::MoreNotShown);
        }
    }

    /// The files a mount shows for it: (name, start, length), all inside the disk.
    pub fn files(&self) -> Vec<(String, u64, u64)> {
        self.partitions
            .iter()
            .filter_map(|p| p.file_name().map(|n| (n, p.start, p.size)))
            .collect()
    }

    /// Whether a write of `len` bytes at `offset` touches a watched range.
    pub fn touches_table(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.watch
            .iter()
            .any(|&(s, l)| offset < s.saturating_add(l) && s < end)
    }

    /// The layout as JSON (what `info --json` shows under "partition_table").
    pub fn to_json(&self) -> Value {
        let fs = |f: &Option<FsInfo>| {
            f.as_ref().map(|f| {
                json!({
                    "type": f.kind,
                    "name": f.display_name(),
                    "version": f.version,
                    "label": f.label,
                    "uuid": f.uuid,
                })
            })
        };
        let parts: Vec<Value> = self
            .partitions
            .iter()
            .map(|p| {
                json!({
                    "number": p.number,
                    "file": p.file_name(),
                    "kind": p.kind.name(),
                    "first_sector": p.first_sector,
                    "sectors": p.sectors,
                    "start": p.start,
                    "size": p.size,
                    "type": p.part_type.id(),
                    "type_name": p.part_type.common_name(),
                    "name": p.name,
                    "guid": p.guid,
                    "attributes": format!("0x{:016x}", p.attributes),
                    "bootable": p.bootable,
                    "file_system": fs(&p.fs),
                })
            })
            .collect();
        json!({
            "scheme": self.scheme.name(),
            "sector_size": self.sector_size,
            "disk_id": self.disk_id,
            "gpt": self.gpt.as_ref().map(|g| json!({
                "header_lba": g.header_lba,
                "entries": g.entries,
                "first_usable_lba": g.first_usable,
                "last_usable_lba": g.last_usable,
            })),
            "partitions": parts,
            "file_system": fs(&self.whole_disk),
            "warnings": self.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

/// The partition table and the file system at each partition's start (and, with no
/// table, at sector 0). `sector_size` is the disk's logical sector size.
pub fn scan(src: &dyn ReadAt, sector_size: u64) -> Layout {
    let mut l = scan_table(src, sector_size);
    for p in &mut l.partitions {
        if p.kind != Kind::Extended && p.size > 0 {
            p.fs = fs::probe(src, p.start, p.size);
        }
    }
    if l.scheme == Scheme::None {
        l.whole_disk = fs::probe(src, 0, l.disk_size);
    }
    l
}

/// The partition table only (what a mount needs).
pub fn scan_table(src: &dyn ReadAt, sector_size: u64) -> Layout {
    let ss = if (512..=4096).contains(&sector_size) && sector_size.is_power_of_two() {
        sector_size
    } else {
        512
    };
    let size = src.size();
    let mut l = Layout {
        scheme: Scheme::None,
        sector_size: ss,
        disk_size: size,
        disk_id: None,
        gpt: None,
        partitions: Vec::new(),
        whole_disk: None,
        warnings: Vec::new(),
        watch: vec![(0, (34 * ss).min(size))],
    };
    if size > 34 * ss {
        l.watch.push((size - 33 * ss, 33 * ss));
    }
    if size < 512 {
        return l;
    }
    let sector0 = match read_vec(src, 0, 512) {
        Ok(s) => s,
        Err(e) => {
            l.warn(TableWarning::ReadSector0 {
                error: e.to_string(),
            });
            return l;
        }
    };
    if fs::is_volume_boot_record(&sector0) {
        // A file system on the whole disk ("superfloppy"); its boot sector also ends in
        // 55 AA, but what sits where the MBR's entries would be is boot code.
        return l;
    }
    let Ok(mbr) = MBRHeader::read_from(&mut Cursor::new(&sector0)) else {
        return l;
    };
    if mbr.iter().any(|(_, e)| e.sys == 0xEE) {
        l.scheme = Scheme::Gpt;
        gpt(src, &mut l);
    } else {
        l.scheme = Scheme::Mbr;
        l.disk_id = Some(format!("{:08x}", u32::from_le_bytes(mbr.disk_signature)));
        mbr_table(src, &mbr, &mut l);
    }
    check_overlaps(&mut l);
    l
}

/// Turn a table's record into a partition with its byte range inside the disk.
#[allow(clippy::too_many_arguments)]
fn push(
    l: &mut Layout,
    number: u32,
    kind: Kind,
    first: u64,
    sectors: u64,
    part_type: PartType,
    name: Option<String>,
    guid: Option<String>,
    attributes: u64,
    bootable: bool,
) {
    let ss = l.sector_size;
    let start = first.checked_mul(ss).filter(|&s| s < l.disk_size);
    let size = match start {
        None => {
            l.warn(TableWarning::PastEnd {
                number,
                first,
                disk_sectors: l.disk_size / ss,
            });
            0
        }
        Some(s) => {
            let want = sectors.saturating_mul(ss);
            let room = l.disk_size - s;
            if want > room {
                l.warn(TableWarning::CutAtEnd {
                    number,
                    first,
                    sectors,
                    disk_sectors: l.disk_size / ss,
                });
            }
            want.min(room)
        }
    };
    l.partitions.push(Partition {
        number,
        kind,
        first_sector: first,
        sectors,
        start: start.unwrap_or(0),
        size,
        part_type,
        name,
        guid,
        attributes,
        bootable,
        fs: None,
    });
}

fn mbr_entry(l: &mut Layout, number: u32, kind: Kind, first: u64, e: &MBRPartitionEntry) {
    push(
        l,
        number,
        kind,
        first,
        u64::from(e.sectors),
        PartType::Mbr(e.sys),
        None,
        None,
        0,
        e.is_active(),
    );
}

fn mbr_table(src: &dyn ReadAt, mbr: &MBRHeader, l: &mut Layout) {
    let mut extended: Option<(u64, u64)> = None;
    for (i, e) in mbr.iter() {
        if e.is_unused() || e.sectors == 0 {
            continue;
        }
        let first = u64::from(e.starting_lba);
        if first == 0 {
            l.warn(TableWarning::AtSectorZero { index: i });
        }
        if e.is_extended() {
            if extended.is_some() {
                l.warn(TableWarning::SecondExtended { index: i });
            } else {
                extended = Some((first, u64::from(e.sectors)));
            }
            mbr_entry(l, i as u32, Kind::Extended, first, e);
        } else {
            mbr_entry(l, i as u32, Kind::Primary, first, e);
        }
    }
    if let Some((start, len)) = extended {
        logical(src, l, start, len);
    }
}

/// Follow the chain of EBRs of the extended partition at sectors `[ext, ext + len)`.
fn logical(src: &dyn ReadAt, l: &mut Layout, ext: u64, len: u64) {
    let ss = l.sector_size;
    let ext_end = ext + len;
    let disk_sectors = l.disk_size / ss;
    let mut seen = HashSet::new();
    let mut ebr = ext;
    let mut number = 5u32;
    loop {
        if seen.len() >= MAX_LOGICAL {
            l.warn(TableWarning::TooManyLogical { max: MAX_LOGICAL });
            return;
        }
        if !seen.insert(ebr) {
            l.warn(TableWarning::EbrLoop { ebr });
            return;
        }
        if ebr >= ext_end || ebr >= disk_sectors {
            l.warn(TableWarning::EbrOutside { ebr });
            return;
        }
        l.watch.push((ebr * ss, ss));
        let sector = match read_vec(src, ebr * ss, 512) {
            Ok(s) => s,
            Err(e) => {
                l.warn(TableWarning::ReadEbr {
                    ebr,
                    error: e.to_string(),
                });
                return;
            }
        };
        // An EBR has the MBR's layout: entry 1 is the logical partition (relative to
        // this EBR), entry 2 links to the next EBR (relative to the extended partition).
        let h = match MBRHeader::read_from(&mut Cursor::new(&sector)) {
            Ok(h) => h,
            Err(e) => {
                // An empty extended partition need not have an EBR at all.
                if ebr != ext || sector.iter().any(|&b| b != 0) {
                    l.warn(TableWarning::EbrInvalid {
                        ebr,
                        error: e.to_string(),
                    });
                }
                return;
            }
        };
        let p = &h.partition_1;
        if p.is_used() && p.sectors > 0 && !p.is_extended() {
            let first = ebr + u64::from(p.starting_lba);
            let end = first + u64::from(p.sectors);
            if first <= ebr || end > ext_end {
                l.warn(TableWarning::LogicalOutside {
                    number,
                    first,
                    sectors: p.sectors,
                    ext,
                    len,
                });
            }
            mbr_entry(l, number, Kind::Logical, first, p);
            number += 1;
        }
        let next = &h.partition_2;
        if !next.is_extended() || next.starting_lba == 0 {
            return;
        }
        ebr = ext + u64::from(next.starting_lba);
    }
}

/// A GPT header at `lba` with its entries, checked before the entries are read.
fn gpt_at(
    src: &dyn ReadAt,
    ss: u64,
    lba: u64,
    disk_sectors: u64,
) -> Result<(GPTHeader, Vec<GPTPartitionEntry>), GptProblem> {
    let mut s = Stream { src, pos: lba * ss };
    let h = GPTHeader::read_from(&mut s).map_err(|e| GptProblem::Header {
        error: e.to_string(),
    })?;
    if h.primary_lba != lba {
        return Err(GptProblem::OwnPlace {
            recorded: h.primary_lba,
            lba,
        });
    }
    let n = h.number_of_partition_entries;
    if n > MAX_GPT_ENTRIES {
        return Err(GptProblem::TooManyEntries {
            count: n,
            max: MAX_GPT_ENTRIES,
        });
    }
    if h.size_of_partition_entry != 128 {
        return Err(GptProblem::EntrySize {
            size: h.size_of_partition_entry,
        });
    }
    let bytes = u64::from(n) * 128;
    let first = h.partition_entry_lba;
    let end = first.saturating_add(bytes.div_ceil(ss));
    if first < 2 || end > disk_sectors || (first <= lba && lba < end) {
        return Err(GptProblem::ArrayOutside { first, count: n });
    }
    // gptman reads each entry through a buffer a little larger than 128 bytes; hold
    // the array and the sector after it (if any) in memory and let it read from there.
    let base = first * ss;
    let want = (bytes + ss).min(disk_sectors * ss - base);
    let data = read_vec(src, base, want as usize).map_err(|e| GptProblem::ArrayRead {
        error: e.to_string(),
    })?;
    let slice = Slice { base, data };
    let entries = h
        .read_partitions(
            &mut Stream {
                src: &slice,
                pos: 0,
            },
            ss,
        )
        .map_err(|e| GptProblem::Entries {
            error: e.to_string(),
        })?;
    Ok((h, entries))
}

fn guid_text(b: [u8; 16]) -> String {
    // GPT stores GUIDs in Microsoft's mixed-endian layout.
    uuid::Uuid::from_bytes_le(b)
        .hyphenated()
        .to_string()
        .to_uppercase()
}

fn gpt(src: &dyn ReadAt, l: &mut Layout) {
    let ss = l.sector_size;
    let disk_sectors = l.disk_size / ss;
    if disk_sectors < 3 {
        l.warn(TableWarning::GptDiskTooSmall);
        return;
    }
    let last = disk_sectors - 1;
    let primary = gpt_at(src, ss, 1, disk_sectors);
    let backup_lba = match &primary {
        Ok((h, _)) if h.backup_lba > 1 && h.backup_lba < disk_sectors => h.backup_lba,
        _ => last,
    };
    let backup = gpt_at(src, ss, backup_lba, disk_sectors);
    if let Ok((h, _)) = &primary {
        if h.backup_lba != last {
            l.warn(TableWarning::GptBackupLba {
                recorded: h.backup_lba,
                last,
            });
        }
    }
    let used = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            if p.0.disk_guid != b.0.disk_guid
                || p.0.partition_entry_array_crc32 != b.0.partition_entry_array_crc32
            {
                l.warn(TableWarning::GptCopiesDiffer { backup_lba });
            }
            (1, p)
        }
        (Ok(p), Err(e)) => {
            l.warn(TableWarning::GptBackupInvalid {
                backup_lba,
                error: e,
            });
            (1, p)
        }
        (Err(e), Ok(b)) => {
            l.warn(TableWarning::GptPrimaryInvalid {
                backup_lba,
                error: e,
            });
            (backup_lba, b)
        }
        (Err(e1), Err(e2)) => {
            l.warn(TableWarning::NoValidGpt {
                primary: e1,
                backup_lba,
                backup: e2,
            });
            return;
        }
    };
    let (lba, (h, entries)) = used;
    l.disk_id = Some(guid_text(h.disk_guid));
    l.gpt = Some(GptInfo {
        header_lba: lba,
        entries: h.number_of_partition_entries,
        first_usable: h.first_usable_lba,
        last_usable: h.last_usable_lba,
    });
    let array_len = u64::from(h.number_of_partition_entries) * 128;
    l.watch.push((lba * ss, ss));
    l.watch.push((h.partition_entry_lba * ss, array_len));
    if h.backup_lba < disk_sectors {
        l.watch.push((h.backup_lba * ss, ss));
    }
    if h.first_usable_lba > h.last_usable_lba || h.last_usable_lba >= disk_sectors {
        l.warn(TableWarning::GptUsableOutside {
            first: h.first_usable_lba,
            last: h.last_usable_lba,
            disk_sectors,
        });
    }
    for (i, e) in entries.iter().enumerate() {
        if e.is_unused() {
            continue;
        }
        let number = i as u32 + 1;
        if e.ending_lba < e.starting_lba {
            l.warn(TableWarning::EndsBeforeStart {
                number,
                start: e.starting_lba,
                end: e.ending_lba,
            });
            continue;
        }
        if e.starting_lba < h.first_usable_lba || e.ending_lba > h.last_usable_lba {
            l.warn(TableWarning::OutsideUsable {
                number,
                start: e.starting_lba,
                end: e.ending_lba,
                first_usable: h.first_usable_lba,
                last_usable: h.last_usable_lba,
            });
        }
        let name = e.partition_name.as_str().trim_end_matches('\0').to_string();
        push(
            l,
            number,
            Kind::Gpt,
            e.starting_lba,
            (e.ending_lba - e.starting_lba).saturating_add(1),
            PartType::Gpt(guid_text(e.partition_type_guid)),
            (!name.is_empty()).then_some(name),
            Some(guid_text(e.unique_partition_guid)),
            e.attribute_bits,
            e.attribute_bits & 4 != 0,
        );
    }
}

/// Warn about partitions sharing sectors (each keeps its file: both are inside the disk).
fn check_overlaps(l: &mut Layout) {
    let mut spans: Vec<(u64, u64, u32)> = l
        .partitions
        .iter()
        .filter(|p| p.kind != Kind::Extended && p.size > 0)
        .map(|p| (p.start, p.start + p.size, p.number))
        .collect();
    spans.sort_unstable();
    let mut reach: Option<(u64, u32)> = None;
    let mut found = Vec::new();
    for (s, e, n) in spans {
        if let Some((end, m)) = reach {
            if s < end {
                found.push(TableWarning::Overlap {
                    first: m,
                    second: n,
                });
            }
            if e > end {
                reach = Some((e, n));
            }
        } else {
            reach = Some((e, n));
        }
    }
    for w in found {
        l.warn(w);
    }
}
