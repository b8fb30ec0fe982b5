//! `vdiskfs create`: a differencing child of a parent, or an empty dynamic base.

use std::cell::RefCell;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions, Intent};
use crate::cli::{parse_size, CreateArgs, FormatArg};
use crate::error::{Error, Result};
use crate::image::vhd::create::windows_relative_path;
use crate::image::vhdx::create::NewVhdx;
use crate::image::vhdx::Vhdx;
use crate::image::{create_new_file, detect_format, open_layer};
use crate::layer::{Format, Layer, OpenOptions};

const CREATOR: &str = concat!("vdiskfs ", env!("CARGO_PKG_VERSION"));
const DEFAULT_BLOCK: u64 = 2 << 20;

fn format_for(args: &CreateArgs) -> Result<FormatArg> {
    if let Some(f) = args.format {
        return Ok(f);
    }
    let ext = args
        .image
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "vhdx" | "avhdx" => Ok(FormatArg::Vhdx),
        "vhd" | "avhd" => Ok(FormatArg::Vhd),
        _ => Err(Error::Invalid(format!(
            "{}: cannot tell the format from the extension (use .vhdx/.avhdx or .vhd/.avhd, or --format)",
            args.image.display()
        ))),
    }
}

pub fn run(args: &CreateArgs) -> Result<i32> {
    let format = format_for(args)?;
    let block_size = match &args.block_size {
        Some(s) => parse_size(s).map_err(Error::Invalid)?,
        None => DEFAULT_BLOCK,
    };
    let block_size = u32::try_from(block_size)
        .map_err(|_| Error::Invalid(format!("block size {block_size} is too large")))?;
    match &args.parent {
        Some(parent) => create_child(args, format, parent, block_size),
        None => {
            let size =
                parse_size(args.size.as_deref().unwrap_or_default()).map_err(Error::Invalid)?;
            let lss = args.logical_sector_size.unwrap_or(512);
            match format {
                FormatArg::Vhdx => {
                    let n = NewVhdx {
                        virtual_size: size,
                        block_size,
                        logical_sector_size: lss,
                        physical_sector_size: lss.max(4096),
                        parent_locator: None,
                        virtual_disk_id: None,
                        fixed: false,
                    };
                    n.validate(&args.image)?;
                    create_new_file(&args.image, |f| {
                        crate::image::vhdx::create::write_new(f, &args.image, &n, CREATOR)
                    })?;
                }
                FormatArg::Vhd => {
                    if lss != 512 {
                        return Err(Error::Invalid(format!(
                            "{}: VHD disks always have 512-byte sectors",
                            args.image.display()
                        )));
                    }
                    make_dir(&args.image)?;
                    crate::image::vhd::create::create_dynamic(&args.image, size, block_size)?;
                }
            }
            Ok(0)
        }
    }
}

/// Resolve the parent path as the Virtual PC API did: a relative path is taken relative
/// to the child's directory first, then to the current directory.
fn resolve_parent(child: &Path, parent: &Path) -> Result<PathBuf> {
    let mut tried = Vec::new();
    if parent.is_relative() {
        let child_dir = child.parent().unwrap_or(Path::new(""));
        let c = child_dir.join(parent);
        if c.is_file() {
            return absolute(&c);
        }
        tried.push(c.display().to_string());
    }
    if parent.is_file() {
        return absolute(parent);
    }
    tried.push(parent.display().to_string());
    Err(Error::Invalid(format!(
        "parent {} does not exist or is not a file (tried {})",
        parent.display(),
        tried.join(", ")
    )))
}

/// Create the new file's directory when missing, as the Virtual PC API did.
fn make_dir(image: &Path) -> Result<()> {
    match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => {
            std::fs::create_dir_all(d).map_err(|e| Error::file(d, "create directory", e))
        }
        _ => Ok(()),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::file(p, "resolve", e))
}

/// The child's directory as an absolute path, without requiring it to exist.
fn absolute_dir(child: &Path) -> Result<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let cwd = std::env::current_dir().map_err(|e| Error::file(Path::new("."), "getcwd", e))?;
    let mut out = PathBuf::new();
    // Existing prefix canonicalised, the rest appended lexically.
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

/// An absolute Linux path in Win32 extended form on drive Z:, the drive Wine maps to
/// the Linux root (a Linux path has no drive letter of its own).
pub fn absolute_win32_path(p: &Path) -> String {
    format!("\\\\?\\Z:{}", p.display().to_string().replace('/', "\\"))
}

