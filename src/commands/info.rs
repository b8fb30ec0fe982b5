//! `vdiskfs info`: the chain, top to base, each layer with what it is, how it was found,
//! and how much of the virtual disk it holds; then what is inside the merged disk: the
//! guest's partition table and the file system of each partition (`guest::scan`).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::chain::Chain;
use crate::cli::InfoArgs;
use crate::disk::{Disk, DiskOptions};
use crate::error::{warning_lines, Result};
use crate::guest;
use crate::layer::LayerInfo;

pub fn run(args: &InfoArgs) -> Result<i32> {
    let chain = Chain::open(
        &args.image,
        &args.chain.options(crate::chain::Intent::Inspect),
    )?;
    let mut doc = describe(&chain)?;
    let ss = u64::from(chain.top().logical_sector_size());
    // Read-only, no cache: a few sectors per partition are read.
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_bytes: 0,
            ..DiskOptions::default()
        },
    );
    doc["partition_table"] = guest::scan(&disk, ss).to_json();
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
        "warnings": warning_lines(&info.warnings),
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
        "warnings": warning_lines(&chain.warnings),
    }))
}

fn human(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{} ({n} bytes)", short_size(n))
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
    if doc["partition_table"].is_object() {
        s.push('\n');
        s.push_str(&render_partitions(&doc["partition_table"]));
    }
    s
}

/// "1.00 MiB" (no byte count: the table shows sectors).
pub(crate) fn short_size(n: u64) -> String {
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
        format!("{v:.2} {}", UNITS[u])
    }
}

/// "NTFS, label "Windows", UUID 0123..." from a file_system object.
fn fs_text(f: &Value) -> String {
    let mut s = f["name"].as_str().unwrap_or("").to_string();
    if let Some(l) = f["label"].as_str() {
        s.push_str(&format!(", label {l:?}"));
    }
    if let Some(u) = f["uuid"].as_str() {
        s.push_str(&format!(", UUID {u}"));
    }
    s
}

/// The "partition_table" object as text.
fn render_partitions(t: &Value) -> String {
    let mut s = String::new();
    let ss = t["sector_size"].as_u64().unwrap_or(512);
    match t["scheme"].as_str().unwrap_or("none") {
        "gpt" => {
            s.push_str("partition table: GPT");
            if let Some(id) = t["disk_id"].as_str() {
                s.push_str(&format!(", disk GUID {id}"));
            }
            if let Some(g) = t["gpt"].as_object() {
                s.push_str(&format!(
                    ", {} entries, header at LBA {}",
                    g["entries"], g["header_lba"]
                ));
            }
            s.push_str(&format!(", sector size {ss}\n"));
        }
        "mbr" => {
            s.push_str("partition table: MBR");
            if let Some(id) = t["disk_id"].as_str() {
                s.push_str(&format!(", disk signature {id}"));
            }
            s.push_str(&format!(", sector size {ss}\n"));
        }
        _ => {
            s.push_str("partition table: none");
            match t["file_system"].as_object() {
                Some(_) => s.push_str(&format!(
                    "; file system on the whole disk: {}\n",
                    fs_text(&t["file_system"])
                )),
                None => s.push_str("; no file system recognised at sector 0\n"),
            }
        }
    }
    for p in t["partitions"].as_array().into_iter().flatten() {
        let u = |k: &str| p[k].as_u64().unwrap_or(0);
        let label = match p["file"].as_str() {
            Some(f) => f.to_string(),
            None => format!("#{}", u("number")),
        };
        let first = u("first_sector");
        let last = (first + u("sectors")).saturating_sub(1);
        s.push_str(&format!(
            "  {label:<4} {} sectors {first}-{last}, {} at {}",
            p["kind"].as_str().unwrap_or(""),
            short_size(u("size")),
            short_size(u("start")),
        ));
        if p["bootable"] == true {
            s.push_str(", bootable");
        }
        s.push('\n');
        let mut ty = String::from("type ");
        match p["type_name"].as_str() {
            Some(n) => ty.push_str(&format!("{n} ({})", p["type"].as_str().unwrap_or(""))),
            None => ty.push_str(p["type"].as_str().unwrap_or("")),
        }
        if let Some(n) = p["name"].as_str() {
            ty.push_str(&format!(", name {n:?}"));
        }
        s.push_str(&format!("       {ty}\n"));
        if p["file_system"].is_object() {
            s.push_str(&format!("       {}\n", fs_text(&p["file_system"])));
        }
    }
    for w in t["warnings"].as_array().into_iter().flatten() {
        s.push_str(&format!("  warning: {}\n", w.as_str().unwrap_or("")));
    }
    s
}
