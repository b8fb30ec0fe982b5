//! The fuser transport: each `Filesystem` callback converts fuser's arguments, calls one
//! function of `vfs::Vfs` (where all the file-system behaviour is, and its tests), and
//! converts the result into fuser's reply. Nothing here decides an answer.
//!
//! Each fuser worker thread keeps one reusable read buffer, so a 1 MiB read neither
//! allocates nor zeroes memory after the first one on that thread.
//!
//! The cache invalidations the `Vfs` asks for (`vfs::Notify`) go through a channel to a
//! thread of their own (`start_notifier`), which sends them to the kernel after the
//! request that caused them has been answered.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::vfs::{
    self, Attr, FileKind, Notify, NotifySlot, Opened, Refused, SetAttr, Vfs, XattrList, ATTR_TTL,
};

pub use crate::vfs::{FsOptions, MAX_IO, STATS_NAME};

/// One invalidation for the notifier thread.
enum Inval {
    Data { ino: u64, offset: u64, len: u64 },
    Entry { parent: u64, name: OsString },
}

/// `vfs::Notify` as a queue to the notifier thread.
struct Queue(mpsc::Sender<Inval>);

impl Notify for Queue {
    fn inval_data(&self, ino: u64, offset: u64, len: u64) {
        let _ = self.0.send(Inval::Data { ino, offset, len });
    }
    fn inval_entry(&self, parent: u64, name: &OsStr) {
        let _ = self.0.send(Inval::Entry {
            parent,
            name: name.to_os_string(),
        });
    }
}

/// Start the thread that sends the `Vfs`'s invalidations to the kernel through
/// `notifier`, and plug it into `slot` (from `VdiskFs::notify_slot`, taken before the
/// session was made). It ends when the file system is dropped.
pub fn start_notifier(slot: &NotifySlot, notifier: Notifier) {
    let (tx, rx) = mpsc::channel::<Inval>();
    let spawned = std::thread::Builder::new()
        .name("vdiskfs-notify".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // Take what else is queued and merge touching ranges of one inode (a
                // sequential writer queues one range per request).
                let mut batch = vec![first];
                batch.extend(rx.try_iter().take(4096));
                let mut merged: Vec<Inval> = Vec::with_capacity(batch.len());
                for m in batch {
                    if let (
                        Some(Inval::Data { ino, offset, len }),
                        Inval::Data {
                            ino: i2,
                            offset: o2,
                            len: l2,
                        },
                    ) = (merged.last_mut(), &m)
                    {
                        if *ino == *i2 && offset.saturating_add(*len) == *o2 {
                            *len = len.saturating_add(*l2);
                            continue;
                        }
                    }
                    merged.push(m);
                }
                for m in merged {
                    // ENOENT: the kernel has nothing cached for it, which is fine.
                    let r = match &m {
                        Inval::Data { ino, offset, len } => notifier.inval_inode(
                            INodeNo(*ino),
                            i64::try_from(*offset).unwrap_or(i64::MAX),
                            i64::try_from(*len).unwrap_or(i64::MAX),
                        ),
                        Inval::Entry { parent, name } => {
                            notifier.inval_entry(INodeNo(*parent), name)
                        }
                    };
                    if let Err(e) = r {
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            log::debug!("cache invalidation: {e}");
                        }
                    }
                }
            }
        });
    match spawned {
        Ok(_) => {
            let _ = slot.set(Box::new(Queue(tx)));
        }
        Err(e) => log::error!("cannot start the cache invalidation thread: {e}"),
    }
}

/// The fuser `Filesystem` over a `Vfs`.
pub struct VdiskFs {
    vfs: Arc<Vfs>,
    /// Ask for FUSE_OVER_IO_URING at INIT (`uring.rs` then serves the rings).
    want_uring: bool,
    /// Set at INIT when the kernel offered FUSE_OVER_IO_URING and we asked for it.
    uring_agreed: Arc<AtomicBool>,
}

thread_local! {
    /// Per-worker read buffer; grows to the largest request seen and is never shrunk.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: vfs::Errno) -> Errno {
    Errno::from_i32(e)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.crtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
    }
}

