//! What is wrong, typed: defects (`Error::Corrupt`), features vdiskfs does not implement
//! (`Error::Unsupported`), requests it refuses (`Error::Request`), option conflicts
//! (`Error::Usage`), mounts refused or failed (`Error::Mount`, `Error::MountFailed`),
//! broken invariants (`Error::Internal`) and warnings (non-fatal findings). Each variant carries the structure and the
//! numbers that matter (offsets, expected and found values); its `Display` is the
//! one-line message users see, and code and tests match on the variant, never on the
//! text. Text is made only at the boundary (the CLI line, the JSON of `info`/`check`).

use std::path::PathBuf;

use uuid::Uuid;

/// A damaged or invalid structure, grouped by format. `Display` is the message after
/// "path: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Defect {
    #[error(transparent)]
    Vhdx(#[from] VhdxDefect),
    #[error(transparent)]
    Vhd(#[from] VhdDefect),
    /// A read of `len` bytes at `offset` goes past the end of the `file_len`-byte file
    /// (a structure points outside the file).
    #[error(
        "read of {len} bytes at offset {offset} is past the end of the file ({file_len} bytes)"
    )]
    ReadPastEnd {
        len: usize,
        offset: u64,
        file_len: u64,
    },
    /// Neither a VHDX nor a VHD signature.
    #[error("not a VHDX or VHD image (no \"vhdxfile\" signature at offset 0 and no \"conectix\" footer)")]
    NotAnImage,
    /// A layer's allocation map described a different number of bytes than asked for.
    #[error("internal: map of {len} bytes at {offset} described {described} bytes (damaged allocation tables?)")]
    MapLength {
        len: usize,
        offset: u64,
        described: u64,
    },
    /// Free text, for test doubles only.
    #[error("{0}")]
    Other(String),
}

impl From<String> for Defect {
    fn from(s: String) -> Self {
        Defect::Other(s)
    }
}

impl From<&str> for Defect {
    fn from(s: &str) -> Self {
        Defect::Other(s.to_string())
    }
}

/// Why one copy of the VHDX header is invalid (MS-VHDX 2.2.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    #[error("short header")]
    Short,
    #[error("bad signature (expected \"head\")")]
    Signature,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("past the end of the file")]
    PastEnd,
}

/// Why a VHDX parent locator item is invalid (MS-VHDX 2.6.2.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocatorProblem {
    #[error("parent locator is {len} bytes (header needs 20)")]
    Short { len: usize },
    #[error("unknown parent locator type {id}")]
    UnknownType { id: Uuid },
    #[error("parent locator claims {count} entries, more than its {len} bytes hold")]
    TooManyEntries { count: usize, len: usize },
    /// `part` is "key" or "value".
    #[error("parent locator entry {index}: {part} at offset {offset} length {length} is outside the item ({len} bytes)")]
    EntryOutside {
        index: usize,
        part: &'static str,
        offset: usize,
        length: usize,
        len: usize,
    },
    #[error("parent locator entry {index} {part}: odd UTF-16 byte length {length}")]
    OddLength {
        index: usize,
        part: &'static str,
        length: usize,
    },
    #[error("parent locator entry {index} {part}: invalid UTF-16")]
    Utf16 { index: usize, part: &'static str },
    #[error("parent locator key {key:?} appears twice")]
    KeyTwice { key: String },
}

/// A pending VHDX log that would grow the file past what its structures can address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the pending log would grow the file from {from} to {to} bytes, beyond the {bound} bytes \
     its structures can address (header section, log, regions and every block of the disk)"
)]
pub struct LogGrowth {
    pub from: u64,
    pub to: u64,
    pub bound: u64,
}

