//! `vdiskfs cat` and `vdiskfs info` on Virtual PC VHD files made by qemu-img (issue 3).
//! qemu-img is the judge: `vdiskfs cat IMG` must equal `qemu-img convert -f vpc -O raw
//! IMG` byte for byte. qemu pads sizes to a CHS geometry unless `force_size=on`; the
//! virtual size is the footer's current size, which is also what qemu reports for the
//! files it makes.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The 512-byte footer at the end of a VHD file.
fn footer(img: &Path) -> Vec<u8> {
    let f = read_at(img, file_len(img) - 512, 512);
    assert_eq!(&f[..8], b"conectix", "footer cookie of {}", img.display());
    f
}

/// Footer "Current Size" (offset 48, big-endian).
fn footer_current_size(img: &Path) -> u64 {
    be64(&footer(img), 48)
}

/// The dynamic disk header ("cxsparse") at the footer's Data Offset.
fn dynamic_header(img: &Path) -> (u64, Vec<u8>) {
    let off = be64(&footer(img), 16);
    let h = read_at(img, off, 1024);
    assert_eq!(
        &h[..8],
        b"cxsparse",
        "dynamic header cookie of {}",
        img.display()
    );
    (off, h)
}

/// `vdiskfs cat` (to a redirected stdout and with --output) equals `oracle`, and
/// `vdiskfs info --json` reports what the file and qemu-img say.
fn check_image(dir: &TempDir, img: &Path, oracle: &Path, disk_type: &str) {
    assert_cat_equals(dir, img, oracle);
    // libvhdi, the second independent reader, must agree too.
    if require_tool("vhdimount") && require_fuse() {
        let mnt = dir.join("vhdimount");
        let m = FuseMount::vhdimount(img, &mnt);
        assert_same_file(&m.merged(), oracle, "vhdimount vs qemu-img");
        drop(m);
        std::fs::remove_dir(&mnt).unwrap();
    }

    let v = info_json(img, &[]);
    let layers = info_layers(&v);
    assert_eq!(layers.len(), 1, "a VHD base is a chain of one layer: {v}");
    let l = &layers[0];
    assert_eq!(json_str(l, "format"), "VHD", "{l}");
    assert_eq!(json_str(l, "disk_type"), disk_type, "{l}");
    let vsize = json_u64(l, "virtual_size");
    assert_eq!(
        vsize,
        footer_current_size(img),
        "virtual size vs footer current size"
    );
    assert_eq!(
        vsize,
        json_u64(&qemu_info("vpc", img), "virtual-size"),
        "virtual size vs qemu-img info"
    );
    assert_eq!(vsize, file_len(oracle), "virtual size vs qemu's raw view");
    assert_eq!(json_u64(l, "logical_sector_size"), 512, "{l}");
    assert_eq!(l.get("has_parent"), Some(&Value::Bool(false)), "{l}");
    assert!(
        l.get("ids").and_then(|x| x.as_object()).is_some(),
        "\"ids\" missing or not an object: {l}"
    );
    if disk_type == "dynamic" {
        let (_, h) = dynamic_header(img);
        let bs = be32(&h, 32) as u64;
        assert_eq!(
            json_u64(l, "block_size"),
            bs,
            "block size vs dynamic header"
        );
        let total = json_u64(l, "total_blocks");
        assert_eq!(
            total,
            vsize.div_ceil(bs),
            "total_blocks = ceil(size / block size)"
        );
        let alloc = json_u64(l, "allocated_blocks");
        assert!(alloc <= total, "allocated {alloc} > total {total}");
        // Count allocated BAT entries straight from the file.
        let bat_off = be64(&h, 16);
        let bat = read_at(img, bat_off, total as usize * 4);
        let want = (0..total as usize)
            .filter(|&i| be32(&bat, 4 * i) != 0xFFFF_FFFF)
            .count() as u64;
        assert_eq!(alloc, want, "allocated_blocks vs BAT entries in the file");
    }
}

/// `qemu-img convert -f raw -O vpc -o OPTS RAW OUT`.
fn raw_to_vhd(raw: &Path, opts: &str, out: &Path) {
    qemu_convert_raw("vpc", opts, raw, out);
}

/// Convert a raw file to VHD with `opts`, then check vdiskfs against qemu's raw view
/// of the result (which starts with the input and is padded with zeros to the CHS
/// size).
fn converted_case(tag: &str, opts: &str, disk_type: &str, make: impl Fn(&Path)) {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new(tag);
    let raw = dir.join("in.raw");
    make(&raw);
    let img = dir.join(format!("{tag}.vhd"));
    raw_to_vhd(&raw, opts, &img);
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vpc", &img, &oracle);
    // Test setup sanity: qemu's view starts with what it was given.
    let n = file_len(&raw);
    assert!(file_len(&oracle) >= n);
    let prefix = dir.join("qemu-prefix.raw");
    std::fs::write(&prefix, read_at(&oracle, 0, n as usize)).unwrap();
    assert_same_file(&prefix, &raw, "qemu-img round trip (test setup)");
    std::fs::remove_file(&prefix).unwrap();
    check_image(&dir, &img, &oracle, disk_type);
}

#[test]
fn fixed_filled() {
    converted_case("vhd-fixed", "subformat=fixed", "fixed", |p| {
        filled_raw(
            p,
            20 * MIB + 512,
            1,
            &[(MIB, 2 * MIB), (9 * MIB + 512, 4 * KIB)],
        )
    });
}

