//! How vdiskfs opens files that other processes may be using: read-only opens that leave
//! the access time alone, the advisory locks (flock) and, when a lock is refused, who
//! holds it. Which file gets which lock is decided in one place, `chain::Intent`; this
//! module is the mechanism.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

/// Open `path` read-only or read-write. `O_NONBLOCK`: if a parent path was swapped for a
/// FIFO after the chain checked it was a regular file, the open and reads fail instead
/// of blocking forever (it changes nothing for regular files). Read-only opens add
/// `O_NOATIME` so that looking at an image changes none of its time stamps; only the
/// owner (or CAP_FOWNER) may ask for it, so on `EPERM` the open is retried without.
pub fn open_file(path: &Path, writable: bool) -> io::Result<File> {
    let open = |extra: libc::c_int| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | extra)
            .open(path)
    };
    if writable {
        return open(0);
    }
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// The names in directory `dir` (without "." and ".."), read through a descriptor
/// opened with `O_NOATIME` when allowed: listing a directory updates its access time
/// otherwise.
pub fn list_dir(dir: &Path) -> io::Result<Vec<OsString>> {
    let open = |extra: libc::c_int| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | extra)
            .open(dir)
    };
    let f = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        r => r?,
    };
    let mut d = nix::dir::Dir::from_fd(OwnedFd::from(f)).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// How long a lock that is refused is tried again: a daemon that was just unmounted may
/// still be closing the file, and a process forked elsewhere in this program holds a
/// copy of every descriptor (and so the lock) until it execs.
const LOCK_GRACE: Duration = Duration::from_secs(2);

/// Take an flock on `file`, exclusive or shared, with `grace` trying again for a short
/// while. Ok(true): locked; Ok(false): someone else holds a conflicting lock; Err: the
/// file system cannot lock (the caller goes on without a lock).
pub fn lock(file: &File, exclusive: bool, grace: bool) -> io::Result<bool> {
    let try_lock = || {
        if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        }
    };
    let deadline = Instant::now() + if grace { LOCK_GRACE } else { Duration::ZERO };
    loop {
        match try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() >= deadline => {
                return Ok(false)
            }
            Err(std::fs::TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A process holding an flock on a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Exclusive (a writer) or shared (a reader).
    pub exclusive: bool,
    /// "vdiskfs mount at /mnt/x", the command name, or "this process".
    pub what: String,
}

/// The processes holding an flock on the file `own` is open on, other than through `own`
/// itself. Found in /proc/PID/fdinfo/FD, whose "lock:" lines name the lock's device and
/// inode (/proc/locks alone gives the pid that took the lock, which is gone when the lock
/// was taken before a fork, as a detached mount does). Processes whose /proc entries we
/// may not read are missed; the list is only for messages.
pub fn holders(own: &File) -> Vec<Holder> {
    let Ok(md) = own.metadata() else {
        return Vec::new();
    };
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(md.dev()),
        libc::minor(md.dev()),
        md.ino()
    );
    let me = std::process::id();
    let own_fd = own.as_raw_fd().to_string();
    let mut out: Vec<Holder> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let mut lock = None;
        for fd in fds.flatten() {
            if pid == me && fd.file_name().to_str() == Some(own_fd.as_str()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            for line in text.lines().filter(|l| l.starts_with("lock:")) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // lock:  1: FLOCK  ADVISORY  WRITE 5995 fe:00:10011470 0 EOF
                if f.get(2) == Some(&"FLOCK") && f.get(6) == Some(&key.as_str()) {
                    let excl = f.get(4) == Some(&"WRITE");
                    lock = Some(lock.unwrap_or(false) || excl);
                }
            }
        }
        if let Some(exclusive) = lock {
            out.push(Holder {
                pid,
                exclusive,
                what: describe_process(pid),
            });
        }
    }
    out
}

/// "another process (pid 12: vdiskfs mount at /mnt/x)" for the holders of `own`'s file
/// (only the exclusive ones with `writers`), or "another process" when none is found.
pub fn describe_holders(own: &File, writers: bool) -> String {
    let list: Vec<String> = holders(own)
        .into_iter()
        .filter(|h| h.exclusive || !writers)
        .take(4)
        .map(|h| format!("pid {}: {}", h.pid, h.what))
        .collect();
    if list.is_empty() {
        "another process".to_string()
    } else {
        format!("another process ({})", list.join("; "))
    }
}

/// What process `pid` is, for a message: "vdiskfs mount at MOUNTPOINT" for a vdiskfs
/// daemon, else its command name.
fn describe_process(pid: u32) -> String {
    if pid == std::process::id() {
        return "this process".to_string();
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let args: Vec<OsString> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| OsStr::from_bytes(a).to_os_string())
        .collect();
    let is_vdiskfs = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n.as_bytes().starts_with(b"vdiskfs"));
    if is_vdiskfs {
        if let Ok(cli) = crate::cli::Cli::try_parse_from(&args) {
            if let crate::cli::Command::Mount(m) = cli.command {
                return format!("vdiskfs mount at {}", mount_point(&m.mountpoint).display());
            }
        }
    }
    if comm.is_empty() {
        "unknown command".to_string()
    } else {
        comm
    }
}

/// The mount point a daemon was given, made absolute when it was relative (the daemon
/// runs in "/", so its start directory is unknown) and exactly one FUSE mount ends with
/// it.
fn mount_point(given: &Path) -> PathBuf {
    if given.is_absolute() {
        return given.to_path_buf();
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let found: Vec<PathBuf> = crate::commands::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.mount_point.ends_with(given))
        .map(|m| m.mount_point)
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        _ => given.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vdiskfs-access-{}-{name}", std::process::id()));
        std::fs::write(&p, b"data").unwrap();
        p
    }

    /// Until `observe()` gives `want` (for up to 30 s; then the last answer fails the
    /// test). Another test thread's fork holds a copy of our descriptors, and so of their
    /// locks, until it execs: for that moment it is one more holder (its own pid), or
    /// keeps a dropped descriptor's lock alive. What must be seen is unchanged.
    fn eventually<T: PartialEq + std::fmt::Debug>(want: T, observe: impl Fn() -> T) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = observe();
            if got == want {
                return;
            }
            if Instant::now() > deadline {
                assert_eq!(got, want);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn holders_are_found_with_their_lock_kind() {
        let p = temp("holders");
        let me = std::process::id();
        let a = open_file(&p, false).unwrap();
        let b = open_file(&p, false).unwrap();
        eventually(vec![], || holders(&a));
        assert!(lock(&b, false, false).unwrap());
        eventually(
            vec![Holder {
                pid: me,
                exclusive: false,
                what: "this process".into(),
            }],
            || holders(&a),
        );
        // Our own descriptor's lock is not listed.
        eventually(vec![], || holders(&b));
        b.unlock().unwrap();
        let w = open_file(&p, true).unwrap();
        assert!(lock(&w, true, false).unwrap());
        eventually(true, || holders(&a).first().is_some_and(|h| h.exclusive));
        eventually(format!("another process (pid {me}: this process)"), || {
            describe_holders(&a, true)
        });
        drop(w);
        eventually("another process".to_string(), || {
            describe_holders(&a, false)
        });
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn read_only_opens_leave_atime_alone() {
        let p = temp("atime");
        let old = std::time::UNIX_EPOCH + Duration::from_secs(946_684_800); // 2000-01-01
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_times(std::fs::FileTimes::new().set_accessed(old))
            .unwrap();
        drop(f);
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        open_file(&p, false)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().accessed().unwrap(), old);
        std::fs::remove_file(&p).unwrap();
    }
}
