//! Test support, one copy for unit tests (`crate::test_support`, test builds only) and
//! integration tests (`integration/common` includes this file): temporary directories
//! (the `tempfile` crate, never removed while something is mounted below them), the
//! shared fixtures, and the "fail instead of skipping" switch. Only std and tempfile
//! here, so the file compiles in both places.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

/// Set by `.ci/run`: a test that needs FUSE, a loop device, a tool that
/// `scripts/setup.sh` installs or the shared fixtures fails instead of skipping.
pub const REQUIRE_ENV: &str = "VDISKFS_REQUIRE_FUSE";

/// Where the shared fixtures are when not at `../shared/fixtures` beside the repository.
pub const FIXTURES_ENV: &str = "VDISKFS_FIXTURES";

/// True when `.ci/run` (or a developer) asked for "fail, don't skip".
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A fresh directory under the system temp dir (`vdiskfs-test-TAG-...`, canonical path),
/// removed with its contents on drop, unless something is still mounted below it.
/// Declare mount guards *after* the TempDir that holds their mount point, so they drop
/// (unmount) first.
pub struct TempDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vdiskfs-test-{tag}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("create a temporary directory: {e}"));
        // Canonical, so paths compare equal to what resolution returns.
        let path = dir
            .path()
            .canonicalize()
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", dir.path().display()));
        TempDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// A subdirectory (created, with its parents).
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        p
    }

    /// A file (and its directories) with `text`, returning its path.
    pub fn file(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(p.parent().expect("a file below the directory"))
            .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if is_mounted_below(&self.path) {
            // Never recurse into a live mount (it could be someone's guest file system).
            eprintln!(
                "warning: leaving {} in place: something is still mounted below it",
                self.path.display()
            );
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
        // Otherwise tempfile removes it.
    }
}

/// The shared fixtures (`../shared/fixtures`, see its README): `$VDISKFS_FIXTURES`, or
/// `../shared/fixtures` beside the repository. When missing: `None` with a SKIPPED
/// line, or a panic when `VDISKFS_REQUIRE_FUSE` is set (CI must never skip them).
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os(FIXTURES_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    if dir.is_dir() {
        // Canonical, so paths compare equal to what chain resolution returns.
        return Some(dir.canonicalize().unwrap_or(dir));
    }
    missing(&format!(
        "fixtures directory {} not found (it belongs beside the repository, or set {FIXTURES_ENV})",
        dir.display()
    ));
    None
}

/// One file of the shared fixtures (see `fixtures_dir`: skipped or failing when absent).
pub fn fixture(name: &str) -> Option<PathBuf> {
    let p = fixtures_dir()?.join(name);
    if p.is_file() {
        return Some(p);
    }
    missing(&format!("fixture {} not found", p.display()));
    None
}

fn missing(what: &str) {
    if required() {
        panic!("{what}, and {REQUIRE_ENV} is set");
    }
    eprintln!("SKIPPED: {what}; set {REQUIRE_ENV}=1 to make this fail");
}

/// Every mount point, from /proc/self/mountinfo.
pub fn mount_points() -> Vec<PathBuf> {
    let s = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    s.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `dir` is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    mount_points().contains(&dir)
}

/// True when `dir` or anything below it is a mount point.
pub fn is_mounted_below(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    mount_points().iter().any(|m| m.starts_with(&dir))
}
