//! `vdiskfs compact`: the command line's adapter over `crate::compact::compact` (the
//! policy and the work are there): options, signals, progress bars, the report.

use crate::chain::Intent;
use crate::cli::CompactArgs;
use crate::commands::info::short_size;
use crate::compact::{compact, CompactOptions};
use crate::error::Result;
use crate::progress::{Bars, Mode};

pub fn run(args: &CompactArgs) -> Result<i32> {
    let opts = CompactOptions {
        image: args.image.clone(),
        chain: args.chain.options(Intent::WriteTop),
        dry_run: args.dry_run,
    };
    let cancel = super::cancel_on_signals(&args.image)?;
    let warn = |w: &crate::defect::Warning| log::warn!("{w}");
    let bars = Bars::new(
        Mode::from_flags(args.progress.quiet, args.progress.progress),
        &warn,
    );
    let report = compact(&opts, &bars, &cancel)?;
    drop(bars);
    let path = args.image.display();
    let size = |n: u64| format!("{} ({n} bytes)", short_size(n));
    if args.dry_run {
        println!(
            "{path}: would free {}: {} -> {} ({} of {} blocks all zeros, {} to release, {} to move)",
            short_size(report.len_before - report.len_after),
            size(report.len_before),
            size(report.len_after),
            report.zero_blocks,
            report.allocated_blocks,
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
