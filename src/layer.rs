//! The layer abstraction: one image file of a chain, seen as "which bytes of the
//! virtual disk do I hold, and where in my file are they".
//!
//! `map` never reads payload data, so the merge logic lives in one place (`disk.rs`),
//! the block cache sits only over parents, and `info` can count allocation cheaply.

use std::path::Path;

use uuid::Uuid;

use crate::error::{Finding, Result, Warning};

/// One stretch of a layer's view of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// This layer holds `len` bytes, stored at `file_offset` in its file.
    Held { len: u64, file_offset: u64 },
    /// This layer defines `len` bytes as zeros (zero block, or unallocated in a base).
    Zero { len: u64 },
    /// This layer does not hold these bytes; ask the next layer down.
    Absent { len: u64 },
}

impl Run {
    pub fn len(&self) -> u64 {
        match *self {
            Run::Held { len, .. } | Run::Zero { len } | Run::Absent { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `[offset, offset + len)` cut where blocks of `block_size` bytes meet: for each piece in
/// order, (block number, offset in the block, length). The one walk of a range over a
/// format's blocks (map, write and discard in VHD and VHDX).
pub(crate) fn block_pieces(
    offset: u64,
    len: u64,
    block_size: u64,
) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let in_block = pos % block_size;
            let n = (block_size - in_block).min(end - pos);
            let piece = (pos / block_size, in_block, n);
            pos += n;
            piece
        })
    })
}

/// Push a run, merging it with the previous one when they are contiguous.
pub fn push_run(runs: &mut Vec<Run>, run: Run) {
    if run.is_empty() {
        return;
    }
    if let Some(last) = runs.last_mut() {
        match (last, run) {
            (
                Run::Held { len, file_offset },
                Run::Held {
                    len: l2,
                    file_offset: f2,
                },
            ) if *file_offset + *len == f2 => {
                *len += l2;
                return;
            }
            (Run::Zero { len }, Run::Zero { len: l2 }) => {
                *len += l2;
                return;
            }
            (Run::Absent { len }, Run::Absent { len: l2 }) => {
                *len += l2;
                return;
            }
            _ => {}
        }
    }
    runs.push(run);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Vhdx,
    Vhd,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Vhdx => "VHDX",
            Format::Vhd => "VHD",
            Format::Raw => "raw",
        }
    }
}

/// Where a differencing layer says its parent is, and how to recognise it.
#[derive(Debug, Clone, Default)]
pub struct ParentRef {
    /// Candidate paths in the order they must be tried: (locator name, path as recorded
    /// in the file, still in Windows form when the file has a Windows path).
    pub candidates: Vec<(String, String)>,
    /// Ids the parent's `linkage_id()` may equal (VHDX parent_linkage and
    /// parent_linkage2; VHD parent unique id). Empty means "not recorded".
    pub linkage: Vec<Uuid>,
    /// VHD only: the parent's footer time stamp as recorded by the child.
    pub timestamp: Option<u32>,
}

/// What `vdiskfs info` shows for one layer. Formats fill what applies.
#[derive(Debug, Clone, Default)]
pub struct LayerInfo {
    /// "fixed", "dynamic", "differencing" or "raw".
    pub disk_type: String,
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Named identifiers (e.g. "virtual_disk_id", "data_write_guid", "unique_id").
    pub ids: Vec<(String, String)>,
    pub has_parent: bool,
    /// Parent locator entries as stored (key, value).
    pub parent_locator: Vec<(String, String)>,
    /// VHDX: "clean", or a description of the pending log that was replayed.
    pub log_state: Option<String>,
    /// Blocks with data in this file (fully or partially present).
    pub allocated_blocks: u64,
    pub total_blocks: u64,
    /// Bytes of the virtual disk this layer answers itself (held or zero).
    pub bytes_held: u64,
    /// Anything else worth showing (creator, version, ...).
    pub extra: Vec<(String, String)>,
    /// Problems that did not stop the open (checksum mismatches in read-only use...).
    pub warnings: Vec<Warning>,
}

