//! Durability, in one place: how a new file appears (atomically, never over an existing
//! one unless asked to replace it), and the poison latch every writer's fdatasyncs go
//! through. The ordered flush points (`ImageFile::flush_ordered`) and bounded reads
//! (`ImageFile::read_vec_at`) use these from `ImageFile`.
//!
//! **Atomic create.** The content is written to `.NAME.vdiskfs-tmp-PID` in the target's
//! directory, fsynced, and moved into place in one step: renameat2(RENAME_NOREPLACE)
//! (or, where the file system lacks it, link(2) then unlink of the temporary name, link
//! also failing on an existing target), or with `replace` a plain rename over the old
//! file. Then the directory is fsynced, so the new entry survives a crash. A file that
//! appeared meanwhile is never replaced; on any error the temporary file is removed. A
//! run killed meanwhile leaves the temporary file; `remove_stale_temps` removes those
//! whose process is gone.
//!
//! **Poison.** Linux reports a writeback error once: after a failed fdatasync, data
//! acknowledged earlier may be gone and a later fdatasync may succeed anyway. No
//! metadata may be written after that (it could point at lost data), so the first failed
//! fdatasync of a file latches, and every later write, flush and close of it fails.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Request, Result};

/// Why a write or flush fails after an fdatasync failed.
pub const POISONED_WRITE: &str =
    "write (an earlier flush failed; data may be lost, so nothing more is written)";
/// Why a close fails after an fdatasync failed.
pub const POISONED_CLOSE: &str = "close (an earlier flush failed; the last writes may be lost)";

/// The poison latch of one file (see the top of this file). Set by the first failed
/// fdatasync, never cleared.
#[derive(Debug, Default)]
pub struct Poison(AtomicBool);