fn reply_opened(r: vfs::Reply<Opened>, reply: ReplyOpen) {
    match r {
        Ok(o) => {
            let mut flags = FopenFlags::empty();
            if o.keep_cache {
                flags |= FopenFlags::FOPEN_KEEP_CACHE;
            }
            if o.direct_io {
                flags |= FopenFlags::FOPEN_DIRECT_IO;
            }
            reply.opened(FileHandle(o.fh), flags);
        }
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(r: vfs::Reply<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(r: vfs::Reply<Attr>, reply: ReplyAttr) {
    match r {
        Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
        Err(e) => reply.error(errno(e)),
    }
}

impl VdiskFs {
    /// Serve a `Vfs` built by the caller (with windows added, say).
    pub fn from_vfs(vfs: Vfs) -> Self {
        VdiskFs {
            vfs: Arc::new(vfs),
            want_uring: false,
            uring_agreed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The `Vfs` this adapter serves, for the other transport to share.
    pub fn vfs(&self) -> Arc<Vfs> {
        self.vfs.clone()
    }

    /// Ask the kernel for FUSE_OVER_IO_URING at INIT; the flag reads true after the
    /// handshake if it agreed.
    pub fn ask_for_uring(&mut self) -> Arc<AtomicBool> {
        self.want_uring = true;
        self.uring_agreed.clone()
    }

    /// Whether the exported files accept writes.
    pub fn is_writable(&self) -> bool {
        self.vfs.is_writable()
    }

    /// Where `start_notifier` plugs in (take it before the session consumes `self`).
    pub fn notify_slot(&self) -> NotifySlot {
        self.vfs.notify_slot()
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
        if self.want_uring {
            // Refused when the kernel did not offer it (enable_uring off).
            match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                Ok(()) => self.uring_agreed.store(true, Ordering::SeqCst),
                Err(_) => log::debug!("the kernel did not offer FUSE_OVER_IO_URING at INIT"),
            }
        }
        log::debug!("FUSE init done");
        Ok(())
    }

    fn destroy(&mut self) {
        self.vfs.destroy();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.vfs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&ATTR_TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(self.vfs.getattr(ino.0), reply);
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
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            flags: flags.is_some(),
        };
        reply_attr(self.vfs.setattr(ino.0, &set), reply);
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
        reply.error(errno(Refused::ChangeTree.errno()));
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
        reply.error(errno(Refused::ChangeTree.errno()));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(Refused::ChangeTree.errno()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(Refused::ChangeTree.errno()));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(Refused::ChangeTree.errno()));
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
        reply.error(errno(Refused::ChangeTree.errno()));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno(Refused::ChangeTree.errno()));
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
        reply.error(errno(Refused::ChangeTree.errno()));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply_opened(self.vfs.open(ino.0, flags.0), reply);
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
            match self.vfs.read(ino.0, fh.0, offset, &mut buf[..size]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.vfs.write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
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
        reply_empty(self.vfs.flush(ino.0, fh.0), reply);
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
        reply_empty(self.vfs.release(ino.0, fh.0), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.vfs.fsync(ino.0, fh.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_opened(self.vfs.opendir(ino.0), reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.vfs.readdir(ino.0, offset, |e| {
            reply.add(INodeNo(e.ino), e.next_offset, file_type(e.kind), e.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.vfs.fsyncdir(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.vfs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
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
        reply.error(errno(Refused::SetXattr.errno()));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(errno(Refused::GetXattr.errno()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.vfs.listxattr(ino.0, size) {
            Ok(XattrList::Size(n)) => reply.size(n),
            Ok(XattrList::Data(d)) => reply.data(d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(Refused::RemoveXattr.errno()));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(self.vfs.access(ino.0, mask.bits()), reply);
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
        reply.error(errno(Refused::Ioctl.errno()));
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
        reply.error(errno(Refused::Poll.errno()));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.vfs.fallocate(ino.0, fh.0, offset, length, mode), reply);
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
        reply.error(errno(Refused::Lseek.errno()));
    }
}
