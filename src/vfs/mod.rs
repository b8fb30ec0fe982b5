//! The file system a mount exports, independent of how requests reach it.
//!
//! `Vfs` answers file-system requests (lookup, getattr, open, read, write, flush, fsync,
//! readdir, statfs...) with plain arguments — inode numbers, offsets, open flags,
//! buffers — and returns `Result<T, Errno>` with a positive errno. It knows nothing of
//! fuser or of the kernel protocol: `fuse.rs` is a thin adapter from fuser's callbacks
//! to these functions, and another transport (FUSE over io_uring) can call the same
//! ones, so both answer every request alike. The unit tests (`tests.rs`) call it
//! directly on small images, without /dev/fuse.
//!
//! What the mount shows is a table of nodes: the root directory and, in it, one regular
//! file per exported byte range of the disk (the whole disk as `disk.raw`; byte windows
//! of it: fixed ones with `add_window`, and the guest's partitions `p1`, `p2`, ... with
//! `enable_partitions`) and the hidden read-only `.stats` file with the counters of the
//! running mount. Inode numbers are the table's indices plus one and are never reused:
//! a partition that disappears (or moves) leaves a dead node behind, and a new one gets
//! a new inode.
//!
//! Partitions follow the guest's table on a writable mount: a write that touches the
//! table's sectors (see `guest::Layout::watch`) marks the list stale, and the next
//! lookup or opendir in the root rereads the table and updates the nodes.
//!
//! Windows alias the bytes of `disk.raw` (and of each other) in different files, so the
//! kernel caches the same bytes in several page caches. On a writable mount with windows
//! the data files are therefore opened without FOPEN_KEEP_CACHE (each open drops what
//! the kernel cached of that file), and after each write the overlapping ranges of the
//! other data files are invalidated through `Notify` (for files open at the time), by
//! the transport's own thread, never inside a request.
//!
//! Every request runs on the transport's thread that received it; `Disk` is `Sync` and
//! reads are positioned, so parallel reads take only a read lock of the node table.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::disk::Disk;
use crate::error::{Error, MountRefusal};
use crate::guest;

#[cfg(test)]
mod tests;

/// A positive errno value, as a reply carries it.
pub type Errno = i32;

/// The answer to one request: a value or an errno.
pub type Reply<T> = std::result::Result<T, Errno>;

/// Inode of the mount's root directory.
pub const ROOT_INO: u64 = 1;
/// Inode of the exported raw image.
pub const DISK_INO: u64 = 2;
/// Inode of the hidden counters file.
pub const STATS_INO: u64 = 3;
/// Name of the hidden counters file.
pub const STATS_NAME: &str = ".stats";

/// Largest request we ask the kernel for (it may cap it lower: see
/// /proc/sys/fs/fuse/max_pages_limit).
pub const MAX_IO: u32 = 1 << 20;

/// How long the kernel may cache names and attributes. Only we change the files, and
/// their sizes never change, so this can be long; mtime after a write may lag by this
/// much.
pub const ATTR_TTL: Duration = Duration::from_secs(1);

/// Block size reported by getattr and statfs.
const BLOCK_SIZE: u32 = 4096;

/// Most nodes a mount ever has (partitions that come and go leave dead nodes behind).
pub const MAX_NODES: usize = 1 << 16;

/// Low bits of a file handle: what was opened, and whether for writing.
const FH_STATS: u64 = 1;
const FH_WRITE: u64 = 2;
const FH_SHIFT: u32 = 2;

/// What the mount exports, and how.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Name of the raw file in the mount's root.
    pub name: OsString,
    /// Refuse every write (the file is 0444 and writes get EROFS).
    pub read_only: bool,
    /// Owner of the files.
    pub uid: u32,
    pub gid: u32,
    /// Open the data files with FOPEN_DIRECT_IO (no page cache, no read-ahead).
    pub direct_io: bool,
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// The root directory.
    Root,
    /// The whole merged disk.
    Disk,
    /// `len` bytes of the disk from byte `start` (a partition, say).
    Window { start: u64, len: u64 },
    /// The counters text, generated at open.
    Stats,
    /// A partition that is no longer in the guest's table (its inode is not reused).
    Gone,
}

