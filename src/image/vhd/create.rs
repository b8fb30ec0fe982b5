//! Creating VHD files: an empty dynamic base, or a differencing child of a VHD parent.
//!
//! Layout written: footer copy (0), dynamic disk header (512), BAT (1536, all
//! unallocated), parent locator data (differencing: W2ru then W2ku, each in whole
//! sectors), footer. The file appears atomically and never over an existing file
//! (`durable::create_file_atomically`).
//!
//! Parent paths on Linux (their forms are made in `paths.rs`): W2ru holds the parent
//! relative to the child's directory in Windows form (".\\base.vhd", "..\\img\\base.vhd").
//! W2ku must be an absolute Windows path, which a Linux path cannot be; it holds the
//! canonical Linux path with backslashes ("\\srv\\img\\base.vhd"), a rooted path without
//! drive letter that Windows resolves against the current drive and that turns back into
//! the Linux path when the backslashes are made slashes (what vdiskfs's resolver does).
//! The parent Unicode name holds the same absolute path, as Windows writes it; libvhdi
//! resolves a parent by the last `\`-separated component of that name in the child's
//! directory.
//!
//! Creator application "vdfs". qemu older than 10.0 sizes VHDs from unknown creators
//! by their CHS geometry (rounded down), newer qemu, libvhdi and Hyper-V by the current
//! size; the current size written is exactly the size asked for.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use super::dynamic::{DynamicHeader, HEADER_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use super::footer::{now_time_stamp, DiskType, Footer, Geometry, FOOTER_SIZE};
use super::locator::{encode_utf16le, LocatorEntry};
use super::Vhd;
use crate::error::{Error, Request, Result};
use crate::image::durable::create_file_atomically;
use crate::layer::Layer;
use crate::paths::{windows_absolute_path, windows_relative_path};

/// Default block size for new VHDs (2 MiB, as Hyper-V and qemu use).
#[cfg(test)]
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest virtual size a VHD can describe (2040 GiB, the specification's limit).
pub const MAX_SIZE: u64 = 2040 << 30;

const CREATOR: [u8; 4] = *b"vdfs";
const CREATOR_VERSION: u32 = 0x0001_0000;
const TABLE_OFFSET: u64 = (FOOTER_SIZE + HEADER_SIZE) as u64;

/// Create an empty dynamic VHD of `size` bytes (a multiple of 512, at most 2040 GiB)
/// with `block_size`-byte blocks (a power of two, 512 B .. 256 MiB; use
/// [`DEFAULT_BLOCK_SIZE`]). Fails if `path` exists.
pub fn create_dynamic(path: &Path, size: u64, block_size: u32) -> Result<()> {
    check_params(path, size, block_size)?;
    let footer = new_footer(DiskType::Dynamic, size, Geometry::for_sectors(size / 512));
    let header = new_header(size, block_size);
    write_new_file(path, &footer, &header, &[])
}

/// Create a differencing VHD at `child` whose parent is the opened VHD `parent` (which
/// may itself be differencing). The child takes the parent's current size and
/// geometry, records the parent's unique id and time stamp, and gets W2ru (relative)
/// and W2ku (absolute) locators computed from `parent.path()` and `child`. The child's
/// directory must exist. Fails if `child` exists.
pub fn create_differencing(child: &Path, parent: &Vhd, block_size: u32) -> Result<()> {
    let pf = parent.footer();
    let size = pf.current_size;
    check_params(child, size, block_size)?;
    let record = ParentRecord::new(child, parent)?;
    let mut footer = new_footer(DiskType::Differencing, size, pf.disk_geometry);
    footer.original_size = size;
    let mut header = new_header(size, block_size);
    header.parent_unique_id = pf.unique_id;
    header.parent_time_stamp = pf.time_stamp;
    header.parent_unicode_name = record.unicode_name.clone();
    write_new_file(child, &footer, &header, &record.locators())
}

/// What a differencing VHD at `child` records about where its parent is: what
/// `create_differencing` writes and `set-parent` rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRecord {
    /// W2ru: the parent relative to the child's directory, in Windows form.
    pub relative: String,
    /// W2ku: the parent's canonical Linux path in rooted Windows form.
    pub absolute: String,
    /// The header's parent Unicode name (the same absolute path, as Windows writes it).
    pub unicode_name: String,
}

impl ParentRecord {
    /// The record for a child at `child` (whose directory must exist) of `parent`.
    pub fn new(child: &Path, parent: &Vhd) -> Result<ParentRecord> {
        let parent_abs = std::fs::canonicalize(parent.path())
            .map_err(|e| Error::file(parent.path(), "resolve the parent's path", e))?;
        let child_dir = child
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let child_dir_abs = std::fs::canonicalize(child_dir)
            .map_err(|e| Error::file(child_dir, "resolve the child's directory", e))?;
        let absolute = windows_absolute_path(&parent_abs);
        Ok(ParentRecord {
            relative: windows_relative_path(&child_dir_abs, &parent_abs),
            unicode_name: absolute.clone(),
            absolute,
        })
    }

