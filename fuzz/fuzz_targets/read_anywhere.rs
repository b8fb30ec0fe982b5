//! Open a fuzzed image (VHDX or VHD, detected by signature) as a chain and read ranges of
//! the merged view through `Disk::read_at`, as `cat` and the FUSE daemon do.
//!
//! Input: `image ranges count`, where the last byte is `count` (0..=8 ranges are used,
//! count % 9), the `count * 12` bytes before it are ranges (offset:u64le, len:u32le,
//! len taken modulo 1 MiB + 1, offset modulo the disk size), and the rest is a sparse
//! file (fuzz/src/sparse.rs). A differencing image gets a raw all-zero 1 MiB parent
//! through `--parent` with `--ignore-linkage`, so its own data is read too.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vdiskfs::{Chain, ChainOptions, Disk, DiskOptions};

fn parent() -> &'static std::path::Path {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = vdiskfs_fuzz::scratch().join("parent.raw");
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 20))
            .expect("make raw parent");
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_last() else {
        return;
    };
    let count = (count % 9) as usize;
    let Some(split) = rest.len().checked_sub(count * 12) else {
        return;
    };
    let (image, ranges) = rest.split_at(split);
    let path = vdiskfs_fuzz::image_file("img", image);
    if vdiskfs_fuzz::fix_checksums_wanted(image) {
        vdiskfs_fuzz::fix_vhdx_checksums(&path);
    }
    let parent = parent();
    let mut opts = ChainOptions {
        ignore_linkage: true,
        ..Default::default()
    };
    let chain = match Chain::open(&path, &opts) {
        Ok(c) => c,
        Err(_) => {
            // A differencing disk whose parent is not there: give it the raw one.
            opts.parents = vec![parent.to_path_buf()];
            match Chain::open(&path, &opts) {
                Ok(c) => c,
                Err(_) => return,
            }
        }
    };
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_bytes: 1 << 20,
            cache_block: 64 << 10,
        },
    );
    let size = disk.len();
    if size == 0 {
        return;
    }
    let mut buf = Vec::new();
    for r in ranges.chunks_exact(12) {
        let off = u64::from_le_bytes(r[0..8].try_into().unwrap()) % size;
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap()) as usize
            % (vdiskfs_fuzz::MAX_READ as usize + 1);
        buf.resize(len, 0xa5);
        if let Ok(n) = disk.read_at(off, &mut buf) {
            assert_eq!(
                n as u64,
                (len as u64).min(size - off),
                "short read inside the disk"
            );
        }
    }
});
