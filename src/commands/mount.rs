//! `vdiskfs mount` and `vdiskfs umount`: the FUSE daemon's life cycle.
//!
//! Everything that can fail because of the user's input (options, the mount point, the
//! chain) is checked in the foreground process, so errors are printed and the command
//! exits non-zero before it detaches. Detaching is a fork: the parent waits on a pipe
//! until the child reports that the mount is live (or why it is not), then exits.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fuser::{Config, Session, SessionACL};

use crate::chain::{Chain, Intent};
use crate::cli::{parse_size, MountArgs, Transport, UmountArgs};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, MountFailure, MountRefusal, Result};
use crate::fuse::{start_notifier, FsOptions, VdiskFs, STATS_NAME};
use crate::sys;
use crate::uring;
use crate::vfs::{Vfs, MAX_IO};

/// The file system type shown in /proc/self/mountinfo ("fuse." + subtype).
#[cfg(test)]
const FSTYPE: &str = "fuse.vdiskfs";

/// Mount options after parsing `-o`.
#[derive(Debug, Clone)]
struct ParsedOptions {
    fsname: String,
    subtype: String,
    acl: SessionACL,
    default_permissions: bool,
    auto_unmount: bool,
    read_only: bool,
    nonempty: bool,
    /// Generic mount flags by name (nosuid, nodev, noexec, ...).
    flags: Vec<&'static str>,
    /// Anything else, passed to the kernel (or fusermount3) as is.
    custom: Vec<String>,
}

/// Parse the `-o` lists (each comma separated).
fn parse_options(lists: &[String], read_only: bool) -> Result<ParsedOptions> {
    let mut p = ParsedOptions {
        fsname: "vdiskfs".into(),
        subtype: "vdiskfs".into(),
        acl: SessionACL::Owner,
        default_permissions: false,
        auto_unmount: false,
        read_only,
        nonempty: false,
        flags: Vec::new(),
        custom: Vec::new(),
    };
    let (mut dev, mut suid) = (false, false);
    for opt in lists.iter().flat_map(|l| l.split(',')) {
        let opt = opt.trim();
        match opt {
            "" | "rw" | "async" | "exec" | "atime" => {}
            "ro" => p.read_only = true,
            "nonempty" => p.nonempty = true,
            "allow_other" => {
                p.acl = SessionACL::All;
                p.default_permissions = true;
            }
            "allow_root" => {
                if p.acl == SessionACL::Owner {
                    p.acl = SessionACL::RootAndOwner;
                }
                p.default_permissions = true;
            }
            "default_permissions" => p.default_permissions = true,
            "auto_unmount" => p.auto_unmount = true,
            "dev" => dev = true,
            "suid" => suid = true,
            "nodev" | "nosuid" => {}
            // What mount(8) and fstab use (userspace options, no kernel meaning here),
            // and access-time options (the file system keeps no access times).
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "owner" | "group"
            | "nofail" | "_netdev" | "loud" | "silent" | "diratime" | "nodiratime" | "relatime"
            | "norelatime" | "strictatime" | "nostrictatime" | "lazytime" | "nolazytime" => {}
            _ if opt.starts_with("x-") || opt.starts_with("comment=") => {}
            "noexec" => p.flags.push("noexec"),
            "noatime" => p.flags.push("noatime"),
            "sync" => p.flags.push("sync"),
            "dirsync" => p.flags.push("dirsync"),
            _ => {
                if let Some(v) = opt.strip_prefix("fsname=") {
                    p.fsname = v.to_string();
                } else if let Some(v) = opt.strip_prefix("subtype=") {
                    p.subtype = v.to_string();
                } else if opt.starts_with("fd=")
                    || opt.starts_with("rootmode=")
                    || opt.starts_with("user_id=")
                    || opt.starts_with("group_id=")
                {
                    return Err(Error::Mount(MountRefusal::Reserved {
                        option: opt.to_string(),
                    }));
                } else if opt.contains(char::is_whitespace) {
                    return Err(Error::Mount(MountRefusal::WhiteSpace {
                        option: opt.to_string(),
                    }));
                } else if opt.starts_with("max_read=") || opt.starts_with("blksize=") {
                    // The kernel's own FUSE options that vdiskfs does not set itself.
                    p.custom.push(opt.to_string());
                } else {
                    // The kernel would only say EINVAL; name the culprit (a typo in an
                    // fstab line, say).
                    return Err(Error::Mount(MountRefusal::Unknown {
                        option: opt.to_string(),
                    }));
                }
            }
        }
    }
    if p.auto_unmount && p.acl == SessionACL::Owner {
        return Err(Error::Mount(MountRefusal::AutoUnmountAlone));
    }
    if !dev {
        p.flags.push("nodev");
    }
    if !suid {
        p.flags.push("nosuid");
    }
    if p.read_only {
        p.flags.push("ro");
    }
    Ok(p)
}

