//! The one error type of vdiskfs. Every variant names the file it is about, so the
//! command line can print a single line that tells the user which file is wrong and why.

use std::io;
use std::path::{Path, PathBuf};

pub use crate::defect::*;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a valid image of its format, or a structure in it is damaged:
    /// `defect` says what is wrong, in which structure, at which offset.
    #[error("{}: {defect}", path.display())]
    Corrupt { path: PathBuf, defect: Defect },

    /// The file is valid but uses a feature vdiskfs does not implement.
    #[error("{}: unsupported: {feature}", path.display())]
    Unsupported { path: PathBuf, feature: Feature },

    /// An I/O error on a backing file, with the operation and offset.
    #[error("{}: {op} at offset {offset}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// An I/O error that is not tied to an offset (open, stat, rename...).
    #[error("{}: {op}: {source}", path.display())]
    File {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A differencing disk's parent could not be found.
    #[error("{}: parent not found; tried: {}", child.display(), tried.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    ParentNotFound { child: PathBuf, tried: Vec<Tried> },

    /// A parent exists but is not (or cannot be shown to be) the file the child was made
    /// from; `msg` says which.
    #[error("{}: parent {} does not match: {msg} (use --ignore-linkage to read it anyway)", child.display(), parent.display())]
    Linkage {
        child: PathBuf,
        parent: PathBuf,
        msg: LinkageProblem,
    },

    /// A request vdiskfs refuses (a chain rule broken, a change the files cannot take);
    /// the message names the files.
    #[error("{0}")]
    Request(Request),

    /// A mount refused before anything is mounted: an option or the mount point.
    #[error("{0}")]
    Mount(MountRefusal),

    /// Options that do not fit together, or a value that is not one.
    #[error("{0}")]
    Usage(Usage),

    /// A mount or unmount that failed after vdiskfs asked for it (kernel, fusermount3,
    /// FUSE session).
    #[error("{0}")]
    MountFailed(MountFailure),

    /// A broken internal invariant (a bug of vdiskfs).
    #[error("{0}")]
    Internal(Internal),
}

impl Error {
    pub fn corrupt(path: &Path, defect: impl Into<Defect>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            defect: defect.into(),
        }
    }

    pub fn unsupported(path: &Path, feature: impl Into<Feature>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            feature: feature.into(),
        }
    }

    /// The defect, when this is a corrupt-file error.
    pub fn defect(&self) -> Option<&Defect> {
        match self {
            Error::Corrupt { defect, .. } => Some(defect),
            _ => None,
        }
    }

    pub fn io(path: &Path, op: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }

    pub fn file(path: &Path, op: &'static str, source: io::Error) -> Self {
        Error::File {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// The message without the leading "path: " (for errors nested in another message
    /// about the same file).
    pub fn detail(&self) -> String {
        let s = self.to_string();
        let path = match self {
            Error::Corrupt { path, .. }
            | Error::Unsupported { path, .. }
            | Error::Io { path, .. }
            | Error::File { path, .. } => path,
            _ => return s,
        };
        let prefix = format!("{}: ", path.display());
        s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::File { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                _ => libc::EIO,
            },
            _ => libc::EIO,
        }
    }
}
