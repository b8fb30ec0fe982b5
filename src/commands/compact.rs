//! `vdiskfs compact`: policy only (locks, signals, progress, the report); the work is in
//! `crate::compact` and the formats' `Compact` implementations.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::chain::Intent;
use crate::cli::CompactArgs;
use crate::commands::info::short_size;
use crate::compact::{compact_chain, open_top, Control};
use crate::error::{Error, Result};
use crate::progress::{Mode, Progress};

pub fn run(args: &CompactArgs) -> Result<i32> {
    // A dry run writes nothing: the chain is opened as for a copy (shared locks that
    // must be had, so nobody writes it meanwhile); a real run locks the top like a
    // writable mount.
    let intent = if args.dry_run {
        Intent::Copy
    } else {
        Intent::WriteTop
    };
    let (chain, top) = open_top(&args.image, &args.chain.options(intent))?;
    for w in &chain.warnings {
        log::warn!("{w}");
    }
    let info = chain.top().info()?;
    let scan_total = info.allocated_blocks * info.block_size;
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
    let report = compact_chain(chain, &top, &ctl);
    if let Some(p) = mover.lock().unwrap_or_else(|e| e.into_inner()).take() {
        p.finish();
    }
    let report = report?;
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
