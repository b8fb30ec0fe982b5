//! Virtual PC / Virtual Server VHD (Virtual Hard Disk Image Format Specification 1.0).
//!
//! Layout: a fixed disk is raw data followed by the 512-byte footer. A dynamic or
//! differencing disk is a footer copy at offset 0, the dynamic disk header, the BAT,
//! parent locator data (differencing), data blocks (sector bitmap + data), and the footer.
//!
//! Read semantics (`map`), checked against libvhdi:
//! - dynamic disk: an unallocated block reads as zeros; in an allocated block a sector
//!   whose bitmap bit is set is read from the block, and a sector whose bit is clear
//!   reads as zeros. The specification calls clear-bit sectors unused, and libvhdi
//!   returns zeros for them (verified: clearing bit 0x80 of a qemu-made block hides
//!   sector 0). qemu ignores the bitmap on reads; it always writes full bitmaps, so the
//!   two views agree on every file qemu or Hyper-V makes.
//! - differencing disk: an unallocated block, or a sector whose bit is clear, is
//!   `Absent` (read from the parent); set bits are held here.

pub mod bat;
mod check;
mod compact;
pub mod create;
pub mod dynamic;
pub mod footer;
pub mod locator;
pub(crate) mod resize;
pub mod set_parent;
mod write;

use std::path::Path;

use uuid::Uuid;

use crate::error::{Error, Finding, Result, VhdDefect, Warning};
use crate::image::ImageFile;
use crate::layer::{
    block_pieces, push_run, Format, Layer, LayerInfo, OpenOptions, ParentRef, Run, WritableLayer,
};

use bat::{Bat, Bitmap, UNALLOCATED};
use dynamic::{DynamicHeader, HEADER_SIZE};
use footer::{fourcc, DiskType, Footer, FOOTER_SIZE};

/// Sector size of every VHD.
pub const SECTOR: u64 = 512;

/// An opened VHD file (fixed, dynamic or differencing).
pub struct Vhd {
    file: ImageFile,
    footer: Footer,
    header: Option<DynamicHeader>,
    bat: Option<Bat>,
    parent: Option<ParentRef>,
    locator_info: Vec<(String, String)>,
    warnings: Vec<Warning>,
    writer: Option<write::Writer>,
}

/// Positioned read of the real file. Unlike `ImageFile::read_exact_at` it does not stop
/// at the length seen at open: a writable VHD grows as blocks are allocated, and every
/// offset read here was checked against the file when its block was loaded or made.
pub(crate) fn pread(file: &ImageFile, buf: &mut [u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::io(
                &file.path,
                "read (the file is shorter than its BAT says: truncated while open?)",
                offset,
                std::io::Error::from_raw_os_error(libc::EIO),
            )
        } else {
            Error::io(&file.path, "read", offset, e)
        }
    })
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("path", &self.file.path)
            .field("disk_type", &self.footer.disk_type)
            .field("current_size", &self.footer.current_size)
            .field("writable", &self.writer.is_some())
            .finish()
    }
}

