//! `vdiskfs convert`: the merged view of a chain (or a raw image) as a new independent
//! disk.

use std::path::Path;
use std::sync::Arc;

use crate::chain::{Chain, Intent};
use crate::cli::{parse_size, ConvertArgs, ConvertFormatArg, DiskTypeArg, SourceFormatArg};
use crate::convert::{
    convert, source_data_bytes, ConvertSpec, OutFormat, AZURE_MAX_SIZE, AZURE_MIN_SIZE,
};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Request, Result, Usage};
use crate::image::detect_format;
use crate::image::raw::Raw;

const DEFAULT_BLOCK: u64 = 2 << 20;
const MIB: u64 = 1 << 20;

fn output_format(args: &ConvertArgs) -> Result<OutFormat> {
    if args.azure {
        if matches!(args.format, Some(f) if f != ConvertFormatArg::Vhd) {
            return Err(Error::Usage(Usage::AzureFormat {
                output: args.output.clone(),
            }));
        }
        return Ok(OutFormat::Vhd);
    }
    if let Some(f) = args.format {
        return Ok(match f {
            ConvertFormatArg::Vhdx => OutFormat::Vhdx,
            ConvertFormatArg::Vhd => OutFormat::Vhd,
            ConvertFormatArg::Raw => OutFormat::Raw,
        });
    }
    let ext = args
        .output
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "vhdx" | "avhdx" => Ok(OutFormat::Vhdx),
        "vhd" | "avhd" => Ok(OutFormat::Vhd),
        "raw" | "img" | "bin" => Ok(OutFormat::Raw),
        _ => Err(Error::Usage(Usage::OutputFormat {
            output: args.output.clone(),
        })),
    }
}

/// Open SOURCE as the chain to read from.
fn open_source(args: &ConvertArgs) -> Result<Chain> {
    match args.source_format {
        SourceFormatArg::Auto => {
            if detect_format(&args.source)?.is_none() {
                return Err(Error::Request(Request::SourceNotImage {
                    input: args.source.clone(),
                }));
            }
            Chain::open(&args.source, &args.chain.options(Intent::Copy))
        }
        SourceFormatArg::Raw => {
            if !args.chain.parents.is_empty() {
                return Err(Error::Usage(Usage::RawSourceParent {
                    input: args.source.clone(),
                }));
            }
            let raw = Raw::open(&args.source, Intent::Copy.open_options(0))?;
            Ok(Chain {
                layers: vec![Arc::new(raw)],
                found: vec![None],
                warnings: Vec::new(),
            })
        }
    }
}

/// True when `a` and `b` are the same file (same device and inode: catches hard links
/// and symbolic links as well as other spellings of the path).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

pub fn run(args: &ConvertArgs) -> Result<i32> {
    let format = output_format(args)?;
    let fixed = args.azure || args.disk_type == DiskTypeArg::Fixed;
    let chain = open_source(args)?;
    for w in &chain.warnings {
        log::warn!("{w}");
    }
    for l in &chain.layers {
        if same_file(l.path(), &args.output) {
            return Err(Error::Request(Request::OutputInChain {
                output: args.output.clone(),
                top: l.path() == chain.top().path(),
            }));
        }
    }
    let source_lss = chain.top().logical_sector_size();
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_bytes: 0,
            ..Default::default()
        },
    );
    let spec = make_spec(args, format, fixed, source_lss, disk.len())?;
    if args.output.symlink_metadata().is_ok() && !args.force {
        return Err(Error::Request(Request::OutputExists {
            output: args.output.clone(),
        }));
    }
    // Ctrl-C and SIGTERM stop the copy between blocks; the temporary file is removed
    // and OUTPUT never appears. (SIGKILL leaves the temporary file; the next run
    // removes it.)
    let cancel = super::cancel_on_signals(&args.output)?;
    let total = source_data_bytes(&disk)?;
    let progress = crate::progress::Progress::bytes(
        total,
        "convert",
        crate::progress::Mode::from_flags(args.progress.quiet, args.progress.progress),
    );
    let out = &args.output;
    let result = convert(&disk, out, &spec, args.force, &|n| progress.add(n), &cancel);
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            drop(progress);
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "vdiskfs: {}: interrupted; nothing was written",
                    out.display()
                );
                return Ok(130);
            }
            if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT) {
                return Err(Error::Request(Request::OutputFull {
                    output: out.clone(),
                    cause: e.detail(),
                    total,
                }));
            }
            return Err(e);
        }
    };
    progress.finish();
    log::info!(
        "{}: {} bytes of source data read, {} bytes in {} blocks written",
        out.display(),
        report.bytes_to_copy,
        report.bytes_written,
        report.blocks_written
    );
    Ok(0)
}

fn make_spec(
    args: &ConvertArgs,
    format: OutFormat,
    fixed: bool,
    source_lss: u32,
    source_size: u64,
) -> Result<ConvertSpec> {
    let block_size = match &args.block_size {
        Some(s) => parse_size(s).map_err(|p| Error::Usage(Usage::Size(p)))?,
        None => DEFAULT_BLOCK,
    };
    let block_size = u32::try_from(block_size)
        .map_err(|_| Error::Usage(Usage::BlockSizeTooLarge { block_size }))?;
    let lss = match (format, args.logical_sector_size) {
        (OutFormat::Vhdx, Some(n)) => n,
        (OutFormat::Vhdx, None) => source_lss,
        (_, Some(512)) | (_, None) => 512,
        (_, Some(n)) => {
            return Err(Error::Usage(Usage::SectorSizeNotVhdx {
                output: args.output.clone(),
                size: n,
            }))
        }
    };
    let mut size = source_size;
    if format == OutFormat::Vhdx {
        size = size.div_ceil(lss as u64) * lss as u64;
    } else if format == OutFormat::Vhd {
        size = size.div_ceil(512) * 512;
    }
    if args.azure {
        let rounded = size.div_ceil(MIB) * MIB;
        let rounded = rounded.max(AZURE_MIN_SIZE);
        if rounded > AZURE_MAX_SIZE {
            return Err(Error::Request(Request::AzureTooLarge {
                input: args.source.clone(),
                size: source_size,
                max: AZURE_MAX_SIZE,
            }));
        }
        if rounded != source_size {
            eprintln!(
                "vdiskfs: {}: virtual size {source_size} rounded up to {rounded} bytes ({} MiB) for Azure; the added {} bytes at the end read as zeros",
                args.output.display(),
                rounded / MIB,
                rounded - source_size
            );
        }
        size = rounded;
    } else if size != source_size {
        eprintln!(
            "vdiskfs: {}: virtual size {source_size} rounded up to {size} bytes (a whole number of sectors); the added bytes read as zeros",
            args.output.display()
        );
    }
    Ok(ConvertSpec {
        format,
        fixed,
        block_size,
        logical_sector_size: lss,
        physical_sector_size: lss.max(4096),
        virtual_size: size,
        creator: crate::image::vhdx::create::CREATOR.to_string(),
    })
}
