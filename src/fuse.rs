//! The FUSE file system: a root directory holding one regular file (`disk.raw` by default)
//! that is the merged view of a chain, and a hidden read-only `.stats` file with the
//! counters of the running mount.
//!
//! Every request is answered on the fuser worker thread that received it; `Disk` is
//! `Sync` and reads are positioned, so parallel reads take no lock here. Each worker
//! keeps one reusable read buffer, so a 1 MiB read neither allocates nor zeroes memory
//! after the first one on that thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, PollEvents,
    PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::disk::Disk;
use crate::error::Error;

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

/// How long the kernel may cache names and attributes. Only we change the file, and its
/// size never changes, so this can be long; mtime after a write may lag by this much.
const TTL: Duration = Duration::from_secs(1);

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
}

pub struct VdiskFs {
    disk: Arc<Disk>,
    opts: FsOptions,
    /// Whether writes reach the disk (not read-only and the top layer is writable).
    writable: bool,
    mount_time: SystemTime,
    /// Last write, as nanoseconds since the epoch (0: never written while mounted).
    mtime_ns: AtomicU64,
    next_fh: AtomicU64,
    /// `.stats` contents, generated at open, by file handle.
    stats: Mutex<HashMap<u64, Arc<[u8]>>>,
}

thread_local! {
    /// Per-worker read buffer; grows to the largest request seen and is never shrunk.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno_of(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// Run `f`, turning a panic into EIO for this request instead of a dead mount.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::error!("{what}: internal error (panic: {msg}); answered EIO");
            Err(Errno::EIO)
        }
    }
}

