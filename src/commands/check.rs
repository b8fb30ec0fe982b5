//! `vdiskfs check`: verify every layer's structures (read-only: a pending log is replayed
//! in memory only, nothing is written).

use std::io::Write;

use serde_json::json;

use crate::chain::Chain;
use crate::cli::CheckArgs;
use crate::error::{Error, Finding, Result};

pub fn run(args: &CheckArgs) -> Result<i32> {
    if args.azure {
        return run_azure(args);
    }
    let mut layers = Vec::new();
    let mut damaged = false;
    // A chain of an interrupted merge opens for checking (its record is a note, logged as
    // a warning): the files themselves must be sound at every moment of a merge.
    let mut opts = args.chain.options(crate::chain::Intent::Inspect);
    opts.resume_merge = true;
    match Chain::open(&args.image, &opts) {
        Ok(chain) => {
            for l in &chain.layers {
                // A structure that fails while being checked is damage to report, not a
                // reason to stop: the user asked what is wrong.
                let mut problems: Vec<Finding> = l.check().unwrap_or_else(|e| vec![e.into()]);
                let info = match l.info() {
                    Ok(i) => Some(i),
                    Err(e) => {
                        // `info` walks the BAT too: the same damage, listed once.
                        let f = Finding::from(e);
                        if !problems.contains(&f) {
                            problems.push(f);
                        }
                        None
                    }
                };
                damaged |= !problems.is_empty();
                // A warning the check counts as damage is listed once, as damage.
                let warnings: Vec<String> = info
                    .as_ref()
                    .map(|i| i.warnings.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter(|w| !problems.contains(&Finding::Warning((*w).clone())))
                    .map(ToString::to_string)
                    .collect();
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                layers.push(json!({
                    "path": l.path().display().to_string(),
                    "format": l.format().name(),
                    "problems": problems,
                    "warnings": warnings,
                    "log_state": info.and_then(|i| i.log_state),
                }));
            }
        }
        // A file too damaged to open is the check's answer, not a usage error.
        Err(e @ (Error::Corrupt { .. } | Error::Unsupported { .. })) => {
            let path = match &e {
                Error::Corrupt { path, .. } | Error::Unsupported { path, .. } => path.clone(),
                _ => unreachable!("matched above"),
            };
            damaged = true;
            layers.push(json!({
                "path": path.display().to_string(),
                "format": null,
                "problems": [e.detail()],
                "warnings": [],
                "log_state": null,
            }));
        }
        Err(e) => return Err(e),
    }
    let mut text = String::new();
    if args.json {
        let doc = json!({"ok": !damaged, "layers": layers});
        text = serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n";
    } else {
        for l in &layers {
            let path = l["path"].as_str().unwrap_or("");
            let problems = l["problems"].as_array().cloned().unwrap_or_default();
            if problems.is_empty() {
                text.push_str(&format!(
                    "{path}: OK ({})\n",
                    l["format"].as_str().unwrap_or("")
                ));
            }
            for p in problems {
                text.push_str(&format!("{path}: DAMAGE: {}\n", p.as_str().unwrap_or("")));
            }
            for w in l["warnings"].as_array().into_iter().flatten() {
                text.push_str(&format!("{path}: warning: {}\n", w.as_str().unwrap_or("")));
            }
            if let Some(s) = l["log_state"].as_str() {
                if !s.starts_with("clean") {
                    text.push_str(&format!("{path}: log: {s}\n"));
                }
            }
        }
    }
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| Error::file(std::path::Path::new("<stdout>"), "write", e))?;
    Ok(if damaged { 2 } else { 0 })
}

/// `check --azure`: whether IMAGE is a VHD Azure accepts for upload.
fn run_azure(args: &CheckArgs) -> Result<i32> {
    let problems = crate::commands::convert::azure_problems(&args.image)?;
    let path = args.image.display().to_string();
    let text = if args.json {
        let doc = json!({"path": path, "azure_ready": problems.is_empty(), "problems": problems});
        serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n"
    } else if problems.is_empty() {
        format!("{path}: OK for Azure (fixed VHD, whole MiB, valid footer)\n")
    } else {
        problems
            .iter()
            .map(|p| format!("{path}: not Azure-ready: {p}\n"))
            .collect()
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| Error::file(std::path::Path::new("<stdout>"), "write", e))?;
    Ok(if problems.is_empty() { 0 } else { 2 })
}