impl ParsedOptions {
    /// The FUSE-specific part of the kernel's mount data (after fd=, rootmode=, ...).
    fn fuse_data(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.acl != SessionACL::Owner {
            v.push("allow_other".to_string());
        }
        if self.default_permissions {
            v.push("default_permissions".to_string());
        }
        v.extend(self.custom.iter().cloned());
        v
    }

    fn ms_flags(&self) -> libc::c_ulong {
        let mut f = 0;
        for name in &self.flags {
            f |= match *name {
                "nodev" => libc::MS_NODEV,
                "nosuid" => libc::MS_NOSUID,
                "noexec" => libc::MS_NOEXEC,
                "noatime" => libc::MS_NOATIME,
                "sync" => libc::MS_SYNCHRONOUS,
                "dirsync" => libc::MS_DIRSYNC,
                "ro" => libc::MS_RDONLY,
                _ => 0,
            };
        }
        f
    }

    /// The `-o` list for fusermount3.
    fn fusermount_options(&self) -> String {
        // fusermount3 takes `\` as an escape, so a comma in the name stays in it.
        let fsname = self.fsname.replace('\\', "\\\\").replace(',', "\\,");
        let mut v = vec![
            format!("fsname={fsname}"),
            format!("subtype={}", self.subtype),
        ];
        v.extend(self.flags.iter().map(|s| s.to_string()));
        if self.auto_unmount {
            v.push("auto_unmount".into());
        }
        v.extend(self.fuse_data());
        v.join(",")
    }
}

/// A live mount's connection to the kernel: the /dev/fuse descriptor, plus (with
/// `auto_unmount`) the socket whose closing tells fusermount3 to unmount.
struct Mounted {
    dev: OwnedFd,
    _auto_unmount: Option<OwnedFd>,
}

/// Mount a FUSE file system at `mountpoint`: with mount(2) when root, else (or for
/// auto_unmount, or when the kernel says EPERM) through the setuid fusermount3.
fn fuse_mount(mountpoint: &Path, p: &ParsedOptions) -> Result<Mounted> {
    if sys::euid() == 0 && !p.auto_unmount {
        match mount_sys(mountpoint, p) {
            Ok(dev) => {
                return Ok(Mounted {
                    dev,
                    _auto_unmount: None,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                log::debug!("mount(2) refused ({e}); trying fusermount3");
            }
            Err(e) => return Err(Error::file(mountpoint, "mount", e)),
        }
    }
    mount_fusermount(mountpoint, p)
}

fn mount_sys(mountpoint: &Path, p: &ParsedOptions) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut data = vec![
        format!("fd={}", dev.as_raw_fd()),
        "rootmode=40000".to_string(),
        format!("user_id={}", sys::uid()),
        format!("group_id={}", sys::gid()),
    ];
    data.extend(p.fuse_data());
    sys::mount(
        &p.fsname,
        mountpoint,
        &format!("fuse.{}", p.subtype),
        p.ms_flags(),
        &data.join(","),
    )?;
    Ok(dev.into())
}

fn mount_fusermount(mountpoint: &Path, p: &ParsedOptions) -> Result<Mounted> {
    use std::process::Stdio;
    // Our end must not leak into fusermount3 (or any later child); theirs must reach it,
    // so it is created without close-on-exec (this process has no other threads yet).
    let (ours, theirs) = sys::socketpair_for_child()
        .map_err(|e| Error::file(Path::new("socketpair"), "create", e))?;
    let mut child = None;
    let mut last_err = None;
    for bin in ["fusermount3", "fusermount"] {
        match Command::new(bin)
            .arg("-o")
            .arg(p.fusermount_options())
            .arg("--")
            .arg(mountpoint)
            .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => {
                child = Some(c);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    drop(theirs);
    let Some(mut child) = child else {
        return Err(Error::file(
            Path::new("fusermount3"),
            "run (install the fuse3 package)",
            last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
        ));
    };
    match sys::recv_fd(&ours) {
        Ok(dev) => {
            if p.auto_unmount {
                // fusermount3 stays to unmount when `ours` closes (when we exit).
                drop(child.stderr.take());
                Ok(Mounted {
                    dev,
                    _auto_unmount: Some(ours),
                })
            } else {
                drop(ours);
                let _ = child.wait();
                Ok(Mounted {
                    dev,
                    _auto_unmount: None,
                })
            }
        }
        Err(_) => {
            drop(ours);
            let mut msg = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut msg);
            }
            let _ = child.wait();
            Err(Error::MountFailed(MountFailure::Mount {
                mountpoint: mountpoint.to_path_buf(),
                msg: msg.trim().to_string(),
            }))
        }
    }
}

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount's source (for vdiskfs, the image); only the tests read it so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub source: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).is_some_and(|d| {
            (b'0'..=b'3').contains(&d[0]) && d[1..].iter().all(|c| (b'0'..=b'7').contains(c))
        });
        if b[i] == b'\\' && octal {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Parse mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some(fstype), Some(source)) = (r.next(), r.next()) else {
            continue;
        };
        v.push(MountEntry {
            mount_point: PathBuf::from(unescape_mountinfo(mp)),
            fstype: unescape_mountinfo(fstype).to_string_lossy().into_owned(),
            source: unescape_mountinfo(source).to_string_lossy().into_owned(),
        });
    }
    v
}