    /// The locator entries' platform codes and data, in the order they are written.
    pub fn locators(&self) -> [([u8; 4], Vec<u8>); 2] {
        [
            (*b"W2ru", encode_utf16le(&self.relative)),
            (*b"W2ku", encode_utf16le(&self.absolute)),
        ]
    }
}

/// Lay out `locators`' data from file offset `pos` on (each in whole sectors) and point
/// `header`'s locator entries at it (the other entries cleared). Returns the pieces to
/// write and the offset after the last one.
pub(super) fn lay_out_locators(
    header: &mut DynamicHeader,
    locators: &[([u8; 4], Vec<u8>)],
    mut pos: u64,
) -> (Vec<(u64, Vec<u8>)>, u64) {
    header.parent_locators = Default::default();
    let mut pieces = Vec::new();
    for (i, (code, data)) in locators.iter().enumerate() {
        let space = (data.len() as u64).div_ceil(512).max(1) * 512;
        header.parent_locators[i] = LocatorEntry {
            platform_code: *code,
            // Bytes, as Windows writes it (see locator.rs).
            platform_data_space: space as u32,
            platform_data_length: data.len() as u32,
            platform_data_offset: pos,
        };
        pieces.push((pos, data.clone()));
        pos += space;
    }
    (pieces, pos)
}

/// The largest fixed VHD `convert` writes: the footer's current size is 64 bits and a
/// fixed disk has no BAT, so the 2040 GiB limit of dynamic disks does not apply; Azure
/// takes fixed VHDs up to 32 TiB (see docs/usage.md, `convert --azure`).
pub const MAX_FIXED_SIZE: u64 = 32 << 40;

/// The footer of a new fixed VHD of `size` bytes (a non-zero multiple of 512): current
/// and original size equal, geometry by the specification's CHS algorithm.
pub fn fixed_footer(path: &Path, size: u64) -> Result<[u8; FOOTER_SIZE]> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_FIXED_SIZE {
        return Err(Error::Request(Request::FixedVhdSize {
            path: path.to_path_buf(),
            size,
            max: MAX_FIXED_SIZE,
        }));
    }
    let mut f = new_footer(DiskType::Fixed, size, Geometry::for_sectors(size / 512));
    f.data_offset = u64::MAX;
    Ok(f.to_bytes())
}

/// A new dynamic VHD being written block by block into an empty file (by `convert`).
pub struct DynamicWriter {
    footer: [u8; FOOTER_SIZE],
    block_size: u32,
    bitmap_size: u64,
    /// Where the next block goes (sector aligned).
    next: u64,
}

impl DynamicWriter {
    /// Write the fixed structures (footer copy, header, a BAT of unused entries) of a
    /// dynamic VHD of `size` bytes in `block_size`-byte blocks into the empty `file`.
    pub fn start(file: &File, path: &Path, size: u64, block_size: u32) -> Result<Self> {
        check_params(path, size, block_size)?;
        let footer = new_footer(DiskType::Dynamic, size, Geometry::for_sectors(size / 512));
        let header = new_header(size, block_size);
        let (pieces, end) = build(&footer, &header, &[]);
        write_bat_unused(file, path, header.max_table_entries)?;
        for (at, data) in &pieces[..2] {
            file.write_all_at(data, *at)
                .map_err(|e| Error::io(path, "write", *at, e))?;
        }
        Ok(DynamicWriter {
            footer: footer.to_bytes(),
            block_size,
            bitmap_size: header.bitmap_size() as u64,
            next: end - FOOTER_SIZE as u64,
        })
    }

    /// Place block `index` after the blocks placed so far: its sector bitmap (every
    /// sector present) and its BAT entry are written, and the file offset where the
    /// block's data goes is returned. The caller writes the block's non-zero data
    /// there; what it leaves out stays a hole of the new file and reads as zeros.
    pub fn allocate(&mut self, file: &File, path: &Path, index: u64) -> Result<u64> {
        let at = self.next;
        let bitmap = vec![0xFFu8; self.bitmap_size as usize];
        file.write_all_at(&bitmap, at)
            .map_err(|e| Error::io(path, "write", at, e))?;
        let data_at = at + self.bitmap_size;
        let sector = u32::try_from(at / 512).map_err(|_| {
            Error::Request(Request::VhdBatAddress {
                path: path.to_path_buf(),
            })
        })?;
        let entry_at = TABLE_OFFSET + index * 4;
        file.write_all_at(&sector.to_be_bytes(), entry_at)
            .map_err(|e| Error::io(path, "write", entry_at, e))?;
        self.next = data_at + self.block_size as u64;
        Ok(data_at)
    }

    /// Write the closing footer after the last block.
    pub fn finish(self, file: &File, path: &Path) -> Result<()> {
        file.write_all_at(&self.footer, self.next)
            .map_err(|e| Error::io(path, "write", self.next, e))
    }
}

