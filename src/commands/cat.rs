//! `vdiskfs cat`: stream the merged raw view.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::chain::Chain;
use crate::cli::CatArgs;
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Result};
use crate::progress::{Mode, Progress};

/// Bytes per read: large enough to amortise per-call work, small enough to stay in cache.
const CHUNK: usize = 4 << 20;

pub fn run(args: &CatArgs) -> Result<i32> {
    let chain = Chain::open(
        &args.image,
        &args.chain.options(crate::chain::Intent::Inspect),
    )?;
    let disk = Disk::new(chain, DiskOptions::default());
    let mode = Mode::from_flags(args.progress.quiet, args.progress.progress);
    let progress = Progress::bytes(disk.len(), "cat", mode);
    match &args.output {
        Some(path) => {
            let f = File::create(path).map_err(|e| Error::file(path, "create", e))?;
            write_all(&disk, f, path, &progress)?;
        }
        None => {
            let out = std::io::stdout().lock();
            write_all(&disk, out, Path::new("<stdout>"), &progress)?;
        }
    }
    progress.finish();
    Ok(0)
}

/// Copy the whole disk to `out`, counting the bytes on `progress`.
pub fn write_all<W: Write>(
    disk: &Disk,
    mut out: W,
    out_path: &Path,
    progress: &Progress,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < disk.len() {
        let n = disk.read_at(off, &mut buf)?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            // `vdiskfs cat | head` is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(Error::io(out_path, "write", off, e)),
        }
        off += n as u64;
        progress.add(n as u64);
    }
    out.flush().map_err(|e| Error::file(out_path, "flush", e))?;
    Ok(())
}
