//! `set_parent`: make a differencing disk point at its parent's new place ([`set_parent`],
//! the library's verb, Hyper-V's `Set-VHD -ParentPath`; `commands/set_parent.rs` is the
//! command line's adapter).
//!
//! Policy: NEW_PARENT's chain is opened read-only with the locks of a child to be made
//! over it (`Intent::CreateChild`: it must not be changing, and cannot start to until we
//! are done; the chain options apply to it); CHILD alone is opened writable
//! (`Intent::Rewrite(1)`: an exclusive lock, so nobody has it or a child of it open)
//! without looking for its old parent. Identity first (format, sector size, size, the
//! parent id CHILD records), then the format writes the locator `create` would write
//! (`vhdx::create::parent_locator`, `vhd::create::ParentRecord`), crash-safe
//! (`vhdx::set_parent`, `vhd::set_parent`).

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::chain::{file_id, ChainOptions, Intent};
use crate::commands::create::open_parent_chain;
use crate::error::{Defect, Error, Request, Result, VhdDefect, Warning};
use crate::image::vhd::create::ParentRecord;
use crate::image::vhd::Vhd;
use crate::image::vhdx::Vhdx;
use crate::image::{detect_format, vhdx};
use crate::layer::{Format, Layer, OpenOptions};
use crate::progress::Observer;

/// What [`set_parent`] is asked to do (`vdiskfs set-parent`'s arguments).
#[derive(Debug, Clone, Default)]
pub struct SetParentOptions {
    /// The differencing disk whose parent locator is rewritten.
    pub child: PathBuf,
    /// The parent's new place: the disk CHILD was made from (VHDX: its DataWriteGuid is
    /// CHILD's parent linkage; VHD: its unique id is CHILD's parent unique id), of the
    /// same format and sector size, and no larger than CHILD.
    pub new_parent: PathBuf,
    /// How NEW_PARENT's own chain (its parents) is found; `intent` is set-parent's own
    /// and ignored.
    pub chain: ChainOptions,
    /// Accept a NEW_PARENT that is not the disk CHILD was made from and record its
    /// identity (Hyper-V's -IgnoreIdMismatch; the observer gets
    /// `Warning::IdMismatchIgnored`).
    pub ignore_id_mismatch: bool,
    /// Work out the new locator entries and change nothing.
    pub dry_run: bool,
}

/// What a [`set_parent`] did, or (dry run) would do: CHILD's parent locator entries
/// (name, value) before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetParentReport {
    pub old_locator: Vec<(String, String)>,
    pub new_locator: Vec<(String, String)>,
    /// NEW_PARENT's id is the one CHILD records (false: accepted with
    /// `ignore_id_mismatch`, and the new identity recorded).
    pub id_matched: bool,
}

/// Rewrite `opts.child`'s parent locator to name `opts.new_parent` (`vdiskfs
/// set-parent`), after the identity checks; refusals (formats, a cycle, sector size,
/// size, the parent id without `ignore_id_mismatch`) change no byte.
pub fn set_parent(opts: &SetParentOptions, progress: &dyn Observer) -> Result<SetParentReport> {
    let args = opts;
    let child = args.child.as_path();
    let format = detect_format(child)?;
    let parent_format = detect_format(&args.new_parent)?;
    let name = |f: Option<Format>| f.map(Format::name).unwrap_or("neither VHDX nor VHD");
    match (format, parent_format) {
        (Some(Format::Vhdx), Some(Format::Vhdx)) => set_vhdx(args, progress),
        (Some(Format::Vhd), Some(Format::Vhd)) => set_vhd(args, progress),
        (Some(c @ (Format::Vhdx | Format::Vhd)), p) => Err(Error::Request(Request::FormatMix {
            child: child.to_path_buf(),
            child_format: c.name(),
            parent: args.new_parent.clone(),
            parent_format: name(p),
        })),
        (f, _) => Err(Error::Request(Request::SetParentFormat {
            child: child.to_path_buf(),
            format: name(f),
        })),
    }
}

/// How CHILD is opened: writable with an exclusive lock, or (`--dry-run`) read-only.
fn child_options(args: &SetParentOptions) -> OpenOptions {
    if args.dry_run {
        Intent::Inspect.open_options(0)
    } else {
        Intent::Rewrite(1).open_options(0)
    }
}

/// Refuse a NEW_PARENT whose chain holds CHILD (or is CHILD).
fn refuse_cycle(child: &Path, parent: &Path, chain: &crate::chain::Chain) -> Result<()> {
    let id = file_id(child)?;
    for l in &chain.layers {
        if file_id(l.path())? == id {
            return Err(Error::Request(Request::ParentIsChild {
                child: child.to_path_buf(),
                parent: parent.to_path_buf(),
                same: l.path().to_path_buf(),
            }));
        }
    }
    Ok(())
}

