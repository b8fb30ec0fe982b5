//! Writing the merged view of a chain as a new, independent disk (`vdiskfs convert`).
//!
//! The work is proportional to the data, not to the virtual size: `Disk::data_ranges`
//! says which ranges some layer holds (from the layers' maps, no payload read), only
//! the output units (blocks) those ranges touch are read, and a unit that reads as
//! zeros is not written (dynamic: left unallocated; raw and fixed: left as a hole of the
//! sparse output file, which reads as zeros).
//!
//! The output file is new: it is written under a temporary name and linked into place
//! by the caller (`image::create_file_atomically`), so no log or ordering is needed
//! inside it; a crash leaves only the temporary file, which the next run removes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::image::vhd::create::{fixed_footer, DynamicWriter};
use crate::image::vhdx::bat::{make_entry, PAYLOAD_BLOCK_FULLY_PRESENT};
use crate::image::vhdx::create::{write_new, NewVhdx};

/// Granularity at which raw and fixed outputs skip zeros (holes in the file).
const HOLE_UNIT: usize = 64 << 10;
/// Unit of work for raw and fixed VHD outputs.
const RAW_UNIT: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    Vhdx,
    Vhd,
    Raw,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ConvertSpec {
    pub format: OutFormat,
    /// Fixed (every block present / a flat VHD) rather than dynamic. Raw ignores it.
    pub fixed: bool,
    /// Block size of a VHDX or dynamic VHD output.
    pub block_size: u32,
    /// VHDX only: 512 or 4096.
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// The output's virtual size: the source's, or larger (e.g. rounded up to a whole
    /// MiB for Azure); bytes past the source's end read as zeros.
    pub virtual_size: u64,
    /// Creator string written into a VHDX.
    pub creator: String,
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// Bytes some layer of the source holds (what had to be read).
    pub bytes_to_copy: u64,
    /// Payload bytes written into the output (blocks or non-zero pieces).
    pub bytes_written: u64,
    /// Output units (blocks) that held non-zero data.
    pub blocks_written: u64,
}

/// Where the payload of each output unit goes.
enum Sink {
    /// Raw file or fixed VHD: unit data at its virtual offset.
    Flat,
    /// Fixed VHDX: block `b` at `start + b * block_size`, every BAT entry present.
    FixedVhdx {
        start: u64,
    },
    /// Dynamic VHDX: non-zero blocks appended from `next`, BAT entry set per block.
    DynamicVhdx {
        next: u64,
    },
    DynamicVhd(Box<DynamicWriter>),
}

/// Write the merged view of `disk` into the empty `file` as `spec` says. `progress` is
/// called with the number of source bytes handled since the last call; `cancel` is
/// polled between units (set by a signal handler) and stops the work with an error.
pub fn write_image(
    disk: &Disk,
    file: &File,
    path: &Path,
    spec: &ConvertSpec,
    progress: &dyn Fn(u64),
    cancel: &AtomicBool,
) -> Result<ConvertReport> {
    if spec.virtual_size < disk.len() {
        return Err(Error::Invalid(format!(
            "{}: output size {} is smaller than the source's {}",
            path.display(),
            spec.virtual_size,
            disk.len()
        )));
    }
    let (mut sink, unit) = start(file, path, spec)?;
    let mut ranges = Vec::new();
    disk.data_ranges(0, disk.len(), &mut ranges)?;
    let mut report = ConvertReport {
        bytes_to_copy: ranges.iter().map(|r| r.1).sum(),
        ..Default::default()
    };
    let mut buf = vec![0u8; unit as usize];
    let mut last_unit = None;
    for &(off, len) in &ranges {
        let mut pos = off;
        let end = off + len;
        while pos < end {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Invalid(format!(
                    "{}: interrupted; nothing was written at that path",
                    path.display()
                )));
            }
            let index = pos / unit;
            let unit_end = ((index + 1) * unit).min(end);
            if last_unit != Some(index) {
                last_unit = Some(index);
                copy_unit(
                    disk,
                    file,
                    path,
                    spec,
                    &mut sink,
                    index,
                    &mut buf,
                    &mut report,
                )?;
            }
            progress(unit_end - pos);
            pos = unit_end;
        }
    }
    finish(file, path, spec, sink)?;
    Ok(report)
}

/// Lay out the empty output and return where units go, and the unit size.
fn start(file: &File, path: &Path, spec: &ConvertSpec) -> Result<(Sink, u64)> {
    let size = spec.virtual_size;
    match (spec.format, spec.fixed) {
        (OutFormat::Raw, _) => {
            file.set_len(size)
                .map_err(|e| Error::file(path, "extend", e))?;
            Ok((Sink::Flat, RAW_UNIT))
        }
        (OutFormat::Vhd, true) => {
            fixed_footer(path, size)?; // validates the size before anything is written
            file.set_len(size)
                .map_err(|e| Error::file(path, "extend", e))?;
            Ok((Sink::Flat, RAW_UNIT))
        }
        (OutFormat::Vhd, false) => Ok((
            Sink::DynamicVhd(Box::new(DynamicWriter::start(
                file,
                path,
                size,
                spec.block_size,
            )?)),
            spec.block_size as u64,
        )),
        (OutFormat::Vhdx, fixed) => {
            let n = new_vhdx(spec);
            write_new(file, path, &n, &spec.creator)?;
            let start = n.payload_start();
            let bs = spec.block_size as u64;
            if fixed {
                let blocks = size.div_ceil(bs);
                set_fixed_bat(file, path, &n, blocks, start)?;
                file.set_len(start + blocks * bs)
                    .map_err(|e| Error::file(path, "extend", e))?;
                Ok((Sink::FixedVhdx { start }, bs))
            } else {
                Ok((Sink::DynamicVhdx { next: start }, bs))
            }
        }
    }
}