/// A defect in a VHDX file, by structure: file identifier, headers, log, region table,
/// metadata, BAT, sector bitmaps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdxDefect {
    // File type identifier and headers.
    #[error("bad VHDX file type identifier (expected \"vhdxfile\" at offset 0)")]
    FileIdentifier,
    #[error("both VHDX headers are invalid: header 1 (at 64 KiB): {first}; header 2 (at 128 KiB): {second}")]
    BothHeaders {
        first: HeaderProblem,
        second: HeaderProblem,
    },
    #[error("log offset {offset} / length {length} are not multiples of 1 MiB")]
    LogAlignment { offset: u64, length: u32 },
    #[error("log at offset {offset} overlaps the header section")]
    LogInHeaderSection { offset: u64 },

    // Log (MS-VHDX 2.3).
    #[error(
        "pending log at offset {offset} length {length} lies outside the file ({file_len} bytes)"
    )]
    PendingLogOutside {
        offset: u64,
        length: u32,
        file_len: u64,
    },
    #[error("{0}; refusing to replay it (the file was not modified)")]
    LogGrowth(LogGrowth),
    #[error("the log overlaps the BAT or metadata region")]
    LogOverlapsRegions,
    #[error("header LogLength {length} is not a non-zero multiple of 1 MiB below 4 GiB")]
    LogLength { length: u64 },
    #[error("header LogOffset {offset} is not a multiple of 1 MiB after the header section")]
    LogOffset { offset: u64 },
    #[error("the log at offset {offset} length {length} lies outside the file ({file_len} bytes)")]
    LogOutside {
        offset: u64,
        length: u64,
        file_len: u64,
    },
    #[error(
        "the log at offset {offset} ({length} bytes) holds no active sequence found within \
         {factor} x its length of reading (a genuine log needs at most twice its length); it \
         is damaged or crafted, so the file is corrupt"
    )]
    LogScanBudget {
        offset: u64,
        length: u64,
        factor: u64,
    },
    #[error(
        "the header's LogGuid {guid} is set but the log at offset {offset} holds no valid \
         entry sequence for it, so the file is corrupt (MS-VHDX 2.3.3)"
    )]
    LogNoSequence { guid: Uuid, offset: u64 },
    #[error(
        "the file is {file_len} bytes but its log says it was at least {flushed} bytes \
         (FlushedFileOffset of log entry {sequence}): the file was truncated"
    )]
    LogTruncated {
        file_len: u64,
        flushed: u64,
        sequence: u64,
    },
    #[error("log entry {sequence} at log offset {pos} changed while it was being read")]
    LogEntryChanged { sequence: u64, pos: u64 },

    // Region table (MS-VHDX 2.2.3).
    /// Each problem names its copy ("region table 1 (at 192 KiB): ...").
    #[error("both VHDX region tables are invalid: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    BothRegionTables { problems: Vec<RegionTableCopy> },
    #[error("region {id} appears twice")]
    RegionTwice { id: Uuid },
    /// `name` is "BAT" or "metadata".
    #[error("no {name} region")]
    RegionMissing { name: &'static str },
    #[error("{name} region at offset {offset} length {length} is misplaced (must be 1 MiB aligned, after the header section, non-empty)")]
    RegionMisplaced {
        name: &'static str,
        offset: u64,
        length: u64,
    },
    #[error("{name} region at offset {offset} length {length} extends past the end of the file ({file_len} bytes)")]
    RegionPastEnd {
        name: &'static str,
        offset: u64,
        length: u64,
        file_len: u64,
    },
    #[error("BAT and metadata regions overlap")]
    RegionsOverlap,

    // Metadata region (MS-VHDX 2.6).
    #[error("bad metadata table signature at offset {offset} (expected \"metadata\")")]
    MetadataSignature { offset: u64 },
    #[error("metadata table has {count} entries (at most {max} allowed)")]
    MetadataEntries { count: u16, max: u16 },
    #[error("metadata item {id} is {length} bytes (at most 1 MiB allowed)")]
    MetadataItemTooLarge { id: Uuid, length: u32 },
    #[error("metadata item {id} at offset {offset} length {length} lies outside the metadata region ({region_length} bytes)")]
    MetadataItemOutside {
        id: Uuid,
        offset: u32,
        length: u32,
        region_length: u64,
    },
    #[error("metadata item {id} appears twice")]
    MetadataItemTwice { id: Uuid },
    #[error("metadata item {id} is {length} bytes, expected at least {min}")]
    MetadataItemShort { id: Uuid, length: u32, min: u32 },
    #[error("required metadata item {name} is missing")]
    MetadataItemMissing { name: &'static str },
    #[error("block size {block_size} is invalid (must be a power of two from 1 MiB to 256 MiB)")]
    BlockSize { block_size: u32 },
    /// `which` is "logical" or "physical".
    #[error("{which} sector size {size} is invalid (must be 512 or 4096)")]
    SectorSize { which: &'static str, size: u32 },
    #[error("virtual disk size {size} is invalid (must be a non-zero multiple of the {sector_size}-byte sector size, at most 64 TiB)")]
    VirtualSize { size: u64, sector_size: u32 },
    #[error(transparent)]
    ParentLocator(LocatorProblem),
    #[error("differencing disk without a valid parent_linkage in its parent locator")]
    NoParentLinkage,
    #[error("differencing disk whose parent locator has no relative_path, volume_path or absolute_win32_path")]
    NoParentPath,

    // BAT and sector bitmaps (MS-VHDX 2.5).
    #[error("BAT region is {length} bytes but a {virtual_size}-byte disk with {block_size}-byte blocks needs {need}")]
    BatSize {
        length: u64,
        virtual_size: u64,
        block_size: u32,
        need: u64,
    },
    #[error("BAT index {index} out of range ({entries} entries)")]
    BatIndex { index: u64, entries: u64 },
    #[error("BAT entry for block {block} is PARTIALLY_PRESENT in a file without a parent")]
    PartialWithoutParent { block: u64 },
    #[error("BAT entry for block {block} points at file offset {offset}, outside the file ({file_len} bytes) or inside the header section")]
    BlockOutside {
        block: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("BAT entry for block {block} points at file offset {offset}, which overlaps the BAT, metadata or log region")]
    BlockOverlapsRegions { block: u64, offset: u64 },
    #[error("BAT entry for block {block} has reserved state {state}")]
    ReservedState { block: u64, state: u64 },
    #[error(
        "chunk {chunk} has PARTIALLY_PRESENT blocks but its sector bitmap block is not present"
    )]
    BitmapNotPresent { chunk: u64 },
    #[error("sector bitmap block of chunk {chunk} at file offset {offset} is outside the file")]
    BitmapOutside { chunk: u64, offset: u64 },
    #[error(
        "the sector bitmap block of chunk {chunk} at file offset {offset} is also another chunk's"
    )]
    BitmapShared { chunk: u64, offset: u64 },

    // Found by `check` only (an open tolerates them).
    /// Region table copy `copy` (1 at 192 KiB, 2 at 256 KiB) has a bad signature or
    /// checksum.
    #[error("region table {copy} is invalid")]
    RegionTableInvalid { copy: u64 },
    #[error("the two region table copies differ")]
    RegionTablesDiffer,
    /// `BitmapOutside` as `check` words it (it walks every chunk, not only those a read
    /// needs).
    #[error("sector bitmap block of chunk {chunk} at {offset} is outside the file")]
    BitmapBlockOutside { chunk: u64, offset: u64 },
    /// A sector bitmap BAT entry in a state its file cannot have (any but NOT_PRESENT in
    /// a file without a parent; a reserved one in a child).
    #[error("sector bitmap entry of chunk {chunk} has state {state}, invalid in a {} file", if *differencing { "differencing" } else { "non-differencing" })]
    BitmapState {
        chunk: u64,
        state: u64,
        differencing: bool,
    },
    /// Two structures of the file share bytes: `area` starts at `offset`, inside `other`
    /// (the one before it that reaches furthest).
    #[error("{area} (at {offset}) overlaps {other}")]
    Overlap {
        area: VhdxArea,
        offset: u64,
        other: VhdxArea,
    },
}

/// A part of a VHDX file, as `VhdxDefect::Overlap` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VhdxArea {
    #[error("header section")]
    HeaderSection,
    #[error("BAT region")]
    BatRegion,
    #[error("metadata region")]
    MetadataRegion,
    #[error("log")]
    Log,
    #[error("payload block {block}")]
    PayloadBlock { block: u64 },
    #[error("sector bitmap block {chunk}")]
    BitmapBlock { chunk: u64 },
}