/// The topmost mount at exactly `path` (already canonical), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

fn is_enotconn(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTCONN)
}

fn stale_mount_error(path: &Path) -> Error {
    Error::MountFailed(MountFailure::Stale {
        path: path.to_path_buf(),
    })
}

/// Check that `path` can be mounted on: exists, is a directory, is not a mount point,
/// and is empty (unless `nonempty`). Returns the canonical path.
fn check_mountpoint(path: &Path, nonempty: bool) -> Result<PathBuf> {
    let md = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Mount(MountRefusal::MountPointMissing {
                path: path.to_path_buf(),
            }))
        }
        Err(e) if is_enotconn(&e) => return Err(stale_mount_error(path)),
        Err(e) => return Err(Error::file(path, "mount point", e)),
    };
    if !md.is_dir() {
        return Err(Error::Mount(MountRefusal::MountPointNotDirectory {
            path: path.to_path_buf(),
        }));
    }
    let canon = path
        .canonicalize()
        .map_err(|e| Error::file(path, "mount point", e))?;
    let already = || {
        Error::Mount(MountRefusal::AlreadyMountPoint {
            path: path.to_path_buf(),
        })
    };
    if mount_at(&canon).is_some() {
        return Err(already());
    }
    if let Some(parent) = canon.parent() {
        if let Ok(pm) = std::fs::metadata(parent) {
            if pm.dev() != md.dev() {
                return Err(already());
            }
        }
    }
    if !nonempty {
        let mut rd = std::fs::read_dir(&canon).map_err(|e| Error::file(path, "mount point", e))?;
        if rd.next().is_some() {
            return Err(Error::Mount(MountRefusal::MountPointNotEmpty {
                path: path.to_path_buf(),
            }));
        }
    }
    Ok(canon)
}

/// The machine's physical memory in bytes (MemTotal of /proc/meminfo), if known.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name == STATS_NAME
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(Error::Mount(MountRefusal::Name {
            name: name.to_string(),
            stats: STATS_NAME,
        }));
    }
    Ok(())
}

fn check_dev_fuse() -> Result<()> {
    match std::fs::metadata("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(Error::MountFailed(MountFailure::NoDevFuse))
        }
        Err(e) => Err(Error::file(Path::new("/dev/fuse"), "stat", e)),
    }
}

