//! VHD open (footer at the end or its copy at 0, dynamic header, parent locators, BAT)
//! then info, check, map and read of a few ranges, read-only.
//! Input: a sparse file (fuzz/src/sparse.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdiskfs::testing::Vhd;
use vdiskfs::OpenOptions;

fuzz_target!(|data: &[u8]| {
    let path = vdiskfs_fuzz::image_file("img.vhd", data);
    if let Ok(v) = Vhd::open(&path, OpenOptions::default()) {
        vdiskfs_fuzz::exercise(&v, data, 0);
    }
});
