//! `vdiskfs set-parent CHILD NEW_PARENT`: the command line's adapter over
//! `crate::set_parent::set_parent` (the policy and the checks are there): the old and
//! the new locator entries as text.

use crate::chain::Intent;
use crate::cli::SetParentArgs;
use crate::error::Result;
use crate::progress::{Bars, Mode};
use crate::set_parent::{set_parent, SetParentOptions};

pub fn run(args: &SetParentArgs) -> Result<i32> {
    let opts = SetParentOptions {
        child: args.child.clone(),
        new_parent: args.new_parent.clone(),
        chain: args.chain.options(Intent::CreateChild),
        ignore_id_mismatch: args.ignore_id_mismatch,
        dry_run: args.dry_run,
    };
    let warn = |w: &crate::defect::Warning| log::warn!("{w}");
    let r = set_parent(&opts, &Bars::new(Mode::Never, &warn))?;
    let child = args.child.display();
    print_entries(&format!("{child}: old parent locator"), &r.old_locator);
    let title = if args.dry_run {
        format!("{child}: new parent locator (--dry-run: not written)")
    } else {
        format!("{child}: new parent locator")
    };
    print_entries(&title, &r.new_locator);
    Ok(0)
}

fn print_entries(what: &str, entries: &[(String, String)]) {
    println!("{what}:");
    for (k, v) in entries {
        println!("  {k}: {v}");
    }
}
