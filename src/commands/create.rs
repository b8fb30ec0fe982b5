//! `vdiskfs create`: a differencing child of a parent, or an empty dynamic base.

//!
//! Policy only: which format, which parent (resolved as the Virtual PC API did), the
//! parent's chain opened with the locks of `chain::Intent::CreateChild`; the files
//! themselves are made by the formats (`image::vhdx::create`, `image::vhd::create`).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions, Intent};
use crate::cli::{parse_size, CreateArgs, FormatArg};
use crate::error::{Error, Request, Result, Usage};
use crate::image::durable::refuse_existing;
use crate::image::vhd::Vhd;
use crate::image::vhdx::Vhdx;
use crate::image::{detect_format, open_layer, vhd, vhdx};
use crate::layer::{Format, Layer, OpenOptions};

const DEFAULT_BLOCK: u32 = 2 << 20;

/// What [`create`] makes: a dynamic base (no `parent`) or a differencing child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// VHDX or VHD; `None`: from the file name's extension (`.vhdx`/`.avhdx`,
    /// `.vhd`/`.avhd`).
    pub format: Option<Format>,
    /// The parent of a differencing child, resolved as the Virtual PC API did (a
    /// relative path against the child's directory first, then the current directory).
    /// `None`: an empty dynamic base.
    pub parent: Option<PathBuf>,
    /// A base's virtual size in bytes (a child has its parent's).
    pub size: u64,
    /// Block size in bytes; `None`: 2 MiB.
    pub block_size: Option<u32>,
    /// A VHDX base's logical sector size (512 or 4096); `None`: 512.
    pub logical_sector_size: Option<u32>,
}

fn format_for(image: &Path, format: Option<Format>) -> Result<Format> {
    if let Some(f) = format {
        return Ok(f);
    }
    let ext = image
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "vhdx" | "avhdx" => Ok(Format::Vhdx),
        "vhd" | "avhd" => Ok(Format::Vhd),
        _ => Err(Error::Usage(Usage::CreateFormat {
            image: image.to_path_buf(),
        })),
    }
}

/// `vdiskfs create`: the flags into [`CreateOptions`].
pub fn run(args: &CreateArgs) -> Result<i32> {
    // The same order of checks as before the library entry point existed.
    let format = format_for(
        &args.image,
        args.format.map(|f| match f {
            FormatArg::Vhdx => Format::Vhdx,
            FormatArg::Vhd => Format::Vhd,
        }),
    )?;
    let block_size = match &args.block_size {
        Some(s) => parse_size(s).map_err(|p| Error::Usage(Usage::Size(p)))?,
        None => u64::from(DEFAULT_BLOCK),
    };
    let block_size = u32::try_from(block_size)
        .map_err(|_| Error::Usage(Usage::BlockSizeTooLarge { block_size }))?;
    let size = match &args.parent {
        Some(_) => 0,
        None => parse_size(args.size.as_deref().unwrap_or_default())
            .map_err(|p| Error::Usage(Usage::Size(p)))?,
    };
    let opts = CreateOptions {
        format: Some(format),
        parent: args.parent.clone(),
        size,
        block_size: Some(block_size),
        logical_sector_size: args.logical_sector_size,
    };
    create(&args.image, &opts)?;
    Ok(0)
}

/// Create `image`, which must not exist, as `opts` says: a dynamic base of `opts.size`
/// bytes, or a differencing child of `opts.parent` (whose chain is opened and locked as
/// [`Intent::CreateChild`] until the child exists). The file appears atomically, or not
/// at all.
pub fn create(image: &Path, opts: &CreateOptions) -> Result<()> {
    let format = format_for(image, opts.format)?;
    if format == Format::Raw {
        return Err(Error::Usage(Usage::CreateRaw {
            image: image.to_path_buf(),
        }));
    }
    let block_size = opts.block_size.unwrap_or(DEFAULT_BLOCK);
    if let Some(parent) = &opts.parent {
        return create_child(image, format, parent, block_size);
    }
    let lss = opts.logical_sector_size.unwrap_or(512);
    if format == Format::Vhdx {
        vhdx::create::create_base(image, opts.size, block_size, lss)?;
        return Ok(());
    }
    if lss != 512 {
        return Err(Error::Usage(Usage::VhdSectorSize {
            image: image.to_path_buf(),
        }));
    }
    make_dir(image)?;
    vhd::create::create_dynamic(image, opts.size, block_size)?;
    Ok(())
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
    Err(Error::Request(Request::CreateParentMissing {
        parent: parent.to_path_buf(),
        tried,
    }))
}

/// Create the new file's directory when missing, as the Virtual PC API did (a VHD
/// child's locators are computed from its canonical directory, before the file is
/// created).
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

/// Open the chain of the parent `path` for creating a child over it
/// (`Intent::CreateChild`, the lock rules in `chain.rs`), its top with `open_top` (so its
/// format-specific fields can be read). The chain holds the locks: keep it until the child
/// exists.
pub(crate) fn open_parent_chain<L: Layer + 'static>(
    path: &Path,
    open_top: fn(&Path, OpenOptions) -> Result<L>,
    opts: &ChainOptions,
) -> Result<(Arc<L>, Chain)> {
    let top: RefCell<Option<Arc<L>>> = RefCell::new(None);
    let opts = ChainOptions {
        intent: Intent::CreateChild,
        ..opts.clone()
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

fn create_child(image: &Path, format: Format, parent: &Path, block_size: u32) -> Result<()> {
    // Before the parent's chain is opened and locked (the final guarantee is the
    // no-replace move of `durable::create_file_atomically`).
    refuse_existing(image)?;
    let parent_abs = resolve_parent(image, parent)?;
    let pformat = detect_format(&parent_abs)?;
    // The parent's chain is opened read-only, with the locks of a child to be created
    // (`Intent::CreateChild`): no file of it may be changing, and none can start changing
    // until the child exists (the chain is held until then).
    match (format, pformat) {
        (Format::Vhdx, Some(Format::Vhdx)) => {
            let (p, _chain) = open_parent_chain(&parent_abs, Vhdx::open, &ChainOptions::default())?;
            vhdx::create::create_child(image, &p, block_size)?;
        }
        (Format::Vhd, Some(Format::Vhd)) => {
            let (p, _chain) = open_parent_chain(&parent_abs, Vhd::open, &ChainOptions::default())?;
            make_dir(image)?;
            vhd::create::create_differencing(image, &p, block_size)?;
        }
        (want, got) => {
            let got = got.map(|f| f.name()).unwrap_or("neither VHDX nor VHD");
            let want = match want {
                Format::Vhd => "a VHD child needs a VHD parent",
                _ => "a VHDX child needs a VHDX parent",
            };
            return Err(Error::Request(Request::CreateParentFormat {
                image: image.to_path_buf(),
                want,
                parent: parent_abs.clone(),
                got,
            }));
        }
    }
    Ok(())
}