impl Poison {
    pub fn new() -> Poison {
        Poison::default()
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// EIO naming `path` and `op` (`POISONED_WRITE`, `POISONED_CLOSE`) once set.
    pub fn check(&self, path: &Path, op: &'static str) -> Result<()> {
        if self.is_set() {
            return Err(Error::io(
                path,
                op,
                0,
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
}

/// The directory a new `path` goes into.
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary name `create_file_atomically` uses for `path` in process `pid`.
fn temp_name(dir: &Path, name: &OsStr, pid: u32) -> PathBuf {
    dir.join(format!(".{}.vdiskfs-tmp-{pid}", name.to_string_lossy()))
}

/// The one "never overwrite" check (the final guarantee is the no-replace move of
/// `create_file_atomically`; this gives the clear message early, before any work).
pub fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(already_exists(path));
    }
    Ok(())
}

fn already_exists(path: &Path) -> Error {
    Error::Request(Request::AlreadyExists {
        path: path.to_path_buf(),
    })
}

/// Create `path` atomically and never over an existing file (see the top of this file).
/// The directory is created when missing, as the Virtual PC API did.
pub fn create_new_file(path: &Path, fill: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    create_file_atomically(path, false, fill)
}

/// Remove temporary files a killed earlier run left for `path` (same name pattern, a
/// process id that no longer exists). Returns how many were removed.
pub fn remove_stale_temps(path: &Path) -> usize {
    let dir = dir_of(path);
    let Some(name) = path.file_name() else {
        return 0;
    };
    let prefix = format!(".{}.vdiskfs-tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let fname = e.file_name();
        let Some(pid) = fname
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            log::info!("removed {} left by an interrupted run", e.path().display());
            removed += 1;
        }
    }
    removed
}

/// `fill` writes the content of `path` into a new temporary file, which is fsynced and
/// moved into place: without `replace` never over an existing file (an error naming
/// `path`), with `replace` atomically over it (readers see the old or the new file,
/// never a part). On any error the temporary file is removed and `path` is untouched.
pub fn create_file_atomically(
    path: &Path,
    replace: bool,
    fill: impl FnOnce(&File) -> Result<()>,
) -> Result<()> {
    if !replace {
        refuse_existing(path)?;
    }
    let dir = dir_of(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, "create directory", e))?;
    let name = path.file_name().ok_or_else(|| {
        Error::Request(Request::NotAFileName {
            path: path.to_path_buf(),
        })
    })?;
    let tmp = temp_name(&dir, name, std::process::id());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        // The temporary name means nothing to the user: name the file asked for.
        .map_err(|e| Error::file(path, "create", e))?;
    let result = (|| {
        fill(&f)?;
        f.sync_all().map_err(|e| Error::file(path, "fsync", e))?;
        drop(f);
        place(&tmp, path, replace)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Make the new directory entry durable.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Move the finished temporary file `tmp` to `path` (over it only with `replace`).
fn place(tmp: &Path, path: &Path, replace: bool) -> Result<()> {
    if replace {
        return std::fs::rename(tmp, path).map_err(|e| Error::file(path, "rename into place", e));
    }
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => Err(already_exists(path)),
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            // A file system without RENAME_NOREPLACE: link fails if the target exists.
            std::fs::hard_link(tmp, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    already_exists(path)
                } else {
                    Error::file(path, "link into place", e)
                }
            })?;
            let _ = std::fs::remove_file(tmp);
            Ok(())
        }
        Err(e) => Err(Error::file(
            path,
            "move into place",
            io::Error::from_raw_os_error(e as i32),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn create_never_overwrites_and_leaves_no_temp() {
        let d = TempDir::new("durable-create");
        let p = d.join("sub/new.img");
        create_new_file(&p, |f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"new", 0)
                .map_err(|e| Error::file(&p, "w", e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let e = create_new_file(&p, |_| Ok(())).unwrap_err();
        assert!(
            matches!(&e, Error::Request(Request::AlreadyExists { path }) if *path == p),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(names(&d.join("sub")), ["new.img"]);
    }

    #[test]
    fn a_failed_fill_leaves_nothing() {
        let d = TempDir::new("durable-fail");
        let p = d.join("x.img");
        let boom = || Error::Internal(crate::error::Internal::BitmapNotLoaded { chunk: 7 });
        let e = create_new_file(&p, |_| Err(boom())).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Internal(crate::error::Internal::BitmapNotLoaded { chunk: 7 })
            ),
            "the fill's own error: {e}"
        );
        assert!(names(d.path()).is_empty(), "{:?}", names(d.path()));
    }

    #[test]
    fn a_file_appearing_meanwhile_is_not_replaced() {
        let d = TempDir::new("durable-race");
        let p = d.join("x.img");
        let e = create_new_file(&p, |_| {
            std::fs::write(&p, b"theirs").unwrap();
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(&e, Error::Request(Request::AlreadyExists { path }) if *path == p),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"theirs");
        assert_eq!(names(d.path()), ["x.img"]);
    }

    #[test]
    fn replace_swaps_the_whole_file() {
        let d = TempDir::new("durable-replace");
        let p = d.join("x.img");
        std::fs::write(&p, b"old content").unwrap();
        create_file_atomically(&p, true, |f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"new", 0)
                .map_err(|e| Error::file(&p, "w", e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(names(d.path()), ["x.img"]);
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let d = TempDir::new("durable-stale");
        let p = d.join("x.img");
        // A pid above pid_max (4194304 at most) belongs to no process.
        let dead = temp_name(d.path(), OsStr::new("x.img"), 99_999_999);
        let mine = temp_name(d.path(), OsStr::new("x.img"), std::process::id());
        let other = d.join(".y.img.vdiskfs-tmp-99999999");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"t").unwrap();
        }
        assert_eq!(remove_stale_temps(&p), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn the_latch_stays_set() {
        let p = Poison::new();
        assert!(p.check(Path::new("f"), POISONED_WRITE).is_ok());
        p.set();
        let e = p.check(Path::new("f"), POISONED_WRITE).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(p.check(Path::new("f"), POISONED_CLOSE).is_err());
    }
}