impl Vhd {
    /// Open a VHD file, checking footer, dynamic header, BAT and parent locators.
    /// Checksum mismatches are warnings for read-only opens and errors for writable ones.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Vhd> {
        Self::open_inner(path, opts, false)
    }

    /// `open`, but a dynamic disk header whose checksum does not match opens writable too
    /// (with the warning): for `set-parent`, which writes the whole header again (the
    /// repair of a header torn by power loss during an earlier set-parent).
    pub(crate) fn open_rewriting_header(path: &Path, opts: OpenOptions) -> Result<Vhd> {
        Self::open_inner(path, opts, true)
    }

    fn open_inner(path: &Path, opts: OpenOptions, header_rewritten: bool) -> Result<Vhd> {
        let file = ImageFile::open_with(path, opts)?;
        let mut warnings = Vec::new();
        let len = file.len();
        let (footer, footer_ok, footer_pos) = Self::find_footer(&file, opts, &mut warnings)?;
        if !footer_ok {
            if opts.writable {
                return Err(Error::corrupt(
                    path,
                    VhdDefect::ChecksumWritable {
                        structure: "footer",
                    },
                ));
            }
            warnings.push(Warning::VhdChecksum {
                structure: "footer",
            });
        }

        let mut header = None;
        let mut bat = None;
        let mut parent = None;
        let mut locator_info = Vec::new();
        match footer.disk_type {
            DiskType::Fixed => {
                if footer.current_size > footer_pos {
                    return Err(Error::corrupt(
                        path,
                        VhdDefect::FixedSize {
                            current_size: footer.current_size,
                            data_len: footer_pos,
                        },
                    ));
                }
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let at = footer.data_offset;
                if at
                    .checked_add(HEADER_SIZE as u64)
                    .filter(|&e| e <= len)
                    .is_none()
                {
                    return Err(Error::corrupt(
                        path,
                        VhdDefect::HeaderPastEnd {
                            offset: at,
                            file_len: len,
                        },
                    ));
                }
                let mut hb = [0u8; HEADER_SIZE];
                file.read_exact_at(&mut hb, at)?;
                let (h, ok) = DynamicHeader::parse(path, &hb, at)?;
                if !ok {
                    if opts.writable && !header_rewritten {
                        return Err(Error::corrupt(
                            path,
                            VhdDefect::ChecksumWritable {
                                structure: "dynamic disk header",
                            },
                        ));
                    }
                    warnings.push(Warning::VhdChecksum {
                        structure: "dynamic disk header",
                    });
                }
                let needed = footer.current_size.div_ceil(h.block_size as u64);
                if needed > h.max_table_entries as u64 {
                    return Err(Error::corrupt(
                        path,
                        VhdDefect::BatTooSmall {
                            entries: h.max_table_entries,
                            current_size: footer.current_size,
                            block_size: h.block_size,
                            needed,
                        },
                    ));
                }
                bat = Some(Bat::load(
                    &file,
                    h.table_offset,
                    needed as u32, // <= max_table_entries, a u32
                    h.block_size,
                    h.bitmap_size(),
                    SECTOR,
                    footer_pos,
                )?);
                if footer.disk_type == DiskType::Differencing {
                    let (p, info) = Self::read_parent(&file, &h, &mut warnings)?;
                    parent = Some(p);
                    locator_info = info;
                }
                Self::check_block_overlaps(
                    &file,
                    bat.as_ref().expect("just loaded"),
                    &h,
                    at,
                    footer.disk_type == DiskType::Differencing,
                )?;
                header = Some(h);
            }
        }
        let writer = opts.writable.then(|| write::Writer::new(footer_pos));
        // Warnings are logged only once the file opened: a file that fails gets exactly
        // one line, the error.
        for w in &warnings {
            log::warn!("{}: {w}", path.display());
        }
        Ok(Vhd {
            file,
            footer,
            header,
            bat,
            parent,
            locator_info,
            warnings,
            writer,
        })
    }

    /// No data block may overlap the dynamic disk header at `header_at`, or (differencing
    /// disks) the data of a parent locator: reads would return those structures as disk
    /// data. (`Bat::load` already keeps blocks off the BAT, the footer and each other.)
    fn check_block_overlaps(
        file: &ImageFile,
        bat: &Bat,
        h: &DynamicHeader,
        header_at: u64,
        differencing: bool,
    ) -> Result<()> {
        let mut taken = vec![(
            header_at,
            header_at.saturating_add(HEADER_SIZE as u64),
            "the dynamic disk header".to_string(),
        )];
        if differencing {
            for (i, e) in h.parent_locators.iter().enumerate() {
                if !e.is_empty() {
                    let start = e.platform_data_offset;
                    let end = start.saturating_add(e.platform_data_length as u64);
                    taken.push((start, end, format!("parent locator {i}'s data")));
                }
            }
        }
        let block_len = bat.bitmap_size as u64 + bat.block_size as u64;
        for b in 0..bat.len() {
            let e = bat.entry(b);
            if e == UNALLOCATED {
                continue;
            }
            let start = e as u64 * SECTOR;
            let end = start + block_len;
            if let Some((_, _, what)) = taken.iter().find(|(s, t, _)| start < *t && *s < end) {
                return Err(Error::corrupt(
                    &file.path,
                    VhdDefect::BlockOverlaps {
                        entry: b,
                        offset: start,
                        structure: what.clone(),
                    },
                ));
            }
        }
        Ok(())
    }

    /// The footer at the end of the file (512 bytes, or 511 from old tools); failing
    /// that, the copy at offset 0 of a dynamic/differencing disk, with a warning (a
    /// truncated or still-growing file, which libvhdi also reads).
    fn find_footer(
        file: &ImageFile,
        opts: OpenOptions,
        warnings: &mut Vec<Warning>,
    ) -> Result<(Footer, bool, u64)> {
        let path = &file.path;
        let len = file.len();
        for size in [FOOTER_SIZE as u64, FOOTER_SIZE as u64 - 1] {
            if len < size {
                continue;
            }
            let mut b = vec![0u8; size as usize];
            file.read_exact_at(&mut b, len - size)?;
            if &b[..8] == footer::FOOTER_COOKIE {
                let (f, ok) = Footer::parse(path, &b, len - size)?;
                return Ok((f, ok, len - size));
            }
        }
        if len >= FOOTER_SIZE as u64 {
            let mut b = [0u8; FOOTER_SIZE];
            file.read_exact_at(&mut b, 0)?;
            if &b[..8] == footer::FOOTER_COOKIE {
                let (f, ok) = Footer::parse(path, &b, 0)?;
                if f.disk_type != DiskType::Fixed {
                    if opts.writable {
                        return Err(Error::corrupt(path, VhdDefect::FooterMissingWritable));
                    }
                    warnings.push(Warning::VhdFooterMissing);
                    return Ok((f, ok, len));
                }
            }
        }
        Err(Error::corrupt(path, VhdDefect::NoFooter { file_len: len }))
    }

    /// Parent candidates in the search order of `paths::LOCATORS` (W2ru, W2ku, Wi2r, Wi2k,
    /// Mac, MacX, then the parent Unicode name); plus the locator entries for `info`.
    fn read_parent(
        file: &ImageFile,
        h: &DynamicHeader,
        warnings: &mut Vec<Warning>,
    ) -> Result<(ParentRef, Vec<(String, String)>)> {
        let path = &file.path;
        let mut decoded: Vec<Option<(String, String)>> = vec![None; h.parent_locators.len()];
        for (i, e) in h.parent_locators.iter().enumerate() {
            if e.is_empty() {
                continue;
            }
            let Some(name) = e.name() else {
                warnings.push(Warning::VhdLocatorPlatform {
                    index: i,
                    code: fourcc(&e.platform_code),
                });
                continue;
            };
            e.check_bounds(path, i, file.len())?;
            // Bounded by MAX_LOCATOR_DATA in check_bounds.
            let data = file.read_vec_at(
                e.platform_data_offset,
                e.platform_data_length as u64,
                locator::MAX_LOCATOR_DATA as u64,
                "parent locator data",
            )?;
            let s = locator::decode(path, i, &e.platform_code, &data)?;
            decoded[i] = Some((name.to_string(), s));
        }
        // In the search order (`paths::LOCATORS`): the locators by platform code, each
        // code's entries in file order, then the parent Unicode name.
        let mut candidates = Vec::new();
        for want in crate::paths::locators(Format::Vhd) {
            if want == "parent_unicode_name" {
                if !h.parent_unicode_name.is_empty() {
                    candidates.push((want.to_string(), h.parent_unicode_name.clone()));
                }
                continue;
            }
            for (n, s) in decoded.iter().flatten() {
                if n == want && !s.is_empty() {
                    candidates.push((n.clone(), s.clone()));
                }
            }
        }
        let info = decoded.into_iter().flatten().collect();
        Ok((
            ParentRef {
                candidates,
                linkage: vec![Uuid::from_bytes(h.parent_unique_id)],
                timestamp: Some(h.parent_time_stamp),
            },
            info,
        ))
    }

    /// The parsed footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    fn is_differencing(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }
}

