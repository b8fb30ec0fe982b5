//! Making new VHDX files: an empty dynamic base, or a differencing child of a VHDX parent.
//!
//! Layout (the one Hyper-V uses for new files): header section in the first MiB, a 1 MiB
//! log at 1 MiB, the metadata region at 2 MiB, the BAT at 3 MiB; payload blocks are
//! appended at the end of the file as they are written.
//!
//! A differencing file also gets one sector bitmap block per chunk right after the BAT,
//! SB_BLOCK_PRESENT and all zeros (every sector from the parent), as a never-written,
//! sparse range of the file: it costs 1 MiB of apparent size per chunk and no disk space.
//! MS-VHDX allows this (a present, all-zero bitmap is valid in a differencing file);
//! libvhdi needs it, because it reads the bitmap of a chunk whose entry is
//! SB_BLOCK_NOT_PRESENT from file offset 0 (see docs/formats.md).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use super::bat::{make_entry, SB_BLOCK_PRESENT, SECTORS_PER_BITMAP};
use super::header::{Header, HEADER_OFFSETS};
use super::metadata::{
    FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, MAX_VIRTUAL_SIZE, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE,
    TABLE_SIZE, VHDX_LOCATOR_TYPE, VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE,
};
use super::region::{BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};
use super::Vhdx;
use crate::error::{Error, Request, Result};
use crate::image::create_new_file;
use crate::layer::Layer;
use crate::paths::{absolute_dir, absolute_win32_path, windows_relative_path};

/// The creator string written into new files' file type identifier.
pub const CREATOR: &str = concat!("vdiskfs ", env!("CARGO_PKG_VERSION"));

const MIB: u64 = 1 << 20;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;

/// What a new VHDX file looks like.
#[derive(Debug, Clone)]
pub struct NewVhdx {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Parent locator key/value pairs; Some makes a differencing disk.
    pub parent_locator: Option<Vec<(String, String)>>,
    /// Defaults to a new random id.
    pub virtual_disk_id: Option<Uuid>,
    /// A fixed disk: the file parameters' LeaveBlockAllocated flag is set (the caller
    /// then makes every payload block present).
    pub fixed: bool,
}

