//! Resolving a chain: the top image, its parent, the parent's parent... down to a base.
//!
//! For every differencing layer the parent is found in this order:
//! 1. an explicit `--parent` for that level (replaces everything else);
//! 2. the paths the child records, in the order of `paths::LOCATORS` (VHDX:
//!    `relative_path`, then `absolute_win32_path`, then `volume_path`; VHD: W2ru, W2ku,
//!    Wi2r, Wi2k, Mac, MacX, then the parent Unicode name), each turned from Windows form
//!    into a Linux path (`paths::windows_to_linux`);
//! 3. the file name alone of each of those, in the child's directory;
//! 4. the file name in each `--search-dir`.
//!
//! Every path is first tried exactly, then component by component case-insensitively
//! (images come from case-insensitive file systems). A path only counts when it is an
//! existing regular file (or a device/FIFO with `--allow-device-parent`) and is not the
//! child itself. Then the parent is opened read-only and checked against the child:
//! linkage id, sector size, format.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, LinkageProblem, NotParent, Request, Result, Tried, Warning};
use crate::image::{open_layer_within, vhdx::log::ReplayBudget};
use crate::layer::{Format, IfWritten, Layer, OpenOptions, ParentRef};
use crate::paths::{self, file_name_of, find_case_insensitive, windows_to_linux};

/// The deepest chain vdiskfs opens (top and base included).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// Chain options every command that opens an image takes.
#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// Extra directories where parents are looked for by file name.
    pub search_dirs: Vec<PathBuf>,
    /// Explicit parents: the first overrides the top's parent, the next that parent's...
    pub parents: Vec<PathBuf>,
    /// Open even when a parent's id does not match the child's linkage.
    pub ignore_linkage: bool,
    /// What the chain is opened for: which files are written, which must not change.
    pub intent: Intent,
    /// Allow block devices and other non-regular files as parents.
    pub allow_device_parent: bool,
    /// Open layers that carry a merge record (`merge.rs`) instead of refusing, accepting
    /// the one link the record says changed (`merge` finishing its work, `check`).
    pub resume_merge: bool,
}

/// What a chain is opened for. This is the one place the lock rules live; every command
/// opens its chain with one of these, so new writers (merge, compact, resize, set-parent,
/// convert) inherit the rules by choosing their intent:
///
/// - a file that is written is opened with an exclusive lock: nobody else may have it open
///   (not as a parent of their disk either);
/// - every other file of a chain that is written, that a new child is created over, or
///   that is copied (`Copy`), is opened read-only with a shared lock that must be had: if another process has it open
///   for writing (holds its exclusive lock) the open fails, naming the file and the writer;
///   holding the shared lock keeps writers out while the chain is open;
/// - a chain opened only to look at (`Inspect`) takes shared locks where it can, and opens
///   a file another process is writing anyway (forensic access to a live system), with a
///   warning that what is read may be inconsistent; such a chain caches no parent data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Intent {
    /// Read only: info, cat, check, mount --read-only.
    #[default]
    Inspect,
    /// Write the top image (a writable mount).
    WriteTop,
    /// Create a new child over the top image (`create --parent`): nothing is written,
    /// but no file of the chain may be changing, or the new child would change with it.
    CreateChild,
    /// Rewrite the top `n` layers (e.g. merging a child into its parent): those are
    /// opened for writing, the rest must not be changing.
    Rewrite(usize),
    /// Copy the merged view into a new file (`convert`): nothing is written, but no file
    /// of the chain may be changing, or the copy would mix old and new data.
    Copy,
}

impl Intent {
    /// How the file at `level` of the chain (0 = the top) is opened.
    pub fn open_options(self, level: usize) -> OpenOptions {
        let refuse = |why: &'static str| OpenOptions {
            writable: false,
            if_written: IfWritten::Refuse(why),
        };
        const UNDER_WRITE: &str = "to write a disk over it: the disk would read a mix of old and \
                                   new data of it, and stop opening once it is written (unmount \
                                   it first)";
        match self {
            Intent::Inspect => OpenOptions::read_only(),
            Intent::WriteTop if level == 0 => OpenOptions::writable(),
            Intent::Rewrite(n) if level < n => OpenOptions::writable(),
            Intent::WriteTop | Intent::Rewrite(_) => refuse(UNDER_WRITE),
            Intent::CreateChild if level == 0 => refuse(
                "to create a child over it: the child would change with every later write to \
                 it (unmount it first)",
            ),
            Intent::CreateChild => refuse(
                "to create a child over a chain that includes it: the child would change with \
                 every write to it (unmount it first)",
            ),
            Intent::Copy => refuse(
                "to copy a chain that includes it: the copy would mix old and new data (unmount \
                 it first)",
            ),
        }
    }
}

/// How a parent was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentFound {
    /// Which locator gave the path: the format's locator name (e.g. "relative_path",
    /// "W2ku"), that name followed by " file name" when only the file name was used in
    /// the child's directory, "--search-dir", or "--parent".
    pub locator: String,
    /// The path as recorded in the child (for "--parent": the path given).
    pub recorded: String,
    /// The path that was opened.
    pub path: PathBuf,
}

pub struct Chain {
    /// Top first, base last.
    pub layers: Vec<Arc<dyn Layer>>,
    /// `found[i]` says how `layers[i]` was found (None for the top).
    pub found: Vec<Option<ParentFound>>,
    /// Non-fatal problems seen while resolving.
    pub warnings: Vec<Warning>,
}

impl Chain {
    pub fn top(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    /// Open `path` and every parent it names.
    pub fn open(path: &Path, opts: &ChainOptions) -> Result<Chain> {
        // One memory budget for the in-memory log replays of all layers (security.md).
        let budget = ReplayBudget::for_chain();
        Self::open_with(path, opts, |p, o, raw| {
            open_layer_within(p, o, raw, &budget)
        })
    }

    /// `open` with the function that opens one file as a layer passed in (tests use
    /// fake layers). `opener(path, options, allow_raw)`.
    pub(crate) fn open_with<F>(path: &Path, opts: &ChainOptions, opener: F) -> Result<Chain>
    where
        F: Fn(&Path, OpenOptions, bool) -> Result<Arc<dyn Layer>>,
    {
        let top = opener(path, opts.intent.open_options(0), false)?;
        let mut ids = vec![file_id(path)?];
        let mut accepted = Vec::new();
        merge_record_check(top.as_ref(), opts, &mut accepted)?;
        let mut chain = Chain {
            layers: vec![top],
            found: vec![None],
            warnings: Vec::new(),
        };
        loop {
            let child = chain.layers.last().expect("chain has a top").clone();
            let Some(pref) = child.parent() else { break };
            let level = chain.layers.len() - 1;
            if chain.layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::Request(Request::ChainTooDeep {
                    top: path.to_path_buf(),
                    max: MAX_CHAIN_DEPTH,
                    layer: child.path().to_path_buf(),
                    depth: chain.layers.len(),
                }));
            }
            let found = resolve_parent(child.path(), pref, level, opts)?;
            let id = file_id(&found.path)?;
            if let Some(k) = ids.iter().position(|&x| x == id) {
                return Err(Error::Request(Request::ParentCycle {
                    child: child.path().to_path_buf(),
                    parent: found.path.clone(),
                    same: chain.layers[k].path().to_path_buf(),
                    level: k,
                }));
            }
            let via_override = found.locator == LOCATOR_OVERRIDE;
            let parent = opener(
                &found.path,
                opts.intent.open_options(level + 1),
                via_override,
            )?;
            merge_record_check(parent.as_ref(), opts, &mut accepted)?;
            // The link an interrupted merge changed on purpose (its record names it).
            let merging = accepted.contains(&(*ids.last().expect("top id"), id));
            let link_opts;
            let link_opts = if merging {
                link_opts = ChainOptions {
                    ignore_linkage: true,
                    ..opts.clone()
                };
                &link_opts
            } else {
                opts
            };
            check_link(
                child.as_ref(),
                parent.as_ref(),
                pref,
                link_opts,
                &mut chain.warnings,
            )?;
            log::info!(
                "{}: parent {} (found by {} from {:?})",
                child.path().display(),
                found.path.display(),
                found.locator,
                found.recorded
            );
            ids.push(id);
            chain.layers.push(parent);
            chain.found.push(Some(found));
        }
        for l in &chain.layers {
            if let Some(who) = l.written_by() {
                warn(
                    &mut chain.warnings,
                    Warning::OpenForWriting {
                        path: l.path().to_path_buf(),
                        who: who.to_string(),
                    },
                );
            }
        }
        let parents_found = chain.layers.len() - 1;
        if let Some(extra) = opts.parents.get(parents_found) {
            return Err(Error::Request(Request::ExtraParent {
                number: parents_found + 1,
                parent: extra.clone(),
                base: chain.layers[parents_found].path().to_path_buf(),
            }));
        }
        Ok(chain)
    }
}

