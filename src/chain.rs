//! Resolving a chain: the top image, its parent, the parent's parent... down to a base.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::open_layer;
use crate::layer::{Layer, OpenOptions};

/// Chain options every command that opens an image takes.
#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// Extra directories where parents are looked for by file name.
    pub search_dirs: Vec<PathBuf>,
    /// Explicit parents: the first overrides the top's parent, the next that parent's...
    pub parents: Vec<PathBuf>,
    /// Open even when a parent's id does not match the child's linkage.
    pub ignore_linkage: bool,
    /// Open the top image for writing.
    pub writable: bool,
    /// Allow block devices and other non-regular files as parents.
    pub allow_device_parent: bool,
}

/// How a parent was found.
#[derive(Debug, Clone)]
pub struct ParentFound {
    /// Which locator (or "--parent", "--search-dir") gave the path.
    pub locator: String,
    /// The path as recorded in the child.
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
    pub warnings: Vec<String>,
}

impl Chain {
    pub fn top(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    /// Open `path` and every parent it names.
    pub fn open(path: &Path, opts: &ChainOptions) -> Result<Chain> {
        let top = open_layer(
            path,
            OpenOptions {
                writable: opts.writable,
            },
            false,
        )?;
        if top.parent().is_some() {
            return Err(Error::Invalid(format!(
                "{}: differencing disks are not supported yet",
                path.display()
            )));
        }
        Ok(Chain {
            layers: vec![top],
            found: vec![None],
            warnings: Vec::new(),
        })
    }
}