impl NewVhdx {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let path = path.to_path_buf();
        if !self.block_size.is_power_of_two() || !(1 << 20..=256 << 20).contains(&self.block_size) {
            return Err(Error::Request(Request::NewVhdxBlockSize {
                path,
                block_size: self.block_size,
            }));
        }
        for size in [self.logical_sector_size, self.physical_sector_size] {
            if size != 512 && size != 4096 {
                return Err(Error::Request(Request::NewVhdxSectorSize { path, size }));
            }
        }
        let lss = self.logical_sector_size as u64;
        if self.virtual_size == 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
            || !self.virtual_size.is_multiple_of(lss)
        {
            return Err(Error::Request(Request::NewVhdxSize {
                path,
                size: self.virtual_size,
                sector_size: lss,
            }));
        }
        Ok(())
    }

    /// Payload blocks per chunk (data blocks described by one sector bitmap block).
    fn chunk_ratio(&self) -> u64 {
        SECTORS_PER_BITMAP * self.logical_sector_size as u64 / self.block_size as u64
    }

    /// The first file offset after the fixed structures (1 MiB aligned): where payload
    /// blocks of a new file go.
    pub fn payload_start(&self) -> u64 {
        self.file_len()
    }

    /// The file offset of the BAT entry of payload block `block` of a new base.
    pub fn payload_entry_offset(&self, block: u64) -> u64 {
        let ratio = self.chunk_ratio();
        // Payload entries are interleaved with one sector-bitmap entry per chunk.
        BAT_OFFSET + (block + block / ratio) * 8
    }

    fn bat_entries(&self) -> u64 {
        let chunk_ratio = self.chunk_ratio();
        let data_blocks = self.virtual_size.div_ceil(self.block_size as u64);
        if self.parent_locator.is_some() {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        }
    }

    /// Sector bitmap blocks written at creation: one per chunk of a differencing file.
    fn bitmap_blocks(&self) -> u64 {
        if self.parent_locator.is_some() {
            let data_blocks = self.virtual_size.div_ceil(self.block_size as u64);
            data_blocks.div_ceil(self.chunk_ratio())
        } else {
            0
        }
    }

    /// Size of the BAT region (whole MiBs).
    fn bat_len(&self) -> u64 {
        (self.bat_entries() * 8).div_ceil(MIB) * MIB
    }

    /// The length of the new file.
    fn file_len(&self) -> u64 {
        BAT_OFFSET + self.bat_len() + self.bitmap_blocks() * MIB
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn put_guid(b: &mut [u8], o: usize, g: Uuid) {
    b[o..o + 16].copy_from_slice(&g.to_bytes_le());
}

fn region_table() -> Vec<u8> {
    let mut t = vec![0u8; REGION_TABLE_SIZE];
    t[0..4].copy_from_slice(b"regi");
    t[8..12].copy_from_slice(&2u32.to_le_bytes());
    // Regions: BAT and metadata, both required.
    for (i, (g, off, len)) in [
        (BAT_GUID, BAT_OFFSET, 0u64),
        (METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + i * 32;
        put_guid(&mut t, e, g);
        t[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&(len as u32).to_le_bytes());
        t[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
    }
    t
}

/// Serialise a parent locator item.
pub fn locator_item(entries: &[(String, String)]) -> Vec<u8> {
    let mut head = vec![0u8; 20];
    put_guid(&mut head, 0, VHDX_LOCATOR_TYPE);
    head[18..20].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    let mut table = Vec::new();
    let mut data = Vec::new();
    let base = 20 + entries.len() * 12;
    for (k, v) in entries {
        let (kb, vb) = (utf16le(k), utf16le(v));
        let ko = base + data.len();
        data.extend_from_slice(&kb);
        let vo = base + data.len();
        data.extend_from_slice(&vb);
        table.extend_from_slice(&(ko as u32).to_le_bytes());
        table.extend_from_slice(&(vo as u32).to_le_bytes());
        table.extend_from_slice(&(kb.len() as u16).to_le_bytes());
        table.extend_from_slice(&(vb.len() as u16).to_le_bytes());
    }
    [head, table, data].concat()
}

fn metadata_region(n: &NewVhdx, disk_id: Uuid) -> Result<Vec<u8>> {
    let mut region = vec![0u8; METADATA_LENGTH as usize];
    let mut items: Vec<(Uuid, u32, Vec<u8>)> = Vec::new();
    // Flags: bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    let mut fp = (n.block_size as u64).to_le_bytes().to_vec();
    let has_parent = n.parent_locator.is_some();
    // Bit 0 LeaveBlockAllocated (fixed disks), bit 1 HasParent.
    let flags: u32 = u32::from(n.fixed) | if has_parent { 2 } else { 0 };
    fp[4..8].copy_from_slice(&flags.to_le_bytes());
    items.push((FILE_PARAMETERS, 4, fp));
    items.push((VIRTUAL_DISK_SIZE, 6, n.virtual_size.to_le_bytes().to_vec()));
    items.push((VIRTUAL_DISK_ID, 6, disk_id.to_bytes_le().to_vec()));
    items.push((
        LOGICAL_SECTOR_SIZE,
        6,
        n.logical_sector_size.to_le_bytes().to_vec(),
    ));
    items.push((
        PHYSICAL_SECTOR_SIZE,
        6,
        n.physical_sector_size.to_le_bytes().to_vec(),
    ));
    if let Some(loc) = &n.parent_locator {
        items.push((PARENT_LOCATOR, 4, locator_item(loc)));
    }
    region[0..8].copy_from_slice(b"metadata");
    region[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut off = TABLE_SIZE;
    for (i, (g, flags, data)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        if off + data.len() > region.len() {
            return Err(Error::Request(Request::LocatorTooLarge));
        }
        put_guid(&mut region, e, *g);
        region[e + 16..e + 20].copy_from_slice(&(off as u32).to_le_bytes());
        region[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        region[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        region[off..off + data.len()].copy_from_slice(data);
        // Keep items 8-byte aligned, as other implementations do.
        off += data.len().div_ceil(8) * 8;
    }
    Ok(region)
}

/// Create an empty dynamic VHDX at `path` (never over an existing file; its directory
/// is created when missing): `size` bytes in `block_size`-byte blocks, with
/// `logical_sector_size`-byte sectors (and physical sectors of at least 4 KiB).
pub fn create_base(
    path: &Path,
    size: u64,
    block_size: u32,
    logical_sector_size: u32,
) -> Result<()> {
    let n = NewVhdx {
        virtual_size: size,
        block_size,
        logical_sector_size,
        physical_sector_size: logical_sector_size.max(4096),
        parent_locator: None,
        virtual_disk_id: None,
        fixed: false,
    };
    n.validate(path)?;
    create_new_file(path, |f| write_new(f, path, &n, CREATOR))
}

/// Create a differencing VHDX at `child` whose parent is the opened VHDX `parent` (which
/// may itself be differencing; the caller holds the chain's locks,
/// `chain::Intent::CreateChild`). The child takes the parent's size, sector sizes and
/// virtual disk id, records the parent's DataWriteGuid as `parent_linkage`, and gets a
/// `relative_path` (from the child's directory, which need not exist yet) and an
/// `absolute_win32_path` computed from `parent.path()`. Never over an existing file.
pub fn create_child(child: &Path, parent: &Vhdx, block_size: u32) -> Result<()> {
    let m = parent.metadata();
    let locator = parent_locator(child, parent)?;
    let n = NewVhdx {
        virtual_size: parent.virtual_size(),
        block_size,
        logical_sector_size: m.logical_sector_size,
        physical_sector_size: m.physical_sector_size,
        parent_locator: Some(locator),
        // A differencing disk shares its parent's identity (IsVirtualDisk item).
        virtual_disk_id: Some(m.virtual_disk_id),
        fixed: false,
    };
    n.validate(child)?;
    create_new_file(child, |f| write_new(f, child, &n, CREATOR))
}

/// The parent locator entries a child at `child` (which need not exist yet) records for
/// the opened VHDX `parent`: `parent_linkage` (the parent's DataWriteGuid),
/// `relative_path` (from the child's directory) and `absolute_win32_path`, computed from
/// `parent.path()`. What `create_child` writes and `set-parent` rewrites.
pub fn parent_locator(child: &Path, parent: &Vhdx) -> Result<Vec<(String, String)>> {
    let parent_abs = std::fs::canonicalize(parent.path())
        .map_err(|e| Error::file(parent.path(), "resolve", e))?;
    let child_dir = absolute_dir(child)?;
    let h = parent.header();
    if !h.log_guid.is_nil() {
        log::warn!(
            "{}: the parent has a pending log (it was not closed cleanly); vdiskfs replays it in memory, but 7-Zip and Hyper-V refuse such a chain until the parent is opened writable once (e.g. `vdiskfs mount` it and unmount)",
            parent_abs.display()
        );
    }
    Ok(vec![
        (
            "parent_linkage".to_string(),
            format!("{{{}}}", h.data_write_guid),
        ),
        (
            "relative_path".to_string(),
            windows_relative_path(&child_dir, &parent_abs),
        ),
        (
            "absolute_win32_path".to_string(),
            absolute_win32_path(&parent_abs),
        ),
    ])
}

/// Write a complete new VHDX into `file` (empty, freshly created).
pub fn write_new(file: &File, path: &Path, n: &NewVhdx, creator: &str) -> Result<()> {
    n.validate(path)?;
    let w = |buf: &[u8], off: u64| {
        file.write_all_at(buf, off)
            .map_err(|e| Error::io(path, "write", off, e))
    };
    // File type identifier.
    let mut ident = vec![0u8; 8 + 512];
    ident[0..8].copy_from_slice(b"vhdxfile");
    let c = utf16le(creator);
    let c = &c[..c.len().min(510)];
    ident[8..8 + c.len()].copy_from_slice(c);
    w(&ident, 0)?;
    // Region tables: the BAT length is filled in here.
    let bat_len = n.bat_len();
    let mut rt = region_table();
    rt[16 + 24..16 + 28].copy_from_slice(&(bat_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&rt);
    rt[4..8].copy_from_slice(&crc.to_le_bytes());
    for off in REGION_TABLE_OFFSETS {
        w(&rt, off)?;
    }
    // Metadata.
    w(
        &metadata_region(n, n.virtual_disk_id.unwrap_or_else(Uuid::new_v4))?,
        METADATA_OFFSET,
    )?;
    // Extending the file gives the zeros of the BAT (every block NOT_PRESENT) and of the
    // sector bitmap blocks after it (never written: holes, no disk space).
    file.set_len(n.file_len())
        .map_err(|e| Error::file(path, "extend", e))?;
    // Really allocate the log and the BAT (up to 64 MiB of it) by writing them: metadata
    // updates then overwrite space the file already owns, so a host disk that fills up
    // later fails data writes with ENOSPC, never the log or the BAT. A larger BAT keeps
    // its holes; only its sector bitmap entries are written.
    w(&vec![0u8; MIB as usize], LOG_OFFSET)?;
    let ratio = n.chunk_ratio();
    let bitmaps_at = BAT_OFFSET + bat_len;
    let sb_entry = |chunk: u64| {
        (
            (chunk * (ratio + 1) + ratio) * 8,
            make_entry(SB_BLOCK_PRESENT, bitmaps_at + chunk * MIB).to_le_bytes(),
        )
    };
    if bat_len <= 64 * MIB {
        let mut chunk = 0;
        for page in (0..bat_len).step_by(MIB as usize) {
            let mut buf = vec![0u8; MIB as usize];
            while chunk < n.bitmap_blocks() {
                let (at, entry) = sb_entry(chunk);
                if at >= page + MIB {
                    break;
                }
                let i = (at - page) as usize;
                buf[i..i + 8].copy_from_slice(&entry);
                chunk += 1;
            }
            w(&buf, BAT_OFFSET + page)?;
        }
    } else {
        for chunk in 0..n.bitmap_blocks() {
            let (at, entry) = sb_entry(chunk);
            w(&entry, BAT_OFFSET + at)?;
        }
    }
    // Headers last, both valid, the second current.
    let mut h = Header {
        sequence_number: 1,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        log_guid: Uuid::nil(),
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH as u32,
        log_offset: LOG_OFFSET,
    };
    w(&h.to_bytes(), HEADER_OFFSETS[0])?;
    h.sequence_number = 2;
    w(&h.to_bytes(), HEADER_OFFSETS[1])?;
    Ok(())
}