/// Unmount `path`. As root with umount(2), otherwise with `fusermount3 -u`. With `lazy`,
/// a busy mount (e.g. `disk.raw` attached to a loop device) is detached lazily: it
/// disappears from the name space now and the daemon ends when the last user closes it.
pub fn unmount(path: &Path, lazy: bool) -> Result<()> {
    // A file closed just now may still pin the mount: the kernel sends FUSE RELEASE in
    // the background and holds the file's references until the daemon answers, so an
    // unmount right after `close` can see EBUSY for a moment (seen under load). Only a
    // mount still busy after this grace period is reported busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match unmount_once(path, lazy) {
            Err(Error::Mount(MountRefusal::Busy { .. }))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

fn unmount_once(path: &Path, lazy: bool) -> Result<()> {
    if sys::euid() == 0 {
        let Err(e) = sys::umount(path, false) else {
            return Ok(());
        };
        if e.raw_os_error() == Some(libc::EBUSY) && lazy {
            log::warn!(
                "{} is busy (disk image still open, e.g. by a loop device); detaching lazily: \
                 the daemon ends when the last user closes it",
                path.display()
            );
            return sys::umount(path, true).map_err(|e| Error::file(path, "umount", e));
        }
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(busy_error(path));
        }
        return Err(Error::file(path, "umount", e));
    }
    let out = fusermount(&["-u"], path)?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if lazy {
        log::warn!("{msg}; detaching lazily");
        let out = fusermount(&["-u", "-z"], path)?;
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::MountFailed(MountFailure::Unmount {
            lazy: true,
            msg,
        }));
    }
    if msg.contains("busy") {
        return Err(busy_error(path));
    }
    Err(Error::MountFailed(MountFailure::Unmount {
        lazy: false,
        msg,
    }))
}

fn busy_error(path: &Path) -> Error {
    Error::Mount(MountRefusal::Busy {
        path: path.to_path_buf(),
    })
}

fn fusermount(args: &[&str], path: &Path) -> Result<std::process::Output> {
    let mut last = None;
    for bin in ["fusermount3", "fusermount"] {
        match Command::new(bin).args(args).arg("--").arg(path).output() {
            Ok(o) => return Ok(o),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::file(
        Path::new("fusermount3"),
        "run (install the fuse3 package)",
        last.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
    ))
}

/// `vdiskfs umount MOUNTPOINT`.
pub fn umount(args: &UmountArgs) -> Result<i32> {
    let path = &args.mountpoint;
    let canon = match path.canonicalize() {
        Ok(c) => c,
        Err(e) if is_enotconn(&e) => path.to_path_buf(),
        Err(e) => return Err(Error::file(path, "mount point", e)),
    };
    match mount_at(&canon) {
        None => Err(Error::MountFailed(MountFailure::NotMounted {
            path: path.to_path_buf(),
        })),
        Some(m) if !m.fstype.starts_with("fuse") => {
            Err(Error::MountFailed(MountFailure::NotVdiskfs {
                path: path.to_path_buf(),
                fstype: m.fstype.clone(),
            }))
        }
        Some(_) => {
            // Learn the daemon's pid from .stats before unmounting, then wait for it to
            // finish: it flushes and closes the image after the unmount, and a script
            // that reopens the image right after `vdiskfs umount` must find it closed.
            let pid = std::fs::read_to_string(canon.join(".stats"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .next()?
                        .strip_prefix("pid ")?
                        .trim()
                        .parse::<u32>()
                        .ok()
                });
            unmount(&canon, false)?;
            if let Some(pid) = pid {
                // Running = /proc/PID/stat exists and its state is not Z (a zombie has
                // finished; its parent just has not reaped it yet).
                // A zombie leader is finished only once its other threads are gone too:
                // until the last of them exits, they share (and keep open) the descriptor
                // table, the image and its lock included (seen under load with the
                // io_uring transport's many threads).
                let running = || {
                    let zombie = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                        Ok(s) => s
                            .rsplit_once(')')
                            .and_then(|(_, rest)| rest.trim_start().chars().next())
                            .is_some_and(|c| c == 'Z'),
                        Err(_) => return false,
                    };
                    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|d| d.count())
                        .unwrap_or(0);
                    !zombie || threads > 1
                };
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                while running() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                if running() {
                    log::warn!("the vdiskfs daemon (pid {pid}) is still running after the unmount");
                }
            }
            Ok(0)
        }
    }
}

/// The write end of the pipe to the waiting parent (detached mode only).
struct Ready(Option<File>);

impl Ready {
    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Wait for SIGINT/SIGTERM/SIGHUP; on each, flush and unmount.
fn spawn_signal_thread(disk: Arc<Disk>, mountpoint: PathBuf, writable: bool) {
    let r = std::thread::Builder::new()
        .name("vdiskfs-signals".into())
        .spawn(move || loop {
            // The signals are blocked in every thread, so this is their only taker.
            let sig = match sys::wait_termination_signal() {
                Ok(s) => s,
                Err(e) => {
                    log::error!("sigwait: {e}");
                    return;
                }
            };
            log::info!("signal {sig}: unmounting {}", mountpoint.display());
            if writable {
                if let Err(e) = disk.flush() {
                    log::error!("flush before unmount: {e}");
                }
            }
            if let Err(e) = unmount(&mountpoint, true) {
                log::error!("unmount {}: {e}", mountpoint.display());
            }
        });
    if let Err(e) = r {
        log::error!("cannot start the signal thread: {e}");
    }
}

/// Open (create, append to) the `--log-file` before detaching, so that a path that
/// cannot be written is an error the user sees, not logs silently lost.
fn open_log_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, "open log file (--log-file)", e))
}