impl Layer for Vhd {
    fn path(&self) -> &Path {
        &self.file.path
    }
    fn written_by(&self) -> Option<&str> {
        self.file.writer.as_deref()
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.footer.current_size
    }

    fn logical_sector_size(&self) -> u32 {
        SECTOR as u32
    }

    fn map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.footer.current_size)
            .ok_or_else(|| {
                Error::Request(crate::error::Request::MapPastEnd {
                    path: self.file.path.clone(),
                    len,
                    offset,
                    size: self.footer.current_size,
                })
            })?;
        let Some(bat) = &self.bat else {
            push_run(
                runs,
                Run::Held {
                    len,
                    file_offset: offset,
                },
            );
            return Ok(());
        };
        let diff = self.is_differencing();
        let miss = |len| {
            if diff {
                Run::Absent { len }
            } else {
                Run::Zero { len }
            }
        };
        for (b, boff, n) in block_pieces(offset, len, bat.block_size as u64) {
            let b = b as usize;
            let e = bat.entry(b);
            if e == UNALLOCATED {
                push_run(runs, miss(n));
            } else {
                let data = e as u64 * SECTOR + bat.bitmap_size as u64;
                match bat.bitmap(&self.file, b)? {
                    Bitmap::Full => push_run(
                        runs,
                        Run::Held {
                            len: n,
                            file_offset: data + boff,
                        },
                    ),
                    bm => {
                        let bend = boff + n;
                        let send = bend.div_ceil(SECTOR) as u32;
                        let mut p = boff;
                        while p < bend {
                            let s = (p / SECTOR) as u32;
                            let (present, cnt) = bm.run_from(s, send);
                            let run_end = ((s + cnt) as u64 * SECTOR).min(bend);
                            let l = run_end - p;
                            if present {
                                push_run(
                                    runs,
                                    Run::Held {
                                        len: l,
                                        file_offset: data + p,
                                    },
                                );
                            } else {
                                push_run(runs, miss(l));
                            }
                            p = run_end;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        pread(&self.file, buf, file_offset)
    }

    fn parent(&self) -> Option<&ParentRef> {
        self.parent.as_ref()
    }

    fn linkage_id(&self) -> Option<Uuid> {
        Some(Uuid::from_bytes(self.footer.unique_id))
    }

    fn timestamp(&self) -> Option<u32> {
        Some(self.footer.time_stamp)
    }

    fn check(&self) -> Result<Vec<Finding>> {
        self.check_structure()
    }

    fn info(&self) -> Result<LayerInfo> {
        let f = &self.footer;
        let mut ids = vec![(
            "unique_id".to_string(),
            Uuid::from_bytes(f.unique_id).to_string(),
        )];
        let mut extra = vec![
            (
                "creator_application".to_string(),
                fourcc(&f.creator_application),
            ),
            (
                "creator_version".to_string(),
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
            ),
            ("creator_host_os".to_string(), fourcc(&f.creator_host_os)),
            ("time_stamp".to_string(), f.time_stamp.to_string()),
            ("original_size".to_string(), f.original_size.to_string()),
            (
                "disk_geometry".to_string(),
                format!(
                    "{}/{}/{}",
                    f.disk_geometry.cylinders,
                    f.disk_geometry.heads,
                    f.disk_geometry.sectors_per_track
                ),
            ),
        ];
        if f.saved_state != 0 {
            extra.push(("saved_state".into(), f.saved_state.to_string()));
        }
        let mut info = LayerInfo {
            disk_type: f.disk_type.name().into(),
            virtual_size: f.current_size,
            logical_sector_size: SECTOR as u32,
            physical_sector_size: SECTOR as u32,
            has_parent: self.parent.is_some(),
            parent_locator: self.locator_info.clone(),
            warnings: self.warnings.clone(),
            ..Default::default()
        };
        match (&self.header, &self.bat) {
            (Some(h), Some(bat)) => {
                info.block_size = h.block_size as u64;
                info.total_blocks = bat.len() as u64;
                let bs = h.block_size as u64;
                let mut held = 0u64;
                for b in 0..bat.len() {
                    if bat.entry(b) == UNALLOCATED {
                        continue;
                    }
                    info.allocated_blocks += 1;
                    if self.is_differencing() {
                        let in_disk = bs.min(f.current_size - b as u64 * bs);
                        let sectors = in_disk.div_ceil(SECTOR) as u32;
                        let n = bat.bitmap(&self.file, b)?.count(sectors) * SECTOR;
                        held += n.min(in_disk);
                    }
                }
                // A dynamic disk answers every byte itself (data or zeros).
                info.bytes_held = if self.is_differencing() {
                    held
                } else {
                    f.current_size
                };
                if self.is_differencing() {
                    ids.push((
                        "parent_unique_id".into(),
                        Uuid::from_bytes(h.parent_unique_id).to_string(),
                    ));
                    extra.push(("parent_time_stamp".into(), h.parent_time_stamp.to_string()));
                    extra.push(("parent_unicode_name".into(), h.parent_unicode_name.clone()));
                }
            }
            _ => info.bytes_held = f.current_size,
        }
        info.ids = ids;
        info.extra = extra;
        Ok(info)
    }

    fn writable(&self) -> Option<&dyn WritableLayer> {
        if self.writer.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod tests;
