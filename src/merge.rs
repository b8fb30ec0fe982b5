//! `merge`: fold CHILD and the layers between it and an ancestor into the ancestor, then
//! delete them ([`merge`], the library's verb; `commands/merge.rs` is the command line's
//! adapter), and the merge record that makes it crash-safe.
//!
//! A record is a small JSON file `.NAME.vdiskfs-merge` in the directory of the layer
//! `NAME` (its real, canonical place), created with `durable::create_file_atomically`
//! before the ancestor's first byte changes and removed after the merged layers are gone.
//! While one exists, any chain through that layer refuses to open ("a merge into X was
//! interrupted; run ... to finish it"): the ancestor below it is partly written, so the
//! layers between it and the top no longer form a valid chain (a VHDX child's linkage
//! stops matching; a VHD's would not notice). The merge itself (and `check`) opens such a
//! chain with `ChainOptions::resume_merge`, which accepts the one recorded link whose id
//! changed: the lowest merged layer over the recorded ancestor.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::access;
use crate::chain::{file_id, resolve_parent, Chain, ChainOptions, FileId, Intent};
use crate::defect::Warning;
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Internal, Request, Result};
use crate::image::durable::create_file_atomically;
use crate::image::{detect_format, open_layer};
use crate::layer::{Format, Layer, OpenOptions, Run};
use crate::progress::Observer;

/// The record's file-name suffix.
pub const RECORD_SUFFIX: &str = ".vdiskfs-merge";

/// Where the copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The ancestor is being written (or may have been): the copy must be (re)done.
    Copying,
    /// The ancestor holds everything and is durable: only deleting is left.
    Copied,
}

/// One merge under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRecord {
    pub phase: Phase,
    /// The merged layers, canonical paths, the top (CHILD) first, the one directly above
    /// the ancestor last.
    pub layers: Vec<PathBuf>,
    /// The ancestor (canonical path) and its device and inode at the start.
    pub ancestor: PathBuf,
    pub ancestor_id: FileId,
    /// The command that finishes the merge (for messages).
    pub command: String,
}

/// The record beside `layer` (the file's canonical place; for a file that is gone, its
/// canonical directory and its name).
pub fn record_path(layer: &Path) -> Result<PathBuf> {
    let real = match fs::canonicalize(layer) {
        Ok(p) => p,
        Err(_) => {
            let dir = match layer.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let dir = fs::canonicalize(dir).map_err(|e| Error::file(dir, "find directory", e))?;
            let name = layer.file_name().ok_or_else(|| {
                Error::Request(Request::NotAFileName {
                    path: layer.to_path_buf(),
                })
            })?;
            dir.join(name)
        }
    };
    let name = real.file_name().expect("canonical paths name a file");
    Ok(real.with_file_name(format!(".{}{RECORD_SUFFIX}", name.to_string_lossy())))
}

impl MergeRecord {
    fn to_json(&self) -> String {
        let v = json!({
            "vdiskfs_merge": 1,
            "phase": match self.phase { Phase::Copying => "copying", Phase::Copied => "copied" },
            "layers": self.layers.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "ancestor": self.ancestor.display().to_string(),
            "ancestor_dev": self.ancestor_id.dev,
            "ancestor_ino": self.ancestor_id.ino,
            "command": self.command,
        });
        serde_json::to_string_pretty(&v).expect("JSON values serialise") + "\n"
    }