/// Redirect stdin and stdout to /dev/null, stderr to `log` or /dev/null.
fn detach_stdio(log: Option<&File>) {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    sys::redirect_stdio(&null, log.unwrap_or(&null));
}

struct Prepared {
    disk: Arc<Disk>,
    fs: VdiskFs,
    config: Config,
    options: ParsedOptions,
    mountpoint: PathBuf,
    writable: bool,
    transport: Transport,
    /// Set at INIT when the kernel agreed to FUSE over io_uring (only asked for when
    /// `transport` allows it and nothing is known to be missing).
    uring_agreed: Option<Arc<std::sync::atomic::AtomicBool>>,
    threads: usize,
}

fn prepare(args: &MountArgs) -> Result<Prepared> {
    check_name(&args.name)?;
    let mut parsed = parse_options(&args.options, args.read_only)?;
    // The mount's source (findmnt, mountinfo) is the image, as for a disk: mount(8)
    // also compares it with fstab's to tell whether an entry is mounted already.
    let fsname_given = args
        .options
        .iter()
        .flat_map(|l| l.split(','))
        .any(|o| o.trim().starts_with("fsname="));
    if !fsname_given {
        if let Some(p) = std::fs::canonicalize(&args.image)
            .ok()
            .and_then(|p| p.to_str().map(str::to_string))
        {
            parsed.fsname = p;
        }
    }
    let cache_block = parse_size(&args.cache_block)
        .map_err(|problem| Error::Mount(MountRefusal::CacheBlockSize { problem }))?;
    if cache_block < 4096 || !cache_block.is_power_of_two() || cache_block > 64 << 20 {
        return Err(Error::Mount(MountRefusal::CacheBlock {
            value: args.cache_block.clone(),
        }));
    }
    let cache_bytes = args.cache_size.checked_mul(1 << 20).ok_or(Error::Mount(
        MountRefusal::CacheSizeOverflow {
            mib: args.cache_size,
        },
    ))?;
    // The cache takes memory only as it fills, but a size the machine cannot hold would
    // end in an allocation failure once enough was read.
    if let Some(total) = physical_memory() {
        if cache_bytes > total {
            return Err(Error::Mount(MountRefusal::CacheSizeOverMemory {
                mib: args.cache_size,
                memory_mib: total >> 20,
            }));
        }
    }
    if args.threads == 0 || args.threads > 256 {
        return Err(Error::Mount(MountRefusal::Threads {
            threads: args.threads,
        }));
    }
    let mountpoint = check_mountpoint(&args.mountpoint, parsed.nonempty)?;
    check_dev_fuse()?;

    let intent = if parsed.read_only {
        Intent::Inspect
    } else {
        Intent::WriteTop
    };
    // Warnings are logged as the chain is opened.
    let chain = Chain::open(&args.image, &args.chain.options(intent))?;
    let disk = Arc::new(Disk::new(
        chain,
        DiskOptions {
            cache_bytes,
            cache_block,
        },
    ));
    let (uid, gid) = (sys::uid(), sys::gid());
    let mut vfs = Vfs::new(
        disk.clone(),
        FsOptions {
            name: OsString::from(&args.name),
            read_only: parsed.read_only,
            uid,
            gid,
            direct_io: args.direct_io,
        },
    );
    if !args.no_partitions {
        // Its warnings are logged (on the terminal: we have not detached yet).
        vfs.enable_partitions();
    }
    let mut fs = VdiskFs::from_vfs(vfs);
    let transport = Transport::resolve(args.transport)?;
    let uring_agreed = match transport {
        Transport::Classic => None,
        Transport::Uring | Transport::Auto => match uring::unavailable() {
            None => Some(fs.ask_for_uring()),
            Some(why) if transport == Transport::Uring => {
                return Err(Error::MountFailed(MountFailure::Uring {
                    mountpoint: args.mountpoint.clone(),
                    why,
                }))
            }
            Some(why) => {
                log::info!("transport: classic (/dev/fuse): {why}");
                None
            }
        },
    };
    let writable = fs.is_writable();
    let mut config = Config::default();
    config.acl = parsed.acl;
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    Ok(Prepared {
        disk,
        fs,
        config,
        options: parsed,
        mountpoint,
        writable,
        transport,
        uring_agreed,
        threads: args.threads,
    })
}