/// A defect in a VHD file, by structure: footer, dynamic disk header, BAT, parent locators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdDefect {
    // Footer.
    #[error("VHD footer at offset {offset}: only {len} bytes")]
    FooterShort { offset: u64, len: usize },
    #[error("no VHD footer at offset {offset} (cookie is not \"conectix\")")]
    FooterCookie { offset: u64 },
    #[error("no VHD footer (\"conectix\") at the end of the file ({file_len} bytes) nor a usable copy at offset 0")]
    NoFooter { file_len: u64 },
    /// A writable open of a file whose footer is only at offset 0.
    #[error("VHD footer missing at the end of the file (truncated?); open it read-only")]
    FooterMissingWritable,
    /// A writable open of a file with a checksum mismatch; `structure` is "footer" or
    /// "dynamic disk header".
    #[error("VHD {structure} checksum does not match (refusing to write to a damaged file; open it read-only)")]
    ChecksumWritable { structure: &'static str },
    #[error("fixed VHD: current size {current_size} is larger than the {data_len} bytes in front of the footer")]
    FixedSize { current_size: u64, data_len: u64 },

    // Dynamic disk header.
    #[error("VHD footer: dynamic disk header offset {offset} lies past the end of the file ({file_len} bytes)")]
    HeaderPastEnd { offset: u64, file_len: u64 },
    #[error("no VHD dynamic disk header at offset {offset} (cookie is not \"cxsparse\")")]
    HeaderCookie { offset: u64 },
    #[error("VHD dynamic disk header at offset {offset}: block size {block_size} is not a power of two between {min} and {max}")]
    BlockSize {
        offset: u64,
        block_size: u32,
        min: u32,
        max: u32,
    },
    #[error("VHD dynamic disk header at offset {offset}: parent Unicode name is not valid UTF-16")]
    ParentName { offset: u64 },
    #[error("VHD dynamic disk header: {entries} BAT entries cannot cover the current size {current_size} with {block_size}-byte blocks ({needed} needed)")]
    BatTooSmall {
        entries: u32,
        current_size: u64,
        block_size: u32,
        needed: u64,
    },

    // BAT.
    #[error("VHD BAT of {count} entries at offset {offset} lies past the end of the file ({file_len} bytes)")]
    BatPastEnd {
        count: u32,
        offset: u64,
        file_len: u64,
    },
    #[error("VHD BAT entry {entry} points at sector {sector} (offset {offset}): the block ({block_len} bytes with its bitmap) does not lie between the headers and the footer (offset {data_end})")]
    BlockOutside {
        entry: usize,
        sector: u32,
        offset: u64,
        block_len: u64,
        data_end: u64,
    },
    #[error("VHD BAT entry {entry}: block at offset {offset} overlaps the BAT")]
    BlockOverlapsBat { entry: usize, offset: u64 },
    #[error("VHD BAT entries {first} and {second} point at overlapping blocks (offsets {first_offset} and {second_offset})")]
    BlocksOverlap {
        first: usize,
        second: usize,
        first_offset: u64,
        second_offset: u64,
    },
    /// `structure` names what the block overlaps ("the dynamic disk header", "parent
    /// locator 2's data").
    #[error("VHD BAT entry {entry}: block at offset {offset} overlaps {structure}")]
    BlockOverlaps {
        entry: usize,
        offset: u64,
        structure: String,
    },

    // Parent locators; `code` is the platform code ("W2ku") or "?".
    #[error("parent locator {index} ({code}): data length {length} exceeds {max} bytes")]
    LocatorTooLong {
        index: usize,
        code: String,
        length: u32,
        max: u32,
    },
    #[error("parent locator {index} ({code}): data at offset {offset} length {length} lies past the end of the file ({file_len} bytes)")]
    LocatorPastEnd {
        index: usize,
        code: String,
        offset: u64,
        length: u32,
        file_len: u64,
    },
    #[error("parent locator {index} ({code}): UTF-16 data has an odd length of {length} bytes")]
    LocatorOddLength {
        index: usize,
        code: String,
        length: usize,
    },
    #[error("parent locator {index} ({code}): invalid UTF-16")]
    LocatorUtf16 { index: usize, code: String },
    #[error("parent locator {index} ({code}): invalid UTF-8")]
    LocatorUtf8 { index: usize, code: String },

    // Found by `check` only (an open tolerates them).
    #[error("the footer copy at offset 0 differs from the footer at the end")]
    FooterCopyDiffers,
    /// The data of parent locator `index` (at `offset`) lies inside a data block.
    #[error("parent locator {index} data at offset {offset} overlaps a data block")]
    LocatorOverlapsBlock { index: usize, offset: u64 },
}

/// A valid feature vdiskfs does not implement. `Display` follows "path: unsupported: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Feature {
    #[error("VHDX version {version} (only version 1 is defined)")]
    VhdxVersion { version: u16 },
    #[error("log version {version} with a pending log (only version 0 is defined)")]
    VhdxLogVersion { version: u16 },
    #[error("unknown required region {id}")]
    VhdxRequiredRegion { id: Uuid },
    #[error("unknown required metadata item {id}")]
    VhdxRequiredMetadata { id: Uuid },
    #[error("pending log of {length} bytes; vdiskfs replays logs of at most {max} bytes")]
    VhdxLogLength { length: u32, max: u64 },
    #[error(
        "replaying its pending log in memory needs more than the {limit_mib} MiB that the log \
         replays of all layers of one chain may hold together ({held_kib} KiB held already); \
         vdiskfs refuses it"
    )]
    VhdxReplayBudget { limit_mib: u64, held_kib: u64 },
    #[error("VHD footer at offset {offset}: disk type {disk_type} (only fixed 2, dynamic 3 and differencing 4 exist)")]
    VhdDiskType { offset: u64, disk_type: u32 },
    #[error(
        "VHD footer at offset {offset}: file format version {major}.{minor} (only 1.x is known)"
    )]
    VhdFooterVersion { offset: u64, major: u32, minor: u32 },
    #[error(
        "VHD dynamic disk header at offset {offset}: version {major}.{minor} (only 1.x is known)"
    )]
    VhdHeaderVersion { offset: u64, major: u32, minor: u32 },
    #[error("VHD BAT of {count} entries (more than {max}; blocks too small for the disk size)")]
    VhdBatEntries { count: u32, max: u32 },
    /// Free text, for test doubles only.
    #[error("{0}")]
    Other(String),
}

impl From<&str> for Feature {
    fn from(s: &str) -> Self {
        Feature::Other(s.to_string())
    }
}

/// A non-fatal finding of an open, kept in `LayerInfo::warnings` / `Chain::warnings`
/// and logged, or of a verb going on anyway (`merge --force`, `resize --force`,
/// `set-parent --ignore-id-mismatch`), given to its `Observer`. `Display` is the line
/// `info` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Warning {
    /// One VHDX header copy is invalid (`copy` 1 at 64 KiB, 2 at 128 KiB); the other
    /// is used.
    #[error("header {copy} (at {} KiB) is invalid: {problem}", copy * 64)]
    VhdxHeaderInvalid { copy: u64, problem: HeaderProblem },
    #[error("unknown optional metadata item {id} ignored")]
    VhdxUnknownMetadata { id: Uuid },
    /// A pending log replayed in memory would grow the file past what its structures
    /// address.
    #[error("{0}; replayed in memory only, a writable open refuses it")]
    VhdxLogGrowth(LogGrowth),
    /// `structure` is "footer" or "dynamic disk header".
    #[error("VHD {structure} checksum does not match")]
    VhdChecksum { structure: &'static str },
    #[error("VHD footer missing at the end of the file (truncated or still being written); using the copy at offset 0")]
    VhdFooterMissing,
    #[error("parent locator {index} has unknown platform code {code:?}; ignored")]
    VhdLocatorPlatform { index: usize, code: String },
    /// A layer another process has open for writing (`who`), read anyway.
    #[error("{}: open for writing by {who}; reading it anyway: what is read may be inconsistent (it can change while it is read)", path.display())]
    OpenForWriting { path: PathBuf, who: String },
    /// The parent's identity could not be checked; read because of --ignore-linkage.
    #[error("{}: parent {}: {problem}; reading anyway because of --ignore-linkage", child.display(), parent.display())]
    LinkageUnchecked {
        child: PathBuf,
        parent: PathBuf,
        problem: LinkageProblem,
    },
    /// The parent is not the one the child was made from; read because of
    /// --ignore-linkage.
    #[error("{}: parent {} does not match ({problem}); reading anyway because of --ignore-linkage: the merged view may be garbage", child.display(), parent.display())]
    LinkageMismatch {
        child: PathBuf,
        parent: PathBuf,
        problem: LinkageProblem,
    },
    /// The parent's modification time differs from the one the child recorded.
    #[error("{}: parent {} time stamp is {actual} but the child recorded {recorded} (the parent was touched after the child was made; this alone does not stop the open)", child.display(), parent.display())]
    TimeStamp {
        child: PathBuf,
        parent: PathBuf,
        actual: u32,
        recorded: u32,
    },
    /// `set-parent --ignore-id-mismatch`: the new parent is not the disk the child was
    /// made from, recorded anyway.
    #[error("{}: {} is not the disk it was made from (it records parent {id_name} {}, the new parent's is {id}); recording it as the parent anyway (--ignore-id-mismatch): the merged view is whatever the bytes of the two files say", child.display(), parent.display(), either(expected))]
    IdMismatchIgnored {
        child: PathBuf,
        parent: PathBuf,
        id_name: &'static str,
        expected: Vec<Uuid>,
        id: Uuid,
    },
    /// `set-parent`: the VHD's dynamic disk header is torn (an earlier set-parent lost
    /// power); the whole header is written again.
    #[error("{}: the dynamic disk header's checksum does not match (power loss during an earlier set-parent leaves that; see docs/design.md): set-parent writes the whole header again", path.display())]
    VhdHeaderRewritten { path: PathBuf },
    /// `merge --force`: another disk depends on the ancestor or a merged layer.
    #[error("{}: depends on {} and breaks with this merge (--force)", path.display(), parent.display())]
    MergeBreaksDependent { path: PathBuf, parent: PathBuf },
    /// `resize --force`: a shrink cuts a guest partition.
    #[error("{}: guest partition {number} ends at byte {end}, past the new end {new} (--force)", path.display())]
    ShrinkCutsPartition {
        path: PathBuf,
        number: u32,
        end: u64,
        new: u64,
    },
}