/// Fault injection for the daemon's tests (integration/hostile.rs): in debug builds only
/// (what `cargo test` runs), `VDISKFS_FAULT_PANIC_AT_OFFSET=N` makes every read request
/// covering byte N of the disk panic inside the worker, to prove a panic costs that one
/// request an EIO and leaves the mount serving. Release builds compile it to nothing.
mod fault_injection {
    #[cfg(debug_assertions)]
    pub fn panic_if_asked(offset: u64, size: usize) {
        use std::sync::OnceLock;
        static AT: OnceLock<Option<u64>> = OnceLock::new();
        let at = AT.get_or_init(|| {
            std::env::var("VDISKFS_FAULT_PANIC_AT_OFFSET")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if let Some(at) = *at {
            if offset <= at && at - offset < size as u64 {
                panic!("fault injected: read of {size} bytes at {offset} covers byte {at}");
            }
        }
    }

    #[cfg(not(debug_assertions))]
    #[inline(always)]
    pub fn panic_if_asked(_offset: u64, _size: usize) {}
}

impl VdiskFs {
    pub fn new(disk: Arc<Disk>, opts: FsOptions) -> Self {
        let writable = !opts.read_only && disk.is_writable();
        VdiskFs {
            disk,
            opts,
            writable,
            mount_time: SystemTime::now(),
            mtime_ns: AtomicU64::new(0),
            next_fh: AtomicU64::new(1),
            stats: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the exported file accepts writes.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn mtime(&self) -> SystemTime {
        match self.mtime_ns.load(Ordering::Relaxed) {
            0 => self.mount_time,
            ns => UNIX_EPOCH + Duration::from_nanos(ns),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.writable { 0o644 } else { 0o444 },
                self.disk.len(),
                1,
            ),
            // Size 0: the text is generated at open and read with direct I/O.
            STATS_INO => (FileType::RegularFile, 0o444, 0, 1),
            _ => return None,
        };
        let mtime = if ino == DISK_INO {
            self.mtime()
        } else {
            self.mount_time
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: self.mount_time,
            kind,
            perm,
            nlink,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn alloc_fh(&self, low: u64) -> u64 {
        (self.next_fh.fetch_add(1, Ordering::Relaxed) << FH_SHIFT) | low
    }

    fn flush_disk(&self, what: &str) -> Result<(), Errno> {
        guarded(what, || {
            self.disk.flush().map_err(|e| {
                log::error!("{what}: {e}");
                errno_of(&e)
            })
        })
    }

    /// Read `size` bytes of the disk at `offset` and answer `reply`.
    fn read_disk(&self, offset: u64, size: u32, reply: ReplyData) {
        let size = size as usize;
        READ_BUF.with(|cell| {
            // A worker answers one request at a time, so the buffer is never borrowed
            // twice; fall back to a fresh buffer rather than trusting that blindly.
            let mut own;
            let mut guard = cell.try_borrow_mut().ok();
            let buf: &mut Vec<u8> = match guard.as_deref_mut() {
                Some(b) => b,
                None => {
                    own = Vec::new();
                    &mut own
                }
            };
            if buf.len() < size {
                buf.resize(size, 0);
            }
            let res = guarded("read", || {
                fault_injection::panic_if_asked(offset, size);
                self.disk.read_at(offset, &mut buf[..size]).map_err(|e| {
                    log::error!(
                        "read of {size} bytes at offset {offset} of {}: {e}",
                        self.opts.name.to_string_lossy()
                    );
                    errno_of(&e)
                })
            });
            match res {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write_disk(&self, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if !self.writable {
            return Err(Errno::EROFS);
        }
        let n = guarded("write", || {
            self.disk.write_at(offset, data).map_err(|e| {
                log::error!(
                    "write of {} bytes at offset {offset} of {}: {e}",
                    data.len(),
                    self.opts.name.to_string_lossy()
                );
                errno_of(&e)
            })
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        self.mtime_ns.store(now, Ordering::Relaxed);
        // n <= data.len() <= the kernel's max_write, far below u32::MAX.
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn lookup_name(&self, parent: INodeNo, name: &OsStr) -> Option<u64> {
        if parent.0 != ROOT_INO {
            return None;
        }
        if name == self.opts.name.as_os_str() {
            Some(DISK_INO)
        } else if name == STATS_NAME {
            Some(STATS_INO)
        } else {
            None
        }
    }
}

impl Filesystem for VdiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Ask for 1 MiB requests; the kernel caps them at its max_pages_limit.
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        // Let the kernel keep more readahead/async requests in flight than the default 16,
        // so every worker has work.
        let _ = config.set_max_background(64);
        log::debug!("FUSE init done");
        Ok(())
    }

    fn destroy(&mut self) {
        if self.writable {
            if let Err(e) = self.disk.close() {
                log::error!("flush at unmount: {e}");
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .lookup_name(parent, name)
            .and_then(|ino| self.attr(ino))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        // The size is the virtual disk's and never changes; ownership and mode are fixed.
        // Time changes (touch) are accepted and ignored.
        if size.is_some_and(|s| s != attr.size) {
            reply.error(if self.writable || ino.0 != DISK_INO {
                Errno::EPERM
            } else {
                Errno::EROFS
            });
            return;
        }
        if mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm))
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
            || flags.is_some()
        {
            reply.error(Errno::EPERM);
            return;
        }
        reply.attr(&TTL, &attr);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match ino.0 {
            DISK_INO => {
                if wants_write && !self.writable {
                    reply.error(Errno::EROFS);
                    return;
                }
                let fh = self.alloc_fh(if wants_write { FH_WRITE } else { 0 });
                // Only this daemon changes the file and every write goes through the
                // kernel's page cache on its way here, so cached pages stay valid across
                // opens.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            STATS_INO => {
                if wants_write {
                    reply.error(Errno::EACCES);
                    return;
                }
                let fh = self.alloc_fh(FH_STATS);
                // The daemon's pid first: `vdiskfs umount` waits for it to finish.
                let text = format!("pid {}\n{}", std::process::id(), self.disk.stats_text());
                let text: Arc<[u8]> = text.into_bytes().into();
                self.stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, text);
                // Direct I/O: the size in getattr (0) does not limit reads.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match ino.0 {
            DISK_INO => self.read_disk(offset, size, reply),
            STATS_INO => {
                let text = self
                    .stats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&fh.0)
                    .cloned();
                match text {
                    Some(t) => {
                        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(t.len());
                        let end = start.saturating_add(size as usize).min(t.len());
                        reply.data(&t[start..end]);
                    }
                    None => reply.error(Errno::EBADF),
                }
            }
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match ino.0 {
            DISK_INO => match self.write_disk(offset, data) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            },
            STATS_INO => reply.error(Errno::EBADF),
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() of a descriptor that wrote: make its writes durable and report errors.
        if ino.0 == DISK_INO && self.writable && fh.0 & FH_WRITE != 0 {
            match self.flush_disk("flush") {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        } else {
            reply.ok();
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == STATS_INO {
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == DISK_INO && self.writable {
            match self.flush_disk("fsync") {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        } else {
            reply.ok();
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT_INO {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries: [(u64, FileType, &OsStr); 4] = [
            (ROOT_INO, FileType::Directory, OsStr::new(".")),
            (ROOT_INO, FileType::Directory, OsStr::new("..")),
            (DISK_INO, FileType::RegularFile, self.opts.name.as_os_str()),
            (STATS_INO, FileType::RegularFile, OsStr::new(STATS_NAME)),
        ];
        // An entry's offset is the offset of the next one.
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = 4096u32;
        let blocks = self.disk.len().div_ceil(u64::from(bsize));
        reply.statfs(blocks, 0, 0, 3, 0, bsize, 255, bsize);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let Some(attr) = self.attr(ino.0) else {
            reply.error(Errno::ENOENT);
            return;
        };
        if mask.contains(AccessFlags::W_OK) && attr.kind == FileType::RegularFile {
            if ino.0 == DISK_INO && !self.writable {
                reply.error(Errno::EROFS);
                return;
            }
            if ino.0 == STATS_INO {
                reply.error(Errno::EACCES);
                return;
            }
        }
        if mask.contains(AccessFlags::X_OK) && attr.kind == FileType::RegularFile {
            reply.error(Errno::EACCES);
            return;
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // ENOSYS: the kernel then treats the file as always ready, like a regular file.
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        // ENOSYS: the kernel handles SEEK_SET/CUR/END itself from then on.
        reply.error(Errno::ENOSYS);
    }
}
