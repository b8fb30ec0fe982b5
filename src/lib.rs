//! vdiskfs: Hyper-V VHDX and Virtual PC VHD differencing-disk chains on Linux.
//!
//! The library holds all the logic (format readers and writers, chain resolution, the
//! merged view, the file system a mount exports and its FUSE adapter) so tests and fuzz
//! targets can call it; `main.rs` is only the command line.

pub mod access;
pub mod cache;
pub mod chain;
pub mod cli;
pub mod commands;
pub mod compact;
pub mod convert;
pub mod defect;
pub mod disk;
pub mod error;
pub mod fuse;
pub mod guest;
pub mod image;
pub mod layer;
pub mod paths;
pub mod progress;
pub mod sys;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vfs;

pub use chain::{Chain, ChainOptions, Intent};
pub use disk::{Disk, DiskOptions};
pub use error::{Error, Result};
pub use layer::{Format, Layer, OpenOptions, Run, WritableLayer};