    fn from_json(path: &Path, text: &str) -> Result<MergeRecord> {
        let bad = |what: &'static str| {
            Error::Request(Request::BadMergeRecord {
                path: path.to_path_buf(),
                what,
            })
        };
        let v: Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        if v["vdiskfs_merge"].as_u64() != Some(1) {
            return Err(bad("unknown version"));
        }
        let phase = match v["phase"].as_str() {
            Some("copying") => Phase::Copying,
            Some("copied") => Phase::Copied,
            _ => return Err(bad("no phase")),
        };
        let layers: Vec<PathBuf> = v["layers"]
            .as_array()
            .ok_or_else(|| bad("no layers"))?
            .iter()
            .map(|s| s.as_str().map(PathBuf::from).ok_or_else(|| bad("layers")))
            .collect::<Result<_>>()?;
        if layers.is_empty() {
            return Err(bad("no layers"));
        }
        Ok(MergeRecord {
            phase,
            layers,
            ancestor: PathBuf::from(v["ancestor"].as_str().ok_or_else(|| bad("no ancestor"))?),
            ancestor_id: FileId {
                dev: v["ancestor_dev"]
                    .as_u64()
                    .ok_or_else(|| bad("no ancestor id"))?,
                ino: v["ancestor_ino"]
                    .as_u64()
                    .ok_or_else(|| bad("no ancestor id"))?,
            },
            command: v["command"].as_str().unwrap_or("vdiskfs merge").to_string(),
        })
    }

    /// The record beside `layer`, if there is one.
    pub fn beside(layer: &Path) -> Result<Option<MergeRecord>> {
        let path = record_path(layer)?;
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(Self::from_json(&path, &text)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::file(&path, "read", e)),
        }
    }

    /// Write (or replace) the record beside `layer`, durably.
    pub fn write_beside(&self, layer: &Path) -> Result<()> {
        let path = record_path(layer)?;
        let text = self.to_json();
        create_file_atomically(&path, true, |f| {
            use std::io::Write;
            let mut f = f;
            f.write_all(text.as_bytes())
                .map_err(|e| Error::file(&path, "write", e))
        })
    }

    /// The link the record allows to mismatch: (lowest merged layer, ancestor), by file
    /// id. None when the lowest merged layer is gone.
    pub fn accepted_link(&self) -> Option<(FileId, FileId)> {
        let low = self.layers.last()?;
        let md = fs::metadata(low).ok()?;
        Some((
            FileId {
                dev: md.dev(),
                ino: md.ino(),
            },
            self.ancestor_id,
        ))
    }
}

/// Remove `path` and make the removal durable (fsync its directory). A file already gone
/// is fine.
pub fn remove_durably(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::file(path, "delete", e)),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = fs::File::open(dir) {
        d.sync_all().map_err(|e| Error::file(dir, "fsync", e))?;
    }
    Ok(())
}

const MIB: u64 = 1 << 20;
/// Bytes read and written per step of the copy.
const PIECE: u64 = 4 * MIB;
/// Virtual bytes mapped per step when looking for the ranges to merge.
const MAP_WINDOW: u64 = 1 << 30;

/// `path` for a shell command line (single-quoted when it needs it).
fn shell(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::file(p, "resolve", e))
}

/// The command that finishes this merge.
fn finish_command(args: &MergeOptions, child: &Path, ancestor: &Path) -> String {
    let mut c = String::from("vdiskfs merge");
    for d in &args.chain.search_dirs {
        let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        c += &format!(" --search-dir {}", shell(&d));
    }
    for p in &args.chain.parents {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        c += &format!(" --parent {}", shell(&p));
    }
    if args.chain.allow_device_parent {
        c += " --allow-device-parent";
    }
    if args.chain.ignore_linkage {
        c += " --ignore-linkage";
    }
    c += &format!(" --into {}", shell(ancestor));
    if args.keep {
        c += " --keep";
    }
    if args.force {
        c += " --force";
    }
    c + " " + &shell(child)
}

fn chain_options(args: &MergeOptions, intent: Intent) -> ChainOptions {
    ChainOptions {
        intent,
        resume_merge: true,
        ..args.chain.clone()
    }
}

/// The ranges of the disk held (data or zeros) by one of `layers[..k]`, the upper layer
/// deciding, widened to whole `unit`s and merged. This is what ANCESTOR (`layers[k]`)
/// must take over; everywhere else CHILD already reads what ANCESTOR reads.
pub(crate) fn merge_ranges(
    layers: &[Arc<dyn Layer>],
    k: usize,
    size: u64,
    unit: u64,
) -> Result<Vec<(u64, u64)>> {
    fn level(
        layers: &[Arc<dyn Layer>],
        lv: usize,
        k: usize,
        off: u64,
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if lv >= k {
            return Ok(());
        }
        let mut runs = Vec::new();
        layers[lv].data_map(off, len, &mut runs)?;
        let mut pos = off;
        for r in runs {
            let n = r.len();
            match r {
                Run::Held { .. } | Run::Zero { .. } => match out.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += n,
                    _ => out.push((pos, n)),
                },
                Run::Absent { .. } => level(layers, lv + 1, k, pos, n, out)?,
            }
            pos += n;
        }
        if pos != off + len {
            return Err(Error::Internal(Internal::MapLength {
                path: layers[lv].path().to_path_buf(),
                len,
                offset: off,
                described: pos - off,
            }));
        }
        Ok(())
    }
    let mut raw = Vec::new();
    let mut off = 0;
    while off < size {
        let len = MAP_WINDOW.min(size - off);
        level(layers, 0, k, off, len, &mut raw)?;
        off += len;
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in raw {
        let a = o - o % unit;
        let b = (o + l).div_ceil(unit).saturating_mul(unit).min(size);
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= a => *pl = (*pl).max(b - *po),
            _ => out.push((a, b - a)),
        }
    }
    Ok(out)
}

