//! The system calls of the mount daemon, as safe functions: the one module of vdiskfs
//! allowed `unsafe` (`lib.rs` denies it everywhere else), built on nix's safe wrappers.
//! `commands/mount.rs` decides what to do (options, which way to mount, readiness,
//! detaching, unmounting); this module only says how the kernel is asked.
//!
//! Why vdiskfs mounts by itself instead of through fuser's `Session::new` (0.18.0): its
//! `Mount` unmounts again on drop after checking `is_mounted`, whose POLLERR test is
//! inverted (it reports an unmounted /dev/fuse as mounted), so every session that ends
//! because someone unmounted it calls umount(2) (as root) or `fusermount3 -u -z` once more
//! on the mount point: a file system mounted there meanwhile would be unmounted. Its
//! mount(2) path also mounts as type "fuse" without the subtype (mountinfo would show
//! `fuse`, not `fuse.vdiskfs`, which `vdiskfs umount`, fstab's `fuse.vdiskfs` and
//! `mount -a` rely on), and it passes the fsname to fusermount3 unescaped (an image path
//! with a comma breaks the option list). See docs/design.md.

// The one exception to Cargo.toml's `unsafe_code = "deny"`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Pid};

/// The real user id.
pub fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The real group id.
pub fn gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

/// The effective user id (0 = may mount(2) and umount(2) itself).
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// mount(2). `flags` are `MS_*` bits.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::from_bits_retain(flags),
        Some(data),
    )?;
    Ok(())
}

/// umount2(2); with `detach`, lazily (MNT_DETACH).
pub fn umount(target: &Path, detach: bool) -> io::Result<()> {
    let flags = if detach {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    nix::mount::umount2(target, flags)?;
    Ok(())
}

/// A connected pair of Unix stream sockets to talk to a child process: (ours, close-on-
/// exec; theirs, inherited by children, to be passed on by number). Call it while the
/// process has one thread, so no other thread's child inherits `theirs`.
pub fn socketpair_for_child() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )?;
    fcntl(&ours, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok((ours, theirs))
}

/// Receive one descriptor sent with SCM_RIGHTS over `sock` (fusermount3's protocol: one
/// byte of data with the descriptor attached). The descriptor is close-on-exec.
pub fn recv_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!(RawFd);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if msg.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut received: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                if fd < 0 {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                // SAFETY: the kernel installed `fd` into this process's descriptor table
                // for this very recvmsg (SCM_RIGHTS) and nothing else refers to it yet, so
                // it is open and ours to own (and to close, if it is not the first).
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    received
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "fusermount3 sent no descriptor"))
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(File, File)> {
    let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((File::from(rd), File::from(wr)))
}

/// Which side of a fork this is.
pub enum Forked {
    /// The original process; the child's pid.
    Parent(Pid),
    Child,
}

/// The number of threads of this process (from /proc/self/task).
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// fork(2), only while this process has a single thread (checked; an error otherwise):
/// the child then gets a consistent copy of every lock and allocator state and may go
/// on running ordinary Rust code.
pub fn fork() -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "{threads} threads are running; fork needs a single-threaded process"
        )));
    }
    // SAFETY: the process has exactly one thread (checked just above, and only this
    // thread could have started another since), so nothing can hold a lock or be in the
    // middle of an allocation at the fork: the child may run any code, not only
    // async-signal-safe functions.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Wait for the child `pid` to end; its wait status as waitpid(2) gives it (exit code
/// times 256, or the signal number plus 128 with a core dump), 0 if unknown.
pub fn wait_status(pid: Pid) -> i32 {
    match nix::sys::wait::waitpid(pid, None) {
        Ok(WaitStatus::Exited(_, code)) => (code & 0xff) << 8,
        Ok(WaitStatus::Signaled(_, sig, core)) => sig as i32 | if core { 0x80 } else { 0 },
        _ => 0,
    }
}

/// Start a new session (setsid(2)): no controlling terminal, so the terminal's signals
/// and hangup do not reach this process.
pub fn setsid() {
    let _ = nix::unistd::setsid();
}

/// Make descriptors 0 and 1 refer to `null` and 2 to `err` (dup2).
pub fn redirect_stdio(null: &File, err: &File) {
    let _ = nix::unistd::dup2_stdin(null);
    let _ = nix::unistd::dup2_stdout(null);
    let _ = nix::unistd::dup2_stderr(err);
}

