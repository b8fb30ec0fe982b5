//! `resize`: change the virtual size of the top image of a chain ([`resize`], the
//! library's verb; `commands/resize.rs` is the command line's adapter).
//!
//! Policy: the size asked for (absolute or grown by N, rounded up to a whole sector), the
//! chain opened with `Intent::WriteTop` (the top locked like a writable mount, its
//! parents read-only and not being written), and the checks: a shrink must leave no
//! data of any layer past the new end (never skippable) and no guest partition
//! (`force` skips this one); a differencing disk grows only when no parent holds data
//! in the new space (it would show instead of zeros). The formats do the rest, each
//! crash-safe (`image::vhdx::resize`, `image::vhd::resize`).

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions, Intent};
use crate::defect::Warning;
use crate::disk::{Disk, DiskOptions};
use crate::error::{Defect, Error, Request, Result, ShrinkBlocker};
use crate::guest;
use crate::image::vhd::Vhd;
use crate::image::vhdx::Vhdx;
use crate::image::{detect_format, open_layer};
use crate::layer::{Format, Layer, Run, WritableLayer};
use crate::progress::Observer;

/// The new virtual size [`resize`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// This many bytes.
    Bytes(u64),
    /// The current size plus this many bytes (`vdiskfs resize IMAGE +N`).
    Grow(u64),
}

/// What [`resize`] is asked to do (`vdiskfs resize`'s arguments).
#[derive(Debug, Clone)]
pub struct ResizeOptions {
    /// The image to resize (the top of its chain).
    pub image: PathBuf,
    /// Rounded up to a whole sector (VHDX: its logical sector size; VHD: 512 bytes, and
    /// for files Virtual PC or qemu made, to a size their CHS geometry describes).
    pub size: NewSize,
    /// How its chain is found; `intent` is resize's own and ignored.
    pub chain: ChainOptions,
    /// Shrink even when a guest partition extends past the new end (given to the
    /// observer as `Warning::ShrinkCutsPartition`); never when data does.
    pub force: bool,
    /// Only check and say what would be done; change nothing.
    pub dry_run: bool,
}

/// What a [`resize`] did, or (dry run) would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeReport {
    /// The virtual size before and after (dry run: what it would be).
    pub old_size: u64,
    pub new_size: u64,
    /// The size asked for, before rounding (equal to `new_size` when none was needed).
    pub asked: u64,
    /// The unit `asked` was rounded up to (bytes).
    pub sector_size: u64,
    /// Set when a VHD's size was rounded to its CHS geometry: the creator application
    /// whose files are sized by it.
    pub chs_creator: Option<String>,
    /// A shrink moved the guest's backup GPT to the new end.
    pub gpt_backup_moved: bool,
    /// A VHD's interrupted earlier resize was finished (the footer copy at offset 0).
    pub finished_interrupted: bool,
    /// The BAT moved to this file offset to make room for the new size.
    pub bat_moved_to: Option<u64>,
}

enum Top {
    Vhdx(Arc<Vhdx>),
    Vhd(Arc<Vhd>),
}

/// The end (exclusive) of the last non-zero byte `layer` itself holds in `[from, to)`,
/// if any. Reads only what the layer holds there.
fn last_data(layer: &dyn Layer, from: u64, to: u64) -> Result<Option<u64>> {
    let to = to.min(layer.virtual_size());
    if from >= to {
        return Ok(None);
    }
    let mut runs = Vec::new();
    layer.data_map(from, to - from, &mut runs)?;
    let mut pos = from;
    let mut last = None;
    let mut buf = vec![0u8; 1 << 20];
    for run in runs {
        let len = run.len();
        if let Run::Held { file_offset, .. } = run {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                layer.read_held(file_offset + done, &mut buf[..n])?;
                if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
                    last = Some(pos + done + i as u64 + 1);
                }
                done += n as u64;
            }
        }
        pos += len;
    }
    Ok(last)
}

/// The merged disk as `Read + Write + Seek`, for gptman.
struct DiskIo<'a> {
    disk: &'a Disk,
    pos: u64,
    size: u64,
}

fn io_err(e: Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl std::io::Read for DiskIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - self.pos) as usize;
        let got = self.disk.read_at(self.pos, &mut buf[..n]).map_err(io_err)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl std::io::Write for DiskIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.disk.write_at(self.pos, buf).map_err(io_err)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for DiskIo<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

/// Moving a GPT's backup copy to the new end of a shrunk disk.
struct GptMove {
    gpt: gptman::GPT,
    /// Bytes of the backup copy (its entry array and header).
    backup_len: u64,
    /// Every partition ends before the backup's new place.
    fits: bool,
}