/// Another disk whose parent is ANCESTOR or a merged layer (it breaks with the merge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeDependent {
    /// The other disk.
    pub path: PathBuf,
    /// Its parent: ANCESTOR or a merged layer.
    pub parent: PathBuf,
}

/// Disks in `dirs` whose parent resolves (by locator, then id) to one of `targets`
/// (file id, linkage id, path); files in `skip` are not looked at.
fn find_dependents(
    dirs: &[PathBuf],
    targets: &[(FileId, Option<uuid::Uuid>, PathBuf)],
    skip: &HashSet<FileId>,
    search_dirs: &[PathBuf],
) -> Vec<MergeDependent> {
    let mut seen_dirs = HashSet::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let opts = ChainOptions {
        search_dirs: search_dirs.to_vec(),
        ..Default::default()
    };
    for dir in dirs {
        let Ok(dir) = std::fs::canonicalize(dir) else {
            continue;
        };
        if !seen_dirs.insert(dir.clone()) {
            continue;
        }
        let Ok(names) = access::list_dir(&dir) else {
            continue;
        };
        for name in names {
            let n = name.to_string_lossy();
            if n.ends_with(RECORD_SUFFIX) || n.contains(".vdiskfs-tmp-") {
                continue;
            }
            let path = dir.join(&name);
            match std::fs::metadata(&path) {
                Ok(md) if md.is_file() => {}
                _ => continue,
            }
            let Ok(id) = file_id(&path) else { continue };
            if skip.contains(&id) || !seen.insert(id) {
                continue;
            }
            if !matches!(detect_format(&path), Ok(Some(Format::Vhdx | Format::Vhd))) {
                continue;
            }
            let Ok(layer) = open_layer(&path, OpenOptions::read_only(), false) else {
                continue;
            };
            let Some(pref) = layer.parent() else { continue };
            let Ok(found) = resolve_parent(&path, pref, 0, &opts) else {
                continue;
            };
            let Ok(pid) = file_id(&found.path) else {
                continue;
            };
            for (tid, linkage, tpath) in targets {
                let linked =
                    pref.linkage.is_empty() || linkage.is_some_and(|l| pref.linkage.contains(&l));
                if *tid == pid && linked {
                    out.push(MergeDependent {
                        path: path.clone(),
                        parent: tpath.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Bytes the ancestor's file may grow by: a new block for every block the ranges touch
/// that holds nothing (of any disk type), plus room for bitmaps and metadata, plus the holes under
/// what it holds (qemu-img makes fixed disks as sparse files, and a block written in
/// part may be sparse: writing there allocates too). 0 when nothing is allocated.
fn space_needed(anc: &dyn Layer, ranges: &[(u64, u64)]) -> Result<u64> {
    let info = anc.info()?;
    let file = std::fs::File::open(anc.path()).map_err(|e| Error::file(anc.path(), "open", e))?;
    let mut runs = Vec::new();
    let mut holes = 0u64;
    for &(o, l) in ranges {
        runs.clear();
        anc.map(o, l, &mut runs)?;
        for r in &runs {
            if let Run::Held { len, file_offset } = *r {
                holes += crate::image::raw::hole_bytes(&file, file_offset, len);
            }
        }
    }
    let mut new = 0u64;
    // A fixed disk counts too: qemu-img's fixed VHDX marks its blocks ZERO, and writing
    // one allocates a new block.
    if info.block_size != 0 {
        let bs = info.block_size;
        let size = anc.virtual_size();
        let mut blocks = HashSet::new();
        for &(o, l) in ranges {
            for b in o / bs..(o + l).div_ceil(bs) {
                blocks.insert(b);
            }
        }
        for b in blocks {
            runs.clear();
            let start = b * bs;
            anc.map(start, bs.min(size - start), &mut runs)?;
            if !runs.iter().any(|r| matches!(r, Run::Held { .. })) {
                new += bs + 4096;
            }
        }
    }
    if holes == 0 && new == 0 {
        return Ok(0);
    }
    Ok(holes + new + 16 * MIB)
}

fn free_space(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Copy the ranges from CHILD's view (`disk`) into `layers[k]`: a reader thread reads
/// pieces of the merged view, this thread writes them through the ancestor's writer. A
/// piece of zeros over a range the ancestor itself reads as zeros is skipped.
fn copy(
    disk: &Disk,
    k: usize,
    ranges: &[(u64, u64)],
    cancel: &AtomicBool,
    progress: &dyn Observer,
) -> Result<bool> {
    let anc = disk.layers()[k].clone();
    let w = anc.writable().ok_or_else(|| {
        Error::Internal(Internal::NotWritable {
            path: anc.path().to_path_buf(),
        })
    })?;
    let mut pieces = Vec::new();
    for &(o, l) in ranges {
        let mut p = o;
        while p < o + l {
            let n = PIECE.min(o + l - p);
            pieces.push((p, n));
            p += n;
        }
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<bool> {
        let (tx, rx) = sync_channel::<Result<(u64, Vec<u8>)>>(2);
        // Buffers go back to the reader: fresh 4 MiB allocations cost a page fault and a
        // zeroed page per 4 KiB, as much CPU as the copy itself.
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);
        let stop = &stop;
        let pieces = &pieces;
        s.spawn(move || {
            for &(o, n) in pieces {
                if cancel.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut buf = free_rx.try_recv().unwrap_or_default();
                buf.resize(n as usize, 0);
                let r = disk.read_at(o, &mut buf).map(|_| (o, buf));
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut runs = Vec::new();
        let result = (|| {
            for msg in rx.iter() {
                let (o, buf) = msg?;
                let zeros = buf.iter().all(|&b| b == 0);
                let skip = zeros && {
                    runs.clear();
                    anc.map(o, buf.len() as u64, &mut runs)?;
                    runs.iter().all(|r| matches!(r, Run::Zero { .. }))
                };
                if !skip {
                    w.write(o, &buf)?;
                }
                progress.advance(buf.len() as u64);
                let _ = free_tx.try_send(buf);
                if cancel.load(Ordering::Relaxed) {
                    return Ok(false);
                }
            }
            Ok(!cancel.load(Ordering::Relaxed))
        })();
        stop.store(true, Ordering::Relaxed);
        // Unblock the reader if it waits to send.
        drop(rx);
        result
    })
}

/// What [`merge`] is asked to do (`vdiskfs merge`'s arguments).
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// CHILD: the top of the run of layers folded into the ancestor.
    pub child: PathBuf,
    /// The ancestor to merge into (None: CHILD's parent); must be in CHILD's chain.
    pub into: Option<PathBuf>,
    /// How CHILD's chain is found (`search_dirs`, `parents`, `ignore_linkage`,
    /// `allow_device_parent`); `intent` and `resume_merge` are merge's own and ignored.
    pub chain: ChainOptions,
    /// Keep the merged layers instead of deleting them (they are no longer valid
    /// children afterwards).
    pub keep: bool,
    /// Merge even when other disks depend on the ancestor or a merged layer (they break;
    /// each is given to the observer as `Warning::MergeBreaksDependent`).
    pub force: bool,
    /// Only find out what would be merged; change nothing.
    pub dry_run: bool,
    /// Skip the free-space check.
    pub no_space_check: bool,
}

/// How a [`merge`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Merged (and, unless `keep`, the merged layers deleted).
    Merged,
    /// A dry run: nothing changed; the report says what a merge would do.
    DryRun,
    /// CHILD was gone and its record said the copy was complete: only the deletions of
    /// an interrupted merge were left, and are done now.
    FinishedInterrupted,
    /// Cancelled during the copy: the merge records stay, every chain through the merged
    /// layers refuses to open, and [`MergeReport::command`] finishes the merge.
    Interrupted,
    /// Cancelled before anything changed.
    Cancelled,
}

/// What a [`merge`] did, or (dry run) would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    pub outcome: MergeOutcome,
    /// The merged layers (canonical paths), CHILD first, the one above the ancestor last.
    pub layers: Vec<PathBuf>,
    /// The ancestor (canonical path).
    pub ancestor: PathBuf,
    /// The ancestor's format and disk type (`LayerInfo::disk_type`; empty when unknown).
    /// None, and empty, for `FinishedInterrupted` (the chain is not opened).
    pub ancestor_format: Option<Format>,
    pub ancestor_type: String,
    /// Bytes the merged layers hold (data or zeros), widened to the ancestor's write
    /// unit: what is copied into the ancestor, and in how many ranges.
    pub bytes: u64,
    pub ranges: usize,
    /// Other disks that depend on the ancestor or a merged layer (with `force`, broken).
    pub dependents: Vec<MergeDependent>,
    /// A record of an earlier, interrupted merge of these layers was found (this run
    /// finishes it).
    pub resumed: bool,
    /// The command line that finishes this merge when it is interrupted.
    pub command: String,
}

/// Fold `opts.child` and the layers between it and the ancestor into the ancestor, then
/// delete them (`vdiskfs merge`). Crash-safe through merge records: order records beside
/// every merged layer (durable) -> copy (every range a merged layer holds, read from
/// CHILD's merged view, written through the ancestor's own writer) -> close the ancestor
/// (durable, clean) -> CHILD's record says "copied" -> delete the merged layers, top
/// first -> remove the records, CHILD's last. While the copy runs, CHILD's view does not
/// change: every sector written into the ancestor is shadowed by a merged layer.
///
/// `progress` gets one phase, `"merge"`, of the bytes copied, and the warnings; `cancel`
/// stops the copy between pieces (outcome `Interrupted`; before the first change,
/// `Cancelled`). Refusals (the chain, dependents without `force`, free space, read-only
/// files, an unrelated interrupted merge) are `Error::Request`s, with nothing changed.
pub fn merge(
    opts: &MergeOptions,
    progress: &dyn Observer,
    cancel: &AtomicBool,
) -> Result<MergeReport> {
    let args = opts;
    let existing = MergeRecord::beside(&args.child)?;
    if args.child.symlink_metadata().is_err() {
        return match existing {
            Some(rec) if rec.phase == Phase::Copied => {
                finish(&rec, false, None, None)?;
                Ok(MergeReport {
                    outcome: MergeOutcome::FinishedInterrupted,
                    layers: rec.layers,
                    ancestor: rec.ancestor,
                    ancestor_format: None,
                    ancestor_type: String::new(),
                    bytes: 0,
                    ranges: 0,
                    dependents: Vec::new(),
                    resumed: true,
                    command: rec.command,
                })
            }
            _ => Err(Error::file(
                &args.child,
                "open",
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )),
        };
    }
    // 1. Look at the chain (read-only) to find the run, the ancestor and what depends on
    //    them.
    let chain = Chain::open(&args.child, &chain_options(args, Intent::Inspect))?;
    let ids: Vec<FileId> = chain
        .layers
        .iter()
        .map(|l| file_id(l.path()))
        .collect::<Result<_>>()?;
    let k = match &args.into {
        Some(into) => {
            let want = file_id(into)?;
            match ids.iter().position(|&i| i == want) {
                Some(0) => {
                    return Err(Error::Request(Request::MergeIntoChild {
                        into: into.clone(),
                    }))
                }
                Some(k) => k,
                None => {
                    let names: Vec<String> = chain
                        .layers
                        .iter()
                        .map(|l| l.path().display().to_string())
                        .collect();
                    return Err(Error::Request(Request::MergeIntoNotInChain {
                        into: into.clone(),
                        child: args.child.clone(),
                        chain: names,
                    }));
                }
            }
        }
        None if chain.layers.len() < 2 => {
            return Err(Error::Request(Request::MergeNoParent {
                child: args.child.clone(),
            }))
        }
        None => 1,
    };
    let anc = chain.layers[k].clone();
    let anc_path = canonical(anc.path())?;
    let run_paths: Vec<PathBuf> = chain.layers[..k]
        .iter()
        .map(|l| canonical(l.path()))
        .collect::<Result<_>>()?;
    let child = run_paths[0].clone();
    if anc.format() == Format::Raw {
        return Err(Error::Request(Request::MergeIntoRaw {
            ancestor: anc.path().to_path_buf(),
        }));
    }
    // Records: only this merge's own may be present, and only on the merged layers.
    for (i, l) in chain.layers.iter().enumerate() {
        if let Some(rec) = MergeRecord::beside(l.path())? {
            let ours = i < k && rec.ancestor_id == ids[k] && rec.layers == run_paths;
            if !ours {
                return Err(Error::Request(Request::MergeInterrupted {
                    layer: l.path().to_path_buf(),
                    ancestor: rec.ancestor,
                    command: rec.command,
                }));
            }
        }
    }
    for l in &chain.layers[..k] {
        if l.virtual_size() != anc.virtual_size() {
            return Err(Error::Request(Request::MergeSizeDiffers {
                layer: l.path().to_path_buf(),
                size: l.virtual_size(),
                ancestor: anc.path().to_path_buf(),
                ancestor_size: anc.virtual_size(),
            }));
        }
    }
    for l in &chain.layers[..=k] {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(l.path()).map_err(|e| Error::file(l.path(), "stat", e))?;
        if md.permissions().mode() & 0o222 == 0 {
            return Err(Error::Request(Request::MergeReadOnlyFile {
                path: l.path().to_path_buf(),
                mode: md.permissions().mode() & 0o7777,
            }));
        }
    }
    let command = finish_command(args, &child, &anc_path);

    // Other disks that depend on the ancestor or a merged layer.
    let mut dirs: Vec<PathBuf> = run_paths
        .iter()
        .chain(std::iter::once(&anc_path))
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.extend(args.chain.search_dirs.iter().cloned());
    let targets: Vec<(FileId, Option<uuid::Uuid>, PathBuf)> = chain.layers[..=k]
        .iter()
        .zip(&ids)
        .map(|(l, id)| (*id, l.linkage_id(), l.path().to_path_buf()))
        .collect();
    let skip: HashSet<FileId> = ids.iter().copied().collect();
    let dependents = find_dependents(&dirs, &targets, &skip, &args.chain.search_dirs);

    let size = anc.virtual_size();
    let unit = (anc.logical_sector_size() as u64).max(match anc.format() {
        // A differencing VHD is written in whole bitmap bytes (`write_granularity`).
        Format::Vhd if anc.parent().is_some() => 4096,
        _ => 0,
    });
    let ranges = merge_ranges(&chain.layers, k, size, unit)?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let anc_type = anc.info().map(|i| i.disk_type).unwrap_or_default();

    let mut report = MergeReport {
        outcome: MergeOutcome::DryRun,
        layers: run_paths.clone(),
        ancestor: anc_path.clone(),
        ancestor_format: Some(anc.format()),
        ancestor_type: anc_type,
        bytes: total,
        ranges: ranges.len(),
        dependents,
        resumed: existing.is_some(),
        command: command.clone(),
    };
    let dependents = &report.dependents;
    if args.dry_run {
        return Ok(report);
    }
    if !dependents.is_empty() && !args.force {
        let list: Vec<String> = dependents
            .iter()
            .map(|d| format!("{} (child of {})", d.path.display(), d.parent.display()))
            .collect();
        return Err(Error::Request(Request::MergeDependents {
            ancestor: anc_path.clone(),
            dependents: list,
        }));
    }
    let phase = existing.as_ref().map_or(Phase::Copying, |r| r.phase);
    if phase == Phase::Copying && existing.is_none() && !args.no_space_check {
        let need = space_needed(anc.as_ref(), &ranges)?;
        let dir = anc_path.parent().unwrap_or(Path::new("/"));
        if let Some(free) = free_space(dir) {
            if need > free {
                return Err(Error::Request(Request::MergeNoSpace {
                    ancestor: anc_path.clone(),
                    total,
                    need_mib: need.div_ceil(MIB),
                    free_mib: free / MIB,
                }));
            }
        }
    }
    for d in dependents {
        progress.warning(&Warning::MergeBreaksDependent {
            path: d.path.clone(),
            parent: d.parent.clone(),
        });
    }
    drop(anc);
    drop(chain);

    if cancel.load(Ordering::Relaxed) {
        // Nothing changed by this run (an earlier run's records stay as they were).
        report.outcome = if report.resumed {
            MergeOutcome::Interrupted
        } else {
            MergeOutcome::Cancelled
        };
        return Ok(report);
    }

    // 2. Reopen for the merge: the run and the ancestor exclusively, the rest shared.
    let chain = Chain::open(&args.child, &chain_options(args, Intent::Rewrite(k + 1)))?;
    if chain.layers.len() <= k || file_id(chain.layers[k].path())? != ids[k] {
        return Err(Error::Request(Request::ChainChanged {
            child: args.child.clone(),
        }));
    }
    let mut rec = existing.unwrap_or(MergeRecord {
        phase: Phase::Copying,
        layers: run_paths.clone(),
        ancestor: anc_path.clone(),
        ancestor_id: ids[k],
        command: command.clone(),
    });
    for p in &run_paths {
        crate::image::remove_stale_temps(&record_path(p)?);
    }
    if rec.phase == Phase::Copying {
        // Before the ancestor's first byte changes: CHILD's record first (it is what a
        // rerun starts from), then the others.
        for p in &run_paths {
            if MergeRecord::beside(p)?.is_none() {
                rec.write_beside(p)?;
            }
        }
        let disk = Disk::new(
            chain,
            DiskOptions {
                cache_bytes: 0,
                ..Default::default()
            },
        );
        let ranges = merge_ranges(disk.layers(), k, size, unit)?;
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        (report.bytes, report.ranges) = (total, ranges.len());
        progress.begin("merge", total);
        let anc = disk.layers()[k].clone();
        let copied = copy(&disk, k, &ranges, cancel, progress);
        let closed = anc.writable().map_or(Ok(()), |w| w.close());
        progress.end();
        let anc_shown = anc.path().to_path_buf();
        let not_finished = |e: Error| {
            // An error about the ancestor itself without its leading "path: ": the
            // message names the ancestor first already.
            let cause = e.to_string();
            let cause = [&anc_path, &anc_shown]
                .iter()
                .find_map(|p| cause.strip_prefix(&format!("{}: ", p.display())))
                .map_or_else(|| cause.clone(), str::to_string);
            Error::Request(Request::MergeUnfinished {
                ancestor: anc_path.clone(),
                cause,
                child: child.clone(),
                command: command.clone(),
            })
        };
        match (copied, closed) {
            (Err(e), _) | (Ok(_), Err(e)) => return Err(not_finished(e)),
            (Ok(false), Ok(())) => {
                report.outcome = MergeOutcome::Interrupted;
                return Ok(report);
            }
            (Ok(true), Ok(())) => {}
        }
        log::info!("{}: merged {total} bytes", anc_path.display());
        rec.phase = Phase::Copied;
        rec.write_beside(&run_paths[0])?;
        drop(anc);
        finish(&rec, args.keep, Some(disk), Some(&ids[..k]))?;
    } else {
        finish(
            &rec,
            args.keep,
            Some(Disk::new(chain, DiskOptions::default())),
            Some(&ids[..k]),
        )?;
    }
    report.outcome = MergeOutcome::Merged;
    Ok(report)
}

/// After the copy: delete the merged layers (top first) unless `keep`, release the chain,
/// then remove the records (CHILD's last: a rerun starts from it).
fn finish(
    rec: &MergeRecord,
    keep: bool,
    disk: Option<Disk>,
    expected: Option<&[FileId]>,
) -> Result<()> {
    if !keep {
        for (i, p) in rec.layers.iter().enumerate() {
            // Still the very file that was merged (not one put at its path meanwhile).
            if let (Some(ids), Ok(id)) = (expected, file_id(p)) {
                if ids.get(i) != Some(&id) {
                    return Err(Error::Request(Request::MergeReplaced { path: p.clone() }));
                }
            }
            // Only a file this merge recorded: an image with the same record beside it,
            // owned by the file's owner (a record planted in a shared directory such as
            // /tmp must not make merge delete someone else's file).
            if p.symlink_metadata().is_err() {
                continue;
            }
            let same = MergeRecord::beside(p)?
                .is_some_and(|r| r.layers == rec.layers && r.ancestor_id == rec.ancestor_id);
            if !same || !same_owner(p)? {
                return Err(Error::Request(Request::MergeRecordNotBeside {
                    path: p.clone(),
                    owner: rec.layers[0].clone(),
                }));
            }
            if !matches!(detect_format(p)?, Some(Format::Vhdx | Format::Vhd)) {
                return Err(Error::Request(Request::MergeRecordNotImage {
                    path: p.clone(),
                }));
            }
            remove_durably(p)?;
        }
    }
    drop(disk);
    for p in rec.layers.iter().skip(1).chain(rec.layers.first()) {
        let r = record_path(p)?;
        remove_durably(&r)?;
        // A record's temporary file a killed run left behind.
        crate::image::remove_stale_temps(&r);
    }
    Ok(())
}

/// The record beside `layer` belongs to the layer's owner.
fn same_owner(layer: &Path) -> Result<bool> {
    let r = record_path(layer)?;
    let a = std::fs::metadata(layer).map_err(|e| Error::file(layer, "stat", e))?;
    let b = std::fs::metadata(&r).map_err(|e| Error::file(&r, "stat", e))?;
    Ok(a.uid() == b.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::vhdx::tests::{new_base, new_child, open_disk, TempDir};

    #[test]
    fn record_round_trips_and_sits_beside_the_layer() {
        let t = TempDir::new("merge-rec");
        let l = t.file("d/child.avhdx", "x");
        let rec = MergeRecord {
            phase: Phase::Copying,
            layers: vec![l.clone()],
            ancestor: t.path().join("base.vhdx"),
            ancestor_id: FileId { dev: 1, ino: 2 },
            command: "vdiskfs merge x".into(),
        };
        assert_eq!(MergeRecord::beside(&l).unwrap(), None);
        rec.write_beside(&l).unwrap();
        let p = record_path(&l).unwrap();
        assert_eq!(
            p.file_name().unwrap().to_str().unwrap(),
            ".child.avhdx.vdiskfs-merge"
        );
        assert_eq!(MergeRecord::beside(&l).unwrap(), Some(rec.clone()));
        // Still found once the layer is gone (a rerun after deleting).
        fs::remove_file(&l).unwrap();
        assert_eq!(MergeRecord::beside(&l).unwrap(), Some(rec));
        fs::write(&p, "garbage").unwrap();
        let e = MergeRecord::beside(&l).unwrap_err();
        assert!(
            matches!(&e, Error::Request(Request::BadMergeRecord { path, what: "not JSON" }) if *path == p),
            "{e}"
        );
    }

    fn write(path: &Path, writes: &[(u64, usize)]) {
        let d = open_disk(path, true);
        for &(o, n) in writes {
            d.write_at(o, &vec![7u8; n]).unwrap();
        }
        d.close().unwrap();
    }

    /// Sector-granular presence in two layers over a written base: the ranges are the
    /// union of what the two children hold, nothing of the base's own data, widened to
    /// the unit asked for.
    #[test]
    fn ranges_are_what_the_merged_layers_hold() {
        let t = TempDir::new("merge-ranges");
        let (b, c1, c2) = (t.join("b.vhdx"), t.join("c1.vhdx"), t.join("c2.vhdx"));
        new_base(&b, 8 << 20, 1 << 20, 512);
        write(&b, &[(0, 4 << 20)]);
        new_child(&c1, &b, Some("1M"));
        write(&c1, &[(512, 512), (3 << 20, 1024)]);
        new_child(&c2, &c1, Some("1M"));
        write(&c2, &[(1024, 512), (5 << 20, 4096)]);
        let chain = Chain::open(&c2, &ChainOptions::default()).unwrap();
        let size = 8 << 20;
        assert_eq!(
            merge_ranges(&chain.layers, 2, size, 512).unwrap(),
            vec![(512, 1024), (3 << 20, 1024), (5 << 20, 4096)]
        );
        assert_eq!(
            merge_ranges(&chain.layers, 1, size, 512).unwrap(),
            vec![(1024, 512), (5 << 20, 4096)]
        );
        assert_eq!(
            merge_ranges(&chain.layers, 2, size, 4096).unwrap(),
            vec![(0, 4096), (3 << 20, 4096), (5 << 20, 4096)]
        );
    }
}
