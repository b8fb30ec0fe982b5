//! vdiskfs: Hyper-V VHDX and Virtual PC VHD differencing-disk chains on Linux.
//!
//! The library is what the `vdiskfs` binary is built on; its public API is small and
//! everything else (the formats' structures, the command line, the mount daemon, the
//! FUSE adapter) is private to the crate:
//!
//! - **Open a chain**: [`Chain::open`] with [`ChainOptions`] (search directories,
//!   parent overrides, and the [`Intent`], which decides the locks and which layer is
//!   writable). [`open_layer`] opens one file as a [`Layer`] without its parents.
//! - **Read and write the merged disk**: [`Disk::new`] over a chain ([`DiskOptions`]:
//!   the parents' cache), then [`Disk::read_at`], [`Disk::write_at`] (the top layer
//!   only, opened with [`Intent::WriteTop`]), [`Disk::flush`], [`Disk::close`].
//! - **One layer**: the [`Layer`] trait (`map` into [`Run`]s, `read_held`, `info`
//!   ([`LayerInfo`]), `check`), [`WritableLayer`], [`Format`], [`OpenOptions`].
//! - **Create** a dynamic base or a differencing child: [`create`] with
//!   [`CreateOptions`] (the parent's chain is locked as [`Intent::CreateChild`]).
//! - **Check**: [`Layer::check`] lists a layer's damage; [`Layer::info`] its warnings.
//! - **Convert** the merged view into a new VHDX, VHD or raw file: [`convert`] with a
//!   [`ConvertSpec`] (the file appears atomically, or not at all). [`azure_problems`]
//!   lists what keeps Azure from taking a file ([`AzureProblem`]).
//! - **Change images in place** (the verbs of the same names, each crash-safe, each one
//!   function taking an options struct and returning a typed report of what it did, or
//!   with `dry_run` would do): [`merge`] ([`MergeOptions`] → [`MergeReport`]: fold a
//!   child and the layers above an ancestor into it), [`compact`] ([`CompactOptions`] →
//!   [`CompactReport`]), [`resize`] ([`ResizeOptions`], [`NewSize`] →
//!   [`ResizeReport`]), [`set_parent`] ([`SetParentOptions`] → [`SetParentReport`]).
//!   Their `chain` field is a [`ChainOptions`] whose `intent` the verb sets itself. An
//!   [`Observer`] (the progress handle; `&()` for none) hears of the phases of
//!   byte-copying work and of warnings; `merge` and `compact` also take a cancel flag.
//! - **Inside the guest**: [`guest::scan`] reads the partition table and probes file
//!   systems through anything that implements [`guest::ReadAt`] (a [`Disk`] does).
//! - **Errors**: [`Error`] and [`Result`]; damage and refusals are typed ([`Defect`],
//!   [`VhdxDefect`], [`VhdDefect`], [`Feature`], [`Request`], [`LinkageProblem`],
//!   [`Warning`], [`MountRefusal`]) so callers match on variants; `Display` is the
//!   one-line message.
//!
//! With the `testing` cargo feature, `vdiskfs::testing` re-exports a few internals for
//! the fuzz targets and the integration tests that craft damaged files (not a supported
//! API).

// One line per module: the library's public items are the re-exports below.
pub(crate) mod access;
pub(crate) mod cache;
pub(crate) mod chain;
pub(crate) mod cli;
pub(crate) mod commands;
pub(crate) mod compact;
pub(crate) mod convert;
pub(crate) mod defect;
pub(crate) mod disk;
pub(crate) mod error;
pub(crate) mod fuse;
pub mod guest;
pub(crate) mod image;
pub(crate) mod layer;
pub(crate) mod merge;
pub(crate) mod paths;
pub(crate) mod progress;
pub(crate) mod resize;
pub(crate) mod set_parent;
pub(crate) mod sys;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod uring;
pub(crate) mod vfs;

pub use chain::{Chain, ChainOptions, Intent, ParentFound, MAX_CHAIN_DEPTH};
pub use commands::create::{create, CreateOptions};
pub use compact::{compact, CompactOptions, CompactReport};
pub use convert::{
    azure_problems, convert, ConvertReport, ConvertSpec, OutFormat, AZURE_MAX_SIZE, AZURE_MIN_SIZE,
};
pub use defect::{
    AzureProblem, Defect, Feature, Finding, HeaderProblem, HumanSize, Internal, LinkageProblem,
    LocatorProblem, LogGrowth, LogWriteProblem, MountFailure, MountRefusal, NotParent,
    RegionTableCopy, RegionTableProblem, Request, ShrinkBlocker, SizeProblem, Tried, Usage,
    VhdDefect, VhdxArea, VhdxDefect, Warning,
};
pub use disk::{Disk, DiskOptions};
pub use error::{Error, Result};
pub use image::open_layer;
pub use layer::{Format, IfWritten, Layer, LayerInfo, OpenOptions, ParentRef, Run, WritableLayer};
pub use merge::{merge, MergeDependent, MergeOptions, MergeOutcome, MergeReport};
pub use progress::Observer;
pub use resize::{resize, NewSize, ResizeOptions, ResizeReport};
pub use set_parent::{set_parent, SetParentOptions, SetParentReport};

/// The `vdiskfs` binary's `main` (the command line and the mount helper protocol).
#[doc(hidden)]
pub use commands::main_entry;

/// Internals the fuzz targets drive directly (cargo feature `testing`). Not a supported
/// API: it changes whenever the formats do.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing {
    pub use crate::image::vhd::Vhd;
    pub use crate::image::vhdx::header::read_current_header;
    pub use crate::image::vhdx::log::{testutil, LogUpdate, LogWriter};
    pub use crate::image::vhdx::Vhdx;
    pub use crate::image::ImageFile;
}