/// After INIT: serve the rings if the kernel agreed to FUSE over io_uring; None when the
/// classic transport serves (said once at -v), an error when `--transport uring` cannot
/// be had.
fn start_uring(
    vfs: &Arc<Vfs>,
    dev: &OwnedFd,
    transport: Transport,
    agreed: Option<&Arc<std::sync::atomic::AtomicBool>>,
    threads: usize,
) -> std::result::Result<Option<uring::Running>, String> {
    let Some(agreed) = agreed else {
        if transport == Transport::Classic {
            log::info!("transport: classic (/dev/fuse), as --transport classic asks");
        }
        return Ok(None);
    };
    if !agreed.load(std::sync::atomic::Ordering::SeqCst) {
        let why = "the kernel did not offer FUSE_OVER_IO_URING at INIT";
        if transport == Transport::Uring {
            return Err(why.into());
        }
        log::info!("transport: classic (/dev/fuse): {why}");
        return Ok(None);
    }
    match uring::start(vfs.clone(), dev, threads, (MAX_IO as usize).max(8192)) {
        Ok(r) => {
            vfs.set_transport("uring");
            log::info!(
                "transport: FUSE over io_uring ({} queues, {} ring threads)",
                r.queues,
                r.threads
            );
            Ok(Some(r))
        }
        // Unmounted before the rings were up: the session ends at once as well.
        Err(uring::StartError::Gone) => {
            log::debug!("the connection ended before the rings were registered");
            Ok(None)
        }
        // The kernel has gone back to /dev/fuse for this connection.
        Err(uring::StartError::Failed(e)) if transport == Transport::Auto => {
            log::info!("transport: classic (/dev/fuse): io_uring: {e}");
            Ok(None)
        }
        Err(uring::StartError::Failed(e)) => Err(e),
    }
}

/// Let the kernel read ahead 1 MiB at a time on this mount (FUSE mounts start at
/// 128 KiB): sequential readers then send 1 MiB requests, one round trip instead of
/// eight (measured: ~2.3 -> ~3 GB/s on a depth-3 chain). Needs root; otherwise, or if
/// anything is unexpected, the default stays. The device number comes from mountinfo:
/// a stat of the mount point would wait for this very daemon to answer.
fn raise_readahead(mountpoint: &Path) {
    // Canonicalise the parent only: a lookup of the mount point itself could wait for
    // this daemon, which is not serving yet.
    let (Some(parent), Some(name)) = (mountpoint.parent(), mountpoint.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(want) = std::fs::canonicalize(parent).map(|p| p.join(name)) else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && Path::new(f[4]) == want).then(|| f[2].to_string())
    });
    if let Some(dev) = dev {
        let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        if let Err(e) = std::fs::write(&knob, "1024") {
            log::debug!("{knob}: {e} (read-ahead stays at the kernel's default)");
        }
    }
}