/// Warnings as text, for the JSON of `info` and `check`.
pub fn warning_lines(warnings: &[Warning]) -> Vec<String> {
    warnings.iter().map(ToString::to_string).collect()
}

/// Why a parent is not (or cannot be shown to be) the file its child was made from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkageProblem {
    /// The parent (a raw file given with --parent) has no id; `expected` lists the ids
    /// the child records.
    #[error(
        "it is a {format} file with no id to check against the recorded parent id {}",
        either(expected)
    )]
    NoId {
        format: &'static str,
        expected: Vec<Uuid>,
    },
    /// The parent's id (`id_name`: DataWriteGuid, unique id) is not the recorded one.
    #[error(
        "the child records parent id {}, the parent's {id_name} is {id}; the parent \
         was changed after the child was made, so the merged view would be garbage",
        either(expected)
    )]
    Changed {
        expected: Vec<Uuid>,
        id_name: &'static str,
        id: Uuid,
    },
}

/// A request vdiskfs refuses: a chain rule broken or options that do not fit the files.
/// `Display` is the whole line (each variant names its files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Request {
    /// `layer` (the `depth`-th layer of the chain opened from `top`) still names a parent.
    #[error("{}: the chain is deeper than {max} layers ({} is layer {depth} and still names a parent); vdiskfs refuses deeper chains", top.display(), layer.display())]
    ChainTooDeep {
        top: PathBuf,
        max: usize,
        layer: PathBuf,
        depth: usize,
    },
    /// `child`'s parent `parent` is the same file as `same`, layer `level` of the chain.
    #[error("{}: parent cycle: its parent {} is the same file as {} (layer {level} of the chain), so the chain never reaches a base", child.display(), parent.display(), same.display())]
    ParentCycle {
        child: PathBuf,
        parent: PathBuf,
        same: PathBuf,
        level: usize,
    },
    /// The `number`-th --parent (`parent`) has no layer to replace: `base` has no parent.
    #[error("--parent number {number} ({}) has no layer to replace: {} is not a differencing disk (it has no parent); give one --parent per parent, the top image's first", parent.display(), base.display())]
    ExtraParent {
        number: usize,
        parent: PathBuf,
        base: PathBuf,
    },
    #[error("{} is {child_format} but its parent {} is {parent_format}: a chain must be all VHDX or all VHD (a raw base is allowed under either)", child.display(), parent.display())]
    FormatMix {
        child: PathBuf,
        child_format: &'static str,
        parent: PathBuf,
        parent_format: &'static str,
    },
    #[error("{} has {child_size}-byte logical sectors but its parent {} has {parent_size}-byte sectors: the layers of a chain must agree", child.display(), parent.display())]
    SectorSize {
        child: PathBuf,
        child_size: u32,
        parent: PathBuf,
        parent_size: u32,
    },
    /// `set-parent` on a disk that has no parent.
    #[error("{}: not a differencing disk (it has no parent to set)", child.display())]
    NotDifferencing { child: PathBuf },
    /// `set-parent`: the new parent is not the disk the child was made from.
    #[error("{}: {} is not the disk it was made from (it records parent {id_name} {}, the new parent's is {id}); use --ignore-id-mismatch to make it the parent anyway", child.display(), parent.display(), either(expected))]
    ParentIdMismatch {
        child: PathBuf,
        parent: PathBuf,
        id_name: &'static str,
        expected: Vec<Uuid>,
        id: Uuid,
    },
    /// `set-parent`: the new parent is larger than the child.
    #[error("{}: the new parent {} is larger than the disk ({parent_size} bytes, the disk {child_size}): the disk would hide the parent's end", child.display(), parent.display())]
    ParentLarger {
        child: PathBuf,
        child_size: u64,
        parent: PathBuf,
        parent_size: u64,
    },
    /// `set-parent`: the new parent is the child, or its chain contains the child.
    #[error("{}: the new parent {} is the disk itself or has it in its chain (as {}): the chain would never reach a base", child.display(), parent.display(), same.display())]
    ParentIsChild {
        child: PathBuf,
        parent: PathBuf,
        same: PathBuf,
    },
    /// `layer` carries the record of a `vdiskfs merge` into `ancestor` that did not finish.
    #[error("{}: a merge into {} was interrupted; run `{command}` to finish it", layer.display(), ancestor.display())]
    MergeInterrupted {
        layer: PathBuf,
        ancestor: PathBuf,
        command: String,
    },

    // Opening: files held by others, formats that cannot be written.
    /// A writable open of a file another process holds (`holders` describes them).
    #[error("{}: in use by {holders} (it is mounted, or is the parent of a mounted disk); refusing to open it for writing", path.display())]
    InUse { path: PathBuf, holders: String },
    /// An open refused because another process (`who`) writes the file; `why` says what
    /// the open was for ("to copy a chain that includes it").
    #[error("{}: open for writing by {who}; refusing {why}", path.display())]
    OpenForWriting {
        path: PathBuf,
        who: String,
        why: &'static str,
    },
    #[error("{}: a raw file can only be a read-only base, not the top of a writable chain", path.display())]
    RawWritable { path: PathBuf },
    /// A change asked of an image opened read-only.
    #[error("{}: opened read-only", path.display())]
    ReadOnlyOpen { path: PathBuf },
    /// A write or discard (`op`) the disk cannot take: not sector-aligned, or past the
    /// virtual size `size`.
    #[error("{}: {op} of {len} bytes at {offset} is not sector-aligned or lies past the virtual size {size}", path.display())]
    OutOfRange {
        path: PathBuf,
        op: &'static str,
        len: u64,
        offset: u64,
        size: u64,
    },
    /// A map asked of a VHD past its virtual size.
    #[error("{}: map of {len} bytes at {offset} is past the virtual size {size}", path.display())]
    MapPastEnd {
        path: PathBuf,
        len: u64,
        offset: u64,
        size: u64,
    },
    /// A command for VHDX and VHD images given another file.
    #[error("{}: not a VHDX or VHD image", path.display())]
    NotVhdxOrVhd { path: PathBuf },

    // Creating files.
    #[error("{}: already exists (vdiskfs never overwrites a file)", path.display())]
    AlreadyExists { path: PathBuf },
    /// A path without a final file name ("/", "..").
    #[error("{}: not a file name", path.display())]
    NotAFileName { path: PathBuf },
    #[error("{}: block size {block_size} is invalid for VHDX (a power of two from 1 MiB to 256 MiB)", path.display())]
    NewVhdxBlockSize { path: PathBuf, block_size: u32 },
    #[error("{}: sector size {size} is invalid (512 or 4096)", path.display())]
    NewVhdxSectorSize { path: PathBuf, size: u32 },
    #[error("{}: size {size} is invalid for VHDX (a non-zero multiple of the {sector_size}-byte sector size, at most 64 TiB)", path.display())]
    NewVhdxSize {
        path: PathBuf,
        size: u64,
        sector_size: u64,
    },
    /// A VHDX parent locator that does not fit its metadata region.
    #[error("parent locator too large")]
    LocatorTooLarge,
    #[error("{}: fixed VHD size {size} must be a non-zero multiple of 512 bytes, at most {max} (32 TiB)", path.display())]
    FixedVhdSize { path: PathBuf, size: u64, max: u64 },
    #[error("{}: VHD block size {block_size} must be a power of two between {min} and {max}", path.display())]
    NewVhdBlockSize {
        path: PathBuf,
        block_size: u32,
        min: u32,
        max: u32,
    },
    #[error("{}: {size} bytes in {block_size}-byte blocks needs more than {max} BAT entries; use a larger block size", path.display())]
    NewVhdBatEntries {
        path: PathBuf,
        size: u64,
        block_size: u32,
        max: u32,
    },
    #[error("{}: VHD size {size} must be a non-zero multiple of 512 bytes, at most {max} (2040 GiB)", path.display())]
    NewVhdSize { path: PathBuf, size: u64, max: u64 },
    /// A new VHD block would start past the sector numbers a BAT entry holds.
    #[error("{}: the VHD grew past what a BAT entry can address", path.display())]
    VhdBatAddress { path: PathBuf },
    /// `create --parent`: no such parent file (`tried` lists the paths looked at).
    #[error("parent {} does not exist or is not a file (tried {})", parent.display(), tried.join(", "))]
    CreateParentMissing { parent: PathBuf, tried: Vec<String> },
    /// `create --parent`: `want` says which parent format the child needs ("a VHD child
    /// needs a VHD parent"); the parent is `got`.
    #[error("{}: {want}, but {} is {got}", image.display(), parent.display())]
    CreateParentFormat {
        image: PathBuf,
        want: &'static str,
        parent: PathBuf,
        got: &'static str,
    },

    // set-parent.
    /// `set-parent` on a file of format `format` (raw, or neither VHDX nor VHD).
    #[error("{}: {format} file, not a VHDX or VHD differencing disk", child.display())]
    SetParentFormat {
        child: PathBuf,
        format: &'static str,
    },
    #[error("{}: not a differencing disk (its metadata has no parent locator)", path.display())]
    NoParentLocator { path: PathBuf },
    #[error("{}: the new parent locator ({len} bytes) does not fit into the free space of the {region_len}-byte metadata region; vdiskfs does not grow the region (use shorter paths)", path.display())]
    LocatorNoRoom {
        path: PathBuf,
        len: u64,
        region_len: u64,
    },
    #[error("{}: the new parent locator ({len} bytes) is too large for one log entry", path.display())]
    LocatorTooLargeForLog { path: PathBuf, len: u64 },
    #[error("{}: not a differencing disk (it has no parent)", path.display())]
    NoParent { path: PathBuf },

    // Resizing.
    #[error("{}: size {spec} is too large", path.display())]
    SizeTooLarge { path: PathBuf, spec: String },
    #[error("{}: the new size must be at least one sector", path.display())]
    SizeZero { path: PathBuf },
    #[error("{}: a VHD cannot be shrunk (only grown; Hyper-V shrinks only VHDX: convert it to VHDX first)", path.display())]
    VhdShrink { path: PathBuf },
    /// Shrinking below `minimum` bytes; `blocker` says what is in the way.
    #[error("{}: cannot shrink to {}: {blocker}; the smallest size allowed is {}", path.display(), HumanSize(*new), HumanSize(*minimum))]
    ShrinkBelowMinimum {
        path: PathBuf,
        new: u64,
        blocker: ShrinkBlocker,
        minimum: u64,
    },
    #[error("{}: cannot shrink to {}: a guest partition reaches past where the backup GPT would go, so the GPT cannot be kept valid (shrink the partition first)", path.display(), HumanSize(*new))]
    ShrinkGpt { path: PathBuf, new: u64 },
    /// `problem` is the GPT library's message.
    #[error("{}: rewriting the guest's GPT: {problem}", path.display())]
    GptRewrite { path: PathBuf, problem: String },
    #[error("{}: cannot grow to {}: its parent {} holds data past the current end (up to byte {end}), which the new space would show instead of zeros", path.display(), HumanSize(*new), parent.display())]
    GrowOverParentData {
        path: PathBuf,
        new: u64,
        parent: PathBuf,
        end: u64,
    },
    #[error("{}: a VHDX's size must be a multiple of its {sector_size}-byte sectors, from {sector_size} bytes to 64 TiB (asked: {asked})", path.display())]
    VhdxResizeSize {
        path: PathBuf,
        sector_size: u64,
        asked: u64,
    },
    #[error("{}: the VirtualDiskSize item crosses a 4 KiB page (at {at}); not resizing", path.display())]
    SizeItemCrossesPage { path: PathBuf, at: u64 },
    #[error("{}: a BAT of {len} bytes does not fit a region table entry", path.display())]
    BatTooLarge { path: PathBuf, len: u64 },
    #[error("{}: a VHD grows to a multiple of 512 bytes up to 2040 GiB (asked: {asked})", path.display())]
    VhdResizeSize { path: PathBuf, asked: u64 },
    #[error("{}: the footer is not in the last 512 bytes (an old 511-byte footer?); not resizing", path.display())]
    FooterNotLast { path: PathBuf },
    #[error("{}: {needed} blocks of {block_size} bytes are more than vdiskfs handles ({max})", path.display())]
    VhdResizeBlocks {
        path: PathBuf,
        needed: u64,
        block_size: u64,
        max: u32,
    },
    #[error("{}: a VHD file cannot grow past 2 TiB", path.display())]
    VhdFileTooLarge { path: PathBuf },

    // Compacting.
    /// `why` says what stands in the way.
    #[error("{}: cannot compact: {why}", path.display())]
    NotCompactable { path: PathBuf, why: &'static str },

    // Converting.
    #[error("{}: not a VHDX or VHD image; if it is a raw disk image, say so with -f raw", input.display())]
    SourceNotImage { input: PathBuf },
    /// The output is the top image (`top`) or another layer of the source chain.
    #[error("{}: the output is {} of the source chain; write to a new file", output.display(), if *top { "the top image" } else { "a layer" })]
    OutputInChain { output: PathBuf, top: bool },
    #[error("{}: already exists (use --force to replace it)", output.display())]
    OutputExists { output: PathBuf },
    /// `cause` is the rendered I/O error (without the path).
    #[error("{}: the output's file system is full ({cause}); nothing was written at that path (the source holds {total} bytes of data to copy, plus the format's metadata)", output.display())]
    OutputFull {
        output: PathBuf,
        cause: String,
        total: u64,
    },
    #[error("{}: {size} bytes is more than Azure accepts for an uploaded VHD ({max} bytes, 32 TiB)", input.display())]
    AzureTooLarge { input: PathBuf, size: u64, max: u64 },
    #[error("{}: interrupted; nothing was written at that path", path.display())]
    ConvertInterrupted { path: PathBuf },
    #[error("{}: output size {size} is smaller than the source's {source_size}", path.display())]
    OutputSmaller {
        path: PathBuf,
        size: u64,
        source_size: u64,
    },

    // Merging.
    #[error("{}: --into names the child itself; give one of its ancestors", into.display())]
    MergeIntoChild { into: PathBuf },
    /// `chain` lists the child's layers, top to base.
    #[error("{}: not in the chain of {} (its chain, top to base: {})", into.display(), child.display(), chain.join(" -> "))]
    MergeIntoNotInChain {
        into: PathBuf,
        child: PathBuf,
        chain: Vec<String>,
    },
    #[error("{}: not a differencing disk: there is no parent to merge it into", child.display())]
    MergeNoParent { child: PathBuf },
    #[error("{}: a raw file cannot be merged into (merge into a VHDX or VHD)", ancestor.display())]
    MergeIntoRaw { ancestor: PathBuf },
    #[error("{}: virtual size {size} differs from the ancestor {}'s {ancestor_size}: resize first", layer.display(), ancestor.display())]
    MergeSizeDiffers {
        layer: PathBuf,
        size: u64,
        ancestor: PathBuf,
        ancestor_size: u64,
    },
    #[error("{}: read-only file (mode {mode:o}); merging writes the ancestor and deletes the merged layers (chmod u+w to allow it)", path.display())]
    MergeReadOnlyFile { path: PathBuf, mode: u32 },
    /// `dependents` lists the disks, each as "CHILD (child of PARENT)".
    #[error("{}: other disks depend on the layers being merged and would break: {}; refusing (--force merges anyway)", ancestor.display(), dependents.join(", "))]
    MergeDependents {
        ancestor: PathBuf,
        dependents: Vec<String>,
    },
    #[error("{}: not enough space: merging {total} bytes may grow it by up to {need_mib} MiB, its file system has {free_mib} MiB free; nothing was changed (--no-space-check merges anyway)", ancestor.display())]
    MergeNoSpace {
        ancestor: PathBuf,
        total: u64,
        need_mib: u64,
        free_mib: u64,
    },
    #[error("{}: the chain changed while it was being opened; try again", child.display())]
    ChainChanged { child: PathBuf },
    /// The copy or the close failed (`cause`, the rendered error); the record stays.
    #[error("{}: {cause}; the merge is not finished ({} refuses to open until it is): run `{command}` again", ancestor.display(), child.display())]
    MergeUnfinished {
        ancestor: PathBuf,
        cause: String,
        child: PathBuf,
        command: String,
    },
    #[error("{}: replaced by another file while it was being merged; not deleted", path.display())]
    MergeReplaced { path: PathBuf },
    #[error("{}: listed in the merge record of {} but without the same record beside it (owned by its owner); not deleted", path.display(), owner.display())]
    MergeRecordNotBeside { path: PathBuf, owner: PathBuf },
    #[error("{}: listed in a merge record but not a VHDX or VHD; not deleted", path.display())]
    MergeRecordNotImage { path: PathBuf },
    /// A merge record file that does not parse; `what` says which part is missing.
    #[error("{}: not a vdiskfs merge record ({what}); if no merge is under way, delete it", path.display())]
    BadMergeRecord { path: PathBuf, what: &'static str },

    // Test support.
    /// A pending log asked for on a file that has one.
    #[error("{}: already has a pending log", path.display())]
    PendingLog { path: PathBuf },
}

/// What keeps `resize` from shrinking to the size asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShrinkBlocker {
    /// A layer (`file`) holds data up to byte `end`.
    #[error("{} holds data up to byte {end}", file.display())]
    Data { file: PathBuf, end: u64 },
    /// Guest partition `number` ends at byte `end`; `backup_len` bytes of backup GPT
    /// follow it.
    #[error("guest partition {number} ends at byte {end}{} (--force skips this check)", if *backup_len > 0 { format!(", and the backup GPT after it takes {backup_len} bytes") } else { String::new() })]
    Partition {
        number: u32,
        end: u64,
        backup_len: u64,
    },
    #[error("the partition table would not fit")]
    PartitionTable,
}