/// SIGINT, SIGTERM and SIGHUP: the signals that end a mount.
fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Block the termination signals in this thread (and so in every thread started from
/// it), to be taken with [`wait_termination_signal`] by one thread.
pub fn block_termination_signals() {
    let _ = termination_signals().thread_block();
}

/// Wait for one of the (blocked) termination signals; its number.
pub fn wait_termination_signal() -> io::Result<i32> {
    Ok(termination_signals().wait()? as i32)
}

/// One FUSE-over-io_uring ring entry's buffers: the 288-byte request header and the
/// payload, and the two-element iovec array a REGISTER command points the kernel at.
///
/// The memory is allocated once and never freed (it lives until the daemon exits): the
/// kernel keeps the addresses from REGISTER for the life of the connection and writes a
/// request into them whenever it hands the entry a request, so freeing them while the
/// connection (or a cancelled command) might still use them would be a use after free.
/// A daemon serves one mount, and a mount has a fixed number of entries.
pub struct FuseRingEntry {
    header: std::ptr::NonNull<u8>,
    header_len: usize,
    payload: std::ptr::NonNull<u8>,
    payload_len: usize,
    iov: std::ptr::NonNull<libc::iovec>,
}

impl FuseRingEntry {
    /// Buffers for one entry: `header_len` bytes of header, `payload_len` of payload.
    pub fn new(header_len: usize, payload_len: usize) -> Self {
        let leak = |n: usize| -> std::ptr::NonNull<u8> {
            let b: &'static mut [u8] = Box::leak(vec![0u8; n].into_boxed_slice());
            std::ptr::NonNull::from(b).cast()
        };
        let header = leak(header_len);
        let payload = leak(payload_len);
        let iov: &'static mut [libc::iovec; 2] = Box::leak(Box::new([
            libc::iovec {
                iov_base: header.as_ptr().cast(),
                iov_len: header_len,
            },
            libc::iovec {
                iov_base: payload.as_ptr().cast(),
                iov_len: payload_len,
            },
        ]));
        FuseRingEntry {
            header,
            header_len,
            payload,
            payload_len,
            iov: std::ptr::NonNull::from(iov).cast(),
        }
    }

    /// The header and payload buffers, to read a request from and write its reply into.
    /// Call it only while the entry is with this process: after its command completed
    /// and before the next command for it is submitted (the kernel writes the buffers
    /// only while it holds the entry, and only inside this thread's io_uring_enter:
    /// the ring is set up with DEFER_TASKRUN where the kernel allows, and the copy is
    /// task work of the submitting thread in any case). `&mut self` makes the borrow
    /// exclusive on this side.
    pub fn buffers(&mut self) -> (&mut [u8], &mut [u8]) {
        // SAFETY: both allocations are live for the rest of the process (leaked in
        // `new`), `header_len`/`payload_len` bytes long, disjoint, and initialised
        // (zeroed at allocation, then written only by us or the kernel as bytes). The
        // caller has the entry back from the kernel (see above), so nothing else
        // accesses them while these borrows, tied to `&mut self`, live.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.header.as_ptr(), self.header_len),
                std::slice::from_raw_parts_mut(self.payload.as_ptr(), self.payload_len),
            )
        }
    }
}

/// An io_uring with 128-byte SQEs (what FUSE's URING_CMDs need) on which one thread
/// registers FUSE ring entries and commits their replies.
pub struct FuseRing {
    ring: io_uring::IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry>,
}

impl FuseRing {
    /// A ring of `entries` SQEs. The completion work of the kernel's FUSE commands is
    /// deferred to this thread's waits (SINGLE_ISSUER + DEFER_TASKRUN) where the kernel
    /// offers that, so it must be used by the thread that created it.
    pub fn new(entries: u32) -> io::Result<Self> {
        let deferred = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        let ring = match deferred {
            Ok(r) => r,
            Err(_) => io_uring::IoUring::builder().build(entries)?,
        };
        Ok(FuseRing { ring })
    }

    /// Queue a FUSE command (`cmd_op`, with `cmd` in the SQE's 80-byte command area) for
    /// `entry` on the FUSE device `dev`; `user_data` comes back in its completion.
    pub fn push(
        &mut self,
        dev: RawFd,
        cmd_op: u32,
        cmd: [u8; 80],
        entry: &FuseRingEntry,
        user_data: u64,
    ) -> io::Result<()> {
        use io_uring::{opcode, types};
        let sqe = opcode::UringCmd80::new(types::Fd(dev), cmd_op)
            .cmd(cmd)
            .addr(Some(entry.iov.as_ptr() as u64))
            .build()
            .user_data(user_data);
        // The kernel reads the iovec count from the SQE's `len` (offset 24), which the
        // crate's UringCmd80 does not set: FUSE wants 2 (header, payload).
        // SAFETY: `Entry128` is `#[repr(C)]` and exactly 128 bytes (a struct
        // io_uring_sqe followed by 64 command bytes; transmute checks the size), made of
        // integers and unions of integers, so any byte pattern is a valid value; bytes
        // 24..28 are the SQE's `len` field in the kernel's ABI.
        let sqe: io_uring::squeue::Entry128 = unsafe {
            let mut raw: [u8; 128] = std::mem::transmute(sqe);
            raw[24..28].copy_from_slice(&2u32.to_le_bytes());
            std::mem::transmute::<[u8; 128], io_uring::squeue::Entry128>(raw)
        };
        // SAFETY: the SQE points at `entry`'s iovec array and, through it, at its header
        // and payload buffers, which are never freed (`FuseRingEntry::new` leaks them),
        // so they stay valid for as long as the kernel may use them.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }

    /// Submit what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()?;
        Ok(())
    }

    /// Submit what is queued and wait for at least one completion (EINTR retried).
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Take the completions there are: (user_data, result).
    pub fn completions(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}