/// Mount and serve until unmounted. `ready` is told "OK" once the mount is live, or the
/// error if mounting fails.
fn serve(p: Prepared, mut ready: Ready, log_file: Option<File>, detached: bool) -> Result<i32> {
    let Prepared {
        disk,
        fs,
        config,
        options,
        mountpoint,
        writable,
        transport,
        uring_agreed,
        threads,
    } = p;
    sys::block_termination_signals();
    let notify = fs.notify_slot();
    let vfs = fs.vfs();
    let mut rings = None;
    let session = fuse_mount(&mountpoint, &options).and_then(|m| {
        let dev = m
            .dev
            .try_clone()
            .map_err(|e| Error::file(Path::new("/dev/fuse"), "dup", e))?;
        let acl = config.acl;
        match Session::from_fd(fs, dev, acl, config) {
            Ok(s) => match start_uring(&vfs, &m.dev, transport, uring_agreed.as_ref(), threads) {
                Ok(r) => {
                    rings = r;
                    Ok((s, m))
                }
                Err(e) => {
                    drop(s);
                    let _ = unmount(&mountpoint, true);
                    Err(Error::MountFailed(MountFailure::Uring {
                        mountpoint: mountpoint.to_path_buf(),
                        why: e.to_string(),
                    }))
                }
            },
            Err(e) => {
                let _ = unmount(&mountpoint, true);
                Err(Error::MountFailed(MountFailure::Handshake {
                    mountpoint: mountpoint.to_path_buf(),
                    error: e.to_string(),
                }))
            }
        }
    });
    let (session, _mounted) = match session {
        Ok(s) => {
            start_notifier(&notify, s.0.notifier());
            s
        }
        Err(err) => {
            if detached {
                // The waiting parent prints it.
                ready.send(&format!("ERR {err}\n"));
                return Ok(1);
            }
            return Err(err);
        }
    };
    log::info!(
        "mounted {} ({} bytes) at {}",
        disk.layers()[0].path().display(),
        disk.len(),
        mountpoint.display()
    );
    raise_readahead(&mountpoint);
    ready.send("OK\n");
    drop(ready);
    if detached {
        detach_stdio(log_file.as_ref());
    }
    spawn_signal_thread(disk.clone(), mountpoint.clone(), writable);
    let res = session.run();
    if res.is_err() {
        // The loop failed while the mount may still be there: do not leave it hanging.
        let _ = unmount(&mountpoint, true);
    }
    if let Some(r) = rings {
        // The connection is gone, so the kernel ends every ring command; the threads
        // may still be answering one request each.
        if !r.wait(std::time::Duration::from_secs(30)) {
            log::warn!("ring threads still running 30 s after the unmount");
        }
    }
    if writable {
        if let Err(e) = disk.close() {
            log::error!("flush at exit: {e}");
        }
    }
    log::info!(
        "unmounted {}; counters:\n{}",
        mountpoint.display(),
        disk.stats_text().trim_end()
    );
    match res {
        Ok(()) => Ok(0),
        Err(e) => Err(Error::MountFailed(MountFailure::SessionEnded {
            mountpoint: mountpoint.to_path_buf(),
            error: e.to_string(),
        })),
    }
}