/// A byte count for people: "512 bytes", "1.5 GiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl std::fmt::Display for HumanSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        let n = self.0;
        if n < 1024 {
            return write!(f, "{n} bytes");
        }
        let mut v = n as f64 / 1024.0;
        let mut u = 0;
        while v >= 1024.0 && u + 1 < UNITS.len() {
            v /= 1024.0;
            u += 1;
        }
        write!(f, "{n} bytes ({v:.1} {})", UNITS[u])
    }
}

/// A mount vdiskfs refuses before mounting: an option, or the mount point, does not fit.
/// `Display` is the whole line (each variant names the option or the directory).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountRefusal {
    /// A FUSE option vdiskfs sets itself (`fd=`, `rootmode=`, `user_id=`, `group_id=`).
    #[error("-o {option}: set by vdiskfs itself, cannot be given")]
    Reserved { option: String },
    #[error("-o {option:?}: mount options cannot contain white space")]
    WhiteSpace { option: String },
    /// Neither a mount(8), a FUSE nor a vdiskfs option (a typo in an fstab line, say).
    #[error(
        "-o {option}: unknown mount option (vdiskfs's own are parent=, search_dir=, \
         ignore_linkage, allow_device_parent, name=, cache_size=, cache_block=, threads=, \
         log_file=)"
    )]
    Unknown { option: String },
    #[error("-o auto_unmount needs -o allow_other or -o allow_root")]
    AutoUnmountAlone,
    /// One of vdiskfs's own `-o` options given without its value.
    #[error("-o {key}: needs a value ({key}=...)")]
    NeedsValue { key: String },
    #[error("-o {key}={value}: not a number")]
    NotANumber { key: String, value: String },
    #[error("-o {key}={value}: takes no value")]
    TakesNoValue { key: String, value: String },
    #[error("-o {key}: too large")]
    TooLarge { key: String },
    #[error("-o {option:?}: options must be UTF-8 text")]
    NotUtf8 { option: std::ffi::OsString },
    #[error("-N {namespace}: mounting in another mount namespace is not supported")]
    Namespace { namespace: String },
    /// The mount helper's command line (`IMAGE MOUNTPOINT [-sfnv] [-o OPTS]...`) is wrong;
    /// `usage` is the synopsis.
    #[error("{problem}; {usage}")]
    Usage {
        problem: String,
        usage: &'static str,
    },
    #[error("mount point {} does not exist (create it with `mkdir -p {}`)", path.display(), path.display())]
    MountPointMissing { path: PathBuf },
    #[error("mount point {} is not a directory", path.display())]
    MountPointNotDirectory { path: PathBuf },
    #[error("mount point {} is already a mount point; unmount it first or choose another directory", path.display())]
    AlreadyMountPoint { path: PathBuf },
    #[error("mount point {} is not empty (use an empty directory, or -o nonempty)", path.display())]
    MountPointNotEmpty { path: PathBuf },
    /// `--name` is empty, `.`, `..`, `.stats` or holds `/` or NUL.
    #[error("--name {name:?}: must be a plain file name other than {stats}")]
    Name { name: String, stats: &'static str },
    /// `--cache-block` is not a size (`problem` says why).
    #[error("--cache-block: {problem}")]
    CacheBlockSize { problem: SizeProblem },
    #[error("--cache-block {value}: must be a power of two between 4K and 64M")]
    CacheBlock { value: String },
    #[error("--cache-size {mib}: too large")]
    CacheSizeOverflow { mib: u64 },
    #[error("--cache-size {mib}: more than this machine's memory ({memory_mib} MiB)")]
    CacheSizeOverMemory { mib: u64, memory_mib: u64 },
    #[error("--threads {threads}: must be between 1 and 256")]
    Threads { threads: usize },
    /// Unmounting: something still has a file of the mount open (after a grace period
    /// for releases the kernel is still delivering).
    #[error(
        "{} is busy: the disk image is still open (unmount the guest file system and detach \
         its loop device first: `losetup -j {}/<name>` shows it)",
        path.display(),
        path.display()
    )]
    Busy { path: PathBuf },
    #[error("-o transport={value}: must be auto, uring or classic")]
    Transport { value: String },
    /// A file the mount would show (`name`, as shown) is not a plain file name.
    #[error("{name:?}: not a plain file name for the mount")]
    NodeName { name: String },
    #[error("{name:?}: the mount already has a file of that name")]
    NodeTwice { name: String },
    #[error("{name:?}: bytes {start}+{len} reach past the end of the disk ({disk_len} bytes)")]
    NodePastEnd {
        name: String,
        start: u64,
        len: u64,
        disk_len: u64,
    },
    #[error("{name:?}: the mount already has {max} nodes")]
    TooManyNodes { name: String, max: usize },
}

