//! `vdiskfs resize`: the command line's adapter over `crate::resize::resize` (the policy
//! and the checks are there): SIZE and `+N` parsed, the report as text.

use crate::chain::Intent;
use crate::cli::{parse_size, ResizeArgs};
use crate::error::{Error, HumanSize, Request, Result, Usage};
use crate::progress::{Bars, Mode};
use crate::resize::{resize, NewSize, ResizeOptions};

/// "12345 bytes (1.5 MiB)".
fn show(n: u64) -> String {
    HumanSize(n).to_string()
}

pub fn run(args: &ResizeArgs) -> Result<i32> {
    let path = &args.image;
    let spec = args.size.trim();
    let new_size = |problem| {
        Error::Usage(Usage::NewSize {
            path: path.to_path_buf(),
            problem,
        })
    };
    let size = match spec.strip_prefix('+') {
        Some(rest) => NewSize::Grow(parse_size(rest).map_err(new_size)?),
        None => NewSize::Bytes(parse_size(spec).map_err(new_size)?),
    };
    let opts = ResizeOptions {
        image: path.clone(),
        size,
        chain: args.chain.options(Intent::WriteTop),
        force: args.force,
        dry_run: args.dry_run,
    };
    let warn = |w: &crate::defect::Warning| eprintln!("vdiskfs: warning: {w}");
    let r = match resize(&opts, &Bars::new(Mode::Never, &warn)) {
        // Named as it was typed.
        Err(Error::Request(Request::SizeTooLarge { path, .. })) => {
            return Err(Error::Request(Request::SizeTooLarge {
                path,
                spec: spec.to_string(),
            }))
        }
        r => r?,
    };
    if args.quiet {
        return Ok(0);
    }
    let rounded = match &r.chs_creator {
        _ if r.new_size == r.asked => String::new(),
        Some(c) => format!(
            " (rounded up from {} to a size its CHS geometry describes exactly: files made by {c:?} are sized by it)",
            r.asked
        ),
        None => format!(
            " (rounded up from {} to whole {}-byte sectors)",
            r.asked, r.sector_size
        ),
    };
    let mut notes = Vec::new();
    if r.gpt_backup_moved {
        notes.push("the guest's backup GPT moved to the new end".to_string());
    }
    if args.dry_run {
        println!(
            "{}: would resize from {} to {}{rounded}{} (dry run: nothing changed)",
            path.display(),
            show(r.old_size),
            show(r.new_size),
            notes.iter().map(|n| format!("; {n}")).collect::<String>()
        );
        return Ok(0);
    }
    if r.finished_interrupted {
        notes.push("finished an interrupted resize (footer copy at offset 0)".into());
    }
    if let Some(at) = r.bat_moved_to {
        notes.push(format!("BAT moved to offset {at}"));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join("; "))
    };
    if r.new_size == r.old_size {
        println!("{}: already {}{notes}", path.display(), show(r.new_size));
    } else {
        println!(
            "{}: resized from {} to {}{rounded}{notes}",
            path.display(),
            show(r.old_size),
            show(r.new_size)
        );
    }
    Ok(0)
}
