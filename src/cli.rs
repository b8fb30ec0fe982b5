//! Command-line definitions (clap derive), one struct per subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::chain::{ChainOptions, Intent};

#[derive(Debug, Parser)]
#[command(
    name = "vdiskfs",
    version,
    about = "Open Hyper-V VHDX and Virtual PC VHD differencing-disk chains on Linux",
    long_about = "vdiskfs reads (and writes) chains of differencing virtual disks: a child \
                  .vhdx/.avhdx/.vhd/.avhd, its parent, and so on down to a base. It shows \
                  the chain (info), streams the merged raw view (cat), makes new children and \
                  bases (create), checks files (check), and mounts the merged view as a raw \
                  image file over FUSE (mount)."
)]
pub struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the chain, top to base: format, type, sizes, IDs, how each parent was found.
    Info(InfoArgs),
    /// Stream the merged raw view of the chain to stdout or a file.
    Cat(CatArgs),
    /// Make a differencing child of a parent, or an empty dynamic base.
    Create(CreateArgs),
    /// Check an image's structures (headers, checksums, BAT bounds, overlaps, bitmaps).
    Check(CheckArgs),
    /// Write the merged view of a chain (or a raw image) as a new independent disk: a full
    /// clone as dynamic or fixed VHDX or VHD, a raw image, or an Azure-ready fixed VHD.
    Convert(ConvertArgs),
    /// Mount the merged view of a chain as a raw image file over FUSE.
    Mount(MountArgs),
    /// Unmount a vdiskfs mount point.
    Umount(UmountArgs),
    /// Write the man pages or shell completions (for packaging; see scripts/deb.sh).
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// Make a differencing disk point at its parent's new place (after files were moved or
    /// renamed): rewrite its parent locator as `create` writes it, crash-safe.
    SetParent(SetParentArgs),
    /// Grow a VHDX or VHD (fixed, dynamic or differencing), or shrink a VHDX when nothing
    /// lies past the new end.
    Resize(ResizeArgs),
    /// Fold a child (and the layers between) into an ancestor, then delete the merged
    /// files: afterwards the ancestor alone reads what the child read.
    Merge(MergeArgs),
    /// Give unused space back: release all-zero blocks of the top file of IMAGE's chain,
    /// move blocks from the end into the holes and shorten the file (offline, in place).
    Compact(CompactArgs),
}

/// Options for finding and checking parents; every command that opens an image takes them.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// Also look for parents by file name in DIR (repeatable).
    #[arg(long = "search-dir", value_name = "DIR")]
    pub search_dirs: Vec<PathBuf>,
    /// Use PATH as the parent (repeatable: the first is the top image's parent, the next
    /// that parent's parent, ...). A raw file may be given as the base.
    #[arg(long = "parent", value_name = "PATH")]
    pub parents: Vec<PathBuf>,
    /// Open even when a parent's id does not match the child's record of it.
    #[arg(long)]
    pub ignore_linkage: bool,
    /// Allow block devices, FIFOs and other non-regular files as parents.
    #[arg(long)]
    pub allow_device_parent: bool,
}

