//! `vdiskfs check`: verify every layer's structures (read-only: a pending log is replayed
//! in memory only, nothing is written).

use std::io::Write;

use serde_json::json;

use crate::chain::Chain;
use crate::cli::CheckArgs;
use crate::error::{Error, Finding, Result, Warning};
use crate::layer::{Layer, LayerInfo};

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
                let (problems, warnings, info) = findings(l.as_ref());
                damaged |= !problems.is_empty();
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
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

/// What `check` reports of one layer: its findings (what `check` finds, and an error of
/// `info` unless it repeats one), the warnings of its open that are not among them, and
/// its `info` when that succeeded.
fn findings(l: &dyn Layer) -> (Vec<Finding>, Vec<Warning>, Option<LayerInfo>) {
    // A structure that fails while being checked is damage to report, not a reason to
    // stop: the user asked what is wrong.
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
    // A warning the check counts as damage is listed once, as damage.
    let warnings = info
        .as_ref()
        .map(|i| i.warnings.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|w| !problems.contains(&Finding::Warning((*w).clone())))
        .cloned()
        .collect();
    (problems, warnings, info)
}

/// `check --azure`: whether IMAGE is a VHD Azure accepts for upload.
fn run_azure(args: &CheckArgs) -> Result<i32> {
    let problems: Vec<String> = crate::convert::azure_problems(&args.image)?
        .iter()
        .map(ToString::to_string)
        .collect();
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use uuid::Uuid;

    use super::findings;
    use crate::error::{Error, Finding, Result, VhdxDefect, Warning};
    use crate::image::vhdx::header::HEADER_OFFSETS;
    use crate::image::vhdx::tests::new_base;
    use crate::image::vhdx::Vhdx;
    use crate::layer::{Format, Layer, LayerInfo, OpenOptions, ParentRef, Run};
    use crate::test_support::TempDir;

    /// A layer whose `check` and `info` say what the test wants.
    struct Fake {
        path: PathBuf,
        check: fn() -> Result<Vec<Finding>>,
        info: fn() -> Result<LayerInfo>,
    }

    impl Layer for Fake {
        fn path(&self) -> &Path {
            &self.path
        }
        fn format(&self) -> Format {
            Format::Vhdx
        }
        fn virtual_size(&self) -> u64 {
            1 << 20
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn map(&self, _offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
            runs.push(Run::Absent { len });
            Ok(())
        }
        fn read_held(&self, _file_offset: u64, _buf: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn parent(&self) -> Option<&ParentRef> {
            None
        }
        fn linkage_id(&self) -> Option<Uuid> {
            None
        }
        fn info(&self) -> Result<LayerInfo> {
            (self.info)()
        }
        fn check(&self) -> Result<Vec<Finding>> {
            (self.check)()
        }
    }

    const OUTSIDE: VhdxDefect = VhdxDefect::BlockOutside {
        block: 1,
        offset: 1 << 40,
        file_len: 4 << 20,
    };

    fn outside() -> Error {
        Error::corrupt(Path::new("/x/a.vhdx"), OUTSIDE)
    }

    #[test]
    fn an_info_error_repeating_a_finding_is_listed_once() {
        let fake = |check, info| Fake {
            path: PathBuf::from("/x/a.vhdx"),
            check,
            info,
        };
        // `check` and `info` both meet the same damaged BAT entry.
        let l = fake(|| Ok(vec![OUTSIDE.into()]), || Err(outside()));
        let (problems, warnings, info) = findings(&l);
        assert_eq!(problems, vec![Finding::from(OUTSIDE)]);
        assert!(warnings.is_empty() && info.is_none());
        // `check` itself failed on it: still one finding.
        let l = fake(|| Err(outside()), || Err(outside()));
        assert_eq!(findings(&l).0, vec![Finding::from(OUTSIDE)]);
        // A different `info` error is a second finding.
        let l = fake(
            || Ok(vec![OUTSIDE.into()]),
            || {
                Err(Error::corrupt(
                    Path::new("/x/a.vhdx"),
                    VhdxDefect::BitmapNotPresent { chunk: 0 },
                ))
            },
        );
        assert_eq!(
            findings(&l).0,
            vec![
                Finding::from(OUTSIDE),
                Finding::from(VhdxDefect::BitmapNotPresent { chunk: 0 })
            ]
        );
    }

    #[test]
    fn a_warning_counted_as_damage_is_not_listed_again_as_a_warning() {
        let d = TempDir::new("check-findings");
        let p = d.join("h.vhdx");
        new_base(&p, 4 << 20, 1 << 20, 512);
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&p).unwrap(),
            &[1],
            HEADER_OFFSETS[0] + 200,
        )
        .unwrap();
        let v = Vhdx::open(&p, OpenOptions::default()).unwrap();
        let (problems, warnings, info) = findings(&v);
        assert!(
            matches!(
                problems.as_slice(),
                [Finding::Warning(Warning::VhdxHeaderInvalid { copy: 1, .. })]
            ),
            "{problems:?}"
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        // The open did warn about it.
        let Finding::Warning(w) = &problems[0] else {
            unreachable!("matched above")
        };
        assert_eq!(info.unwrap().warnings, vec![w.clone()]);
    }
}