/// One entry of the node table.
#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    /// Name in the root directory (empty for the root itself).
    pub name: OsString,
    pub kind: NodeKind,
    /// Size getattr reports.
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// A guest partition (follows the table), not a fixed window.
    pub partition: bool,
}

impl Node {
    /// The byte range of the disk this node shows, if it shows disk data.
    fn data_range(&self) -> Option<(u64, u64)> {
        match self.kind {
            NodeKind::Disk => Some((0, self.size)),
            NodeKind::Window { start, len } => Some((start, len)),
            NodeKind::Root | NodeKind::Stats | NodeKind::Gone => None,
        }
    }

    fn file_kind(&self) -> FileKind {
        match self.kind {
            NodeKind::Root => FileKind::Directory,
            _ => FileKind::RegularFile,
        }
    }
}

/// File type, as attributes and directory entries report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
}

/// A node's attributes (what stat shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// The answer to an open: the handle and how the kernel should cache the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// Keep cached pages across opens (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
    /// Bypass the page cache; the size in getattr does not limit reads (FOPEN_DIRECT_IO).
    pub direct_io: bool,
}

/// One directory entry as readdir hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    /// Offset of the next entry (what a later readdir passes to continue after this one).
    pub next_offset: u64,
    pub kind: FileKind,
    pub name: &'a OsStr,
}

/// Cache invalidations the file system asks the kernel for. The transport sends them
/// from a thread of its own, after the request that caused them has been answered: the
/// kernel may hold locks (a page being written, the directory being looked up) that
/// only that answer releases.
pub trait Notify: Send + Sync {
    /// Drop the kernel's cached pages of `ino` in `[offset, offset + len)`.
    fn inval_data(&self, ino: u64, offset: u64, len: u64);
    /// Make the kernel forget the entry `name` in directory `parent`.
    fn inval_entry(&self, parent: u64, name: &OsStr);
}

/// Where the transport plugs in its `Notify` once it can (after the session exists).
pub type NotifySlot = Arc<OnceLock<Box<dyn Notify>>>;

/// The guest's partition table as the mount follows it.
struct PartitionWatch {
    /// A write touched the table's sectors since the last scan.
    stale: AtomicBool,
    /// The byte ranges whose change can change the table (from the last scan).
    ranges: RwLock<Vec<(u64, u64)>>,
    /// One rescan at a time.
    rescan: Mutex<()>,
}

/// statfs numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The changes a setattr asks for (times are accepted and ignored, so not here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// Whether BSD file flags were given.
    pub flags: bool,
}

/// The answer to listxattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrList<'a> {
    /// The caller asked for the size (buffer size 0).
    Size(u32),
    /// The names, NUL-terminated.
    Data(&'a [u8]),
}

/// Requests every node refuses, with the errno they get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// mknod, mkdir, create, symlink, link, unlink, rmdir, rename: the tree is fixed.
    ChangeTree,
    SetXattr,
    RemoveXattr,
    /// getxattr: there are no extended attributes.
    GetXattr,
    Ioctl,
    Poll,
    /// fallocate modes other than punching a hole and zeroing a range (`Vfs::fallocate`).
    Fallocate,
    Lseek,
}

impl Refused {
    pub fn errno(self) -> Errno {
        match self {
            Refused::ChangeTree | Refused::SetXattr | Refused::RemoveXattr => libc::EPERM,
            Refused::GetXattr => libc::ENODATA,
            Refused::Ioctl => libc::ENOTTY,
            // ENOSYS: the kernel then treats the file as always ready, like a regular file.
            Refused::Poll => libc::ENOSYS,
            Refused::Fallocate => libc::EOPNOTSUPP,
            // ENOSYS: the kernel handles SEEK_SET/CUR/END itself from then on.
            Refused::Lseek => libc::ENOSYS,
        }
    }
}

/// The errno a reply carries for an error of the disk.
pub fn errno_of(e: &Error) -> Errno {
    e.errno()
}

/// Run `f`, turning a panic into EIO for this request instead of a dead mount.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> Reply<T>) -> Reply<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("{what}: internal error (panic: {msg}); answered EIO");
            Err(libc::EIO)
        }
    }
}

