//! Parent paths, in one place: which locators each format records and the order a
//! resolver tries them in ([`LOCATORS`]); a recorded path (Windows form, a `file:` URL or
//! a plain name) read as a Linux path ([`windows_to_linux`], [`file_name_of`],
//! [`find_case_insensitive`]); and the Windows forms `create` writes for a Linux parent
//! ([`windows_relative_path`], [`windows_absolute_path`] for VHD's W2ku,
//! [`absolute_win32_path`] for VHDX's `absolute_win32_path`).
//!
//! `chain.rs` decides where parents are looked for (overrides, search dirs, checks);
//! this module only translates and orders.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::layer::Format;

/// Every parent locator vdiskfs reads, in the order they are tried (the one table of
/// it): VHDX's parent locator keys (relative before absolute before volume), then VHD's
/// platform codes (relative before absolute, Unicode before the deprecated ANSI forms,
/// Windows before Macintosh) and the parent Unicode name of VHD's dynamic header. A
/// format lists what its file records in this order ([`locators`]); the resolver sorts
/// by it again ([`rank`]), names it does not know going last.
pub const LOCATORS: [(Format, &str); 10] = [
    (Format::Vhdx, "relative_path"),
    (Format::Vhdx, "absolute_win32_path"),
    (Format::Vhdx, "volume_path"),
    (Format::Vhd, "W2ru"),
    (Format::Vhd, "W2ku"),
    (Format::Vhd, "Wi2r"),
    (Format::Vhd, "Wi2k"),
    (Format::Vhd, "Mac"),
    (Format::Vhd, "MacX"),
    (Format::Vhd, "parent_unicode_name"),
];

/// The locator names of `format`, in the order they are tried.
pub fn locators(format: Format) -> impl Iterator<Item = &'static str> {
    LOCATORS
        .iter()
        .filter(move |(f, _)| *f == format)
        .map(|(_, n)| *n)
}

/// The place of locator `name` in the search order; unknown names after every known one.
pub fn rank(name: &str) -> usize {
    LOCATORS
        .iter()
        .position(|(_, n)| *n == name)
        .unwrap_or(LOCATORS.len())
}

/// Decode `%XX` escapes of a URL path (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path of a `file:` URL (`file://localhost/Users/x/a%20b.vhd` -> `/Users/x/a b.vhd`),
/// or None when `s` is not a file URL.
fn file_url_path(s: &str) -> Option<String> {
    let lower = s.get(..5)?.to_ascii_lowercase();
    if lower != "file:" {
        return None;
    }
    let rest = &s[5..];
    let path = if let Some(after) = rest.strip_prefix("//") {
        // Skip the host ("localhost" or empty).
        match after.find('/') {
            Some(i) => &after[i..],
            None => "/",
        }
    } else {
        rest
    };
    Some(percent_decode(path))
}

/// Split a slash-separated Windows path into (is absolute, the rest after any drive,
/// volume or UNC prefix).
fn strip_windows_prefix(s: &str) -> (bool, &str) {
    fn after_drive(s: &str) -> Option<&str> {
        let b = s.as_bytes();
        if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
            Some(&s[2..])
        } else {
            None
        }
    }
    // Skip the component of `s` up to the first '/', returning what follows it.
    fn skip_component(s: &str) -> &str {
        match s.find('/') {
            Some(i) => &s[i + 1..],
            None => "",
        }
    }
    if let Some(dev) = s.strip_prefix("//?/").or_else(|| s.strip_prefix("//./")) {
        if let Some(rest) = after_drive(dev) {
            return (true, rest);
        }
        // `get`: the recorded path comes from the image and need not be ASCII, so byte 4
        // may be inside a character (found by the read_anywhere fuzz target).
        if dev.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("UNC/")) {
            // \\?\UNC\server\share\rest
            return (true, skip_component(skip_component(&dev[4..])));
        }
        // \\?\Volume{GUID}\rest (or any other device name)
        return (true, skip_component(dev));
    }
    if let Some(unc) = s.strip_prefix("//") {
        // \\server\share\rest
        return (true, skip_component(skip_component(unc)));
    }
    if let Some(rest) = after_drive(s) {
        // "C:/dir" is absolute; "C:dir" is relative to the drive's current directory,
        // which means nothing here: take it as relative to the child.
        return match rest.strip_prefix('/') {
            Some(r) => (true, r),
            None => (false, rest),
        };
    }
    match s.strip_prefix('/') {
        Some(r) => (true, r),
        None => (false, s),
    }
}

