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
use std::sync::{mpsc, Mutex};

use crate::defect::AzureProblem;
use crate::disk::Disk;
use crate::error::{Error, Request, Result};
use crate::image::detect_format;
use crate::image::vhd::create::{fixed_footer, DynamicWriter};
use crate::image::vhd::footer::{DiskType, Footer, Geometry, FOOTER_SIZE};
use crate::image::vhdx::bat::{make_entry, PAYLOAD_BLOCK_FULLY_PRESENT};
use crate::image::vhdx::create::{write_new, NewVhdx};
use crate::layer::Format;

/// Granularity at which raw and fixed outputs skip zeros (holes in the file).
const HOLE_UNIT: usize = 64 << 10;
/// Unit of work for raw and fixed VHD outputs.
const RAW_UNIT: u64 = 1 << 20;
/// Units are read and written in pieces of this size: small enough to stay in the CPU
/// cache between the read, the zero test and the write.
const PIECE: u64 = 256 << 10;

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

/// Windows of the virtual disk whose data ranges are listed at a time: a chain whose
/// data alternates sector by sector (a hostile sector bitmap) gives one range per 1 KiB,
/// so listing a whole 64 TiB disk at once could take more memory than any machine
/// has; a window's list stays under 8 MiB. A multiple of every unit size.
const WINDOW: u64 = 256 << 20;

/// Write the merged view of `disk` as the new file `output` (`vdiskfs convert`'s work,
/// for library callers): written under a temporary name, fdatasynced and moved into
/// place in one step (`replace`: over an existing file; otherwise an existing file is an
/// error), so `output` appears complete or not at all. Temporary files an interrupted
/// run left for `output` are removed first. `progress` and `cancel` as in `write_image`.
pub fn convert(
    disk: &Disk,
    output: &Path,
    spec: &ConvertSpec,
    replace: bool,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<ConvertReport> {
    let removed = crate::image::remove_stale_temps(output);
    if removed > 0 {
        log::warn!(
            "{}: removed {removed} temporary file(s) left by an interrupted convert",
            output.display()
        );
    }
    let mut report = None;
    crate::image::create_file_atomically(output, replace, |f: &File| {
        report = Some(write_image(disk, f, output, spec, progress, cancel)?);
        Ok(())
    })?;
    Ok(report.expect("set when the fill succeeded"))
}

/// Bytes of `disk` that some layer holds data for (what `write_image` reads, and the
/// total a progress bar counts to), from the layers' maps, window by window.
pub fn source_data_bytes(disk: &Disk) -> Result<u64> {
    let mut total = 0;
    let mut ranges = Vec::new();
    let mut off = 0;
    while off < disk.len() {
        let len = WINDOW.min(disk.len() - off);
        ranges.clear();
        disk.data_ranges(off, len, &mut ranges)?;
        total += ranges.iter().map(|r| r.1).sum::<u64>();
        off += len;
    }
    Ok(total)
}

fn interrupted(path: &Path) -> Error {
    Error::Request(Request::ConvertInterrupted {
        path: path.to_path_buf(),
    })
}

/// The output units the data ranges touch, in order, handed out one at a time to the
/// workers: (unit index, source data bytes in it, for progress).
struct UnitCursor<'a> {
    ranges: &'a [(u64, u64)],
    unit: u64,
    /// (index into `ranges`, position inside that range).
    at: Mutex<(usize, u64)>,
}

/// One output unit to copy: its index and the parts of it some layer holds data for
/// (virtual offsets, in order); everything else in it reads as zeros.
struct UnitWork {
    index: u64,
    spans: Vec<(u64, u64)>,
}

impl UnitWork {
    fn bytes(&self) -> u64 {
        self.spans.iter().map(|s| s.1).sum()
    }
}