/// Refuse a layer that carries a merge record (an interrupted `vdiskfs merge`), unless
/// `resume_merge`; then remember the link the record allows to mismatch.
fn merge_record_check(
    layer: &dyn Layer,
    opts: &ChainOptions,
    accepted: &mut Vec<(FileId, FileId)>,
) -> Result<()> {
    let Some(rec) = crate::merge::MergeRecord::beside(layer.path())? else {
        return Ok(());
    };
    if !opts.resume_merge {
        return Err(Error::Request(Request::MergeInterrupted {
            layer: layer.path().to_path_buf(),
            ancestor: rec.ancestor,
            command: rec.command,
        }));
    }
    log::warn!(
        "{}: a merge into {} was interrupted; run `{}` to finish it",
        layer.path().display(),
        rec.ancestor.display(),
        rec.command
    );
    if let Some(link) = rec.accepted_link() {
        accepted.push(link);
    }
    Ok(())
}

const LOCATOR_OVERRIDE: &str = "--parent";
const LOCATOR_SEARCH_DIR: &str = "--search-dir";

/// The device and inode of a file: two paths name the same file when these agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// Stat `path` (following symlinks) for its device and inode.
pub fn file_id(path: &Path) -> Result<FileId> {
    let md = fs::metadata(path).map_err(|e| Error::file(path, "stat", e))?;
    Ok(FileId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// The child's recorded candidates in the order to try, without empty entries.
fn ordered_candidates(parent: &ParentRef) -> Vec<(String, String)> {
    let mut c: Vec<(String, String)> = parent
        .candidates
        .iter()
        .map(|(n, r)| (n.clone(), r.trim_end_matches('\0').to_string()))
        .filter(|(_, r)| !r.trim().is_empty())
        .collect();
    c.sort_by_key(|(n, _)| paths::rank(n)); // stable: equal ranks keep the file's order
    c
}

/// Why `path` cannot be a parent of the file `child`, or Ok when it can.
fn check_candidate(
    path: &Path,
    child: FileId,
    allow_device: bool,
) -> std::result::Result<(), NotParent> {
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(NotParent::Missing),
        Err(e) => {
            return Err(NotParent::Stat {
                error: e.to_string(),
            })
        }
    };
    let ft = md.file_type();
    if ft.is_dir() {
        return Err(NotParent::Directory);
    }
    if !ft.is_file() && !allow_device {
        let kind = if ft.is_block_device() {
            "a block device"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(NotParent::NotRegular { kind });
    }
    if (FileId {
        dev: md.dev(),
        ino: md.ino(),
    }) == child
    {
        return Err(NotParent::Child);
    }
    Ok(())
}

/// Find the parent of the layer at `level` (0 = the top), whose file is `child_path` and
/// which records `parent`. Returns how it was found; does not open it. Fails with
/// `Error::ParentNotFound` listing every path tried, in order.
pub fn resolve_parent(
    child_path: &Path,
    parent: &ParentRef,
    level: usize,
    opts: &ChainOptions,
) -> Result<ParentFound> {
    let child_id = file_id(child_path)?;
    let not_found = |tried: Vec<Tried>| Error::ParentNotFound {
        child: child_path.to_path_buf(),
        tried,
    };

    if let Some(p) = opts.parents.get(level) {
        return match check_candidate(p, child_id, opts.allow_device_parent) {
            Ok(()) => Ok(ParentFound {
                locator: LOCATOR_OVERRIDE.to_string(),
                recorded: p.display().to_string(),
                path: p.clone(),
            }),
            Err(why) => Err(not_found(vec![Tried::Override {
                path: p.clone(),
                why,
            }])),
        };
    }

    let parent_of_child = child_path.parent().filter(|p| !p.as_os_str().is_empty());
    // The directory the child really is in (symlinks and ".." resolved), so that a
    // recorded "..\\x" means what it meant next to the child.
    let child_dir = fs::canonicalize(parent_of_child.unwrap_or(Path::new(".")))
        .map_err(|e| Error::file(child_path, "find the directory of", e))?;

    let candidates = ordered_candidates(parent);
    let mut attempts: Vec<(String, &str, PathBuf)> = Vec::new();
    for (name, rec) in &candidates {
        attempts.push((name.clone(), rec, windows_to_linux(rec, &child_dir)));
    }
    for (name, rec) in &candidates {
        if let Some(f) = file_name_of(rec) {
            attempts.push((format!("{name} file name"), rec, child_dir.join(f)));
        }
    }
    for dir in &opts.search_dirs {
        for (_, rec) in &candidates {
            if let Some(f) = file_name_of(rec) {
                attempts.push((LOCATOR_SEARCH_DIR.to_string(), rec, dir.join(f)));
            }
        }
    }

    let mut tried = Vec::new();
    let mut seen = HashSet::new();
    for (locator, rec, path) in attempts {
        if !seen.insert(path.clone()) {
            continue;
        }
        let tried_path = |matched, why| Tried::Path {
            locator: locator.clone(),
            recorded: show(rec),
            path: path.clone(),
            matched,
            why,
        };
        let Some(actual) = find_case_insensitive(&path) else {
            tried.push(tried_path(None, NotParent::Missing));
            continue;
        };
        match check_candidate(&actual, child_id, opts.allow_device_parent) {
            Ok(()) => {
                return Ok(ParentFound {
                    locator,
                    recorded: rec.to_string(),
                    path: actual,
                })
            }
            Err(why) => {
                let matched = (actual != path).then(|| actual.clone());
                tried.push(tried_path(matched, why));
            }
        }
    }
    if candidates.is_empty() {
        tried.push(Tried::NoPath);
    }
    Err(not_found(tried))
}

/// A recorded string for a message: as it is (Windows backslashes stay single), with
/// control characters escaped.
fn show(rec: &str) -> String {
    rec.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// What the linkage id is called in a format, for messages.
fn id_name(format: Format) -> &'static str {
    match format {
        Format::Vhdx => "DataWriteGuid",
        Format::Vhd => "unique id",
        Format::Raw => "id",
    }
}

fn warn(warnings: &mut Vec<Warning>, msg: Warning) {
    log::warn!("{msg}");
    warnings.push(msg);
}

/// Check that `parent` may sit under `child`: formats, sector sizes, linkage id, time
/// stamp. Non-fatal findings go to `warnings` (and the log).
pub(crate) fn check_link(
    child: &dyn Layer,
    parent: &dyn Layer,
    pref: &ParentRef,
    opts: &ChainOptions,
    warnings: &mut Vec<Warning>,
) -> Result<()> {
    let (cf, pf) = (child.format(), parent.format());
    if pf != Format::Raw && pf != cf {
        return Err(Error::Request(Request::FormatMix {
            child: child.path().to_path_buf(),
            child_format: cf.name(),
            parent: parent.path().to_path_buf(),
            parent_format: pf.name(),
        }));
    }
    // A raw file has no sector size of its own: it takes the chain's.
    if pf != Format::Raw && child.logical_sector_size() != parent.logical_sector_size() {
        return Err(Error::Request(Request::SectorSize {
            child: child.path().to_path_buf(),
            child_size: child.logical_sector_size(),
            parent: parent.path().to_path_buf(),
            parent_size: parent.logical_sector_size(),
        }));
    }
    if !pref.linkage.is_empty() {
        let expected = pref.linkage.clone();
        let problem = match parent.linkage_id() {
            // A raw file (given with --parent) has no id: the link cannot be verified,
            // and a wrong base gives a garbage view, so it takes --ignore-linkage.
            None => Some(LinkageProblem::NoId {
                format: pf.name(),
                expected,
            }),
            Some(id) if pref.linkage.contains(&id) => None,
            Some(id) => Some(LinkageProblem::Changed {
                expected,
                id_name: id_name(pf),
                id,
            }),
        };
        if let Some(problem) = problem {
            let (child, parent) = (child.path().to_path_buf(), parent.path().to_path_buf());
            if !opts.ignore_linkage {
                return Err(Error::Linkage {
                    child,
                    parent,
                    msg: problem,
                });
            }
            let unchecked = matches!(problem, LinkageProblem::NoId { .. });
            warn(
                warnings,
                if unchecked {
                    Warning::LinkageUnchecked {
                        child,
                        parent,
                        problem,
                    }
                } else {
                    Warning::LinkageMismatch {
                        child,
                        parent,
                        problem,
                    }
                },
            );
        }
    }
    // A recorded time stamp of 0 means "not recorded" (qemu-img writes 0).
    if let (Some(rec), Some(actual)) = (pref.timestamp, parent.timestamp()) {
        if rec != 0 && rec != actual {
            warn(
                warnings,
                Warning::TimeStamp {
                    child: child.path().to_path_buf(),
                    parent: parent.path().to_path_buf(),
                    actual,
                    recorded: rec,
                },
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::open_layer;
    use crate::layer::{LayerInfo, Run};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use uuid::Uuid;

    use crate::test_support::{fixtures_dir, TempDir};

    /// `path` in Windows form on drive C: (`/tmp/x/a` -> `C:\tmp\x\a`).
    fn win(p: &Path) -> String {
        format!("C:{}", p.display().to_string().replace('/', "\\"))
    }

    fn pref(cands: &[(&str, &str)]) -> ParentRef {
        ParentRef {
            candidates: cands
                .iter()
                .map(|(n, r)| (n.to_string(), r.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn not_found_tried(r: Result<ParentFound>) -> Vec<Tried> {
        match r {
            Err(Error::ParentNotFound { tried, .. }) => tried,
            Err(e) => panic!("expected ParentNotFound, got {e}"),
            Ok(f) => panic!("expected ParentNotFound, found {f:?}"),
        }
    }

    #[test]
    fn recorded_strings_shown_as_recorded() {
        assert_eq!(show("C:\\dir\\a.vhd"), "C:\\dir\\a.vhd");
        assert_eq!(show("a\nb\u{1b}"), "a\\nb\\u{1b}");
    }

    #[test]
    fn case_insensitive_lookup() {
        let t = TempDir::new("chain");
        let f = t.file("Images/Parent Disks/Base.VHDX", "");
        // Exact path exists: returned as is.
        assert_eq!(find_case_insensitive(&f), Some(f.clone()));
        let asked = t.path().join("images/PARENT DISKS/base.vhdx");
        assert_eq!(find_case_insensitive(&asked), Some(f.clone()));
        // A ".." inside the path still works.
        let asked = t.path().join("IMAGES/x/../parent disks/BASE.vhdx");
        fs::create_dir(t.path().join("Images/X")).unwrap();
        assert_eq!(
            find_case_insensitive(&asked).map(|p| p.canonicalize().unwrap()),
            Some(f.clone())
        );
        assert_eq!(
            find_case_insensitive(&t.path().join("images/parent disks/other.vhdx")),
            None
        );
        assert_eq!(
            find_case_insensitive(&t.path().join("nothing/base.vhdx")),
            None
        );
    }

    #[test]
    fn relative_locator_is_relative_to_child_dir_not_cwd() {
        let t = TempDir::new("chain");
        let base = t.file("vms/Base.vhdx", "base");
        let child = t.file("vms/diffs/child.avhdx", "child");
        // The child named by a path relative to the current directory.
        let cwd = std::env::current_dir().unwrap();
        let mut rel = PathBuf::new();
        for _ in cwd.components().skip(1) {
            rel.push("..");
        }
        rel.push(child.strip_prefix("/").unwrap());
        assert!(rel.is_relative());
        let r = pref(&[("relative_path", "..\\base.vhdx")]);
        let f = resolve_parent(&rel, &r, 0, &ChainOptions::default()).unwrap();
        assert_eq!(f.path, base);
        assert_eq!(f.locator, "relative_path");
        assert_eq!(f.recorded, "..\\base.vhdx");

        // A bare name is looked up next to the child, not in the current directory.
        let r = pref(&[("parent_unicode_name", "Cargo.toml")]);
        let tried = not_found_tried(resolve_parent(&rel, &r, 0, &ChainOptions::default()));
        let want = t.path().join("vms/diffs/Cargo.toml");
        assert!(
            matches!(&tried[0], Tried::Path { path, why: NotParent::Missing, .. } if *path == want),
            "{tried:?}"
        );
    }

    #[test]
    fn vhdx_locator_order() {
        let t = TempDir::new("chain");
        let child = t.file("c/child.avhdx", "");
        let rel = t.file("c/rel.vhdx", "");
        let abs = t.file("abs/abs.vhdx", "");
        let vol = t.file("vol/vol.vhdx", "");
        let vol_rec = format!(
            "\\\\?\\Volume{{26a21bda-a627-11d7-9931-806e6f6e6963}}{}",
            vol.display().to_string().replace('/', "\\")
        );
        // The file lists them in its own order; relative comes first, then absolute,
        // then volume.
        let r = pref(&[
            ("volume_path", vol_rec.as_str()),
            ("absolute_win32_path", &win(&abs)),
            ("relative_path", "rel.vhdx"),
        ]);
        let opts = ChainOptions::default();
        assert_eq!(resolve_parent(&child, &r, 0, &opts).unwrap().path, rel);
        fs::remove_file(&rel).unwrap();
        let f = resolve_parent(&child, &r, 0, &opts).unwrap();
        assert_eq!(
            (f.path, f.locator.as_str()),
            (abs.clone(), "absolute_win32_path")
        );
        fs::remove_file(&abs).unwrap();
        let f = resolve_parent(&child, &r, 0, &opts).unwrap();
        assert_eq!((f.path, f.locator.as_str()), (vol, "volume_path"));
        assert_eq!(f.recorded, vol_rec);
    }

    #[test]
    fn file_name_in_child_dir_then_search_dirs() {
        let t = TempDir::new("chain");
        let child = t.file("c/child.vhd", "");
        let rec = "C:\\Nowhere\\At\\All\\Parent.vhd";
        let r = pref(&[("W2ku", rec)]);
        let opts = ChainOptions {
            search_dirs: vec![t.path().join("s1"), t.path().join("s2")],
            ..Default::default()
        };
        // Only in the second search dir, under a different case.
        let in_s2 = t.file("s2/PARENT.VHD", "");
        fs::create_dir(t.path().join("s1")).unwrap();
        let f = resolve_parent(&child, &r, 0, &opts).unwrap();
        assert_eq!(f.path, in_s2);
        assert_eq!(f.locator, "--search-dir");
        assert_eq!(f.recorded, rec);
        // Next to the child wins over the search dirs.
        let next = t.file("c/parent.vhd", "");
        let f = resolve_parent(&child, &r, 0, &opts).unwrap();
        assert_eq!(f.path, next);
        assert_eq!(f.locator, "W2ku file name");
    }

    #[test]
    fn unusable_candidates_are_skipped_and_all_listed() {
        let t = TempDir::new("chain");
        let child = t.file("c/child.vhdx", "");
        fs::create_dir_all(t.path().join("c/dir.vhdx")).unwrap();
        let fifo = t.path().join("c/fifo.vhdx");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = t.path().join("c/link-to-child.vhdx");
        std::os::unix::fs::symlink(&child, &link).unwrap();
        let r = pref(&[
            ("relative_path", "DIR.vhdx"),
            ("absolute_win32_path", "C:\\x\\child.vhdx"),
            ("volume_path", "\\\\?\\Volume{x}\\y\\link-to-child.vhdx"),
            ("unknown", "fifo.vhdx"),
        ]);
        let opts = ChainOptions {
            search_dirs: vec![t.path().join("nowhere")],
            ..Default::default()
        };
        let tried = not_found_tried(resolve_parent(&child, &r, 0, &opts));
        let c = t.path().join("c");
        let expect = [
            format!(
                "relative_path \"DIR.vhdx\" -> {}/DIR.vhdx (matched {}/dir.vhdx): is a directory",
                c.display(),
                c.display()
            ),
            "absolute_win32_path \"C:\\x\\child.vhdx\" -> /x/child.vhdx: no such file".into(),
            "volume_path \"\\\\?\\Volume{x}\\y\\link-to-child.vhdx\" -> /y/link-to-child.vhdx: no such file".into(),
            format!(
                "unknown \"fifo.vhdx\" -> {}/fifo.vhdx: is a FIFO, not a regular file (--allow-device-parent allows it)",
                c.display()
            ),
            // relative_path's file name is the same path as above: not tried twice.
            format!(
                "absolute_win32_path file name \"C:\\x\\child.vhdx\" -> {}/child.vhdx: is the child itself",
                c.display()
            ),
            format!(
                "volume_path file name \"\\\\?\\Volume{{x}}\\y\\link-to-child.vhdx\" -> {}/link-to-child.vhdx: is the child itself",
                c.display()
            ),
            format!(
                "--search-dir \"DIR.vhdx\" -> {}/nowhere/DIR.vhdx: no such file",
                t.path().display()
            ),
            format!(
                "--search-dir \"C:\\x\\child.vhdx\" -> {}/nowhere/child.vhdx: no such file",
                t.path().display()
            ),
            format!(
                "--search-dir \"\\\\?\\Volume{{x}}\\y\\link-to-child.vhdx\" -> {}/nowhere/link-to-child.vhdx: no such file",
                t.path().display()
            ),
            format!(
                "--search-dir \"fifo.vhdx\" -> {}/nowhere/fifo.vhdx: no such file",
                t.path().display()
            ),
        ];
        let whys: Vec<&NotParent> = tried
            .iter()
            .map(|t| match t {
                Tried::Path { why, .. } => why,
                t => panic!("{t:?}"),
            })
            .collect();
        use NotParent::*;
        let fifo_kind = NotRegular { kind: "a FIFO" };
        let want = [&Directory, &Missing, &Missing, &fifo_kind, &Child, &Child];
        assert_eq!(whys[..6], want, "{tried:?}");
        assert!(whys[6..].iter().all(|w| **w == Missing), "{tried:?}");
        // The rendered list, exactly: what the user reads (locator, recorded string as
        // recorded, where it led, the case-insensitive match, why not).
        let shown: Vec<String> = tried.iter().map(ToString::to_string).collect();
        assert_eq!(shown, expect);
        // The error is about the child.
        let e = resolve_parent(&child, &r, 0, &opts).unwrap_err();
        assert!(
            matches!(&e, Error::ParentNotFound { child: c, .. } if *c == child),
            "{e}"
        );

        // With --allow-device-parent the FIFO is accepted.
        let opts = ChainOptions {
            allow_device_parent: true,
            ..opts
        };
        assert_eq!(resolve_parent(&child, &r, 0, &opts).unwrap().path, fifo);
    }

    #[test]
    fn no_locator_at_all() {
        let t = TempDir::new("chain");
        let child = t.file("child.vhd", "");
        let r = pref(&[("W2ru", ""), ("W2ku", "\0\0")]);
        let tried = not_found_tried(resolve_parent(&child, &r, 0, &ChainOptions::default()));
        assert_eq!(tried, [Tried::NoPath]);
    }

    #[test]
    fn parent_override_replaces_resolution_for_its_level() {
        let t = TempDir::new("chain");
        let child = t.file("child.vhdx", "");
        let recorded = t.file("base.vhdx", "");
        let other = t.file("elsewhere/other.img", "");
        let r = pref(&[("relative_path", "base.vhdx")]);
        let opts = ChainOptions {
            parents: vec![other.clone()],
            ..Default::default()
        };
        let f = resolve_parent(&child, &r, 0, &opts).unwrap();
        assert_eq!(
            f,
            ParentFound {
                locator: "--parent".into(),
                recorded: other.display().to_string(),
                path: other.clone(),
            }
        );
        // Level 1 has no override: the recorded path is used.
        assert_eq!(resolve_parent(&child, &r, 1, &opts).unwrap().path, recorded);
        // A bad override is not silently replaced by the recorded path.
        let opts = ChainOptions {
            parents: vec![t.path().join("missing.vhdx")],
            ..Default::default()
        };
        let tried = not_found_tried(resolve_parent(&child, &r, 0, &opts));
        assert_eq!(
            tried,
            [Tried::Override {
                path: t.path().join("missing.vhdx"),
                why: NotParent::Missing
            }]
        );
        let opts = ChainOptions {
            parents: vec![child.clone()],
            ..Default::default()
        };
        let tried = not_found_tried(resolve_parent(&child, &r, 0, &opts));
        assert_eq!(
            tried,
            [Tried::Override {
                path: child.clone(),
                why: NotParent::Child
            }]
        );
    }

    // ---- Fake layers: chain rules without real image files ----

    struct Fake {
        path: PathBuf,
        format: Format,
        sector: u32,
        id: Option<Uuid>,
        parent: Option<ParentRef>,
        ts: Option<u32>,
    }

    impl Layer for Fake {
        fn path(&self) -> &Path {
            &self.path
        }
        fn format(&self) -> Format {
            self.format
        }
        fn virtual_size(&self) -> u64 {
            1 << 20
        }
        fn logical_sector_size(&self) -> u32 {
            self.sector
        }
        fn map(&self, _offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
            runs.push(Run::Absent { len });
            Ok(())
        }
        fn read_held(&self, _file_offset: u64, _buf: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn parent(&self) -> Option<&ParentRef> {
            self.parent.as_ref()
        }
        fn linkage_id(&self) -> Option<Uuid> {
            self.id
        }
        fn timestamp(&self) -> Option<u32> {
            self.ts
        }
        fn info(&self) -> Result<LayerInfo> {
            Ok(LayerInfo::default())
        }
    }

    /// A linkage refusal because a VHD parent's unique id is not the one recorded.
    fn is_unique_id_change(e: &Error) -> bool {
        matches!(
            e,
            Error::Linkage {
                msg: LinkageProblem::Changed {
                    id_name: "unique id",
                    ..
                },
                ..
            }
        )
    }

    fn fake(format: Format, sector: u32, id: Option<u128>) -> Fake {
        Fake {
            path: PathBuf::from(format!("/x/{}-{sector}", format.name())),
            format,
            sector,
            id: id.map(Uuid::from_u128),
            parent: None,
            ts: None,
        }
    }

    /// Opens a text file describing a fake layer: lines `format=vhdx|vhd|raw`,
    /// `sector=N`, `id=N`, `linkage=N`, `ts=N`, `loc=NAME|RECORDED`.
    fn fake_open(path: &Path, _o: OpenOptions, allow_raw: bool) -> Result<Arc<dyn Layer>> {
        let text = fs::read_to_string(path).map_err(|e| Error::file(path, "open", e))?;
        let mut l = Fake {
            path: path.to_path_buf(),
            format: Format::Vhdx,
            sector: 512,
            id: None,
            parent: None,
            ts: None,
        };
        for line in text.lines() {
            let (k, v) = line.split_once('=').unwrap();
            match k {
                "format" => {
                    l.format = match v {
                        "vhdx" => Format::Vhdx,
                        "vhd" => Format::Vhd,
                        _ => Format::Raw,
                    }
                }
                "sector" => l.sector = v.parse().unwrap(),
                "id" => l.id = Some(Uuid::from_u128(v.parse().unwrap())),
                "ts" => l.ts = Some(v.parse().unwrap()),
                "linkage" => l
                    .parent
                    .get_or_insert_with(Default::default)
                    .linkage
                    .push(Uuid::from_u128(v.parse().unwrap())),
                "loc" => {
                    let (n, r) = v.split_once('|').unwrap();
                    l.parent
                        .get_or_insert_with(Default::default)
                        .candidates
                        .push((n.into(), r.into()));
                }
                _ => panic!("bad fake line {line}"),
            }
        }
        if l.format == Format::Raw && !allow_raw {
            return Err(Error::corrupt(path, "not a VHDX or VHD image"));
        }
        Ok(Arc::new(l))
    }

    fn open_fake(path: &Path, opts: &ChainOptions) -> Result<Chain> {
        Chain::open_with(path, opts, fake_open)
    }

    #[test]
    fn linkage_mismatch_refused_unless_ignored() {
        let mut child = fake(Format::Vhdx, 512, Some(1));
        let parent = fake(Format::Vhdx, 512, Some(7));
        let r = ParentRef {
            linkage: vec![Uuid::from_u128(5), Uuid::from_u128(6)],
            ..Default::default()
        };
        child.parent = Some(r.clone());
        let mut w = Vec::new();
        let e = check_link(&child, &parent, &r, &ChainOptions::default(), &mut w).unwrap_err();
        let Error::Linkage {
            msg:
                LinkageProblem::Changed {
                    expected,
                    id_name,
                    id,
                },
            ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(*expected, [Uuid::from_u128(5), Uuid::from_u128(6)]);
        assert_eq!((*id_name, *id), ("DataWriteGuid", Uuid::from_u128(7)));
        assert!(w.is_empty());

        let opts = ChainOptions {
            ignore_linkage: true,
            ..Default::default()
        };
        check_link(&child, &parent, &r, &opts, &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(
            matches!(
                w[0],
                Warning::LinkageMismatch {
                    problem: LinkageProblem::Changed { .. },
                    ..
                }
            ),
            "{w:?}"
        );

        // parent_linkage2 matches: fine, no warning.
        let parent6 = fake(Format::Vhdx, 512, Some(6));
        let mut w = Vec::new();
        check_link(&child, &parent6, &r, &ChainOptions::default(), &mut w).unwrap();
        assert!(w.is_empty());
    }

    #[test]
    fn vhd_unique_id_and_time_stamp() {
        let child = fake(Format::Vhd, 512, Some(1));
        let mut parent = fake(Format::Vhd, 512, Some(2));
        parent.ts = Some(100);
        let r = ParentRef {
            linkage: vec![Uuid::from_u128(2)],
            timestamp: Some(99),
            ..Default::default()
        };
        let mut w = Vec::new();
        check_link(&child, &parent, &r, &ChainOptions::default(), &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(matches!(w[0], Warning::TimeStamp { .. }), "{w:?}");
        // 0 means the child did not record one (qemu-img): no warning.
        let r0 = ParentRef {
            timestamp: Some(0),
            ..r.clone()
        };
        let mut w0 = Vec::new();
        check_link(&child, &parent, &r0, &ChainOptions::default(), &mut w0).unwrap();
        assert!(w0.is_empty(), "{w0:?}");
        let wrong = fake(Format::Vhd, 512, Some(3));
        let e = check_link(&child, &wrong, &r, &ChainOptions::default(), &mut w).unwrap_err();
        assert!(is_unique_id_change(&e), "{e}");
    }

    #[test]
    fn formats_and_sector_sizes_must_agree() {
        let r = ParentRef::default();
        let o = ChainOptions::default();
        let mut w = Vec::new();
        let vhdx = fake(Format::Vhdx, 512, Some(1));
        let vhd = fake(Format::Vhd, 512, Some(1));
        let e = check_link(&vhdx, &vhd, &r, &o, &mut w).unwrap_err();
        assert!(
            matches!(&e, Error::Request(Request::FormatMix { child, parent, .. })
                if child == Path::new("/x/VHDX-512") && parent == Path::new("/x/VHD-512")),
            "{e}"
        );
        assert!(check_link(&vhd, &vhdx, &r, &o, &mut w).is_err());
        let vhdx4k = fake(Format::Vhdx, 4096, Some(1));
        let e = check_link(&vhdx4k, &vhdx, &r, &o, &mut w).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Request(Request::SectorSize {
                    child_size: 4096,
                    parent_size: 512,
                    ..
                })
            ),
            "{e}"
        );
        // A raw base fits under either format, whatever the sector size.
        let raw = fake(Format::Raw, 512, None);
        check_link(&vhdx4k, &raw, &r, &o, &mut w).unwrap();
        check_link(&vhd, &raw, &r, &o, &mut w).unwrap();
        assert!(w.is_empty());
        // ...with a warning when the child records an id it cannot be checked against.
        let r = ParentRef {
            linkage: vec![Uuid::from_u128(9)],
            ..Default::default()
        };
        // ...but not when the child records an id it cannot be checked against: that
        // takes --ignore-linkage, and then it is a warning.
        let e = check_link(&vhd, &raw, &r, &o, &mut w).unwrap_err();
        assert!(matches!(e, Error::Linkage { .. }), "{e}");
        assert!(
            matches!(
                e,
                Error::Linkage {
                    msg: LinkageProblem::NoId { .. },
                    ..
                }
            ),
            "{e}"
        );
        let ig = ChainOptions {
            ignore_linkage: true,
            ..Default::default()
        };
        check_link(&vhd, &raw, &r, &ig, &mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(
            matches!(
                w[0],
                Warning::LinkageUnchecked {
                    problem: LinkageProblem::NoId { .. },
                    ..
                }
            ),
            "{w:?}"
        );
    }

    #[test]
    fn fake_chain_of_three() {
        let t = TempDir::new("chain");
        let top = t.file(
            "top/top.avhdx",
            "id=3\nloc=relative_path|..\\MID\\mid.avhdx\nlinkage=2",
        );
        t.file(
            "mid/mid.avhdx",
            &format!(
                "id=2\nloc=absolute_win32_path|{}\nlinkage=1",
                win(&t.path().join("base/base.vhdx"))
            ),
        );
        t.file("base/base.vhdx", "id=1");
        let c = open_fake(&top, &ChainOptions::default()).unwrap();
        assert_eq!(c.layers.len(), 3);
        assert_eq!(c.found.len(), 3);
        assert!(c.found[0].is_none());
        let f1 = c.found[1].as_ref().unwrap();
        assert_eq!(f1.locator, "relative_path");
        assert_eq!(f1.path, t.path().join("mid/mid.avhdx"));
        let f2 = c.found[2].as_ref().unwrap();
        assert_eq!(f2.locator, "absolute_win32_path");
        assert_eq!(c.layers[2].path(), t.path().join("base/base.vhdx"));
        assert!(c.warnings.is_empty());

        // A raw base may replace the base with --parent at level 1.
        let raw = t.file("raw.img", "format=raw");
        let opts = ChainOptions {
            parents: vec![t.path().join("mid/mid.avhdx"), raw.clone()],
            ..Default::default()
        };
        assert!(matches!(open_fake(&top, &opts), Err(Error::Linkage { .. })));
        let opts = ChainOptions {
            ignore_linkage: true,
            ..opts
        };
        let c = open_fake(&top, &opts).unwrap();
        assert_eq!(c.layers[2].path(), raw);
        assert_eq!(c.found[2].as_ref().unwrap().locator, "--parent");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        // ...but a raw file found through a locator is not an image.
        let raw_by_locator = t.file("rawtop.avhdx", "loc=relative_path|raw.img");
        assert!(open_fake(&raw_by_locator, &ChainOptions::default()).is_err());

        // One --parent too many is an error naming the base.
        let opts = ChainOptions {
            parents: vec![
                t.path().join("mid/mid.avhdx"),
                t.path().join("base/base.vhdx"),
                raw,
            ],
            ..Default::default()
        };
        let e = open_fake(&top, &opts).err().unwrap();
        assert!(
            matches!(&e, Error::Request(Request::ExtraParent { number: 3, base, .. })
                if base.ends_with("base/base.vhdx")),
            "{e}"
        );
    }

    #[test]
    fn parent_cycles_are_refused() {
        let t = TempDir::new("chain");
        let a = t.file("a.vhdx", "loc=relative_path|b.vhdx");
        t.file("b.vhdx", "loc=relative_path|c.vhdx");
        t.file("c.vhdx", "loc=relative_path|A.VHDX");
        let msg = open_fake(&a, &ChainOptions::default())
            .err()
            .unwrap()
            .to_string();
        let e = open_fake(&a, &ChainOptions::default()).err().unwrap();
        assert!(
            matches!(&e, Error::Request(Request::ParentCycle { child, same, level: 0, .. })
                if child.ends_with("c.vhdx") && *same == a),
            "{msg}"
        );

        // A hard link to an ancestor is the same file.
        let t = TempDir::new("chain");
        let a = t.file("a.vhdx", "loc=relative_path|b.vhdx");
        t.file("b.vhdx", "loc=relative_path|alias.vhdx");
        fs::hard_link(&a, t.path().join("alias.vhdx")).unwrap();
        let msg = open_fake(&a, &ChainOptions::default())
            .err()
            .unwrap()
            .to_string();
        let e = open_fake(&a, &ChainOptions::default()).err().unwrap();
        assert!(
            matches!(&e, Error::Request(Request::ParentCycle { parent, .. })
                if parent.ends_with("alias.vhdx")),
            "{msg}"
        );

        // A layer naming itself is "parent not found" (the child itself is skipped).
        let s = t.file("self.vhdx", "loc=relative_path|self.vhdx");
        let e = open_fake(&s, &ChainOptions::default()).err().unwrap();
        assert!(matches!(e, Error::ParentNotFound { .. }), "{e}");
    }

    #[test]
    fn depth_limit() {
        let t = TempDir::new("chain");
        let n = 300;
        for i in 0..n {
            let body = if i + 1 < n {
                format!("loc=relative_path|l{}.vhdx", i + 1)
            } else {
                String::new()
            };
            t.file(&format!("l{i}.vhdx"), &body);
        }
        let opens = AtomicUsize::new(0);
        let opener = |p: &Path, o: OpenOptions, r: bool| {
            opens.fetch_add(1, Ordering::SeqCst);
            fake_open(p, o, r)
        };
        let top = t.path().join("l0.vhdx");
        let e = Chain::open_with(&top, &ChainOptions::default(), opener)
            .err()
            .unwrap();
        assert!(
            matches!(
                e,
                Error::Request(Request::ChainTooDeep {
                    max: 256,
                    depth: 256,
                    ..
                })
            ),
            "{e}"
        );
        assert_eq!(opens.load(Ordering::SeqCst), MAX_CHAIN_DEPTH);

        // Exactly 256 layers is fine.
        let top = t.path().join(format!("l{}.vhdx", n - MAX_CHAIN_DEPTH));
        let c = open_fake(&top, &ChainOptions::default()).unwrap();
        assert_eq!(c.layers.len(), MAX_CHAIN_DEPTH);
    }

    #[test]
    fn linkage_checked_along_the_chain() {
        let t = TempDir::new("chain");
        let top = t.file(
            "top.vhd",
            "format=vhd\nid=3\nloc=W2ru|.\\base.vhd\nlinkage=2",
        );
        t.file("base.vhd", "format=vhd\nid=9");
        let e = open_fake(&top, &ChainOptions::default()).err().unwrap();
        assert!(matches!(e, Error::Linkage { .. }), "{e}");
        let opts = ChainOptions {
            ignore_linkage: true,
            ..Default::default()
        };
        let c = open_fake(&top, &opts).unwrap();
        assert_eq!(c.layers.len(), 2);
        assert_eq!(c.warnings.len(), 1);
    }

    // ---- Real images (the VHD reader) ----

    /// A fixed VHD of `size` bytes of `fill`, with unique id `id`: `size` data bytes and
    /// a 512-byte footer (Virtual Hard Disk Image Format Specification, "Hard Disk
    /// Footer Format").
    fn fixed_vhd(path: &Path, size: u64, fill: u8, id: u128) {
        let mut f = vec![0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // version 1.0
        f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()); // no dynamic header
        f[28..32].copy_from_slice(b"test");
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&size.to_be_bytes()); // original size
        f[48..56].copy_from_slice(&size.to_be_bytes()); // current size
        f[56..60].copy_from_slice(&0x0078_0411u32.to_be_bytes()); // C/H/S 120/4/17
        f[60..64].copy_from_slice(&2u32.to_be_bytes()); // fixed
        f[68..84].copy_from_slice(&id.to_be_bytes());
        let sum: u32 = f.iter().map(|&b| b as u32).sum();
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        let mut data = vec![fill; size as usize];
        data.extend_from_slice(&f);
        fs::write(path, data).unwrap();
    }

    fn read_all(chain: Chain) -> Vec<u8> {
        let disk = crate::disk::Disk::new(chain, Default::default());
        let mut buf = vec![0u8; disk.len() as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = disk.read_at(done as u64, &mut buf[done..]).unwrap();
            assert!(n > 0);
            done += n;
        }
        buf
    }

    #[test]
    fn real_vhd_chain_found_next_to_child() {
        let Some(fx) = fixtures_dir() else { return };
        let top = fx.join("image-differential.vhd");
        let c = Chain::open(&top, &ChainOptions::default()).unwrap();
        assert_eq!(c.layers.len(), 2);
        let f = c.found[1].as_ref().unwrap();
        assert_eq!(f.path, fx.join("image.vhd"));
        assert!(f.recorded.ends_with("image.vhd"), "{f:?}");
        let base = Chain::open(&fx.join("image.vhd"), &Default::default());
        assert_eq!(read_all(c), read_all(base.unwrap()));
    }

    #[test]
    fn real_vhd_chain_through_search_dir() {
        let Some(fx) = fixtures_dir() else { return };
        // The child alone in a directory: its parent is found by --search-dir only.
        let t = TempDir::new("chain");
        let child = t.path().join("Child.vhd");
        fs::copy(fx.join("image-differential.vhd"), &child).unwrap();
        let tried = match Chain::open(&child, &ChainOptions::default()) {
            Err(Error::ParentNotFound { tried, .. }) => tried,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("parent found without a search dir"),
        };
        assert!(!tried.is_empty());
        let opts = ChainOptions {
            search_dirs: vec![fx.clone()],
            ..Default::default()
        };
        let c = Chain::open(&child, &opts).unwrap();
        let f = c.found[1].as_ref().unwrap();
        assert_eq!(f.locator, "--search-dir");
        assert_eq!(f.path, fx.join("image.vhd"));
    }

    #[test]
    fn real_vhd_missing_parent_lists_paths_tried() {
        let Some(fx) = fixtures_dir() else { return };
        let top = fx.join("fat-differential.vhd");
        let e = Chain::open(&top, &ChainOptions::default()).err().unwrap();
        let Error::ParentNotFound { tried, .. } = e else {
            panic!("{e}")
        };
        let missing = |p: &Path| {
            tried.iter().any(
                |t| matches!(t, Tried::Path { path, why: NotParent::Missing, .. } if path == p),
            )
        };
        assert!(
            tried.iter().any(|t| matches!(t, Tried::Path { locator, recorded, .. }
                if locator == "W2ku" && recorded == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd")),
            "{tried:?}"
        );
        assert!(
            missing(Path::new("/Projects/dfvfs/test_data/fat-parent.vhd")),
            "{tried:?}"
        );
        assert!(missing(&fx.join("fat-parent.vhd")), "{tried:?}");
    }

    #[test]
    fn real_vhd_wrong_parent_fails_linkage_and_reads_when_ignored() {
        let Some(fx) = fixtures_dir() else { return };
        let t = TempDir::new("chain");
        let wrong = t.path().join("not-the-parent.vhd");
        fixed_vhd(&wrong, 4 << 20, 0xA5, 0x1234);
        let top = fx.join("fat-differential.vhd");
        let opts = ChainOptions {
            parents: vec![wrong.clone()],
            ..Default::default()
        };
        let e = Chain::open(&top, &opts).err().unwrap();
        assert!(is_unique_id_change(&e), "{e}");

        let opts = ChainOptions {
            ignore_linkage: true,
            ..opts
        };
        let c = Chain::open(&top, &opts).unwrap();
        assert_eq!(c.found[1].as_ref().unwrap().locator, "--parent");
        assert!(c
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::LinkageMismatch { .. })));
        let data = read_all(c);
        assert_eq!(data.len(), 4 << 20);
        // Sectors the child does not hold come from the (wrong) parent.
        assert!(data.contains(&0xA5));
    }

    // ---- Real VHD chains made with the VHD creator ----

    use crate::image::vhd::create::{create_differencing, create_dynamic};
    use crate::image::vhd::Vhd;

    const PAGE: usize = 4096;

    /// Make `dir/l0.vhd` (a 1 MiB dynamic base) and `depth - 1` differencing layers over
    /// it, `l{k}.vhd` over `l{k-1}.vhd`; layer k writes 4 KiB page k filled with k + 1.
    /// Returns the paths, base first.
    fn vhd_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for k in 0..depth {
            let p = dir.join(format!("l{k}.vhd"));
            match paths.last() {
                None => create_dynamic(&p, 1 << 20, 64 << 10).unwrap(),
                Some(parent) => {
                    let parent = Vhd::open(parent, OpenOptions::default()).unwrap();
                    create_differencing(&p, &parent, 64 << 10).unwrap();
                }
            }
            let v = Vhd::open(&p, OpenOptions::writable()).unwrap();
            let w = v.writable().unwrap();
            w.write((k * PAGE) as u64, &vec![k as u8 + 1; PAGE])
                .unwrap();
            w.flush().unwrap();
            paths.push(p);
        }
        paths
    }

    fn expect_pages(data: &[u8], depth: usize) {
        for (i, page) in data.chunks(PAGE).enumerate() {
            let want = if i < depth { i as u8 + 1 } else { 0 };
            assert!(page.iter().all(|&b| b == want), "page {i} is not {want}");
        }
    }

    #[test]
    fn real_vhd_chains_of_depth_2_3_40() {
        for depth in [2, 3, 40] {
            let t = TempDir::new("chain");
            let paths = vhd_chain(t.path(), depth);
            let top = paths.last().unwrap();
            let c = Chain::open(top, &ChainOptions::default()).unwrap();
            assert_eq!(c.layers.len(), depth);
            for (i, f) in c.found.iter().enumerate().skip(1) {
                let f = f.as_ref().unwrap();
                assert_eq!(f.locator, "W2ru");
                assert_eq!(f.path, paths[depth - 1 - i]);
            }
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
            expect_pages(&read_all(c), depth);
        }
    }

    #[test]
    fn real_vhd_chain_moved_and_renamed() {
        let t = TempDir::new("chain");
        fs::create_dir(t.path().join("a")).unwrap();
        vhd_chain(&t.path().join("a"), 3);
        // Moving the directory makes the absolute locators stale; the relative ones
        // still work. Changing the case of a name is matched case-insensitively.
        fs::rename(t.path().join("a"), t.path().join("b")).unwrap();
        fs::rename(t.path().join("b/l1.vhd"), t.path().join("b/L1.VHD")).unwrap();
        let c = Chain::open(&t.path().join("b/l2.vhd"), &ChainOptions::default()).unwrap();
        let f = c.found[1].as_ref().unwrap();
        assert_eq!(f.path, t.path().join("b/L1.VHD"));
        assert_eq!(f.locator, "W2ru");
        expect_pages(&read_all(c), 3);
    }

    #[test]
    fn real_vhd_writable_top_parents_read_only() {
        let t = TempDir::new("chain");
        let paths = vhd_chain(t.path(), 3);
        let opts = ChainOptions {
            intent: Intent::WriteTop,
            ..Default::default()
        };
        let c = Chain::open(&paths[2], &opts).unwrap();
        assert!(c.layers[0].writable().is_some());
        assert!(c.layers[1].writable().is_none());
        assert!(c.layers[2].writable().is_none());
    }

    /// The lock rules of each intent, with the conflicting opener in this process (flock
    /// locks of two descriptors conflict within one process as between processes).
    #[test]
    fn intents_apply_the_lock_rules() {
        let t = TempDir::new("chain");
        let paths = vhd_chain(t.path(), 2);
        let (base, child) = (&paths[0], &paths[1]);
        let with = |intent| ChainOptions {
            intent,
            ..Default::default()
        };
        let refused = |path: &Path, intent: Intent| -> Request {
            match Chain::open(path, &with(intent)) {
                Ok(_) => panic!("{intent:?} open of {} was allowed", path.display()),
                Err(Error::Request(r)) => r,
                Err(e) => panic!("{intent:?} open of {}: {e}", path.display()),
            }
        };
        let me = format!("pid {}: this process", std::process::id());

        // The base is being written (by "another process": another descriptor here).
        let writer = Chain::open(base, &with(Intent::WriteTop)).unwrap();
        for (path, intent, why) in [
            // The reason each intent gives (its start).
            (child, Intent::WriteTop, "to write a disk over it"),
            (base, Intent::CreateChild, "to create a child over it"),
            (
                child,
                Intent::CreateChild,
                "to create a child over a chain that includes it",
            ),
            (child, Intent::Rewrite(1), "to write a disk over it"),
            (child, Intent::Copy, "to copy a chain that includes it"),
            (base, Intent::Copy, "to copy a chain that includes it"),
        ] {
            let r = refused(path, intent);
            assert!(
                matches!(&r, Request::OpenForWriting { path: p, who, why: w }
                    if p == base && who.contains(&me) && w.starts_with(why)),
                "{intent:?} {}: {r}",
                path.display()
            );
        }
        // Looking still works, with a warning, and without a parent cache.
        let c = Chain::open(child, &with(Intent::Inspect)).unwrap();
        assert!(c.layers[1].written_by().is_some_and(|w| w.contains(&me)));
        assert!(c.layers[0].written_by().is_none());
        assert!(
            c.warnings
                .iter()
                .any(|w| matches!(w, Warning::OpenForWriting { .. })),
            "{:?}",
            c.warnings
        );
        let d = crate::disk::Disk::new(c, Default::default());
        assert!(d.stats_text().contains("cache off"), "{}", d.stats_text());
        drop(d);
        drop(writer);

        // A writable child holds its parent shared: the parent cannot be written, nor
        // the child opened for writing twice; a look at either still works.
        let w = Chain::open(child, &with(Intent::WriteTop)).unwrap();
        for path in [base, child] {
            let r = refused(path, Intent::WriteTop);
            assert!(
                matches!(&r, Request::InUse { path: p, .. } if p == path),
                "{r}"
            );
        }
        let c = Chain::open(base, &with(Intent::CreateChild)).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        drop(c);
        // A copy of the base (not being written) is fine, of the child is not.
        let c = Chain::open(base, &with(Intent::Copy)).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        drop(c);
        let r = refused(child, Intent::Copy);
        assert!(
            matches!(&r, Request::OpenForWriting { path: p, why, .. }
                if p == child && why.starts_with("to copy a chain that includes it")),
            "{r}"
        );
        drop(w);

        // Rewrite(2) writes the top two layers.
        let c = Chain::open(child, &with(Intent::Rewrite(2))).unwrap();
        assert!(c.layers.iter().all(|l| l.writable().is_some()));
    }

    #[test]
    fn real_vhd_over_smaller_raw_base_given_with_parent() {
        let t = TempDir::new("chain");
        let paths = vhd_chain(t.path(), 2);
        // A raw base half the child's size, full of 0x77: page 0 (not held by the
        // child) comes from it, the child's page 1 from the child, the second half
        // past the raw base's end reads as zeros.
        let raw = t.path().join("base.img");
        fs::write(&raw, vec![0x77u8; 512 << 10]).unwrap();
        let opts = ChainOptions {
            parents: vec![raw.clone()],
            ignore_linkage: true,
            ..Default::default()
        };
        let c = Chain::open(&paths[1], &opts).unwrap();
        assert_eq!(c.layers[1].path(), raw);
        assert_eq!(c.layers[1].format(), Format::Raw);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let data = read_all(c);
        assert_eq!(data.len(), 1 << 20);
        assert!(data[..PAGE].iter().all(|&b| b == 0x77));
        assert!(data[PAGE..2 * PAGE].iter().all(|&b| b == 2));
        assert!(data[2 * PAGE..512 << 10].iter().all(|&b| b == 0x77));
        assert!(data[512 << 10..].iter().all(|&b| b == 0));

        // Found through a locator instead, a raw file is not an image.
        fs::remove_file(&paths[0]).unwrap();
        fs::rename(&raw, &paths[0]).unwrap();
        let e = Chain::open(&paths[1], &ChainOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(e.defect(), Some(crate::error::Defect::NotAnImage)),
            "{e}"
        );
    }

    // ---- Real VHDX chains made with the VHDX writer ----

    use crate::image::vhdx::create::{write_new, NewVhdx};

    /// Write a new VHDX of 4 MiB at `path`; with `parent`, a differencing child whose
    /// locator records `parent`'s DataWriteGuid and the given path entries.
    fn new_vhdx(path: &Path, lss: u32, parent: Option<(&Path, &[(&str, &str)])>) {
        let parent_locator = parent.map(|(pp, entries)| {
            let p = open_layer(pp, OpenOptions::default(), false).unwrap();
            let mut kv = vec![(
                "parent_linkage".to_string(),
                format!("{{{}}}", p.linkage_id().unwrap()),
            )];
            kv.extend(entries.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            kv
        });
        let n = NewVhdx {
            virtual_size: 4 << 20,
            block_size: 1 << 20,
            logical_sector_size: lss,
            physical_sector_size: 4096,
            parent_locator,
            virtual_disk_id: None,
            fixed: false,
        };
        crate::image::create_new_file(path, |f| write_new(f, path, &n, "chain test")).unwrap();
    }

    fn write_page(path: &Path, page: usize, fill: u8) {
        let l = open_layer(path, OpenOptions::writable(), false).unwrap();
        let w = l.writable().unwrap();
        w.write((page * PAGE) as u64, &vec![fill; PAGE]).unwrap();
        w.flush().unwrap();
    }

    #[test]
    fn real_vhdx_chain_of_three() {
        let t = TempDir::new("chain");
        let base = t.path().join("Base Disks/Base.vhdx");
        new_vhdx(&base, 512, None);
        write_page(&base, 0, 1);
        let mid = t.path().join("work/mid.avhdx");
        // Relative path with different case, absolute path stale.
        new_vhdx(
            &mid,
            512,
            Some((
                &base,
                &[
                    ("relative_path", "..\\base disks\\BASE.VHDX"),
                    ("absolute_win32_path", "C:\\VMs\\Base.vhdx"),
                ],
            )),
        );
        write_page(&mid, 1, 2);
        let top = t.path().join("work/top.avhdx");
        // Only a volume path, in the \\?\Volume{GUID}\ form, absolute from the root.
        let vol = format!(
            "\\\\?\\Volume{{0fd3ad2c-4f9e-4a4b-9e0b-3d7e0e0b8d11}}{}",
            mid.display().to_string().replace('/', "\\")
        );
        new_vhdx(&top, 512, Some((&mid, &[("volume_path", vol.as_str())])));
        write_page(&top, 2, 3);

        let c = Chain::open(&top, &ChainOptions::default()).unwrap();
        assert_eq!(c.layers.len(), 3);
        let f1 = c.found[1].as_ref().unwrap();
        assert_eq!((f1.locator.as_str(), &f1.path), ("volume_path", &mid));
        let f2 = c.found[2].as_ref().unwrap();
        assert_eq!((f2.locator.as_str(), &f2.path), ("relative_path", &base));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        expect_pages(&read_all(c), 3);

        // Writing to the base changes its DataWriteGuid: the chain no longer links.
        write_page(&base, 5, 9);
        let e = Chain::open(&top, &ChainOptions::default()).err().unwrap();
        assert!(
            matches!(&e, Error::Linkage {
                parent,
                msg: LinkageProblem::Changed { id_name: "DataWriteGuid", .. },
                ..
            } if parent.ends_with("Base.vhdx")),
            "{e}"
        );
        let opts = ChainOptions {
            ignore_linkage: true,
            ..Default::default()
        };
        let c = Chain::open(&top, &opts).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    }

    #[test]
    fn real_vhdx_sector_sizes_and_formats_must_agree() {
        let t = TempDir::new("chain");
        let base = t.path().join("base.vhdx");
        new_vhdx(&base, 512, None);
        let child = t.path().join("child4k.avhdx");
        new_vhdx(
            &child,
            4096,
            Some((&base, &[("relative_path", "base.vhdx")])),
        );
        let e = Chain::open(&child, &ChainOptions::default()).err().unwrap();
        assert!(
            matches!(&e, Error::Request(Request::SectorSize { child: c, child_size: 4096, parent, parent_size: 512 })
                if *c == child && *parent == base),
            "{e}"
        );

        // A VHDX child over a VHD parent (given with --parent) is refused.
        let vhd = vhd_chain(t.path(), 1).pop().unwrap();
        let child = t.path().join("child.avhdx");
        new_vhdx(
            &child,
            512,
            Some((&base, &[("relative_path", "base.vhdx")])),
        );
        let opts = ChainOptions {
            parents: vec![vhd.clone()],
            ..Default::default()
        };
        let e = Chain::open(&child, &opts).err().unwrap();
        assert!(
            matches!(&e, Error::Request(Request::FormatMix { child: c, parent, .. })
                if *c == child && *parent == vhd),
            "{e}"
        );
    }
}