/// Join `rel` (slash-separated) onto `base`, resolving "." and ".." lexically, as Windows
/// does.
fn join_lexical(base: &Path, rel: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.file_name().is_some() {
                    out.pop();
                } else if !out.has_root() {
                    // A relative start, or already above it: keep the "..".
                    out.push("..");
                } // at the root: ".." is the root itself
            }
            p => out.push(p),
        }
    }
    out
}

/// Turn a path recorded in a child (Windows form, a file URL, or a plain name) into the
/// Linux path to try. Backslashes become slashes; a drive letter (`C:`), `\\?\C:\`,
/// `\\?\Volume{GUID}\` or UNC `\\server\share\` prefix is dropped and the rest is taken
/// as absolute from `/`; a relative path is relative to `child_dir`.
pub fn windows_to_linux(recorded: &str, child_dir: &Path) -> PathBuf {
    let recorded = recorded.trim_end_matches('\0');
    if let Some(p) = file_url_path(recorded) {
        return join_lexical(Path::new("/"), &p);
    }
    let s = recorded.replace('\\', "/");
    let (absolute, rest) = strip_windows_prefix(&s);
    if absolute {
        join_lexical(Path::new("/"), rest)
    } else {
        join_lexical(child_dir, rest)
    }
}

/// The file name alone of a recorded path (Windows form, file URL or plain name).
pub fn file_name_of(recorded: &str) -> Option<String> {
    let recorded = recorded.trim_end_matches('\0');
    let s = match file_url_path(recorded) {
        Some(p) => p,
        None => recorded.replace('\\', "/"),
    };
    let (_, rest) = strip_windows_prefix(&s);
    rest.rsplit('/')
        .find(|p| !p.is_empty())
        .filter(|p| *p != "." && *p != "..")
        .map(str::to_string)
}

/// `path` itself when it exists; otherwise the existing path whose components match
/// `path`'s case-insensitively (the first in sorted order when several do), or None.
pub fn find_case_insensitive(path: &Path) -> Option<PathBuf> {
    if fs::symlink_metadata(path).is_ok() {
        return Some(path.to_path_buf());
    }
    let mut cur = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::Normal(name) => {
                let exact = cur.join(name);
                if fs::symlink_metadata(&exact).is_ok() {
                    cur = exact;
                    continue;
                }
                let want = name.to_string_lossy().to_lowercase();
                let dir = if cur.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    cur.as_path()
                };
                // Listed without changing the directory's access time.
                let mut matches: Vec<_> = crate::access::list_dir(dir)
                    .ok()?
                    .into_iter()
                    .filter(|n| n.to_string_lossy().to_lowercase() == want)
                    .collect();
                matches.sort();
                cur.push(matches.first()?);
            }
            other => cur.push(other.as_os_str()),
        }
    }
    Some(cur)
}