impl ChainArgs {
    pub fn options(&self, intent: Intent) -> ChainOptions {
        ChainOptions {
            search_dirs: self.search_dirs.clone(),
            parents: self.parents.clone(),
            ignore_linkage: self.ignore_linkage,
            intent,
            allow_device_parent: self.allow_device_parent,
            resume_merge: false,
        }
    }
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    pub image: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    pub image: PathBuf,
    /// Write to FILE instead of stdout (never overwrites an existing file's other data:
    /// the file is created or truncated).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub chain: ChainArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// `--quiet` / `--progress`, for every command that copies many bytes.
#[derive(Debug, Clone, Args)]
pub struct ProgressArgs {
    /// Show no progress bar (by default one is shown when stderr is a terminal).
    #[arg(short, long, conflicts_with = "progress")]
    pub quiet: bool,
    /// Show progress even when stderr is not a terminal (then one line per second).
    #[arg(long)]
    pub progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Vhdx,
    Vhd,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The file to create (never overwritten). Format follows the extension:
    /// .vhdx/.avhdx -> VHDX, .vhd/.avhd -> VHD.
    pub image: PathBuf,
    /// Make a differencing child of PARENT.
    #[arg(long, value_name = "PARENT", conflicts_with = "size")]
    pub parent: Option<PathBuf>,
    /// Make an empty dynamic base of SIZE bytes (suffixes K, M, G, T: powers of 1024).
    #[arg(long, value_name = "SIZE", required_unless_present = "parent")]
    pub size: Option<String>,
    /// Block size (suffixes K, M); default 2M.
    #[arg(long, value_name = "N")]
    pub block_size: Option<String>,
    /// Logical sector size of a new base (512 or 4096; VHD is always 512).
    #[arg(long, value_name = "N")]
    pub logical_sector_size: Option<u32>,
    /// Override the format the extension implies.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    pub image: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    /// Instead of the structure check, tell whether IMAGE is a VHD that Azure accepts for
    /// upload (fixed, whole MiB, valid footer, size within Azure's limits) and what is
    /// wrong if not.
    #[arg(long)]
    pub azure: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertFormatArg {
    Vhdx,
    Vhd,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskTypeArg {
    Dynamic,
    Fixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceFormatArg {
    /// VHDX or VHD, recognised by its signature (the default).
    Auto,
    /// A plain raw disk image (as qemu-img's `-f raw`).
    Raw,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The image to convert: the top of a VHDX/VHD chain, or a raw image with `-f raw`.
    pub source: PathBuf,
    /// The new file (never overwritten without --force). Its extension gives the format:
    /// .vhdx/.avhdx, .vhd/.avhd, or .raw/.img/.bin.
    pub output: PathBuf,
    /// What SOURCE is: auto (VHDX or VHD) or raw.
    #[arg(
        short = 'f',
        long = "source-format",
        value_enum,
        default_value = "auto"
    )]
    pub source_format: SourceFormatArg,
    /// Output format (default from OUTPUT's extension).
    #[arg(long, value_enum)]
    pub format: Option<ConvertFormatArg>,
    /// Output type: dynamic (only blocks holding data are stored) or fixed.
    #[arg(long = "type", value_enum, default_value = "dynamic")]
    pub disk_type: DiskTypeArg,
    /// Block size of a VHDX or dynamic VHD output (suffixes K, M); default 2M.
    #[arg(long, value_name = "N")]
    pub block_size: Option<String>,
    /// Logical sector size of a VHDX output (512 or 4096; default: the source's).
    #[arg(long, value_name = "N")]
    pub logical_sector_size: Option<u32>,
    /// An Azure-ready fixed VHD: implies --format vhd --type fixed; the size is rounded up
    /// to a whole MiB (at least 20 MiB; the added bytes read as zeros).
    #[arg(long)]
    pub azure: bool,
    /// Replace OUTPUT if it exists (atomically: the old file stays until the new one is
    /// complete).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// Name of the exported raw file.
    #[arg(long, default_value = "disk.raw")]
    pub name: String,
    /// Mount read-only: no file is modified, not even to replay a log.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Stay in the foreground (do not detach).
    #[arg(short, long)]
    pub foreground: bool,
    /// FUSE mount options, comma separated (e.g. allow_other).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Parent block cache size in MiB (0 turns it off).
    #[arg(long, default_value_t = 256)]
    pub cache_size: u64,
    /// Parent block cache granularity (suffixes K, M).
    #[arg(long, default_value = "64K")]
    pub cache_block: String,
    /// Worker threads serving requests.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Serve the data files without the kernel's page cache (also `-o direct_io`): every
    /// read and write goes to the daemon at the size the program asked for. Faster for
    /// large sequential reads (no second copy of the disk in memory), much slower for
    /// small ones (no read-ahead); shared mmap of the files is refused (ENODEV).
    #[arg(long)]
    pub direct_io: bool,
    /// Do not show the guest's partitions as files (p1, p2, ...) beside the raw file.
    #[arg(long)]
    pub no_partitions: bool,
    /// When detached, append the daemon's log to FILE (otherwise it is discarded).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// How requests reach the daemon: FUSE over io_uring where the kernel offers it
    /// (Linux 6.14+, /sys/module/fuse/parameters/enable_uring = Y), else /dev/fuse
    /// (auto); only io_uring, failing otherwise (uring); only /dev/fuse (classic).
    /// Default: $VDISKFS_TRANSPORT, else auto.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// `mount --transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Auto,
    Uring,
    Classic,
}

/// The environment variable that sets the default of `mount --transport`.
pub const TRANSPORT_ENV: &str = "VDISKFS_TRANSPORT";

impl Transport {
    /// `--transport` if given, else `$VDISKFS_TRANSPORT` if set, else auto.
    pub fn resolve(given: Option<Transport>) -> crate::Result<Transport> {
        if let Some(t) = given {
            return Ok(t);
        }
        match std::env::var(TRANSPORT_ENV) {
            Ok(v) if !v.is_empty() => clap::ValueEnum::from_str(&v, false).map_err(|_| {
                crate::Error::Usage(crate::error::Usage::TransportEnv {
                    var: TRANSPORT_ENV,
                    value: v.clone(),
                })
            }),
            _ => Ok(Transport::Auto),
        }
    }
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The child whose view is merged (the top of the run of layers to fold).
    pub child: PathBuf,
    /// The ancestor to merge into (default: CHILD's parent); must be in CHILD's chain.
    #[arg(long, value_name = "ANCESTOR")]
    pub into: Option<PathBuf>,
    /// Keep CHILD and the layers between instead of deleting them (they are no longer
    /// valid children afterwards).
    #[arg(long)]
    pub keep: bool,
    /// Merge even when other disks depend on ANCESTOR or a merged layer (they break).
    #[arg(long)]
    pub force: bool,
    /// Only say what would be merged into what, how many bytes, and which other disks
    /// would break.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the free-space check (for file systems whose free space does not say what
    /// can be written: thin-provisioned, compressing, deduplicating). A merge that runs
    /// out of space stops, and the same command finishes it after space is freed.
    #[arg(long)]
    pub no_space_check: bool,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: GenerateWhat,
}

#[derive(Debug, Subcommand)]
pub enum GenerateWhat {
    /// Write vdiskfs.1 and one vdiskfs-COMMAND.1 per command into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL, or write it into DIR under the name the
    /// shell looks for (vdiskfs.bash, _vdiskfs, vdiskfs.fish).
    Completions {
        shell: clap_complete::Shell,
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct SetParentArgs {
    /// The differencing disk whose parent locator is rewritten.
    pub child: PathBuf,
    /// The parent's new place: it must be the disk CHILD was made from (VHDX: its
    /// DataWriteGuid is CHILD's parent_linkage; VHD: its unique id is CHILD's parent unique
    /// id), of the same format and sector size, and no larger than CHILD.
    pub new_parent: PathBuf,
    /// Accept a NEW_PARENT that is not the disk CHILD was made from, and record its
    /// identity (Hyper-V's -IgnoreIdMismatch): the merged view is then whatever the bytes
    /// of the two files say.
    #[arg(long)]
    pub ignore_id_mismatch: bool,
    /// Print the old and the new locator entries and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Chain options for NEW_PARENT's own chain (its parents).
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// Parse "64K", "2M", "1G", "1T" or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, crate::error::SizeProblem> {
    use crate::error::SizeProblem;
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(SizeProblem::UnknownSuffix {
                        text: s.to_string(),
                        suffix: c,
                    })
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| SizeProblem::NotANumber {
        text: s.to_string(),
    })?;
    n.checked_mul(mult).ok_or_else(|| SizeProblem::TooLarge {
        text: s.to_string(),
    })
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The image to resize (the top of its chain; locked like a writable mount).
    pub image: PathBuf,
    /// The new virtual size (suffixes K, M, G, T: powers of 1024), or +N to grow by N.
    /// Rounded up to a whole sector (VHDX: its logical sector size; VHD: 512 bytes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
    /// Shrink even when a guest partition extends past the new end (never when data
    /// does).
    #[arg(long)]
    pub force: bool,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The image whose top file is compacted (a base or a child; parents are only read).
    pub image: PathBuf,
    /// Only report what would be freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}