/// When the guest has a sound GPT whose backup copy is at the disk's end: the plan to
/// rewrite the backup at the end of size `new` (the primary header then names the new
/// place and last usable sector), possible when every partition fits below it.
fn plan_gpt_move(
    disk: &Disk,
    layout: &guest::Layout,
    ss: u64,
    old: u64,
    new: u64,
) -> Option<GptMove> {
    if layout.scheme != guest::Scheme::Gpt || layout.gpt.as_ref()?.header_lba != 1 {
        return None;
    }
    let mut io = DiskIo {
        disk,
        pos: 0,
        size: old,
    };
    let mut gpt = gptman::GPT::read_from(&mut io, ss).ok()?;
    let h = &gpt.header;
    let array =
        (h.number_of_partition_entries as u64 * h.size_of_partition_entry as u64).div_ceil(ss);
    if h.primary_lba != 1 || h.partition_entry_lba != 2 || h.backup_lba != old / ss - 1 {
        return None;
    }
    let backup_len = (array + 1) * ss;
    let new_last = (new / ss).checked_sub(1)?;
    let last_usable = new_last.saturating_sub(array + 1);
    let fits = last_usable >= h.first_usable_lba
        && !gpt
            .iter()
            .any(|(_, p)| p.is_used() && p.ending_lba > last_usable);
    gpt.header.backup_lba = new_last;
    gpt.header.last_usable_lba = last_usable;
    Some(GptMove {
        gpt,
        backup_len,
        fits,
    })
}