/// Write a BAT of `entries` unused entries (0xFFFFFFFF) in chunks of at most 1 MiB.
fn write_bat_unused(file: &File, path: &Path, entries: u32) -> Result<()> {
    let bat_bytes = entries as u64 * 4;
    let chunk = vec![0xFFu8; (1u64 << 20).min(bat_bytes) as usize];
    let mut done = 0u64;
    while done < bat_bytes {
        let n = (chunk.len() as u64).min(bat_bytes - done);
        let at = TABLE_OFFSET + done;
        file.write_all_at(&chunk[..n as usize], at)
            .map_err(|e| Error::io(path, "write", at, e))?;
        done += n;
    }
    Ok(())
}

fn check_params(path: &Path, size: u64, block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::Request(Request::NewVhdBlockSize {
            path: path.to_path_buf(),
            block_size,
            min: MIN_BLOCK_SIZE,
            max: MAX_BLOCK_SIZE,
        }));
    }
    if size.div_ceil(block_size as u64) > super::bat::MAX_BAT_ENTRIES as u64 {
        return Err(Error::Request(Request::NewVhdBatEntries {
            path: path.to_path_buf(),
            size,
            block_size,
            max: super::bat::MAX_BAT_ENTRIES,
        }));
    }
    if size == 0 || !size.is_multiple_of(512) || size > MAX_SIZE {
        return Err(Error::Request(Request::NewVhdSize {
            path: path.to_path_buf(),
            size,
            max: MAX_SIZE,
        }));
    }
    Ok(())
}

fn new_footer(disk_type: DiskType, size: u64, geometry: Geometry) -> Footer {
    Footer {
        features: 2,
        file_format_version: 0x0001_0000,
        data_offset: FOOTER_SIZE as u64,
        time_stamp: now_time_stamp(),
        creator_application: CREATOR,
        creator_version: CREATOR_VERSION,
        creator_host_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        disk_geometry: geometry,
        disk_type,
        checksum: 0,
        unique_id: *Uuid::new_v4().as_bytes(),
        saved_state: 0,
    }
}

fn new_header(size: u64, block_size: u32) -> DynamicHeader {
    DynamicHeader {
        data_offset: u64::MAX,
        table_offset: TABLE_OFFSET,
        header_version: 0x0001_0000,
        // size <= 2040 GiB and block_size >= 512, so this fits in u32.
        max_table_entries: size.div_ceil(block_size as u64) as u32,
        block_size,
        checksum: 0,
        parent_unique_id: [0; 16],
        parent_time_stamp: 0,
        parent_unicode_name: String::new(),
        parent_locators: Default::default(),
    }
}

/// The file as a list of (offset, bytes) pieces plus its total length. The BAT is
/// not in the list (it can be large: up to 16 MiB for 2040 GiB in 512 KiB blocks, far
/// more with tiny blocks); `write_new_file` writes it in bounded chunks.
fn build(
    footer: &Footer,
    header: &DynamicHeader,
    locators: &[([u8; 4], Vec<u8>)],
) -> (Vec<(u64, Vec<u8>)>, u64) {
    let mut header = header.clone();
    let bat_len = (header.max_table_entries as u64 * 4).div_ceil(512) * 512;
    let (mut pieces, pos) = lay_out_locators(&mut header, locators, TABLE_OFFSET + bat_len);
    let fb = footer.to_bytes().to_vec();
    pieces.push((0, fb.clone()));
    pieces.push((FOOTER_SIZE as u64, header.to_bytes().to_vec()));
    pieces.push((pos, fb));
    (pieces, pos + FOOTER_SIZE as u64)
}

/// Write the new file through `durable::create_file_atomically` (temporary name,
/// fsync, moved into place without replacing anything; removed on error).
fn write_new_file(
    path: &Path,
    footer: &Footer,
    header: &DynamicHeader,
    locators: &[([u8; 4], Vec<u8>)],
) -> Result<()> {
    let (pieces, _len) = build(footer, header, locators);
    create_file_atomically(path, false, |file| {
        // The BAT: every entry unallocated (0xFFFFFFFF).
        write_bat_unused(file, path, header.max_table_entries)?;
        for (at, data) in &pieces {
            file.write_all_at(data, *at)
                .map_err(|e| Error::io(path, "write", *at, e))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_parameters() {
        let d = std::env::temp_dir();
        assert!(create_dynamic(&d.join("x.vhd"), 1000, DEFAULT_BLOCK_SIZE).is_err());
        assert!(create_dynamic(&d.join("x.vhd"), 1 << 20, 3 << 20).is_err());
        assert!(create_dynamic(&d.join("x.vhd"), MAX_SIZE + 512, DEFAULT_BLOCK_SIZE).is_err());
        assert!(create_dynamic(&d.join("x.vhd"), 0, DEFAULT_BLOCK_SIZE).is_err());
        let e = create_dynamic(&d.join("x.vhd"), 1 << 40, 512).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Request(Request::NewVhdBatEntries {
                    block_size: 512,
                    ..
                })
            ),
            "{e}"
        );
    }
}