#[test]
fn fixed_force_size() {
    converted_case(
        "vhd-fixed-force",
        "subformat=fixed,force_size=on",
        "fixed",
        |p| filled_raw(p, 17 * MIB, 2, &[(0, MIB)]),
    );
}

#[test]
fn fixed_empty() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("vhd-fixed-empty");
    let img = dir.join("empty.vhd");
    qemu_create("vpc", "subformat=fixed", &img, "6M");
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vpc", &img, &oracle);
    check_image(&dir, &img, &oracle, "fixed");
}

#[test]
fn dynamic_filled() {
    converted_case("vhd-dyn-filled", "subformat=dynamic", "dynamic", |p| {
        filled_raw(
            p,
            27 * MIB + 1536,
            3,
            &[
                (2 * MIB, 2 * MIB),
                (7 * MIB + 512, MIB),
                (20 * MIB, 5 * MIB),
            ],
        )
    });
}

#[test]
fn dynamic_sparse() {
    converted_case("vhd-dyn-sparse", "subformat=dynamic", "dynamic", |p| {
        sparse_raw(
            p,
            64 * MIB,
            4,
            &[
                (512, 512),
                (6 * MIB - 4 * KIB, 8 * KIB),
                (64 * MIB - 512, 512),
            ],
        )
    });
}

#[test]
fn dynamic_force_size() {
    converted_case(
        "vhd-dyn-force",
        "subformat=dynamic,force_size=on",
        "dynamic",
        |p| filled_raw(p, 13 * MIB + 512, 5, &[(4 * MIB, 4 * MIB)]),
    );
}

#[test]
fn dynamic_empty_and_written_by_qemu_io() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new("vhd-dyn-qemu-io");
    let img = dir.join("dyn.vhd");
    qemu_create("vpc", "subformat=dynamic", &img, "40M");
    let oracle = dir.join("qemu-empty.raw");
    qemu_to_raw("vpc", &img, &oracle);
    check_image(&dir, &img, &oracle, "dynamic");

    run_ok(
        Command::new("qemu-io")
            .args(["-f", "vpc"])
            .args(["-c", "write -P 0x5a 512 4096"])
            .args(["-c", "write -P 0xa5 2096640 1024"]) // straddles the first 2 MiB block
            .args(["-c", "write -P 0x33 31457280 3145728"])
            .arg(&img),
    );
    let oracle = dir.join("qemu-written.raw");
    qemu_to_raw("vpc", &img, &oracle);
    check_image(&dir, &img, &oracle, "dynamic");
}

// ---------------------------------------------------------------------------
// Damage that is survivable for read-only use, and damage that is not
// ---------------------------------------------------------------------------

/// A small dynamic VHD with data in every block, and qemu's raw view of it.
fn small_dynamic(dir: &TempDir, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let raw = dir.join("in.raw");
    filled_raw(&raw, 6 * MIB, seed, &[]);
    let img = dir.join("small.vhd");
    raw_to_vhd(&raw, "subformat=dynamic", &img);
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vpc", &img, &oracle);
    (img, oracle)
}

#[test]
fn footer_missing_at_end_uses_copy_at_start() {
    // A truncated or still-growing file: the footer at the end is gone, its copy at
    // offset 0 remains. libvhdi reads such files (with a warning); so must we.
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("vhd-no-end-footer");
    let (img, oracle) = small_dynamic(&dir, 6);
    let cut = dir.join("no-end-footer.vhd");
    std::fs::copy(&img, &cut).unwrap();
    let len = file_len(&cut);
    set_file_len(&cut, len - 512);
    let out = dir.join("out.raw");
    let o = vdiskfs([
        "cat".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
        cut.as_os_str(),
    ]);
    o.assert_success();
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_same_file(&out, &oracle, "cat of a VHD whose end footer is missing");
}

#[test]
fn dynamic_header_checksum_mismatch_is_a_warning_when_reading() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("vhd-hdr-checksum");
    let (img, oracle) = small_dynamic(&dir, 7);
    let (hoff, h) = dynamic_header(&img);
    // Checksum field of the dynamic header: offset 36, 4 bytes.
    let mut ck = h[36..40].to_vec();
    ck[3] ^= 0x01;
    patch_file(&img, hoff + 36, &ck);
    let out = dir.join("out.raw");
    let o = vdiskfs([
        "cat".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    o.assert_success();
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_same_file(&out, &oracle, "cat with a dynamic header checksum mismatch");
}

#[test]
fn random_file_is_rejected() {
    let dir = TempDir::new("vhd-bad-random");
    let bad = dir.join("random.vhd");
    make_random(&bad, MIB, 8);
    for args in [
        vec!["cat".as_ref(), bad.as_os_str()],
        vec!["info".as_ref(), "--json".as_ref(), bad.as_os_str()],
    ] {
        let o = vdiskfs(&args);
        assert_clean_failure(&o, &bad);
        assert!(o.stdout.is_empty(), "`{}` wrote to stdout", o.cmd);
    }
}

#[test]
fn bat_entry_past_end_of_file_is_rejected() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("vhd-bad-bat");
    let (img, _) = small_dynamic(&dir, 9);
    let (_, h) = dynamic_header(&img);
    let bat_off = be64(&h, 16);
    // Block 1 now claims to start 8 GiB into a 6 MiB file (in 512-byte sectors).
    patch_file(&img, bat_off + 4, &(16u32 << 20).to_be_bytes());
    let out = dir.join("out.raw");
    let o = vdiskfs([
        "cat".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    assert_clean_failure(&o, &img);
    let o = vdiskfs(["cat".as_ref(), img.as_os_str()]);
    assert_clean_failure(&o, &img);
}
