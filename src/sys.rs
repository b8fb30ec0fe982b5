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
