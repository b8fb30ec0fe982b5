//! The merge record: what `vdiskfs merge` leaves beside every layer it is folding into an
//! ancestor while the merge is under way (`commands/merge.rs`), and what every chain open
//! looks for (`chain.rs`).
//!
//! A record is a small JSON file `.NAME.vdiskfs-merge` in the directory of the layer
//! `NAME` (its real, canonical place), created with `durable::create_file_atomically`
//! before the ancestor's first byte changes and removed after the merged layers are gone.
//! While one exists, any chain through that layer refuses to open ("a merge into X was
//! interrupted; run ... to finish it"): the ancestor below it is partly written, so the
//! layers between it and the top no longer form a valid chain (a VHDX child's linkage
//! stops matching; a VHD's would not notice). The merge command itself (and `check`)
//! opens such a chain with `ChainOptions::resume_merge`, which accepts the one recorded
//! link whose id changed: the lowest merged layer over the recorded ancestor.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::chain::FileId;
use crate::error::{Error, Request, Result};
use crate::image::durable::create_file_atomically;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

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
}
