//! Helpers shared by the fuzz targets: a per-process scratch directory on tmpfs, the
//! sparse input encoding, and the checks every opened layer must pass.

pub mod memdisk;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vdiskfs::Run;
use vdiskfs::Layer;

/// Largest single map/read a target asks for (FUSE requests are at most 1 MiB).
pub const MAX_READ: u64 = 1 << 20;

/// `info()` and `check()` walk the whole BAT; on a disk claiming 64 TiB in 1 MiB blocks
/// that is 64 Mi entries (correct, bounded, but seconds per input). The targets call
/// them only below this virtual size so the fuzzer keeps its speed; the bounds tests
/// cover the huge sizes (tests/integration hostile.rs measures their memory).
pub const WALK_LIMIT: u64 = 1 << 40;

/// A directory of this process's own on tmpfs (falls back to the temp dir), removed at
/// exit by nobody: libFuzzer exits with `_exit`, so the name carries the pid and
/// scripts/fuzz.sh removes leftovers.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/fuzz.sh gives each run its own directory, so concurrent runs (two
        // checkouts fuzzing at once) never clean up each other's scratch files.
        let base = match std::env::var_os("VDISKFS_FUZZ_SCRATCH") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let d = base.join(format!("vdiskfs-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create scratch dir");
        d
    })
}

/// Write the sparse input to `scratch()/name` and return the path.
pub fn image_file(name: &str, input: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    sparse::write_file(&p, input).expect("write scratch image");
    p
}

/// A few ranges derived from the input: the start, the end, and two picked by `seed`.
pub fn pick_ranges(size: u64, seed: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        return Vec::new();
    }
    let len = |x: u64| 1 + x % MAX_READ;
    let mut v = vec![(0, len(seed).min(size))];
    let l = len(seed >> 20).min(size);
    v.push((size - l, l));
    for k in [
        seed % size,
        (seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15) % size,
    ] {
        v.push((k, len(seed >> 7).min(size - k)));
    }
    v
}

/// A cheap hash of the input to choose ranges with.
pub fn seed_of(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Map and read `[off, off + len)` of one layer, checking the invariants a layer promises:
/// the runs describe exactly the range, and held bytes are read (or refused) without a
/// panic. `min_held` is the smallest file offset data may come from (the VHDX header
/// section is never payload).
pub fn map_and_read(layer: &dyn Layer, off: u64, len: u64, min_held: u64) {
    let mut runs = Vec::new();
    if layer.map(off, len, &mut runs).is_err() {
        return;
    }
    let total: u64 = runs.iter().map(Run::len).sum();
    assert_eq!(
        total, len,
        "map({off}, {len}) described {total} bytes: {runs:?}"
    );
    let mut buf = Vec::new();
    for r in runs {
        if let Run::Held { len, file_offset } = r {
            assert!(
                file_offset >= min_held,
                "held data at file offset {file_offset}, inside the header section"
            );
            buf.resize(len as usize, 0);
            let _ = layer.read_held(file_offset, &mut buf);
        }
    }
}

/// Everything a read-only user can make a layer do: info, check, map and read.
pub fn exercise(layer: &dyn Layer, input: &[u8], min_held: u64) {
    let size = layer.virtual_size();
    if size <= WALK_LIMIT {
        let _ = layer.info();
        let _ = layer.check();
    }
    for (off, len) in pick_ranges(size, seed_of(input)) {
        map_and_read(layer, off, len, min_held);
    }
}

pub use sparse::{fix_checksums_wanted, fix_vhdx_checksums};