/// `parent` relative to `from_dir`, both absolute and canonical, in Windows form with a
/// leading ".\" when it does not start with "..". (VHD's W2ru, VHDX's relative_path.)
pub fn windows_relative_path(from_dir: &Path, parent: &Path) -> String {
    let a: Vec<Component> = from_dir.components().collect();
    let b: Vec<Component> = parent.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..a.len() {
        parts.push("..".into());
    }
    for c in &b[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    let joined = parts.join("\\");
    if joined.starts_with("..") {
        joined
    } else {
        format!(".\\{joined}")
    }
}

/// An absolute Linux path in rooted Windows form, for VHD's W2ku and parent Unicode name
/// (`/srv/img/base.vhd` -> `\srv\img\base.vhd`). W2ku must be an absolute Windows path,
/// which a Linux path cannot be; this is a rooted path without drive letter that Windows
/// resolves against the current drive and that [`windows_to_linux`] turns back into the
/// Linux path.
pub fn windows_absolute_path(p: &Path) -> String {
    p.to_string_lossy().replace('/', "\\")
}

/// An absolute Linux path in Win32 extended form on drive Z:, the drive Wine maps to
/// the Linux root (a Linux path has no drive letter of its own); VHDX's
/// absolute_win32_path.
pub fn absolute_win32_path(p: &Path) -> String {
    format!("\\\\?\\Z:{}", p.display().to_string().replace('/', "\\"))
}

/// The directory of a file about to be created (`child`) as an absolute path, without
/// requiring it to exist: the existing prefix canonicalised, the rest appended lexically.
pub fn absolute_dir(child: &Path) -> Result<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let cwd = std::env::current_dir().map_err(|e| Error::file(Path::new("."), "getcwd", e))?;
    let mut out = PathBuf::new();
    let joined = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        cwd.join(dir)
    };
    for comp in joined.components() {
        match comp {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
        if let Ok(c) = std::fs::canonicalize(&out) {
            out = c;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_with_multibyte_characters_do_not_panic() {
        // Regression (fuzz/regressions/read_anywhere_windows_prefix_char_boundary.bin): a
        // locator path "\\?\" followed by a multi-byte character was sliced at byte 4.
        for p in [
            "\\\\?\\Z \u{7dfa}\\mp\\x.vhdx",
            "\\\\.\\\u{e9}\u{e9}",
            "\\\\?\\UN\u{e9}",
        ] {
            let _ = windows_to_linux(p, Path::new("/tmp"));
        }
    }

    #[test]
    fn windows_paths_become_linux_paths() {
        let dir = Path::new("/data/vms/child");
        let cases = [
            ("..\\base.vhdx", "/data/vms/base.vhdx"),
            (".\\base.vhdx", "/data/vms/child/base.vhdx"),
            ("base.vhdx", "/data/vms/child/base.vhdx"),
            ("sub\\Base.VHDX", "/data/vms/child/sub/Base.VHDX"),
            ("..\\..\\..\\..\\x.vhd", "/x.vhd"),
            ("C:\\dir\\base.vhdx", "/dir/base.vhdx"),
            ("c:/dir/base.vhdx", "/dir/base.vhdx"),
            ("C:base.vhdx", "/data/vms/child/base.vhdx"),
            (
                "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\dir\\base.vhdx",
                "/dir/base.vhdx",
            ),
            ("\\\\?\\C:\\dir\\base.vhdx", "/dir/base.vhdx"),
            ("\\\\?\\UNC\\server\\share\\dir\\b.vhd", "/dir/b.vhd"),
            ("\\\\server\\share\\dir\\b.vhd", "/dir/b.vhd"),
            ("\\dir\\base.vhd", "/dir/base.vhd"),
            ("/home/u/base.vhdx", "/home/u/base.vhdx"),
            (
                "file://localhost/Users/x/my%20base.vhd",
                "/Users/x/my base.vhd",
            ),
            ("file:///Users/x/b%C3%A4se.vhd", "/Users/x/b\u{e4}se.vhd"),
            ("file:///Users/x/100%.vhd", "/Users/x/100%.vhd"),
            ("C:\\dir\\base.vhdx\0\0", "/dir/base.vhdx"),
        ];
        for (rec, want) in cases {
            assert_eq!(windows_to_linux(rec, dir), PathBuf::from(want), "{rec:?}");
        }
    }

    #[test]
    fn file_name_alone() {
        let cases = [
            ("..\\base.vhdx", Some("base.vhdx")),
            ("C:\\dir\\Base.vhdx", Some("Base.vhdx")),
            ("\\\\?\\Volume{x}\\dir\\base.vhdx", Some("base.vhdx")),
            (
                "file://localhost/Users/x/my%20base.vhd",
                Some("my base.vhd"),
            ),
            ("base.vhd", Some("base.vhd")),
            ("C:\\", None),
            ("..", None),
            ("dir\\..", None),
        ];
        for (rec, want) in cases {
            assert_eq!(file_name_of(rec).as_deref(), want, "{rec:?}");
        }
    }

    #[test]
    fn relative_paths() {
        let r = windows_relative_path(Path::new("/a/b"), Path::new("/a/b/base.vhd"));
        assert_eq!(r, ".\\base.vhd");
        let r = windows_relative_path(Path::new("/a/b/c"), Path::new("/a/x/base.vhd"));
        assert_eq!(r, "..\\..\\x\\base.vhd");
        let r = windows_relative_path(Path::new("/a"), Path::new("/a/d/base.vhd"));
        assert_eq!(r, ".\\d\\base.vhd");
        assert_eq!(
            windows_absolute_path(Path::new("/srv/img/b.vhd")),
            "\\srv\\img\\b.vhd"
        );
    }

    #[test]
    fn relative_paths_use_windows_separators() {
        assert_eq!(
            absolute_win32_path(Path::new("/srv/img/base.vhdx")),
            "\\\\?\\Z:\\srv\\img\\base.vhdx"
        );
    }

    #[test]
    fn one_search_order_for_both_formats() {
        let vhdx: Vec<_> = locators(Format::Vhdx).collect();
        assert_eq!(
            vhdx,
            ["relative_path", "absolute_win32_path", "volume_path"]
        );
        let vhd: Vec<_> = locators(Format::Vhd).collect();
        assert_eq!(
            vhd,
            [
                "W2ru",
                "W2ku",
                "Wi2r",
                "Wi2k",
                "Mac",
                "MacX",
                "parent_unicode_name"
            ]
        );
        assert!(rank("relative_path") < rank("volume_path"));
        assert!(rank("MacX") < rank("parent_unicode_name"));
        assert_eq!(rank("unknown"), LOCATORS.len());
    }
}