/// Why a size given on the command line ("64G", "+1M") is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeProblem {
    #[error("bad size {text:?}: unknown suffix {suffix:?}")]
    UnknownSuffix { text: String, suffix: char },
    #[error("bad size {text:?}: not a number")]
    NotANumber { text: String },
    #[error("bad size {text:?}: too large")]
    TooLarge { text: String },
}

/// One reason Azure would not take a file as an uploaded VHD (`check --azure`,
/// `vdiskfs::azure_problems`). `Display` is the text after "not Azure-ready: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AzureProblem {
    #[error("is not a VHD (no \"conectix\" footer)")]
    NotVhd,
    #[error("is a VHDX; Azure takes only fixed VHD files (convert it: vdiskfs convert --azure)")]
    IsVhdx,
    #[error("is {len} bytes, too short for a VHD")]
    TooShort { len: u64 },
    #[error("the last 512 bytes are not a valid VHD footer ({detail}); a fixed VHD ends with one")]
    BadFooter { detail: String },
    #[error(
        "is a {disk_type} VHD; Azure takes only fixed VHDs (vdiskfs convert --azure makes one)"
    )]
    NotFixed { disk_type: &'static str },
    #[error("the footer checksum is wrong")]
    FooterChecksum,
    #[error("the virtual size {size} is not a whole number of MiB (the next is {next})")]
    NotWholeMib { size: u64, next: u64 },
    #[error(
        "the virtual size {size} is outside Azure's limits ({} to {} bytes: 20 MiB to 32 TiB)",
        crate::convert::AZURE_MIN_SIZE,
        crate::convert::AZURE_MAX_SIZE
    )]
    SizeOutOfRange { size: u64 },
    #[error("the original size {original} differs from the current size {size}")]
    OriginalSize { original: u64, size: u64 },
    #[error("the file is {len} bytes; a fixed VHD of virtual size {size} must be {want} (data + 512-byte footer)")]
    FileLength { len: u64, size: u64, want: u64 },
    #[error("the disk geometry C/H/S {}/{}/{} is not the VHD specification's for this size ({}/{}/{})", have.0, have.1, have.2, want.0, want.1, want.2)]
    Geometry {
        have: (u16, u8, u8),
        want: (u16, u8, u8),
    },
    #[error("the footer's data offset is {offset:#x}; a fixed disk has 0xFFFFFFFFFFFFFFFF")]
    DataOffset { offset: u64 },
}