/// The identity check: sector size, size, and the parent id CHILD records. Returns
/// whether the id matched (false: accepted with `--ignore-id-mismatch`, after a warning
/// when `warn`).
fn check_identity(
    args: &SetParentOptions,
    child: &dyn Layer,
    parent: &dyn Layer,
    warn: Option<&dyn Observer>,
) -> Result<bool> {
    let Some(pref) = child.parent() else {
        return Err(Error::Request(Request::NotDifferencing {
            child: child.path().to_path_buf(),
        }));
    };
    if child.logical_sector_size() != parent.logical_sector_size() {
        return Err(Error::Request(Request::SectorSize {
            child: child.path().to_path_buf(),
            child_size: child.logical_sector_size(),
            parent: args.new_parent.clone(),
            parent_size: parent.logical_sector_size(),
        }));
    }
    if parent.virtual_size() > child.virtual_size() {
        return Err(Error::Request(Request::ParentLarger {
            child: child.path().to_path_buf(),
            child_size: child.virtual_size(),
            parent: args.new_parent.clone(),
            parent_size: parent.virtual_size(),
        }));
    }
    let id = parent.linkage_id().unwrap_or_else(Uuid::nil);
    if pref.linkage.contains(&id) {
        return Ok(true);
    }
    let expected = pref.linkage.clone();
    let id_name = match parent.format() {
        Format::Vhdx => "DataWriteGuid",
        _ => "unique id",
    };
    if !args.ignore_id_mismatch {
        return Err(Error::Request(Request::ParentIdMismatch {
            child: child.path().to_path_buf(),
            parent: args.new_parent.clone(),
            id_name,
            expected,
            id,
        }));
    }
    let Some(progress) = warn else {
        return Ok(false);
    };
    let w = Warning::IdMismatchIgnored {
        child: child.path().to_path_buf(),
        parent: args.new_parent.clone(),
        id_name,
        expected,
        id,
    };
    progress.warning(&w);
    Ok(false)
}

fn set_vhdx(args: &SetParentOptions, progress: &dyn Observer) -> Result<SetParentReport> {
    let opts = ChainOptions {
        intent: Intent::CreateChild,
        ..args.chain.clone()
    };
    let (parent, parent_chain) = open_parent_chain(&args.new_parent, Vhdx::open, &opts)?;
    refuse_cycle(&args.child, &args.new_parent, &parent_chain)?;
    // Checked on a read-only open first, so a refusal changes no byte (a writable open
    // replays a pending log), and again on the file as opened for writing.
    check_identity(
        args,
        &Vhdx::open(&args.child, Intent::Inspect.open_options(0))?,
        parent.as_ref(),
        Some(progress),
    )?;
    let child = Vhdx::open(&args.child, child_options(args))?;
    let id_matched = check_identity(args, &child, parent.as_ref(), None)?;
    let new = vhdx::create::parent_locator(&args.child, &parent)?;
    let old = child.metadata().parent_locator.clone();
    if !args.dry_run {
        child.set_parent_locator(&new)?;
    }
    drop(child);
    drop(parent_chain);
    Ok(SetParentReport {
        old_locator: old,
        new_locator: new,
        id_matched,
    })
}

/// A writable open refused only because the dynamic header's checksum does not match.
fn is_torn_header(e: &Error) -> bool {
    matches!(
        e.defect(),
        Some(Defect::Vhd(VhdDefect::ChecksumWritable {
            structure: "dynamic disk header"
        }))
    )
}

fn set_vhd(args: &SetParentOptions, progress: &dyn Observer) -> Result<SetParentReport> {
    let opts = ChainOptions {
        intent: Intent::CreateChild,
        ..args.chain.clone()
    };
    let (parent, parent_chain) = open_parent_chain(&args.new_parent, Vhd::open, &opts)?;
    refuse_cycle(&args.child, &args.new_parent, &parent_chain)?;
    check_identity(
        args,
        &Vhd::open(&args.child, Intent::Inspect.open_options(0))?,
        parent.as_ref(),
        Some(progress),
    )?;
    let child = match Vhd::open(&args.child, child_options(args)) {
        Err(e) if is_torn_header(&e) => {
            progress.warning(&Warning::VhdHeaderRewritten {
                path: args.child.clone(),
            });
            Vhd::open_rewriting_header(&args.child, child_options(args))?
        }
        r => r?,
    };
    let matched = check_identity(args, &child, parent.as_ref(), None)?;
    let record = ParentRecord::new(&args.child, &parent)?;
    let identity = (!matched).then(|| (parent.footer().unique_id, parent.footer().time_stamp));
    let old = child.parent_record_entries();
    let mut new: Vec<(String, String)> = vec![
        ("W2ru".into(), record.relative.clone()),
        ("W2ku".into(), record.absolute.clone()),
        ("parent_unicode_name".into(), record.unicode_name.clone()),
    ];
    match identity {
        Some((id, ts)) => {
            new.push(("parent_unique_id".into(), Uuid::from_bytes(id).to_string()));
            new.push(("parent_time_stamp".into(), ts.to_string()));
        }
        None => new.extend(
            old.iter()
                .filter(|(k, _)| k == "parent_unique_id" || k == "parent_time_stamp")
                .cloned(),
        ),
    }
    if !args.dry_run {
        child.set_parent_locator(&record, identity)?;
        // Closed (flushed, nothing reserved left over) before the report.
        drop(child);
    }
    drop(parent_chain);
    Ok(SetParentReport {
        old_locator: old,
        new_locator: new,
        id_matched: matched,
    })
}