fn new_vhdx(spec: &ConvertSpec) -> NewVhdx {
    NewVhdx {
        virtual_size: spec.virtual_size,
        block_size: spec.block_size,
        logical_sector_size: spec.logical_sector_size,
        physical_sector_size: spec.physical_sector_size,
        parent_locator: None,
        virtual_disk_id: None,
        fixed: spec.fixed,
    }
}

/// Every payload entry of a fixed VHDX: present, block `b` at `start + b * bs`. Written
/// in runs of contiguous entries (a chunk's sector-bitmap entry sits between runs).
fn set_fixed_bat(file: &File, path: &Path, n: &NewVhdx, blocks: u64, start: u64) -> Result<()> {
    let bs = n.block_size as u64;
    let mut b = 0u64;
    let mut run: Vec<u8> = Vec::new();
    let mut run_at = n.payload_entry_offset(0);
    while b < blocks {
        let at = n.payload_entry_offset(b);
        if at != run_at + run.len() as u64 || run.len() >= 1 << 20 {
            file.write_all_at(&run, run_at)
                .map_err(|e| Error::io(path, "write", run_at, e))?;
            run.clear();
            run_at = at;
        }
        let entry = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, start + b * bs);
        run.extend_from_slice(&entry.to_le_bytes());
        b += 1;
    }
    file.write_all_at(&run, run_at)
        .map_err(|e| Error::io(path, "write", run_at, e))
}

#[allow(clippy::too_many_arguments)]
fn copy_unit(
    disk: &Disk,
    file: &File,
    path: &Path,
    spec: &ConvertSpec,
    sink: &mut Sink,
    index: u64,
    buf: &mut [u8],
    report: &mut ConvertReport,
) -> Result<()> {
    let unit = buf.len() as u64;
    let voff = index * unit;
    // Past the source's end (a larger output) reads as zeros; read_at is short there.
    let n = disk.read_at(voff, buf)?;
    buf[n..].fill(0);
    if is_zero(buf) {
        return Ok(());
    }
    report.blocks_written += 1;
    let w = |data: &[u8], at: u64| {
        file.write_all_at(data, at)
            .map_err(|e| Error::io(path, "write", at, e))
    };
    match sink {
        Sink::Flat => {
            // Only the part inside the virtual size; zero pieces stay holes.
            let len = unit.min(spec.virtual_size - voff) as usize;
            report.bytes_written += write_nonzero_pieces(&buf[..len], voff, &w)?;
        }
        Sink::FixedVhdx { start } => {
            report.bytes_written += write_nonzero_pieces(buf, *start + voff, &w)?;
        }
        Sink::DynamicVhdx { next } => {
            let n = new_vhdx(spec);
            w(buf, *next)?;
            let entry = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, *next);
            w(&entry.to_le_bytes(), n.payload_entry_offset(index))?;
            *next += unit;
            report.bytes_written += unit;
        }
        Sink::DynamicVhd(dw) => {
            dw.write_block(file, path, index, buf)?;
            report.bytes_written += unit;
        }
    }
    Ok(())
}

/// Write the non-zero `HOLE_UNIT` pieces of `data` at `at..`; returns bytes written.
fn write_nonzero_pieces(data: &[u8], at: u64, w: &dyn Fn(&[u8], u64) -> Result<()>) -> Result<u64> {
    let mut written = 0u64;
    let mut i = 0usize;
    while i < data.len() {
        // Coalesce consecutive non-zero pieces into one write.
        let mut j = i;
        while j < data.len() && !is_zero(&data[j..(j + HOLE_UNIT).min(data.len())]) {
            j = (j + HOLE_UNIT).min(data.len());
        }
        if j > i {
            w(&data[i..j], at + i as u64)?;
            written += (j - i) as u64;
            i = j;
        } else {
            i = (i + HOLE_UNIT).min(data.len());
        }
    }
    Ok(written)
}

fn finish(file: &File, path: &Path, spec: &ConvertSpec, sink: Sink) -> Result<()> {
    match sink {
        Sink::DynamicVhd(dw) => dw.finish(file, path),
        Sink::Flat if spec.format == OutFormat::Vhd => {
            let footer = fixed_footer(path, spec.virtual_size)?;
            file.write_all_at(&footer, spec.virtual_size)
                .map_err(|e| Error::io(path, "write", spec.virtual_size, e))
        }
        _ => Ok(()),
    }
}

/// True when every byte is zero. The fold has no early exit inside a 4 KiB piece, so it
/// vectorises; the `all` stops at the first non-zero piece.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