/// Command-line options that do not fit together or a value that is not one, found
/// before any file is looked at beyond its name. `Display` is the whole line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Usage {
    /// A size option (`--size`, `--block-size`) that is not a size.
    #[error("{0}")]
    Size(SizeProblem),
    /// The size argument of `resize IMAGE SIZE`.
    #[error("{}: {problem}", path.display())]
    NewSize { path: PathBuf, problem: SizeProblem },
    #[error("block size {block_size} is too large")]
    BlockSizeTooLarge { block_size: u64 },
    #[error("{}: cannot tell the format from the extension (use .vhdx/.avhdx or .vhd/.avhd, or --format)", image.display())]
    CreateFormat { image: PathBuf },
    #[error("{}: create makes VHDX or VHD files, not raw ones", image.display())]
    CreateRaw { image: PathBuf },
    #[error("{}: VHD disks always have 512-byte sectors", image.display())]
    VhdSectorSize { image: PathBuf },
    #[error("{}: --azure makes a fixed VHD; it cannot be combined with another --format", output.display())]
    AzureFormat { output: PathBuf },
    #[error("{}: cannot tell the output format from the extension (use .vhdx, .vhd or .raw/.img, or --format)", output.display())]
    OutputFormat { output: PathBuf },
    #[error("{}: a raw source has no parents; --parent does not apply", input.display())]
    RawSourceParent { input: PathBuf },
    #[error("{}: --logical-sector-size {size} applies only to VHDX output (VHD and raw have 512-byte sectors)", output.display())]
    SectorSizeNotVhdx { output: PathBuf, size: u32 },
    /// The transport environment variable `var` holds `value`.
    #[error("{var}={value}: must be auto, uring or classic")]
    TransportEnv { var: &'static str, value: String },
}