/// Fault injection for the daemon's tests: in debug builds only (what `cargo test`
/// runs), `VDISKFS_FAULT_PANIC_AT_OFFSET=N` makes every read request covering byte N of
/// the disk panic inside the request, to prove a panic costs that one request an EIO and
/// leaves the mount serving (integration/hostile.rs). Release builds compile it to
/// nothing.
#[derive(Debug, Default)]
struct FaultInjection {
    #[cfg(debug_assertions)]
    panic_at: Option<u64>,
}

impl FaultInjection {
    fn from_env() -> Self {
        FaultInjection {
            #[cfg(debug_assertions)]
            panic_at: std::env::var("VDISKFS_FAULT_PANIC_AT_OFFSET")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    #[cfg(debug_assertions)]
    fn panic_if_asked(&self, offset: u64, size: usize) {
        if let Some(at) = self.panic_at {
            if offset <= at && at - offset < size as u64 {
                panic!("fault injected: read of {size} bytes at {offset} covers byte {at}");
            }
        }
    }

    #[cfg(not(debug_assertions))]
    #[inline(always)]
    fn panic_if_asked(&self, _offset: u64, _size: usize) {}
}

/// The file system: the node table over one disk, open handles, and the mount's times.
pub struct Vfs {
    disk: Arc<Disk>,
    uid: u32,
    gid: u32,
    /// Whether writes reach the disk (not read-only and the top layer is writable).
    writable: bool,
    /// Indexed by inode - 1.
    nodes: RwLock<Vec<Arc<Node>>>,
    /// Set by `enable_partitions`.
    partitions: Option<PartitionWatch>,
    /// Whether data files keep the kernel's page cache across opens: not when writes
    /// through one file can change another's bytes (windows on a writable mount).
    keep_cache: bool,
    /// `FsOptions::direct_io`.
    direct_io: bool,
    notify: NotifySlot,
    mount_time: SystemTime,
    /// Last write, as nanoseconds since the epoch (0: never written while mounted).
    mtime_ns: AtomicU64,
    next_fh: AtomicU64,
    /// `.stats` contents, generated at open, by file handle.
    stats: Mutex<HashMap<u64, Arc<[u8]>>>,
    /// Which transport serves the mount ("classic", "uring"), for `.stats`.
    transport: RwLock<&'static str>,
    /// Requests answered through FUSE-over-io_uring ring entries (for `.stats`).
    ring_requests: AtomicU64,
    /// Read requests for data files and their bytes (for `.stats`: the average request
    /// size shows whether read-ahead reaches the daemon as large requests).
    read_requests: AtomicU64,
    read_bytes: AtomicU64,
    faults: FaultInjection,
}

impl Vfs {
    /// The root with the whole disk (named `opts.name`) and `.stats` in it.
    pub fn new(disk: Arc<Disk>, opts: FsOptions) -> Self {
        let writable = !opts.read_only && disk.is_writable();
        let data_perm = if writable { 0o644 } else { 0o444 };
        let nodes = vec![
            Node {
                ino: ROOT_INO,
                name: OsString::new(),
                kind: NodeKind::Root,
                size: 0,
                perm: 0o755,
                partition: false,
            },
            Node {
                ino: DISK_INO,
                name: opts.name,
                kind: NodeKind::Disk,
                size: disk.len(),
                perm: data_perm,
                partition: false,
            },
            Node {
                ino: STATS_INO,
                name: STATS_NAME.into(),
                kind: NodeKind::Stats,
                // Size 0: the text is generated at open and read with direct I/O.
                size: 0,
                perm: 0o444,
                partition: false,
            },
        ];
        Vfs {
            disk,
            uid: opts.uid,
            gid: opts.gid,
            writable,
            nodes: RwLock::new(nodes.into_iter().map(Arc::new).collect()),
            partitions: None,
            keep_cache: true,
            direct_io: opts.direct_io,
            notify: Arc::new(OnceLock::new()),
            mount_time: SystemTime::now(),
            mtime_ns: AtomicU64::new(0),
            next_fh: AtomicU64::new(1),
            stats: Mutex::new(HashMap::new()),
            transport: RwLock::new("classic"),
            ring_requests: AtomicU64::new(0),
            read_requests: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            faults: FaultInjection::from_env(),
        }
    }

    /// Add a file showing `len` bytes of the disk from `start`, named `name`, to the
    /// root; returns its inode. Only before serving (it takes `&mut self`). The mount
    /// adds partition windows through `enable_partitions`; the tests add their own.
    #[cfg(test)]
    pub fn add_window(&mut self, name: &OsStr, start: u64, len: u64) -> crate::Result<u64> {
        if self.writable {
            self.keep_cache = false;
        }
        let nodes = self.nodes.get_mut().unwrap_or_else(|p| p.into_inner());
        Self::push_window(
            nodes,
            self.disk.len(),
            self.writable,
            name,
            start,
            len,
            false,
        )
    }

    fn push_window(
        nodes: &mut Vec<Arc<Node>>,
        disk_len: u64,
        writable: bool,
        name: &OsStr,
        start: u64,
        len: u64,
        partition: bool,
    ) -> crate::Result<u64> {
        let shown = name.to_string_lossy().into_owned();
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.as_encoded_bytes().contains(&b'/')
            || name.len() > 255
        {
            return Err(Error::Mount(MountRefusal::NodeName { name: shown }));
        }
        if nodes.iter().any(|n| n.name == name) {
            return Err(Error::Mount(MountRefusal::NodeTwice { name: shown }));
        }
        if start.checked_add(len).is_none_or(|end| end > disk_len) {
            return Err(Error::Mount(MountRefusal::NodePastEnd {
                name: shown,
                start,
                len,
                disk_len,
            }));
        }
        if nodes.len() >= MAX_NODES {
            return Err(Error::Mount(MountRefusal::TooManyNodes {
                name: shown,
                max: MAX_NODES,
            }));
        }
        let ino = nodes.len() as u64 + 1;
        nodes.push(Arc::new(Node {
            ino,
            name: name.to_os_string(),
            kind: NodeKind::Window { start, len },
            size: len,
            perm: if writable { 0o644 } else { 0o444 },
            partition,
        }));
        Ok(ino)
    }

    /// Show the guest's partitions as files `p1`, `p2`, ... (see `guest::Layout::files`),
    /// and on a writable mount follow changes of the table. Only before serving. Returns
    /// the table's warnings (also logged).
    pub fn enable_partitions(&mut self) -> Vec<guest::TableWarning> {
        let layout = self.scan_partitions();
        if self.writable {
            self.keep_cache = false;
        }
        self.partitions = Some(PartitionWatch {
            stale: AtomicBool::new(false),
            ranges: RwLock::new(layout.watch.clone()),
            rescan: Mutex::new(()),
        });
        self.apply_partitions(&layout.files());
        layout.warnings
    }

    fn scan_partitions(&self) -> guest::Layout {
        let ss = u64::from(self.disk.chain().top().logical_sector_size());
        let disk: &Disk = &self.disk;
        let layout =
            catch_unwind(AssertUnwindSafe(|| guest::scan_table(disk, ss))).unwrap_or_else(|_| {
                log::error!(
                    "reading the partition table: internal error (panic); no partition files"
                );
                guest::scan_table(&Vec::new(), ss)
            });
        for w in &layout.warnings {
            log::warn!("partition table: {w}");
        }
        layout
    }

    /// Make the partition nodes match `files`: unchanged ones keep their inode, the
    /// others die and new ones are added; the kernel is told to forget changed names.
    fn apply_partitions(&self, files: &[(String, u64, u64)]) {
        let mut forget = Vec::new();
        {
            let mut nodes = self.nodes_mut();
            for n in nodes.iter_mut() {
                let keep = !n.partition
                    || n.kind == NodeKind::Gone
                    || files.iter().any(|(name, s, l)| {
                        n.name == name.as_str() && n.kind == NodeKind::Window { start: *s, len: *l }
                    });
                if !keep {
                    forget.push(n.name.clone());
                    *n = Arc::new(Node {
                        ino: n.ino,
                        name: OsString::new(),
                        kind: NodeKind::Gone,
                        size: 0,
                        perm: 0,
                        partition: true,
                    });
                }
            }
            for (name, start, len) in files {
                let have = nodes.iter().any(|n| {
                    n.partition
                        && n.name == name.as_str()
                        && n.kind
                            == NodeKind::Window {
                                start: *start,
                                len: *len,
                            }
                });
                if have {
                    continue;
                }
                let r = Self::push_window(
                    &mut nodes,
                    self.disk.len(),
                    self.writable,
                    OsStr::new(name),
                    *start,
                    *len,
                    true,
                );
                if let Err(e) = r {
                    log::warn!("partition file not shown: {e}");
                }
            }
        }
        if let Some(n) = self.notify.get() {
            for name in forget {
                n.inval_entry(ROOT_INO, &name);
            }
        }
    }

    /// Reread the partition table if a write touched it since the last time.
    fn refresh_partitions(&self) {
        let Some(p) = &self.partitions else { return };
        if !p.stale.load(Ordering::Acquire) {
            return;
        }
        let _one = p.rescan.lock().unwrap_or_else(|e| e.into_inner());
        if !p.stale.swap(false, Ordering::AcqRel) {
            return;
        }
        let layout = self.scan_partitions();
        *p.ranges.write().unwrap_or_else(|e| e.into_inner()) = layout.watch.clone();
        self.apply_partitions(&layout.files());
    }

    /// Where the transport plugs in its cache invalidations.
    pub fn notify_slot(&self) -> NotifySlot {
        self.notify.clone()
    }

    /// After a write of disk bytes `[start, start + len)` through node `from`: mark the
    /// partition list stale if the table was touched, and drop the other data files'
    /// cached copies of those bytes.
    fn after_write(&self, from: u64, start: u64, len: u64) {
        if let Some(p) = &self.partitions {
            let end = start.saturating_add(len);
            let touched = p
                .ranges
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|&(s, l)| start < s.saturating_add(l) && s < end);
            if touched {
                p.stale.store(true, Ordering::Release);
            }
        }
        let Some(notify) = self.notify.get() else {
            return;
        };
        if self.keep_cache {
            // No windows on this writable mount: nothing aliases.
            return;
        }
        for n in self.nodes().iter() {
            if n.ino == from {
                continue;
            }
            if let Some((s, l)) = n.data_range() {
                let a = start.max(s);
                let b = start.saturating_add(len).min(s + l);
                if a < b {
                    notify.inval_data(n.ino, a - s, b - a);
                }
            }
        }
    }

    /// Whether the data files accept writes.
    /// Record which transport serves the mount (shown in `.stats`).
    pub fn set_transport(&self, name: &'static str) {
        *self.transport.write().unwrap_or_else(|p| p.into_inner()) = name;
    }

    /// Count one request answered through a FUSE-over-io_uring ring entry.
    pub fn note_ring_request(&self) {
        self.ring_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The transport `.stats` names.
    pub fn transport(&self) -> &'static str {
        *self.transport.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The node table, root first (dead partition nodes included).
    pub fn nodes(&self) -> RwLockReadGuard<'_, Vec<Arc<Node>>> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn nodes_mut(&self) -> RwLockWriteGuard<'_, Vec<Arc<Node>>> {
        self.nodes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A live node.
    fn node(&self, ino: u64) -> Option<Arc<Node>> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.nodes()
            .get(i)
            .filter(|n| n.kind != NodeKind::Gone)
            .cloned()
    }

    /// A node by inode, dead ones too (requests on a handle of a partition that went
    /// away get ESTALE rather than ENOENT).
    fn node_or_stale(&self, ino: u64) -> Reply<Arc<Node>> {
        let i =
            usize::try_from(ino.checked_sub(1).ok_or(libc::ENOENT)?).map_err(|_| libc::ENOENT)?;
        match self.nodes().get(i) {
            Some(n) if n.kind == NodeKind::Gone => Err(libc::ESTALE),
            Some(n) => Ok(n.clone()),
            None => Err(libc::ENOENT),
        }
    }

    fn mtime(&self) -> SystemTime {
        match self.mtime_ns.load(Ordering::Relaxed) {
            0 => self.mount_time,
            ns => UNIX_EPOCH + Duration::from_nanos(ns),
        }
    }

    fn attr_of(&self, node: &Node) -> Attr {
        // Data files change with writes; the root and .stats keep the mount's time.
        let mtime = if node.data_range().is_some() {
            self.mtime()
        } else {
            self.mount_time
        };
        Attr {
            ino: node.ino,
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: self.mount_time,
            kind: node.file_kind(),
            perm: node.perm,
            nlink: if node.kind == NodeKind::Root { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            blksize: BLOCK_SIZE,
        }
    }

    fn alloc_fh(&self, low: u64) -> u64 {
        (self.next_fh.fetch_add(1, Ordering::Relaxed) << FH_SHIFT) | low
    }

    fn flush_disk(&self, what: &str) -> Reply<()> {
        guarded(what, || {
            self.disk.flush().map_err(|e| {
                log::error!("{what}: {e}");
                errno_of(&e)
            })
        })
    }

    /// The mount is going away: make writes durable and leave the top image clean.
    pub fn destroy(&self) {
        if self.writable {
            if let Err(e) = self.disk.close() {
                log::error!("flush at unmount: {e}");
            }
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Reply<Attr> {
        if parent != ROOT_INO {
            return Err(libc::ENOENT);
        }
        self.refresh_partitions();
        self.nodes()
            .iter()
            .skip(1)
            .find(|n| n.kind != NodeKind::Gone && n.name == name)
            .map(|n| self.attr_of(n))
            .ok_or(libc::ENOENT)
    }

    pub fn getattr(&self, ino: u64) -> Reply<Attr> {
        self.node(ino).map(|n| self.attr_of(&n)).ok_or(libc::ENOENT)
    }

    /// The size is the disk's and never changes; ownership and mode are fixed. Time
    /// changes (touch) are accepted and ignored.
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Reply<Attr> {
        let node = self.node(ino).ok_or(libc::ENOENT)?;
        let attr = self.attr_of(&node);
        if set.size.is_some_and(|s| s != attr.size) {
            return Err(if self.writable || node.data_range().is_none() {
                libc::EPERM
            } else {
                libc::EROFS
            });
        }
        if set.mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm))
            || set.uid.is_some_and(|u| u != attr.uid)
            || set.gid.is_some_and(|g| g != attr.gid)
            || set.flags
        {
            return Err(libc::EPERM);
        }
        Ok(attr)
    }

    /// `mask` is access(2)'s: F_OK or an or of R_OK, W_OK, X_OK.
    pub fn access(&self, ino: u64, mask: i32) -> Reply<()> {
        let node = self.node(ino).ok_or(libc::ENOENT)?;
        if node.file_kind() != FileKind::RegularFile {
            return Ok(());
        }
        if mask & libc::W_OK != 0 {
            if node.data_range().is_some() && !self.writable {
                return Err(libc::EROFS);
            }
            if node.kind == NodeKind::Stats {
                return Err(libc::EACCES);
            }
        }
        if mask & libc::X_OK != 0 {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    /// `flags` are open(2)'s.
    pub fn open(&self, ino: u64, flags: i32) -> Reply<Opened> {
        let node = self.node(ino).ok_or(libc::ENOENT)?;
        let acc = flags & libc::O_ACCMODE;
        let wants_write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        match node.kind {
            NodeKind::Disk | NodeKind::Window { .. } => {
                if wants_write && !self.writable {
                    return Err(libc::EROFS);
                }
                // Only this daemon changes the data and every write goes through the
                // kernel's page cache on its way here, so cached pages stay valid across
                // opens, unless the same bytes can be written through another file
                // (windows on a writable mount): then each open drops the file's cached
                // pages, and writes invalidate the other files' copies (`after_write`).
                Ok(Opened {
                    fh: self.alloc_fh(if wants_write { FH_WRITE } else { 0 }),
                    keep_cache: self.keep_cache && !self.direct_io,
                    direct_io: self.direct_io,
                })
            }
            NodeKind::Stats => {
                if wants_write {
                    return Err(libc::EACCES);
                }
                let fh = self.alloc_fh(FH_STATS);
                // The daemon's pid first: `vdiskfs umount` waits for it to finish.
                let text = format!(
                    "pid {}\n{}transport {}\nring_requests {}\nread_requests {}\nread_bytes {}\n",
                    std::process::id(),
                    self.disk.stats_text(),
                    self.transport(),
                    self.ring_requests.load(Ordering::Relaxed),
                    self.read_requests.load(Ordering::Relaxed),
                    self.read_bytes.load(Ordering::Relaxed),
                );
                let text: Arc<[u8]> = text.into_bytes().into();
                self.stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, text);
                Ok(Opened {
                    fh,
                    keep_cache: false,
                    direct_io: true,
                })
            }
            NodeKind::Root => Err(libc::EISDIR),
            NodeKind::Gone => Err(libc::ENOENT),
        }
    }

    /// Read into `buf` (its length is the request's size); returns the bytes read, short
    /// only at the end of the file.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, buf: &mut [u8]) -> Reply<usize> {
        let node = self.node_or_stale(ino)?;
        match node.kind {
            NodeKind::Disk | NodeKind::Window { .. } => {
                let (start, len) = node.data_range().expect("a data node");
                if offset >= len {
                    return Ok(0);
                }
                let n = (buf.len() as u64).min(len - offset) as usize;
                let size = buf.len();
                self.read_requests.fetch_add(1, Ordering::Relaxed);
                self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                guarded("read", || {
                    self.faults.panic_if_asked(start + offset, n);
                    self.disk
                        .read_at(start + offset, &mut buf[..n])
                        .map_err(|e| {
                            log::error!(
                                "read of {size} bytes at offset {offset} of {}: {e}",
                                node.name.to_string_lossy()
                            );
                            errno_of(&e)
                        })
                })
            }
            NodeKind::Stats => {
                let text = self
                    .stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&fh)
                    .cloned()
                    .ok_or(libc::EBADF)?;
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(text.len());
                let end = start.saturating_add(buf.len()).min(text.len());
                buf[..end - start].copy_from_slice(&text[start..end]);
                Ok(end - start)
            }
            NodeKind::Root => Err(libc::EISDIR),
            NodeKind::Gone => Err(libc::ESTALE),
        }
    }

    /// Write `data` at `offset`; returns the bytes written, short at the end of the file.
    pub fn write(&self, ino: u64, _fh: u64, offset: u64, data: &[u8]) -> Reply<u32> {
        let node = self.node_or_stale(ino)?;
        let (start, len) = match node.kind {
            NodeKind::Disk | NodeKind::Window { .. } => node.data_range().expect("a data node"),
            NodeKind::Stats => return Err(libc::EBADF),
            NodeKind::Root => return Err(libc::EISDIR),
            NodeKind::Gone => return Err(libc::ESTALE),
        };
        if !self.writable {
            return Err(libc::EROFS);
        }
        let name = node.name.to_string_lossy();
        let n = if data.is_empty() {
            0
        } else if offset >= len {
            log::error!(
                "write of {} bytes at offset {offset} of {name}: past its end ({len} bytes)",
                data.len()
            );
            return Err(libc::ENOSPC);
        } else {
            (data.len() as u64).min(len - offset) as usize
        };
        let n = guarded("write", || {
            self.disk.write_at(start + offset, &data[..n]).map_err(|e| {
                log::error!(
                    "write of {} bytes at offset {offset} of {name}: {e}",
                    data.len()
                );
                errno_of(&e)
            })
        })?;
        self.touch();
        self.after_write(ino, start + offset, n as u64);
        // n <= data.len() <= the kernel's max_write, far below u32::MAX.
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// fallocate(2) on a data file. Two modes, both "these bytes read zeros from now
    /// on": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (a discard: what a loop device
    /// sends for `blkdiscard` and `fstrim`) and FALLOC_FL_ZERO_RANGE, with or without
    /// FALLOC_FL_KEEP_SIZE (write-zeroes). The disk's space is given back
    /// (`Disk::discard`). A range reaching past the end: clamped with KEEP_SIZE, ENOSPC
    /// without (the file cannot grow). EROFS on a read-only mount; every other mode gets
    /// EOPNOTSUPP (`Refused::Fallocate`).
    pub fn fallocate(&self, ino: u64, _fh: u64, offset: u64, len: u64, mode: i32) -> Reply<()> {
        let node = self.node_or_stale(ino)?;
        let (start, size) = match node.kind {
            NodeKind::Disk | NodeKind::Window { .. } => node.data_range().expect("a data node"),
            NodeKind::Stats => return Err(libc::EBADF),
            NodeKind::Root => return Err(libc::EISDIR),
            NodeKind::Gone => return Err(libc::ESTALE),
        };
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if !matches!(mode, PUNCH | ZERO | ZERO_KEEP) {
            return Err(Refused::Fallocate.errno());
        }
        if !self.writable {
            return Err(libc::EROFS);
        }
        if len == 0 {
            return Err(libc::EINVAL);
        }
        let end = offset.saturating_add(len);
        if end > size && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return Err(libc::ENOSPC);
        }
        let end = end.min(size);
        if offset >= end {
            return Ok(());
        }
        let name = node.name.to_string_lossy();
        guarded("fallocate", || {
            self.disk
                .discard(start + offset, end - offset)
                .map_err(|e| {
                    log::error!(
                        "discard of {} bytes at offset {offset} of {name}: {e}",
                        end - offset
                    );
                    errno_of(&e)
                })
        })?;
        self.touch();
        self.after_write(ino, start + offset, end - offset);
        Ok(())
    }

    /// The data files' mtime is now.
    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        self.mtime_ns.store(now, Ordering::Relaxed);
    }

    /// close() of a descriptor: if it was opened for writing, make the writes durable and
    /// report their errors.
    pub fn flush(&self, ino: u64, fh: u64) -> Reply<()> {
        let is_data = self.node(ino).is_some_and(|n| n.data_range().is_some());
        if is_data && self.writable && fh & FH_WRITE != 0 {
            self.flush_disk("flush")
        } else {
            Ok(())
        }
    }

    pub fn fsync(&self, ino: u64, _fh: u64, _datasync: bool) -> Reply<()> {
        let is_data = self.node(ino).is_some_and(|n| n.data_range().is_some());
        if is_data && self.writable {
            self.flush_disk("fsync")
        } else {
            Ok(())
        }
    }

    pub fn release(&self, ino: u64, fh: u64) -> Reply<()> {
        if self.node(ino).is_some_and(|n| n.kind == NodeKind::Stats) {
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fh);
        }
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> Reply<Opened> {
        if ino == ROOT_INO {
            self.refresh_partitions();
            Ok(Opened {
                fh: 0,
                keep_cache: false,
                direct_io: false,
            })
        } else {
            Err(libc::ENOTDIR)
        }
    }

    /// Hand the entries from `offset` on to `add`, which returns true when the reply is
    /// full (that entry was not taken).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Reply<()> {
        if ino != ROOT_INO {
            return Err(libc::ENOTDIR);
        }
        let dots = [OsStr::new("."), OsStr::new("..")]
            .into_iter()
            .map(|name| (ROOT_INO, FileKind::Directory, name));
        let nodes = self.nodes();
        let files = nodes[1..]
            .iter()
            .filter(|n| n.kind != NodeKind::Gone)
            .map(|n| (n.ino, n.file_kind(), n.name.as_os_str()));
        // An entry's offset is the offset of the next one.
        for (i, (ino, kind, name)) in dots
            .chain(files)
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let entry = DirEntry {
                ino,
                next_offset: i as u64 + 1,
                kind,
                name,
            };
            if add(entry) {
                break;
            }
        }
        Ok(())
    }

    pub fn fsyncdir(&self, _ino: u64) -> Reply<()> {
        Ok(())
    }

    pub fn statfs(&self) -> Statfs {
        Statfs {
            blocks: self.disk.len().div_ceil(u64::from(BLOCK_SIZE)),
            bfree: 0,
            bavail: 0,
            files: self.nodes().len() as u64,
            ffree: 0,
            bsize: BLOCK_SIZE,
            namelen: 255,
            frsize: BLOCK_SIZE,
        }
    }

    /// `size` is the caller's buffer size (0: it asks how much it needs).
    pub fn listxattr(&self, _ino: u64, size: u32) -> Reply<XattrList<'static>> {
        const NAMES: &[u8] = &[];
        if size == 0 {
            Ok(XattrList::Size(NAMES.len() as u32))
        } else {
            Ok(XattrList::Data(NAMES))
        }
    }
}
