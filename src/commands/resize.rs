//! `vdiskfs resize`: change the virtual size of the top image of a chain.
//!
//! Policy only: the size asked for (absolute or `+N`, rounded up to a whole sector), the
//! chain opened with `Intent::WriteTop` (the top locked like a writable mount, its
//! parents read-only and not being written), and the checks: a shrink must leave no
//! data of any layer past the new end (never skippable) and no guest partition
//! (`--force` skips this one); a differencing disk grows only when no parent holds data
//! in the new space (it would show instead of zeros). The formats do the rest, each
//! crash-safe (`image::vhdx::resize`, `image::vhd::resize`).

use std::cell::RefCell;
use std::sync::Arc;

use crate::chain::{Chain, Intent};
use crate::cli::{parse_size, ResizeArgs};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Defect, Error, Result};
use crate::guest;
use crate::image::vhd::Vhd;
use crate::image::vhdx::Vhdx;
use crate::image::{detect_format, open_layer};
use crate::layer::{Format, Layer, Run, WritableLayer};

enum Top {
    Vhdx(Arc<Vhdx>),
    Vhd(Arc<Vhd>),
}

/// "12345 bytes (1.5 MiB)".
fn show(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{n} bytes ({v:.1} {})", UNITS[u])
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

pub fn run(args: &ResizeArgs) -> Result<i32> {
    let path = &args.image;
    // A dry run writes nothing, so it must not replay a log either: read-only, with
    // the shared locks of a copy (nobody may be writing the chain).
    let intent = if args.dry_run {
        Intent::Copy
    } else {
        Intent::WriteTop
    };
    let top: RefCell<Option<Top>> = RefCell::new(None);
    let chain = Chain::open_with(path, &args.chain.options(intent), |p, o, allow_raw| {
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

    let spec = args.size.trim();
    let asked = match spec.strip_prefix('+') {
        Some(rest) => {
            let add =
                parse_size(rest).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
            old.checked_add(add).ok_or_else(|| {
                Error::Invalid(format!("{}: size {spec} is too large", path.display()))
            })?
        }
        None => parse_size(spec).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?,
    };
    let new = asked
        .checked_next_multiple_of(gran)
        .ok_or_else(|| Error::Invalid(format!("{}: size {spec} is too large", path.display())))?;
    if new == 0 {
        return Err(Error::Invalid(format!(
            "{}: the new size must be at least one sector",
            path.display()
        )));
    }
    let rounded = if new != asked {
        format!(" (rounded up from {asked} to whole {gran}-byte sectors)")
    } else {
        String::new()
    };

    if new < old {
        if let Top::Vhd(_) = top {
            return Err(Error::Invalid(format!(
                "{}: a VHD cannot be shrunk (only grown; Hyper-V shrinks only VHDX: convert it to VHDX first)",
                path.display()
            )));
        }
        // Data past the new end, in any layer: never skippable.
        let mut data_end = None;
        for l in &chain.layers {
            if let Some(e) = last_data(l.as_ref(), new, old)? {
                data_end = data_end.max(Some((e, l.path().to_path_buf())));
            }
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
        drop(disk);
        let part = layout
            .partitions
            .iter()
            .map(|p| (p.start.saturating_add(p.size), p.number))
            .max();
        let data_min = data_end
            .as_ref()
            .map_or(0, |(e, _)| e.next_multiple_of(gran));
        let part_min = part.map_or(0, |(e, _)| e.next_multiple_of(gran));
        let minimum = data_min
            .max(if args.force { 0 } else { part_min })
            .max(gran);
        if new < minimum {
            let why = match (&data_end, part) {
                (Some((e, file)), _) if *e > new => {
                    format!("{} holds data up to byte {e}", file.display())
                }
                (_, Some((e, n))) => {
                    format!("guest partition {n} ends at byte {e} (--force skips this check)")
                }
                _ => "data lies past it".into(),
            };
            return Err(Error::Invalid(format!(
                "{}: cannot shrink to {}: {why}; the smallest size allowed is {}",
                path.display(),
                show(new),
                show(minimum)
            )));
        }
        if let Some((e, n)) = part.filter(|(e, _)| *e > new) {
            ::log::warn!(
                "{}: guest partition {n} ends at byte {e}, past the new end (--force)",
                path.display()
            );
            eprintln!(
                "vdiskfs: warning: {}: guest partition {n} ends at byte {e}, past the new end {new} (--force)",
                path.display()
            );
        }
        drop(layers);
    } else if new > old {
        // A differencing disk shows its parents past its old end; they must hold
        // nothing there, or the new space would not read as zeros.
        for l in chain.layers.iter().skip(1) {
            if let Some(e) = last_data(l.as_ref(), old, new)? {
                return Err(Error::Invalid(format!(
                    "{}: cannot grow to {}: its parent {} holds data past the current end (up to byte {e}), which the new space would show instead of zeros",
                    path.display(),
                    show(new),
                    l.path().display()
                )));
            }
        }
        drop(chain);
    } else {
        drop(chain);
    }

    if args.dry_run {
        if !args.quiet {
            println!(
                "{}: would resize from {} to {}{rounded} (dry run: nothing changed)",
                path.display(),
                show(old),
                show(new)
            );
        }
        return Ok(0);
    }
    let mut notes = Vec::new();
    match &top {
        Top::Vhdx(v) => {
            if new != old {
                let r = v.resize_to(new)?;
                if let Some(at) = r.bat_moved_to {
                    notes.push(format!("BAT moved to offset {at}"));
                }
            }
            v.close()?;
        }
        Top::Vhd(v) => {
            if v.repair_footer_copy()? {
                notes.push("finished an interrupted resize (footer copy at offset 0)".into());
            }
            if new != old {
                let r = v.grow_to(new)?;
                if let Some(at) = r.bat_moved_to {
                    notes.push(format!("BAT moved to offset {at}"));
                }
            }
            WritableLayer::close(v.as_ref())?;
        }
    }
    if !args.quiet {
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        };
        if new == old {
            println!("{}: already {}{notes}", path.display(), show(new));
        } else {
            println!(
                "{}: resized from {} to {}{rounded}{notes}",
                path.display(),
                show(old),
                show(new)
            );
        }
    }
    Ok(0)
}