/// One opened image file.
pub trait Layer: Send + Sync {
    fn path(&self) -> &Path;
    fn format(&self) -> Format;
    fn virtual_size(&self) -> u64;
    fn logical_sector_size(&self) -> u32;
    /// Describe `[offset, offset + len)` as consecutive runs appended to `runs`.
    /// The range lies inside the virtual size and is sector-aligned or not: callers
    /// may ask for any byte range. Never reads payload data.
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()>;
    /// `map` for visiting where a disk's data is (`Disk::data_ranges`, convert): a layer
    /// may also describe ranges it knows to be zeros without reading them, which `map`
    /// reports as held (a raw file's holes), as `Run::Zero`. May cost system calls, so
    /// reads use `map`.
    fn data_map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        self.map(offset, len, runs)
    }
    /// Read bytes this layer holds, at a file offset that `map` returned.
    fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Where the parent is, for differencing layers; None for bases.
    fn parent(&self) -> Option<&ParentRef>;
    /// The id a child's linkage must equal: VHDX DataWriteGuid, VHD unique id.
    fn linkage_id(&self) -> Option<Uuid>;
    /// VHD only: the footer time stamp a child records for its parent.
    fn timestamp(&self) -> Option<u32> {
        None
    }
    /// Everything `info` shows; may walk the BAT.
    fn info(&self) -> Result<LayerInfo>;
    /// Structural problems found by a full check (`vdiskfs check`); empty when sound.
    fn check(&self) -> Result<Vec<Finding>> {
        Ok(Vec::new())
    }
    /// Opened read-only while another process had the file open for writing (held its
    /// exclusive lock): who that was ("another process (pid ...)"). What is read may
    /// change under the reader.
    fn written_by(&self) -> Option<&str> {
        None
    }
    /// The writable side, when this layer was opened for writing.
    fn writable(&self) -> Option<&dyn WritableLayer> {
        None
    }
}

/// Only the top image of a writable chain gets this.
pub trait WritableLayer: Layer {
    /// Write `data` at virtual offset `offset`, making the written sectors present in
    /// this layer. `offset` and `data.len()` are multiples of the logical sector size
    /// and the range lies inside the virtual size (`disk.rs` does read-modify-write for
    /// unaligned requests). Other sectors of a newly allocated block
    /// keep falling through to the parent (differencing) or read as zeros (base).
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Discard `[offset, offset + len)`: afterwards it reads zeros (never the parent's
    /// data), and the format gives back what space it can (whole blocks unallocated or
    /// made zero blocks, file space punched out). Same alignment rules as `write`
    /// (`write_granularity`); durable at the next `flush`, like a write.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make every write so far durable.
    fn flush(&self) -> Result<()>;
    /// Flush and leave the file clean for other tools (e.g. a VHDX header without a
    /// pending log). Called once when the disk is closed; later writes are not expected.
    fn close(&self) -> Result<()> {
        self.flush()
    }
    /// Smallest unit a write should cover, in bytes (a multiple of the logical sector
    /// size); `disk.rs` widens smaller writes by read-modify-write, clamped to the
    /// virtual size. A VHD child uses 4096 (one byte of its sector bitmap), because
    /// libvhdi misreads bitmap bytes that are only partly set.
    fn write_granularity(&self) -> u32 {
        self.logical_sector_size()
    }
}

/// What a read-only open does when another process has the file open for writing (holds
/// its exclusive lock). The chain decides which applies (`chain::Intent`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IfWritten {
    /// Open it anyway, without a lock (forensic use of a live system must always work);
    /// the layer says so (`Layer::written_by`) and the chain warns.
    #[default]
    Warn,
    /// Fail; the text says why the file must not change and ends the error message.
    Refuse(&'static str),
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open for writing, with an exclusive lock: nobody else may have it open.
    pub writable: bool,
    /// Read-only opens: what to do when someone else is writing the file.
    pub if_written: IfWritten,
}

impl OpenOptions {
    /// Read-only, warning (not failing) when someone else is writing the file.
    pub const fn read_only() -> Self {
        OpenOptions {
            writable: false,
            if_written: IfWritten::Warn,
        }
    }

    /// For writing.
    pub const fn writable() -> Self {
        OpenOptions {
            writable: true,
            if_written: IfWritten::Warn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::block_pieces;

    #[test]
    fn block_pieces_cut_at_block_boundaries() {
        let v: Vec<_> = block_pieces(1000, 5000, 2048).collect();
        assert_eq!(v, [(0, 1000, 1048), (1, 0, 2048), (2, 0, 1904)]);
        assert_eq!(block_pieces(4096, 0, 2048).count(), 0);
        let v: Vec<_> = block_pieces(4096, 2048, 2048).collect();
        assert_eq!(v, [(2, 0, 2048)]);
    }
}
