//! `vdiskfs merge`: the command line's adapter over `crate::merge::merge` (the policy and
//! the crash-safe order are there): options from the arguments, signals, progress bars,
//! the report as text, the exit code.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::chain::Intent;
use crate::cli::MergeArgs;
use crate::error::Result;
use crate::merge::{merge, MergeOptions, MergeOutcome, MergeReport};
use crate::progress::{Bars, Mode};

pub fn run(args: &MergeArgs) -> Result<i32> {
    let opts = MergeOptions {
        child: args.child.clone(),
        into: args.into.clone(),
        chain: args.chain.options(Intent::Inspect),
        keep: args.keep,
        force: args.force,
        dry_run: args.dry_run,
        no_space_check: args.no_space_check,
    };
    // Ctrl-C and SIGTERM stop the copy between pieces (the records stay; the same
    // command finishes the merge).
    let cancel = if args.dry_run {
        Arc::new(AtomicBool::new(false))
    } else {
        super::cancel_on_signals(&args.child)?
    };
    let warn = |w: &crate::defect::Warning| log::warn!("{w}");
    let bars = Bars::new(
        Mode::from_flags(args.progress.quiet, args.progress.progress),
        &warn,
    );
    let report = merge(&opts, &bars, &cancel)?;
    drop(bars);
    let r = &report;
    match r.outcome {
        MergeOutcome::DryRun => {
            print!("{}", dry_run_text(args, r));
            return Ok(0);
        }
        MergeOutcome::FinishedInterrupted => {
            if !args.progress.quiet {
                eprintln!(
                    "vdiskfs: {}: finished the interrupted merge into {}",
                    args.child.display(),
                    r.ancestor.display()
                );
            }
            return Ok(0);
        }
        MergeOutcome::Interrupted => {
            eprintln!(
                "vdiskfs: {}: merge interrupted; {} refuses to open until it is finished: run `{}`",
                r.ancestor.display(),
                r.layers[0].display(),
                r.command
            );
            return Ok(130);
        }
        MergeOutcome::Cancelled => {
            eprintln!(
                "vdiskfs: {}: interrupted; nothing was changed",
                args.child.display()
            );
            return Ok(130);
        }
        MergeOutcome::Merged => {}
    }
    if args.keep && !args.progress.quiet {
        eprintln!(
            "vdiskfs: kept {}: no longer valid children of {} (its data changed)",
            r.layers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            r.ancestor.display()
        );
    }
    Ok(0)
}

fn dry_run_text(args: &MergeArgs, r: &MergeReport) -> String {
    let mut t = format!(
        "would merge {} layer(s) into {} ({} {}):\n",
        r.layers.len(),
        r.ancestor.display(),
        r.ancestor_format.map_or("", |f| f.name()),
        r.ancestor_type
    );
    for p in &r.layers {
        t += &format!("  {}\n", p.display());
    }
    t += &format!("{} bytes to merge in {} range(s)\n", r.bytes, r.ranges);
    if args.keep {
        t += "would keep the merged layers (no longer valid children afterwards)\n";
    } else {
        t += "would then delete the merged layers\n";
    }
    if r.dependents.is_empty() {
        t += "no other disk depends on them\n";
    } else {
        t += "other disks that would break (merge refuses them without --force):\n";
        for d in &r.dependents {
            t += &format!("  {} (child of {})\n", d.path.display(), d.parent.display());
        }
    }
    if r.resumed {
        t += &format!(
            "an interrupted merge is recorded; this finishes it: {}\n",
            r.command
        );
    }
    t
}
