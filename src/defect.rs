//! What is wrong with a file, typed: defects (`Error::Corrupt`), features vdiskfs does
//! not implement (`Error::Unsupported`), requests it refuses (`Error::Request`) and
//! warnings (non-fatal findings of an open). Each variant carries the structure and the
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
    #[error("both VHDX region tables are invalid: {}", problems.join("; "))]
    BothRegionTables { problems: Vec<String> },
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
/// and logged. `Display` is the line `info` prints.
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
    #[error("it is a {format} file with no id to check against the recorded parent id {expected}")]
    NoId {
        format: &'static str,
        expected: String,
    },
    /// The parent's id (`id_name`: DataWriteGuid, unique id) is not the recorded one.
    #[error(
        "the child records parent id {expected}, the parent's {id_name} is {id}; the parent \
         was changed after the child was made, so the merged view would be garbage"
    )]
    Changed {
        expected: String,
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
    #[error("{}: {} is not the disk it was made from (it records parent {id_name} {expected}, the new parent's is {id}); use --ignore-id-mismatch to make it the parent anyway", child.display(), parent.display())]
    ParentIdMismatch {
        child: PathBuf,
        parent: PathBuf,
        id_name: &'static str,
        expected: String,
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
    CacheBlockSize { problem: String },
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
}