pub fn run(args: &MountArgs, _verbose: u8) -> Result<i32> {
    // `-o parent=...` and the other vdiskfs options, as fstab gives them.
    let args = &super::mount_helper::absorb_own_options(args)?;
    // Only a detached daemon writes to the log file (in the foreground, stderr stays).
    let log_file = match &args.log_file {
        Some(p) if !args.foreground => Some(open_log_file(p)?),
        _ => None,
    };
    let prepared = prepare(args)?;
    if args.foreground {
        return serve(prepared, Ready(None), None, false);
    }
    let (rd, wr) = sys::pipe().map_err(|e| Error::file(Path::new("pipe"), "create", e))?;
    // The chain was opened on this thread and fuser's workers start after the fork, so
    // this process is single-threaded here, as `sys::fork` requires.
    let pid = match sys::fork().map_err(|e| Error::file(Path::new("fork"), "fork", e))? {
        sys::Forked::Parent(pid) => pid,
        sys::Forked::Child => {
            // Child: a session of its own, so the terminal's signals and hangup do not
            // reach it.
            drop(rd);
            sys::setsid();
            let _ = std::env::set_current_dir("/");
            let code = match serve(prepared, Ready(Some(wr)), log_file, true) {
                Ok(c) => c,
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
    };
    // Parent: wait for the daemon's word, then exit without running destructors (the
    // daemon owns the image files now).
    drop(wr);
    let mut msg = String::new();
    let mut rd = rd;
    let _ = rd.read_to_string(&mut msg);
    if msg.starts_with("OK") {
        std::process::exit(0);
    }
    match msg.strip_prefix("ERR ") {
        Some(m) => eprintln!("vdiskfs: {}", m.trim_end()),
        None => {
            let status = sys::wait_status(pid);
            eprintln!("vdiskfs: the daemon exited before the mount was ready (status {status})");
        }
    }
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw\n\
                    42 27 0:39 / /tmp/a\\040b/m ro,nosuid - fuse.vdiskfs vdiskfs ro,user_id=0\n\
                    garbage line\n";
        let v = parse_mountinfo(text);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].mount_point, Path::new("/mnt/parent"));
        assert_eq!(v[0].fstype, "ext3");
        assert_eq!(v[1].mount_point, Path::new("/tmp/a b/m"));
        assert_eq!(v[1].fstype, FSTYPE);
        assert_eq!(v[1].source, "vdiskfs");
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape_mountinfo("a\\9b\\04"), OsString::from("a\\9b\\04"));
    }

    #[test]
    fn options_parse() {
        let p = parse_options(
            &["allow_other,noexec".into(), "max_read=65536".into()],
            false,
        )
        .unwrap();
        assert_eq!(p.acl, SessionACL::All);
        assert!(
            p.default_permissions,
            "allow_other implies default_permissions"
        );
        assert!(p.flags.contains(&"noexec") && p.flags.contains(&"nodev"));
        assert_eq!(p.custom, ["max_read=65536"]);
        assert!(p.fuse_data().contains(&"allow_other".to_string()));
        assert_ne!(p.ms_flags() & libc::MS_NOEXEC, 0);
        assert_eq!(p.ms_flags() & libc::MS_RDONLY, 0);

        let p = parse_options(&["ro,suid,fsname=x".into()], false).unwrap();
        assert!(p.read_only && !p.flags.contains(&"nosuid"));
        assert_eq!(p.acl, SessionACL::Owner);
        assert!(!p.default_permissions);
        assert_ne!(p.ms_flags() & libc::MS_RDONLY, 0);
        assert!(p
            .fusermount_options()
            .starts_with("fsname=x,subtype=vdiskfs"));

        // What mount(8), fstab and mount.fuse3 pass along is accepted and not sent on.
        let p = parse_options(
            &["rw,defaults,noauto,user,_netdev,nofail,x-systemd.automount,comment=x,relatime,dev,suid".into()],
            false,
        )
        .unwrap();
        assert!(p.custom.is_empty(), "{:?}", p.custom);
        assert!(!p.flags.contains(&"nodev") && !p.flags.contains(&"nosuid"));
        let p = ParsedOptions {
            fsname: "/i/a,b\\c.vhdx".into(),
            ..p
        };
        assert!(p
            .fusermount_options()
            .starts_with("fsname=/i/a\\,b\\\\c.vhdx,"));

        let refusal = |opt: &str| match parse_options(&[opt.into()], false) {
            Err(Error::Mount(r)) => r,
            other => panic!("{opt}: {other:?}"),
        };
        assert_eq!(refusal("auto_unmount"), MountRefusal::AutoUnmountAlone);
        assert_eq!(
            refusal("fd=3"),
            MountRefusal::Reserved {
                option: "fd=3".into()
            }
        );
        assert_eq!(
            refusal("searchdir=/x"),
            MountRefusal::Unknown {
                option: "searchdir=/x".into()
            }
        );
        assert_eq!(
            refusal("user_id=0"),
            MountRefusal::Reserved {
                option: "user_id=0".into()
            }
        );
        assert_eq!(
            refusal("max_read=1 2"),
            MountRefusal::WhiteSpace {
                option: "max_read=1 2".into()
            }
        );
    }

    #[test]
    fn names() {
        assert!(check_name("disk.raw").is_ok());
        for bad in ["", ".", "..", ".stats", "a/b", "a\0b"] {
            assert!(
                matches!(
                    check_name(bad),
                    Err(Error::Mount(MountRefusal::Name { name, stats: ".stats" })) if name == bad
                ),
                "{bad:?}"
            );
        }
    }

    /// The mount point checks, each refusal by its variant.
    #[test]
    fn mount_point_refusals() {
        let t = crate::test_support::TempDir::new("mountpoint-refusals");
        let missing = t.join("missing");
        assert!(matches!(
            check_mountpoint(&missing, false),
            Err(Error::Mount(MountRefusal::MountPointMissing { path })) if path == missing
        ));
        let file = t.file("file", "x");
        assert!(matches!(
            check_mountpoint(&file, false),
            Err(Error::Mount(MountRefusal::MountPointNotDirectory { path })) if path == file
        ));
        let full = t.dir("full");
        std::fs::write(full.join("f"), "x").unwrap();
        assert!(matches!(
            check_mountpoint(&full, false),
            Err(Error::Mount(MountRefusal::MountPointNotEmpty { path })) if path == full
        ));
        assert!(check_mountpoint(&full, true).is_ok());
        assert!(check_mountpoint(&t.dir("empty"), false).is_ok());
        // /proc is a mount point on every Linux machine.
        assert!(matches!(
            check_mountpoint(Path::new("/proc"), true),
            Err(Error::Mount(MountRefusal::AlreadyMountPoint { .. }))
        ));
    }
}