/// A mount or unmount that failed in the kernel, in fusermount3 or in the FUSE session.
/// `Display` is the whole line; the foreign messages (`msg`, `error`) are kept as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountFailure {
    /// The mount helper (fusermount3) failed; `msg` is what it said.
    #[error("mount {}: {msg}", mountpoint.display())]
    Mount { mountpoint: PathBuf, msg: String },
    #[error("{}: a FUSE mount whose daemon is gone is still here; clear it with `fusermount3 -u {}`", path.display(), path.display())]
    Stale { path: PathBuf },
    #[error("/dev/fuse does not exist: FUSE is not available (load it with `modprobe fuse`; install the fuse3 package for fusermount3)")]
    NoDevFuse,
    /// `fusermount3 -u` (lazy: `-u -z`) failed; `msg` is what it said.
    #[error("fusermount3 -u{}: {msg}", if *lazy { " -z" } else { "" })]
    Unmount { lazy: bool, msg: String },
    #[error("{} is not mounted", path.display())]
    NotMounted { path: PathBuf },
    #[error("{} is a {fstype} mount, not a vdiskfs mount", path.display())]
    NotVdiskfs { path: PathBuf, fstype: String },
    /// `--transport uring` asked for but not available (`why`).
    #[error("mount {}: --transport uring: {why}", mountpoint.display())]
    Uring { mountpoint: PathBuf, why: String },
    #[error("mount {}: FUSE handshake: {error}", mountpoint.display())]
    Handshake { mountpoint: PathBuf, error: String },
    #[error("FUSE session on {} ended with an error: {error}", mountpoint.display())]
    SessionEnded { mountpoint: PathBuf, error: String },
}

/// A broken internal invariant of vdiskfs (a bug, not a problem of the file or the
/// request). `Display` is the whole line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Internal {
    /// A layer's map described `described` bytes instead of `len`.
    #[error("{}: internal: map of {len} bytes at {offset} described {described} bytes", path.display())]
    MapLength {
        path: PathBuf,
        len: u64,
        offset: u64,
        described: u64,
    },
    #[error("{}: internal: not opened for writing", path.display())]
    NotWritable { path: PathBuf },
    #[error("internal: bitmap of chunk {chunk} not loaded")]
    BitmapNotLoaded { chunk: u64 },
    #[error("{}: internal: a structural update of {pages} pages (at most {limit} aligned 4 KiB pages)", path.display())]
    StructuralUpdate {
        path: PathBuf,
        pages: usize,
        limit: usize,
    },
    /// A block compaction moves changed place under it (`what`: "BAT entry", "block").
    #[error("{}: internal: {what} {index} moved under compact", path.display())]
    MovedUnderCompact {
        path: PathBuf,
        what: &'static str,
        index: u64,
    },
    #[error("{}: internal: move target {to} out of range", path.display())]
    MoveTarget { path: PathBuf, to: u64 },
    #[error("{}: internal: set-parent needs a dynamic header and a writable file", path.display())]
    SetParentNotDynamic { path: PathBuf },
    #[error("{}: region table at {at} has no BAT entry", path.display())]
    NoBatRegionEntry { path: PathBuf, at: u64 },
    #[error("{}: no VirtualDiskSize metadata item", path.display())]
    NoSizeItem { path: PathBuf },
    /// A VHDX log entry asked of `LogWriter` that the log cannot take.
    #[error("{}: {problem}", path.display())]
    LogWrite {
        path: PathBuf,
        problem: LogWriteProblem,
    },
}

/// Why `LogWriter` cannot write a log entry (all are bugs of the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogWriteProblem {
    #[error("cannot write a log entry: log at offset {offset} length {length} is not a valid log region of this file")]
    Region { offset: u64, length: u64 },
    #[error("log sequence number {sequence} is unusable")]
    Sequence { sequence: u64 },
    #[error("FlushedFileOffset {flushed} and LastFileOffset {last} must be multiples of 1 MiB")]
    FileOffsets { flushed: u64, last: u64 },
    #[error("log update at file offset {offset} length {len} is not 4 KiB aligned metadata outside the header section")]
    Update { offset: u64, len: u64 },
    #[error("a log entry of {entry_len} bytes does not fit in the {length}-byte log beside the newest entry; write fewer updates per entry")]
    NoRoom { entry_len: u64, length: u64 },
}

/// Why a path was not taken as a differencing disk's parent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotParent {
    #[error("no such file")]
    Missing,
    /// The file could not be looked at; `error` is the system's message.
    #[error("{error}")]
    Stat { error: String },
    #[error("is a directory")]
    Directory,
    /// `kind` is "a block device", "a character device", "a FIFO", "a socket" or "not a
    /// regular file".
    #[error("is {kind}, not a regular file (--allow-device-parent allows it)")]
    NotRegular { kind: &'static str },
    #[error("is the child itself")]
    Child,
}

/// One place a parent was looked for in vain (`Error::ParentNotFound` lists them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tried {
    /// The path given with --parent.
    #[error("--parent {}: {why}", path.display())]
    Override { path: PathBuf, why: NotParent },
    /// Where a recorded parent path (`recorded`, as shown, from `locator`) leads;
    /// `matched` is the file a case-insensitive match found instead of `path`.
    #[error("{locator} \"{recorded}\" -> {}{}: {why}", path.display(), matched.as_ref().map(|m| format!(" (matched {})", m.display())).unwrap_or_default())]
    Path {
        locator: String,
        recorded: String,
        path: PathBuf,
        matched: Option<PathBuf>,
        why: NotParent,
    },
    #[error("nothing: the child records no parent path (use --parent)")]
    NoPath,
}

/// Ids for a message: "A", "A or B".
fn either(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Why one copy of the VHDX region table (`copy` 1 at 192 KiB, 2 at 256 KiB) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionTableCopy {
    /// The copy could not be read (`error`: the I/O error, without the path).
    #[error("region table {copy}: {error}")]
    Read { copy: u64, error: String },
    #[error("region table {copy} (at {} KiB): {problem}", offset >> 10)]
    Invalid {
        copy: u64,
        offset: u64,
        problem: RegionTableProblem,
    },
}

/// What is wrong inside a VHDX region table copy (MS-VHDX 2.2.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionTableProblem {
    #[error("bad signature (expected \"regi\")")]
    Signature,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("{count} entries (at most {max} allowed)")]
    Entries { count: u32, max: u32 },
}

/// One thing `vdiskfs check` reports about a layer (`Layer::check`). `Display` is the
/// text after "PATH: DAMAGE: " (and a string of the JSON's `problems`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Finding {
    /// A damaged structure.
    #[error(transparent)]
    Defect(Defect),
    /// What a read-only open tolerated but is damage nonetheless: an invalid header
    /// copy, a checksum mismatch, a missing end footer, a log that would grow the file
    /// too far. `check` does not list it again among the warnings.
    #[error(transparent)]
    Warning(Warning),
    /// A structure using a feature vdiskfs does not implement.
    #[error("unsupported: {0}")]
    Unsupported(Feature),
    /// The check could not go on: an error that is not a finding about the file (an I/O
    /// error, say); `detail` is its message without the path, as given.
    #[error("{detail}")]
    Failed { detail: String },
}

impl From<crate::error::Error> for Finding {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error;
        match e {
            Error::Corrupt { defect, .. } => Finding::Defect(defect),
            Error::Unsupported { feature, .. } => Finding::Unsupported(feature),
            e => Finding::Failed { detail: e.detail() },
        }
    }
}

impl From<VhdxDefect> for Finding {
    fn from(d: VhdxDefect) -> Self {
        Finding::Defect(d.into())
    }
}

impl From<VhdDefect> for Finding {
    fn from(d: VhdDefect) -> Self {
        Finding::Defect(d.into())
    }
}