impl UnitCursor<'_> {
    fn next(&self) -> Option<UnitWork> {
        let mut at = self.at.lock().expect("no worker panics holding the cursor");
        let (mut i, mut pos) = *at;
        if i >= self.ranges.len() {
            return None;
        }
        pos = pos.max(self.ranges[i].0);
        let index = pos / self.unit;
        let unit_end = (index + 1) * self.unit;
        let mut spans = Vec::new();
        // Every range (part) inside this unit.
        while i < self.ranges.len() {
            let (off, len) = self.ranges[i];
            let start = pos.max(off);
            if start >= unit_end {
                break;
            }
            let end = (off + len).min(unit_end);
            spans.push((start, end - start));
            pos = end;
            if end == off + len {
                i += 1;
            } else {
                break;
            }
        }
        *at = (i, pos);
        Some(UnitWork { index, spans })
    }
}

/// A non-zero piece of the source on its way from the reader to the writer.
struct Piece {
    /// The output unit it belongs to.
    index: u64,
    /// Its offset inside the unit.
    at: u64,
    buf: Vec<u8>,
    len: usize,
}

/// Pieces in flight between the reader and the writer (each `PIECE` bytes).
const PIPELINE_DEPTH: usize = 8;

/// Write the merged view of `disk` into the empty `file` as `spec` says, reading only
/// what some layer holds (`Disk::data_ranges`, a window at a time), and make it durable
/// (fdatasync).
///
/// Two threads: a reader goes through the units in order, reads the pieces of each that
/// hold data and tests them for zeros; the writer (the calling thread) places each unit
/// when its first non-zero piece arrives and writes the pieces. Reads and zero tests so
/// overlap the writes, and the writes, which the kernel serialises per file anyway, come
/// from one thread in order (the output is the same on every run). `progress` is called
/// with the number of source bytes handled; `cancel` is polled between units and once
/// more after the final fdatasync (set by a signal handler) and stops the work with an
/// error, so a file finished while a signal was pending is not linked into place.
pub fn write_image(
    disk: &Disk,
    file: &File,
    path: &Path,
    spec: &ConvertSpec,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<ConvertReport> {
    if spec.virtual_size < disk.len() {
        return Err(Error::Request(Request::OutputSmaller {
            path: path.to_path_buf(),
            size: spec.virtual_size,
            source_size: disk.len(),
        }));
    }
    let (mut sink, unit) = start(file, path, spec)?;
    let piece_len = PIECE.min(unit) as usize;
    let mut report = ConvertReport::default();
    let to_copy = std::sync::atomic::AtomicU64::new(0);
    let (tx, rx) = mpsc::sync_channel::<Result<Piece>>(PIPELINE_DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..PIPELINE_DEPTH + 2 {
        free_tx
            .send(vec![0u8; piece_len])
            .expect("the receiver is here");
    }
    let written: Result<()> = std::thread::scope(|s| {
        let to_copy = &to_copy;
        s.spawn(move || {
            // Units never straddle windows: WINDOW is a multiple of every unit size.
            let window = WINDOW.max(unit);
            let mut ranges = Vec::new();
            let mut spare: Option<Vec<u8>> = None;
            let mut off = 0;
            while off < disk.len() && !cancel.load(Ordering::Relaxed) {
                let len = window.min(disk.len() - off);
                ranges.clear();
                if let Err(e) = disk.data_ranges(off, len, &mut ranges) {
                    let _ = tx.send(Err(e));
                    return;
                }
                to_copy.fetch_add(ranges.iter().map(|r| r.1).sum(), Ordering::Relaxed);
                let cursor = UnitCursor {
                    ranges: &ranges,
                    unit,
                    at: Mutex::new((0, 0)),
                };
                while !cancel.load(Ordering::Relaxed) {
                    let Some(work) = cursor.next() else {
                        break;
                    };
                    let sent = read_unit(
                        disk, spec, &work, unit, piece_len, &mut spare, &free_rx, &tx,
                    );
                    match sent {
                        Ok(true) => progress(work.bytes()),
                        // The writer stopped (an error it reports itself).
                        Ok(false) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                off += len;
            }
        });
        // The writer. Returning (on an error) drops `rx` and `free_tx`, which stops the
        // reader at its next send or buffer wait (the scope then joins it).
        let free_tx = free_tx;
        let mut current: Option<(u64, u64)> = None; // (unit index, its file offset)
        for msg in rx {
            let p = msg?;
            let base = match current {
                Some((index, base)) if index == p.index => base,
                _ => {
                    let base = sink.place(file, path, spec, p.index, unit)?;
                    report.blocks_written += 1;
                    current = Some((p.index, base));
                    base
                }
            };
            let w = |data: &[u8], at: u64| {
                file.write_all_at(data, at)
                    .map_err(|e| Error::io(path, "write", at, e))
            };
            report.bytes_written += write_nonzero_pieces(&p.buf[..p.len], base + p.at, &w)?;
            let _ = free_tx.send(p.buf);
        }
        Ok(())
    });
    written?;
    report.bytes_to_copy = to_copy.into_inner();
    if cancel.load(Ordering::Relaxed) {
        return Err(interrupted(path));
    }
    finish(file, path, spec, sink)?;
    file.sync_data()
        .map_err(|e| Error::file(path, "fdatasync", e))?;
    if cancel.load(Ordering::Relaxed) {
        return Err(interrupted(path));
    }
    Ok(report)
}

/// The reader's part of one unit: read the pieces of it that hold data (a piece fits the
/// CPU cache, so the zero test reuses what the read brought in) and send the non-zero
/// ones to the writer. Zero pieces are not sent: a unit that reads as zeros is never
/// placed (dynamic: left unallocated), and zero parts of a placed unit stay holes of
/// the new file, which read as zeros. Ok(false) when the writer is gone.
#[allow(clippy::too_many_arguments)]
fn read_unit(
    disk: &Disk,
    spec: &ConvertSpec,
    work: &UnitWork,
    unit: u64,
    piece_len: usize,
    spare: &mut Option<Vec<u8>>,
    free: &mpsc::Receiver<Vec<u8>>,
    tx: &mpsc::SyncSender<Result<Piece>>,
) -> Result<bool> {
    let voff = work.index * unit;
    // A flat output ends at the virtual size; block formats store whole blocks.
    let keep = match spec.format {
        OutFormat::Raw => unit.min(spec.virtual_size - voff),
        OutFormat::Vhd if spec.fixed => unit.min(spec.virtual_size - voff),
        _ => unit,
    };
    let piece_len = piece_len as u64;
    // The next piece (offset in the unit) not yet read.
    let mut done = 0u64;
    for &(off, len) in &work.spans {
        let end = (off + len - voff).min(keep);
        let mut piece = ((off - voff) / piece_len * piece_len).max(done);
        while piece < end {
            let mut buf = match spare.take() {
                Some(b) => b,
                None => match free.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(false),
                },
            };
            let n = piece_len.min(keep - piece) as usize;
            // Past the source's end (a larger output) reads as zeros; read_at is short.
            let got = disk.read_at(voff + piece, &mut buf[..n])?;
            buf[got..n].fill(0);
            if is_zero(&buf[..n]) {
                *spare = Some(buf);
            } else {
                let p = Piece {
                    index: work.index,
                    at: piece,
                    buf,
                    len: n,
                };
                if tx.send(Ok(p)).is_err() {
                    return Ok(false);
                }
            }
            piece += n as u64;
        }
        done = done.max(piece);
    }
    Ok(true)
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

impl Sink {
    /// Where unit `index` (of `unit` bytes at virtual offset `index * unit`) starts in
    /// the file, placing it first where the format needs that (dynamic: the next free
    /// slot and its BAT entry). Called once per unit, when its first non-zero piece
    /// turns up.
    fn place(
        &mut self,
        file: &File,
        path: &Path,
        spec: &ConvertSpec,
        index: u64,
        unit: u64,
    ) -> Result<u64> {
        match self {
            Sink::Flat => Ok(index * unit),
            Sink::FixedVhdx { start } => Ok(*start + index * unit),
            Sink::DynamicVhdx { next } => {
                let at = *next;
                let entry = make_entry(PAYLOAD_BLOCK_FULLY_PRESENT, at);
                let entry_at = new_vhdx(spec).payload_entry_offset(index);
                file.write_all_at(&entry.to_le_bytes(), entry_at)
                    .map_err(|e| Error::io(path, "write", entry_at, e))?;
                *next += unit;
                Ok(at)
            }
            Sink::DynamicVhd(dw) => dw.allocate(file, path, index),
        }
    }
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
        // The last block's zero tail was not written: the file must still cover it.
        Sink::DynamicVhdx { next } => {
            let len = file
                .metadata()
                .map_err(|e| Error::file(path, "stat", e))?
                .len();
            if len < next {
                file.set_len(next)
                    .map_err(|e| Error::file(path, "extend", e))?;
            }
            Ok(())
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

const MIB: u64 = 1 << 20;

/// Azure's limits for an uploaded VHD's virtual size (the upload size minus the 512-byte
/// footer): from 20 MiB to 32 TiB (Azure REST API / SDK, DiskCreationData.UploadSizeBytes:
/// "between 20972032 (20 MiB + 512 bytes for the VHD footer) and 35183298347520 bytes
/// (32 TiB + 512 bytes for the VHD footer)").
pub const AZURE_MIN_SIZE: u64 = 20 * MIB;
pub const AZURE_MAX_SIZE: u64 = 32 << 40;

/// Everything that keeps Azure from taking `path` as an uploaded VHD (empty: it meets
/// the rules), as `check --azure` reports it. Read-only: the file is opened without
/// changing its access time where the kernel allows.
pub fn azure_problems(path: &Path) -> Result<Vec<AzureProblem>> {
    let mut problems = Vec::new();
    match detect_format(path)? {
        Some(Format::Vhd) => {}
        Some(Format::Vhdx) => return Ok(vec![AzureProblem::IsVhdx]),
        _ => return Ok(vec![AzureProblem::NotVhd]),
    }
    let file = crate::access::open_file(path, false).map_err(|e| Error::file(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::file(path, "stat", e))?
        .len();
    if len < FOOTER_SIZE as u64 {
        return Ok(vec![AzureProblem::TooShort { len }]);
    }
    let mut buf = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut buf, len - FOOTER_SIZE as u64)
        .map_err(|e| Error::io(path, "read", len - FOOTER_SIZE as u64, e))?;
    let (footer, checksum_ok) = match Footer::parse(path, &buf, len - FOOTER_SIZE as u64) {
        Ok(x) => x,
        Err(e) => return Ok(vec![AzureProblem::BadFooter { detail: e.detail() }]),
    };
    if footer.disk_type != DiskType::Fixed {
        problems.push(AzureProblem::NotFixed {
            disk_type: footer.disk_type.name(),
        });
    }
    if !checksum_ok {
        problems.push(AzureProblem::FooterChecksum);
    }
    let size = footer.current_size;
    if !size.is_multiple_of(MIB) {
        problems.push(AzureProblem::NotWholeMib {
            size,
            next: size.div_ceil(MIB) * MIB,
        });
    }
    if !(AZURE_MIN_SIZE..=AZURE_MAX_SIZE).contains(&size) {
        problems.push(AzureProblem::SizeOutOfRange { size });
    }
    if footer.original_size != size {
        problems.push(AzureProblem::OriginalSize {
            original: footer.original_size,
            size,
        });
    }
    if footer.disk_type == DiskType::Fixed && len != size + FOOTER_SIZE as u64 {
        problems.push(AzureProblem::FileLength {
            len,
            size,
            want: size + FOOTER_SIZE as u64,
        });
    }
    let geometry = Geometry::for_sectors(size / 512);
    if footer.disk_geometry != geometry {
        let (g, w) = (footer.disk_geometry, geometry);
        problems.push(AzureProblem::Geometry {
            have: (g.cylinders, g.heads, g.sectors_per_track),
            want: (w.cylinders, w.heads, w.sectors_per_track),
        });
    }
    if footer.disk_type == DiskType::Fixed && footer.data_offset != u64::MAX {
        problems.push(AzureProblem::DataOffset {
            offset: footer.data_offset,
        });
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `azure_problems` names each broken rule as its variant: a fixed VHD of a whole
    /// number of MiB passes; the same file one sector longer breaks the size and length
    /// rules; a corrupted footer checksum, a dynamic VHD, a VHDX and a file that is no
    /// VHD at all each get their own variant.
    #[test]
    fn azure_problems_are_typed() {
        let t = crate::test_support::TempDir::new("azure");
        let fixed = |name: &str, size: u64| {
            let p = t.join(name);
            let f = File::create(&p).unwrap();
            f.set_len(size).unwrap();
            let footer = fixed_footer(&p, size).unwrap();
            f.write_all_at(&footer, size).unwrap();
            p
        };
        let good = fixed("good.vhd", 32 * MIB);
        assert_eq!(azure_problems(&good).unwrap(), vec![]);
        let odd = fixed("odd.vhd", 32 * MIB + 512);
        let got = azure_problems(&odd).unwrap();
        assert!(
            got.contains(&AzureProblem::NotWholeMib {
                size: 32 * MIB + 512,
                next: 33 * MIB
            }),
            "{got:?}"
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&good)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 32 * MIB + 67).unwrap(); // the checksum's last byte
        f.write_all_at(&[b[0] ^ 1], 32 * MIB + 67).unwrap();
        assert_eq!(
            azure_problems(&good).unwrap(),
            vec![AzureProblem::FooterChecksum]
        );
        let mut opts = crate::CreateOptions {
            format: None,
            parent: None,
            size: 32 * MIB,
            block_size: None,
            logical_sector_size: None,
        };
        let dynamic = t.join("dyn.vhd");
        crate::create(&dynamic, &opts).unwrap();
        assert_eq!(
            azure_problems(&dynamic).unwrap(),
            vec![AzureProblem::NotFixed {
                disk_type: "dynamic"
            }]
        );
        opts.format = Some(Format::Vhdx);
        let vhdx = t.join("d.vhdx");
        crate::create(&vhdx, &opts).unwrap();
        assert_eq!(azure_problems(&vhdx).unwrap(), vec![AzureProblem::IsVhdx]);
        let junk = t.file("junk.img", "not a disk");
        assert_eq!(azure_problems(&junk).unwrap(), vec![AzureProblem::NotVhd]);
    }

    /// The cursor hands out each touched unit once, in order, with exactly the parts
    /// of the ranges inside it (a range may span units, a unit may hold several).
    #[test]
    fn unit_cursor_splits_ranges_by_unit() {
        let ranges = [(10, 20), (100, 5000), (9000, 10), (20000, 8192)];
        let c = UnitCursor {
            ranges: &ranges,
            unit: 4096,
            at: Mutex::new((0, 0)),
        };
        let mut got = Vec::new();
        while let Some(w) = c.next() {
            got.push((w.index, w.spans));
        }
        assert_eq!(
            got,
            vec![
                (0, vec![(10, 20), (100, 3996)]),
                (1, vec![(4096, 1004)]),
                (2, vec![(9000, 10)]),
                (4, vec![(20000, 480)]),
                (5, vec![(20480, 4096)]),
                (6, vec![(24576, 3616)]),
            ]
        );
        let total: u64 = got.iter().flat_map(|g| g.1.iter()).map(|s| s.1).sum();
        assert_eq!(total, ranges.iter().map(|r| r.1).sum::<u64>());
    }

    /// A layer of `size` bytes holding a byte pattern everywhere, whose reads fail from
    /// `fail_at` on (a disk going bad under the copy).
    struct Failing {
        path: std::path::PathBuf,
        size: u64,
        fail_at: u64,
    }

    impl crate::layer::Layer for Failing {
        fn path(&self) -> &Path {
            &self.path
        }
        fn format(&self) -> crate::layer::Format {
            crate::layer::Format::Raw
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn map(&self, _offset: u64, len: u64, runs: &mut Vec<crate::layer::Run>) -> Result<()> {
            runs.push(crate::layer::Run::Held {
                len,
                file_offset: _offset,
            });
            Ok(())
        }
        fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
            if file_offset + buf.len() as u64 > self.fail_at {
                return Err(Error::io(
                    &self.path,
                    "read",
                    file_offset,
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            buf.fill(0x5a);
            Ok(())
        }
        fn parent(&self) -> Option<&crate::layer::ParentRef> {
            None
        }
        fn linkage_id(&self) -> Option<uuid::Uuid> {
            None
        }
        fn info(&self) -> Result<crate::layer::LayerInfo> {
            Ok(Default::default())
        }
    }

    fn disk_of(layer: Failing) -> Disk {
        let chain = crate::chain::Chain {
            layers: vec![std::sync::Arc::new(layer)],
            found: vec![None],
            warnings: Vec::new(),
        };
        Disk::new(
            chain,
            crate::disk::DiskOptions {
                cache_bytes: 0,
                ..Default::default()
            },
        )
    }

    fn spec(format: OutFormat, size: u64) -> ConvertSpec {
        ConvertSpec {
            format,
            fixed: false,
            block_size: 2 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            virtual_size: size,
            creator: "test".into(),
        }
    }

    /// A read error in the middle of the copy (the reader thread) and a write error
    /// (the writer: a file opened read-only) both end the copy with that error: the
    /// other thread stops too, nothing hangs.
    #[test]
    fn read_and_write_errors_stop_both_threads() {
        let dir =
            std::env::temp_dir().join(format!("vdiskfs-convert-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 64u64 << 20;
        for format in [OutFormat::Vhdx, OutFormat::Vhd, OutFormat::Raw] {
            let disk = disk_of(Failing {
                path: dir.join("src"),
                size,
                fail_at: 40 << 20,
            });
            let out = dir.join(format!("out-{format:?}"));
            let f = std::fs::File::create_new(&out).unwrap();
            let cancel = AtomicBool::new(false);
            let e =
                write_image(&disk, &f, &out, &spec(format, size), &|_| {}, &cancel).unwrap_err();
            assert!(
                matches!(&e, Error::Io { path, op: "read", .. } if *path == dir.join("src")),
                "{format:?}: {e}"
            );

            // Writes fail: the output is open read-only.
            let disk = disk_of(Failing {
                path: dir.join("src"),
                size,
                fail_at: u64::MAX,
            });
            let ro = dir.join(format!("ro-{format:?}"));
            std::fs::File::create_new(&ro).unwrap();
            let f = std::fs::File::open(&ro).unwrap();
            let e = write_image(&disk, &f, &ro, &spec(format, size), &|_| {}, &cancel).unwrap_err();
            assert!(
                matches!(&e, Error::Io { path, .. } | Error::File { path, .. } if *path == ro),
                "{format:?}: {e}"
            );
        }
        // A signal (the flag) stops it too, as "interrupted".
        let disk = disk_of(Failing {
            path: dir.join("src"),
            size,
            fail_at: u64::MAX,
        });
        let out = dir.join("cancelled");
        let f = std::fs::File::create_new(&out).unwrap();
        let cancel = AtomicBool::new(true);
        let e = write_image(
            &disk,
            &f,
            &out,
            &spec(OutFormat::Vhdx, size),
            &|_| {},
            &cancel,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Request(Request::ConvertInterrupted { path }) if *path == out),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn is_zero_finds_a_single_byte() {
        let mut b = vec![0u8; 10000];
        assert!(is_zero(&b));
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
