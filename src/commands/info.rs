//! `vdiskfs info`: the chain, top to base, each layer with what it is, how it was found,
//! and how much of the virtual disk it holds.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::chain::Chain;
use crate::cli::InfoArgs;
use crate::error::Result;
use crate::layer::LayerInfo;

pub fn run(args: &InfoArgs) -> Result<i32> {
    let chain = Chain::open(
        &args.image,
        &args.chain.options(crate::chain::Intent::Inspect),
    )?;
    let doc = describe(&chain)?;
    let text = if args.json {
        serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n"
    } else {
        render_text(&doc)
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(0),
        // `vdiskfs info | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(crate::error::Error::file(Path::new("<stdout>"), "write", e)),
    }
}

fn pairs(v: &[(String, String)]) -> Value {
    Value::Object(
        v.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

fn layer_json(i: usize, chain: &Chain, info: &LayerInfo) -> Value {
    let l = &chain.layers[i];
    let found = chain.found.get(i).and_then(|f| f.as_ref()).map(|f| {
        json!({"locator": f.locator, "recorded": f.recorded, "path": f.path.display().to_string()})
    });
    let share = if info.virtual_size == 0 {
        0.0
    } else {
        (info.bytes_held as f64 * 10000.0 / info.virtual_size as f64).round() / 100.0
    };
    json!({
        "level": i,
        "path": l.path().display().to_string(),
        "format": l.format().name(),
        "disk_type": info.disk_type,
        "virtual_size": info.virtual_size,
        "block_size": info.block_size,
        "logical_sector_size": info.logical_sector_size,
        "physical_sector_size": info.physical_sector_size,
        "ids": pairs(&info.ids),
        "has_parent": info.has_parent,
        "parent_locator": pairs(&info.parent_locator),
        "log_state": info.log_state,
        "allocated_blocks": info.allocated_blocks,
        "total_blocks": info.total_blocks,
        "bytes_held": info.bytes_held,
        "held_percent": share,
        "found_by": found,
        "extra": pairs(&info.extra),
        "warnings": info.warnings,
    })
}

/// The whole chain as one JSON document (the text output is rendered from it).
pub fn describe(chain: &Chain) -> Result<Value> {
    let mut layers = Vec::new();
    for (i, l) in chain.layers.iter().enumerate() {
        layers.push(layer_json(i, chain, &l.info()?));
    }
    Ok(json!({
        "virtual_size": chain.top().virtual_size(),
        "depth": chain.layers.len(),
        "layers": layers,
        "warnings": chain.warnings,
    }))
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {} ({n} bytes)", UNITS[u])
    }
}

fn render_text(doc: &Value) -> String {
    let mut s = String::new();
    let layers = doc["layers"].as_array().cloned().unwrap_or_default();
    s.push_str(&format!(
        "chain of {} layer{} (top first), virtual size {}\n",
        layers.len(),
        if layers.len() == 1 { "" } else { "s" },
        human(doc["virtual_size"].as_u64().unwrap_or(0))
    ));
    for l in &layers {
        let u = |k: &str| l[k].as_u64().unwrap_or(0);
        s.push_str(&format!(
            "\n[{}] {}\n",
            l["level"],
            l["path"].as_str().unwrap_or("")
        ));
        s.push_str(&format!(
            "  format:               {} {}\n",
            l["format"].as_str().unwrap_or(""),
            l["disk_type"].as_str().unwrap_or("")
        ));
        s.push_str(&format!(
            "  virtual size:         {}\n",
            human(u("virtual_size"))
        ));
        if u("block_size") != 0 {
            s.push_str(&format!(
                "  block size:           {}\n",
                human(u("block_size"))
            ));
        }
        s.push_str(&format!(
            "  sector size:          {} logical, {} physical\n",
            u("logical_sector_size"),
            u("physical_sector_size")
        ));
        if let Some(ids) = l["ids"].as_object() {
            for (k, v) in ids {
                s.push_str(&format!(
                    "  {:<21} {}\n",
                    format!("{k}:"),
                    v.as_str().unwrap_or("")
                ));
            }
        }
        s.push_str(&format!("  has parent:           {}\n", l["has_parent"]));
        if let Some(loc) = l["parent_locator"].as_object() {
            for (k, v) in loc {
                s.push_str(&format!(
                    "  parent locator:       {k} = {}\n",
                    v.as_str().unwrap_or("")
                ));
            }
        }
        if let Some(f) = l["found_by"].as_object() {
            s.push_str(&format!(
                "  found by:             {} {:?} -> {}\n",
                f["locator"].as_str().unwrap_or(""),
                f["recorded"].as_str().unwrap_or(""),
                f["path"].as_str().unwrap_or("")
            ));
        }
        if let Some(ls) = l["log_state"].as_str() {
            s.push_str(&format!("  log:                  {ls}\n"));
        }
        if u("total_blocks") != 0 {
            s.push_str(&format!(
                "  allocated blocks:     {} of {}\n",
                u("allocated_blocks"),
                u("total_blocks")
            ));
        }
        s.push_str(&format!(
            "  holds:                {} ({}% of the virtual disk)\n",
            human(u("bytes_held")),
            l["held_percent"]
        ));
        if let Some(extra) = l["extra"].as_object() {
            for (k, v) in extra {
                s.push_str(&format!(
                    "  {:<21} {}\n",
                    format!("{k}:"),
                    v.as_str().unwrap_or("")
                ));
            }
        }
        for w in l["warnings"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "  warning:              {}\n",
                w.as_str().unwrap_or("")
            ));
        }
    }
    for w in doc["warnings"].as_array().into_iter().flatten() {
        s.push_str(&format!("\nwarning: {}\n", w.as_str().unwrap_or("")));
    }
    s
}
