//! `vdiskfs compact`: policy only (locks, signals, progress, the report); the work is in
//! `crate::compact` and the formats' `Compact` implementations.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::chain::{Chain, Intent};
use crate::cli::CompactArgs;
use crate::commands::info::short_size;
use crate::compact::{compact, Compact, Control};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Result};
use crate::image::vhdx::log::ReplayBudget;
use crate::image::{detect_format, open_layer_within, vhd::Vhd, vhdx::Vhdx};
use crate::layer::{Format, Layer};
use crate::progress::{Mode, Progress};

/// The top file, opened as its format (the chain holds it as a `Layer`).
enum Top {
    Vhdx(Arc<Vhdx>),
    Vhd(Arc<Vhd>),
}

impl Top {
    fn compact(&self) -> &dyn Compact {
        match self {
            Top::Vhdx(v) => v.as_ref(),
            Top::Vhd(v) => v.as_ref(),
        }
    }
}

/// Open IMAGE's chain for `intent`, keeping the top file as its format.
fn open(image: &Path, args: &CompactArgs, intent: Intent) -> Result<(Chain, Top)> {
    let budget = ReplayBudget::for_chain();
    let top: Mutex<Option<Top>> = Mutex::new(None);
    let chain = Chain::open_with(image, &args.chain.options(intent), |p, o, raw| {
        let mut slot = top.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return open_layer_within(p, o, raw, &budget);
        }
        let layer: Arc<dyn Layer> = match detect_format(p)? {
            Some(Format::Vhdx) => {
                let v = Arc::new(Vhdx::open_within(p, o, &budget)?);
                *slot = Some(Top::Vhdx(v.clone()));
                v
            }
            Some(Format::Vhd) => {
                let v = Arc::new(Vhd::open(p, o)?);
                *slot = Some(Top::Vhd(v.clone()));
                v
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: not a VHDX or VHD image",
                    p.display()
                )))
            }
        };
        Ok(layer)
    })?;
    let top = top
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .expect("the top is opened first");
    Ok((chain, top))
}

pub fn run(args: &CompactArgs) -> Result<i32> {
    // A dry run writes nothing: the chain is opened as for a copy (shared locks that
    // must be had, so nobody writes it meanwhile); a real run locks the top like a
    // writable mount.
    let intent = if args.dry_run {
        Intent::Copy
    } else {
        Intent::WriteTop
    };
    let (chain, top) = open(&args.image, args, intent)?;
    for w in &chain.warnings {
        log::warn!("{w}");
    }
    let info = chain.top().info()?;
    let scan_total = info.allocated_blocks * info.block_size;
    let parents = (chain.layers.len() > 1).then(|| {
        Disk::new(
            Chain {
                layers: chain.layers[1..].to_vec(),
                found: chain.found[1..].to_vec(),
                warnings: Vec::new(),
            },
            DiskOptions {
                cache_bytes: 0,
                ..Default::default()
            },
        )
    });
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_bytes: 0,
            ..Default::default()
        },
    );
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, cancel.clone())
            .map_err(|e| Error::file(&args.image, "install a signal handler", e))?;
    }
    let mode = Mode::from_flags(args.progress.quiet, args.progress.progress);
    let scan = Progress::bytes(scan_total, "compact: scan", mode);
    let mover: Mutex<Option<Progress>> = Mutex::new(None);
    let ctl = Control {
        dry_run: args.dry_run,
        cancel: &cancel,
        scanned: &|n| scan.add(n),
        moving: &|total| {
            scan.finish();
            if !args.dry_run && total > 0 {
                *mover.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Progress::bytes(total, "compact: move", mode));
            }
        },
        moved: &|n| {
            if let Some(p) = &*mover.lock().unwrap_or_else(|e| e.into_inner()) {
                p.add(n)
            }
        },
    };
    let report = compact(top.compact(), &disk, parents.as_ref(), &ctl);
    if let Some(p) = mover.lock().unwrap_or_else(|e| e.into_inner()).take() {
        p.finish();
    }
    let report = report?;
    drop(disk);
    let path = args.image.display();
    let size = |n: u64| format!("{} ({n} bytes)", short_size(n));
    if args.dry_run {
        println!(
            "{path}: would free {}: {} -> {} ({} of {} blocks all zeros, {} to release, {} to move)",
            short_size(report.len_before - report.len_after),
            size(report.len_before),
            size(report.len_after),
            report.zero_blocks,
            info.allocated_blocks,
            report.released,
            report.moved
        );
        return Ok(0);
    }
    println!(
        "{path}: {} -> {} ({} zero blocks released, {} blocks moved)",
        size(report.len_before),
        size(report.len_after),
        report.released,
        report.moved
    );
    if report.interrupted {
        eprintln!(
            "vdiskfs: {path}: interrupted; the file is consistent, run compact again to continue"
        );
        return Ok(130);
    }
    Ok(0)
}