/// Open the chain of the parent `path` for creating a child over it
/// (`Intent::CreateChild`, the lock rules in `chain.rs`), its top with `open_top` (so its
/// format-specific fields can be read). The chain holds the locks: keep it until the child
/// exists.
fn open_parent_chain<L: Layer + 'static>(
    path: &Path,
    open_top: fn(&Path, OpenOptions) -> Result<L>,
) -> Result<(Arc<L>, Chain)> {
    let top: RefCell<Option<Arc<L>>> = RefCell::new(None);
    let opts = ChainOptions {
        intent: Intent::CreateChild,
        ..Default::default()
    };
    let chain = Chain::open_with(path, &opts, |p, o, allow_raw| {
        let mut slot = top.borrow_mut();
        if slot.is_none() {
            let l = Arc::new(open_top(p, o)?);
            *slot = Some(l.clone());
            return Ok(l as Arc<dyn Layer>);
        }
        open_layer(p, o, allow_raw)
    })?;
    let top = top.into_inner().expect("the chain opened its top");
    Ok((top, chain))
}

fn create_child(
    args: &CreateArgs,
    format: FormatArg,
    parent: &Path,
    block_size: u32,
) -> Result<i32> {
    if args.image.symlink_metadata().is_ok() {
        return Err(Error::Invalid(format!(
            "{}: already exists (vdiskfs never overwrites a file)",
            args.image.display()
        )));
    }
    let parent_abs = resolve_parent(&args.image, parent)?;
    let child_dir = absolute_dir(&args.image)?;
    let relative = windows_relative_path(&child_dir, &parent_abs);
    let absolute = absolute_win32_path(&parent_abs);
    let pformat = detect_format(&parent_abs)?;
    match (format, pformat) {
        (FormatArg::Vhdx, Some(Format::Vhdx)) => {
            // The parent's chain is opened read-only, with the locks of a child to be
            // created (`Intent::CreateChild`): no file of it may be changing, and none can
            // start changing until the child exists.
            let (p, _chain) = open_parent_chain(&parent_abs, Vhdx::open)?;
            let m = p.metadata();
            let h = p.header();
            if !h.log_guid.is_nil() {
                log::warn!(
                    "{}: the parent has a pending log (it was not closed cleanly); vdiskfs replays it in memory, but 7-Zip and Hyper-V refuse such a chain until the parent is opened writable once (e.g. `vdiskfs mount` it and unmount)",
                    parent_abs.display()
                );
            }
            let locator = vec![
                (
                    "parent_linkage".to_string(),
                    format!("{{{}}}", h.data_write_guid),
                ),
                ("relative_path".to_string(), relative),
                ("absolute_win32_path".to_string(), absolute),
            ];
            let n = NewVhdx {
                virtual_size: p.virtual_size(),
                block_size,
                logical_sector_size: m.logical_sector_size,
                physical_sector_size: m.physical_sector_size,
                parent_locator: Some(locator),
                // A differencing disk shares its parent's identity (IsVirtualDisk item).
                virtual_disk_id: Some(m.virtual_disk_id),
                fixed: false,
            };
            n.validate(&args.image)?;
            create_new_file(&args.image, |f| {
                crate::image::vhdx::create::write_new(f, &args.image, &n, CREATOR)
            })?;
        }
        (FormatArg::Vhd, Some(Format::Vhd)) => {
            let (p, _chain) = open_parent_chain(&parent_abs, crate::image::vhd::Vhd::open)?;
            make_dir(&args.image)?;
            crate::image::vhd::create::create_differencing(&args.image, &p, block_size)?;
        }
        (want, got) => {
            let got = got.map(|f| f.name()).unwrap_or("neither VHDX nor VHD");
            let want = match want {
                FormatArg::Vhdx => "a VHDX child needs a VHDX parent",
                FormatArg::Vhd => "a VHD child needs a VHD parent",
            };
            return Err(Error::Invalid(format!(
                "{}: {want}, but {} is {got}",
                args.image.display(),
                parent_abs.display()
            )));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_use_windows_separators() {
        assert_eq!(
            absolute_win32_path(Path::new("/srv/img/base.vhdx")),
            "\\\\?\\Z:\\srv\\img\\base.vhdx"
        );
    }
}
