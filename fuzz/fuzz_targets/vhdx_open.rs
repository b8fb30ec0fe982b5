//! VHDX open (file identifier, headers, log replay in memory, region tables, metadata,
//! parent locator, BAT) then info, check, map and read of a few ranges, read-only.
//! Input: a sparse file (fuzz/src/sparse.rs); checksums are fixed up unless bit 63 of
//! its length field is set (see `fix_vhdx_checksums`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdiskfs::testing::Vhdx;
use vdiskfs::OpenOptions;

fuzz_target!(|data: &[u8]| {
    let path = vdiskfs_fuzz::image_file("img.vhdx", data);
    if vdiskfs_fuzz::fix_checksums_wanted(data) {
        vdiskfs_fuzz::fix_vhdx_checksums(&path);
    }
    if let Ok(v) = Vhdx::open(&path, OpenOptions::default()) {
        // Payload never comes from the 1 MiB header section.
        vdiskfs_fuzz::exercise(&v, data, 1 << 20);
    }
});