/// Write the GPT planned by `plan_gpt_move` (primary header, arrays, the backup at the
/// new end) and shrink the protective MBR's partition to the new size, flushed. Done
/// before the disk shrinks: until then the new backup copy lies in free space (the data
/// check found only zeros there) and the primary still describes a valid table.
fn write_gpt_move(
    path: &std::path::Path,
    disk: &Disk,
    plan: &mut GptMove,
    ss: u64,
    old: u64,
    new: u64,
) -> Result<()> {
    let mut io = DiskIo {
        disk,
        pos: 0,
        size: old,
    };
    plan.gpt.write_into(&mut io).map_err(|e| {
        Error::Request(Request::GptRewrite {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })
    })?;
    let mut mbr = vec![0u8; ss as usize];
    let mut done = 0;
    while done < mbr.len() {
        let n = disk.read_at(done as u64, &mut mbr[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    let sectors = |size: u64| u32::try_from(size / ss - 1).unwrap_or(u32::MAX);
    let size_at = 446 + 12;
    if mbr[446 + 4] == 0xEE
        && u32::from_le_bytes(mbr[size_at..size_at + 4].try_into().expect("4 bytes"))
            == sectors(old)
    {
        mbr[size_at..size_at + 4].copy_from_slice(&sectors(new).to_le_bytes());
        disk.write_at(0, &mbr)?;
    }
    disk.flush()
}

/// Change the virtual size of `opts.image` (the top of its chain) in place (`vdiskfs
/// resize`). Refusals (data or, without `force`, a partition past a shrunk end; a VHD
/// shrink; a child growing over parent data; a size of zero or too large) are errors
/// with nothing changed; `progress` gets the warnings.
pub fn resize(opts: &ResizeOptions, progress: &dyn Observer) -> Result<ResizeReport> {
    let args = opts;
    let path = &args.image;
    // A dry run writes nothing, so it must not replay a log either: read-only, with
    // the shared locks of a copy (nobody may be writing the chain).
    let intent = if args.dry_run {
        Intent::Copy
    } else {
        Intent::WriteTop
    };
    let top: RefCell<Option<Top>> = RefCell::new(None);
    let chain_opts = ChainOptions {
        intent,
        ..args.chain.clone()
    };
    let chain = Chain::open_with(path, &chain_opts, |p, o, allow_raw| {
        let mut slot = top.borrow_mut();
        if slot.is_some() {
            return open_layer(p, o, allow_raw);
        }
        let l: Arc<dyn Layer> = match detect_format(p)? {
            Some(Format::Vhdx) => {
                let v = Arc::new(Vhdx::open(p, o)?);
                *slot = Some(Top::Vhdx(v.clone()));
                v
            }
            Some(Format::Vhd) => {
                let v = Arc::new(Vhd::open(p, o)?);
                *slot = Some(Top::Vhd(v.clone()));
                v
            }
            _ => return Err(Error::corrupt(p, Defect::NotAnImage)),
        };
        Ok(l)
    })?;
    let top = top.into_inner().expect("the chain opened its top");
    let old = chain.top().virtual_size();
    let gran = match &top {
        Top::Vhdx(v) => v.size_granularity(),
        Top::Vhd(_) => 512,
    };

    let too_large = |spec: String| {
        Error::Request(Request::SizeTooLarge {
            path: path.to_path_buf(),
            spec,
        })
    };
    let asked = match args.size {
        NewSize::Grow(add) => old
            .checked_add(add)
            .ok_or_else(|| too_large(format!("+{add}")))?,
        NewSize::Bytes(n) => n,
    };
    let new = asked
        .checked_next_multiple_of(gran)
        .ok_or_else(|| too_large(asked.to_string()))?;
    let mut chs = None;
    let new = match &top {
        Top::Vhd(v) if new > old => {
            let (n, creator) = v.round_size(new);
            chs = creator;
            n
        }
        _ => new,
    };
    if new == 0 {
        return Err(Error::Request(Request::SizeZero {
            path: path.to_path_buf(),
        }));
    }
    let mut report = ResizeReport {
        old_size: old,
        new_size: new,
        asked,
        sector_size: gran,
        chs_creator: chs,
        gpt_backup_moved: false,
        finished_interrupted: false,
        bat_moved_to: None,
    };
    if new < old {
        if let Top::Vhd(_) = top {
            return Err(Error::Request(Request::VhdShrink {
                path: path.to_path_buf(),
            }));
        }
        let layers = chain.layers.clone();
        let disk = Disk::new(
            chain,
            DiskOptions {
                cache_bytes: 0,
                ..DiskOptions::default()
            },
        );
        let layout = guest::scan(&disk, gran);
        // A GPT's backup copy at the end moves to the new end (when everything fits);
        // its old place is not data to keep, its new place must hold none.
        let mut gpt_move = plan_gpt_move(&disk, &layout, gran, old, new);
        let backup_len = match (&gpt_move, layout.scheme) {
            (Some(m), _) => m.backup_len,
            (None, guest::Scheme::Gpt) => layout
                .gpt
                .as_ref()
                .map_or(0, |g| ((g.entries as u64 * 128).div_ceil(gran) + 1) * gran),
            _ => 0,
        };
        let moved_len = gpt_move.as_ref().map_or(0, |m| m.backup_len);
        // Data past the new end (or where the moved backup goes), in any layer: never
        // skippable.
        let mut data_end = None;
        for l in &layers {
            if let Some(e) = last_data(l.as_ref(), new.saturating_sub(moved_len), old - moved_len)?
            {
                data_end = data_end.max(Some((e, l.path().to_path_buf())));
            }
        }
        let part = layout
            .partitions
            .iter()
            .map(|p| (p.start.saturating_add(p.size), p.number))
            .max();
        let data_min = data_end
            .as_ref()
            .map_or(0, |(e, _)| e.next_multiple_of(gran) + moved_len);
        let part_min = part.map_or(0, |(e, _)| e.next_multiple_of(gran) + backup_len);
        let minimum = data_min
            .max(if args.force { 0 } else { part_min })
            .max(gran + backup_len);
        if new < minimum {
            let blocker = match (&data_end, part) {
                (Some((e, file)), _) if e + moved_len > new => ShrinkBlocker::Data {
                    file: file.clone(),
                    end: *e,
                },
                (_, Some((e, n))) if e + backup_len > new => ShrinkBlocker::Partition {
                    number: n,
                    end: e,
                    backup_len,
                },
                _ => ShrinkBlocker::PartitionTable,
            };
            return Err(Error::Request(Request::ShrinkBelowMinimum {
                path: path.to_path_buf(),
                new,
                blocker,
                minimum,
            }));
        }
        if gpt_move.as_ref().is_some_and(|m| !m.fits) {
            return Err(Error::Request(Request::ShrinkGpt {
                path: path.to_path_buf(),
                new,
            }));
        }
        if let Some((e, n)) = part.filter(|(e, _)| *e + backup_len > new) {
            progress.warning(&Warning::ShrinkCutsPartition {
                path: path.to_path_buf(),
                number: n,
                end: e,
                new,
            });
        }
        if let Some(m) = gpt_move.as_mut() {
            if !args.dry_run {
                write_gpt_move(path, &disk, m, gran, old, new)?;
            }
            report.gpt_backup_moved = true;
        }
        drop(disk);
        drop(layers);
    } else if new > old {
        // A differencing disk shows its parents past its old end; they must hold
        // nothing there, or the new space would not read as zeros.
        for l in chain.layers.iter().skip(1) {
            if let Some(e) = last_data(l.as_ref(), old, new)? {
                return Err(Error::Request(Request::GrowOverParentData {
                    path: path.to_path_buf(),
                    new,
                    parent: l.path().to_path_buf(),
                    end: e,
                }));
            }
        }
        drop(chain);
    } else {
        drop(chain);
    }

    if args.dry_run {
        return Ok(report);
    }
    match &top {
        Top::Vhdx(v) => {
            if new != old {
                let r = v.resize_to(new)?;
                log::debug!(
                    "{}: one log entry of {} pages",
                    args.image.display(),
                    r.pages
                );
                report.bat_moved_to = r.bat_moved_to;
            }
            v.close()?;
        }
        Top::Vhd(v) => {
            report.finished_interrupted = v.repair_footer_copy()?;
            if new != old {
                report.bat_moved_to = v.grow_to(new)?.bat_moved_to;
            }
            WritableLayer::close(v.as_ref())?;
        }
    }
    Ok(report)
}
