//! `vdiskfs cat` and `vdiskfs info` on VHDX files of many shapes made by qemu-img
//! (issue 2). qemu-img is the judge: `vdiskfs cat IMG` must equal
//! `qemu-img convert -O raw IMG` byte for byte, both to stdout and with `--output`;
//! `vdiskfs info --json` must report what qemu-img info and the file itself say.
//! Bad input must give one clear line on stderr and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// What the test knows about an image independently of vdiskfs.
struct Expect {
    disk_type: &'static str,
    logical_sector_size: u64,
}

/// Check `img` against `oracle` (a raw file holding its merged view, from qemu-img):
/// cat to stdout (redirected to a file), cat --output, and info --json.
fn check_image(dir: &TempDir, img: &Path, oracle: &Path, qemu_twin: &Path, expect: &Expect) {
    assert_cat_equals(dir, img, oracle);

    check_info(img, oracle, qemu_twin, expect);
}

/// `vdiskfs info --json` against qemu-img info (of `qemu_twin`, which is `img` itself
/// except for the 4096-byte-sector case, where qemu cannot open `img`) and the raw view.
fn check_info(img: &Path, oracle: &Path, qemu_twin: &Path, expect: &Expect) {
    let q = qemu_info("vhdx", qemu_twin);
    let v = info_json(img, &[]);
    let layers = info_layers(&v);
    assert_eq!(layers.len(), 1, "a VHDX base is a chain of one layer: {v}");
    let l = &layers[0];

    assert_eq!(json_str(l, "format"), "VHDX", "{l}");
    assert_eq!(json_str(l, "disk_type"), expect.disk_type, "{l}");
    let vsize = json_u64(l, "virtual_size");
    assert_eq!(
        vsize,
        json_u64(&q, "virtual-size"),
        "virtual size vs qemu-img info"
    );
    assert_eq!(
        vsize,
        file_len(oracle),
        "virtual size vs length of the raw view"
    );
    let bs = json_u64(l, "block_size");
    assert_eq!(
        bs,
        json_u64(&q, "cluster-size"),
        "block size vs qemu-img info"
    );
    assert_eq!(
        json_u64(l, "logical_sector_size"),
        expect.logical_sector_size,
        "{l}"
    );
    let (meta_lss, meta_pss) = metadata_sector_sizes(img);
    assert_eq!(json_u64(l, "logical_sector_size"), meta_lss as u64);
    assert_eq!(json_u64(l, "physical_sector_size"), meta_pss as u64);
    assert_eq!(l.get("has_parent"), Some(&Value::Bool(false)), "{l}");

    let ids = l
        .get("ids")
        .and_then(|x| x.as_object())
        .unwrap_or_else(|| panic!("\"ids\" missing or not an object: {l}"));
    let want_id = metadata_virtual_disk_id(img);
    let got_id = ids
        .get("virtual_disk_id")
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("ids.virtual_disk_id missing: {l}"));
    assert_eq!(got_id.to_ascii_lowercase(), want_id, "virtual disk id");
    assert!(
        l.get("parent_locator").is_some(),
        "\"parent_locator\" missing: {l}"
    );
    let log = json_str(l, "log_state");
    assert!(
        log.starts_with("clean"),
        "qemu-made files have no pending log: {log}"
    );
    assert!(l.get("found_by").is_some(), "\"found_by\" missing: {l}");

    let total = json_u64(l, "total_blocks");
    assert_eq!(
        total,
        vsize.div_ceil(bs),
        "total_blocks = ceil(virtual size / block size)"
    );
    let alloc = json_u64(l, "allocated_blocks");
    assert!(alloc <= total, "allocated {alloc} > total {total}");
    // Every block with a non-zero byte in the raw view must be allocated in the file.
    let nonzero = nonzero_blocks(oracle, bs);
    assert!(
        alloc >= nonzero,
        "allocated_blocks {alloc} but {nonzero} blocks hold non-zero data"
    );
    // (A fixed VHDX need not have every block FULLY_PRESENT: qemu marks the blocks
    // of a new fixed file ZERO.)
    let held = json_u64(l, "bytes_held");
    assert!(held <= vsize, "bytes_held {held} > virtual size {vsize}");
}

/// How many `bs`-sized blocks of a raw file contain a non-zero byte.
fn nonzero_blocks(raw: &Path, bs: u64) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(raw).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let (mut off, mut count, mut last) = (0u64, 0u64, u64::MAX);
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return count;
        }
        // Blocks are >= 1 MiB and reads are 1 MiB-aligned unless short; scan bytes.
        for (i, &b) in buf[..n].iter().enumerate() {
            if b != 0 {
                let blk = (off + i as u64) / bs;
                if blk != last {
                    count += 1;
                    last = blk;
                }
            }
        }
        off += n as u64;
    }
}

// ---------------------------------------------------------------------------
// Reading a few metadata items straight from the file (MS-VHDX 2.2, 2.6), to know
// what info must say, and to make a 4096-byte-sector file that qemu cannot make.
// ---------------------------------------------------------------------------

const METADATA_REGION: &str = "8b7ca206-4790-4b9a-b8fe-575f050f886e";
const VIRTUAL_DISK_ID: &str = "beca12ab-b2e6-4523-93ef-c309e000c746";
const LOGICAL_SECTOR_SIZE: &str = "8141bf1d-a96f-4709-ba47-f233a8faab5f";
const PHYSICAL_SECTOR_SIZE: &str = "cda348c7-445d-4471-9cc9-e9885251c556";

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn guid_at(b: &[u8], at: usize) -> String {
    uuid::Uuid::from_bytes_le(b[at..at + 16].try_into().unwrap()).to_string()
}

/// File offset and length of metadata item `item`.
fn metadata_item(img: &Path, item: &str) -> (u64, u32) {
    let rt = read_at(img, 192 * KIB, 64 * KIB as usize);
    assert_eq!(
        &rt[..4],
        b"regi",
        "region table signature in {}",
        img.display()
    );
    let n = le32(&rt, 8) as usize;
    let md_off = (0..n)
        .map(|i| 16 + 32 * i)
        .find(|&e| guid_at(&rt, e) == METADATA_REGION)
        .map(|e| le64(&rt, e + 16))
        .expect("metadata region");
    let table = read_at(img, md_off, 64 * KIB as usize);
    assert_eq!(&table[..8], b"metadata");
    let count = u16::from_le_bytes([table[10], table[11]]) as usize;
    (0..count)
        .map(|i| 32 + 32 * i)
        .find(|&e| guid_at(&table, e) == item)
        .map(|e| (md_off + le32(&table, e + 16) as u64, le32(&table, e + 20)))
        .unwrap_or_else(|| panic!("metadata item {item} not in {}", img.display()))
}

fn metadata_sector_sizes(img: &Path) -> (u32, u32) {
    let (lo, _) = metadata_item(img, LOGICAL_SECTOR_SIZE);
    let (po, _) = metadata_item(img, PHYSICAL_SECTOR_SIZE);
    (le32(&read_at(img, lo, 4), 0), le32(&read_at(img, po, 4), 0))
}

fn metadata_virtual_disk_id(img: &Path) -> String {
    let (o, len) = metadata_item(img, VIRTUAL_DISK_ID);
    assert_eq!(len, 16);
    guid_at(&read_at(img, o, 16), 0)
}

// ---------------------------------------------------------------------------
// Making images
// ---------------------------------------------------------------------------

/// `qemu-img convert -f raw -O vhdx -o OPTS RAW OUT`.
fn raw_to_vhdx(raw: &Path, opts: &str, out: &Path) {
    qemu_convert_raw("vhdx", opts, raw, out);
}

/// `qemu-img create -f vhdx -o OPTS OUT SIZE`.
fn create_vhdx(opts: &str, out: &Path, size: u64) {
    qemu_create("vhdx", opts, out, &size.to_string());
}

/// Convert `raw` with `opts`, check that qemu reads back what it was given (so the
/// oracle is sound), then check vdiskfs against it.
fn converted_case(tag: &str, size: u64, opts: &str, disk_type: &'static str, make: impl Fn(&Path)) {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new(tag);
    let raw = dir.join("in.raw");
    make(&raw);
    assert_eq!(file_len(&raw), size);
    let img = dir.join(format!("{tag}.vhdx"));
    raw_to_vhdx(&raw, opts, &img);
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vhdx", &img, &oracle);
    assert_same_file(&oracle, &raw, "qemu-img round trip (test setup)");
    check_image(
        &dir,
        &img,
        &oracle,
        &img,
        &Expect {
            disk_type,
            logical_sector_size: 512,
        },
    );
}

/// `qemu-img create` an empty image, optionally write into it with qemu-io, then
/// check vdiskfs against qemu's raw view.
fn created_case(tag: &str, size: u64, opts: &str, disk_type: &'static str, qemu_io: &[&str]) {
    if !require_tool("qemu-img") || (!qemu_io.is_empty() && !require_tool("qemu-io")) {
        return;
    }
    let dir = TempDir::new(tag);
    let img = dir.join(format!("{tag}.vhdx"));
    create_vhdx(opts, &img, size);
    if !qemu_io.is_empty() {
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["-f", "vhdx"]);
        for c in qemu_io {
            cmd.args(["-c", c]);
        }
        cmd.arg(&img);
        run_ok(&mut cmd);
    }
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vhdx", &img, &oracle);
    check_image(
        &dir,
        &img,
        &oracle,
        &img,
        &Expect {
            disk_type,
            logical_sector_size: 512,
        },
    );
}

// ---------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------

#[test]
fn fixed_empty() {
    created_case("fixed-empty", 8 * MIB, "subformat=fixed", "fixed", &[]);
}

#[test]
fn fixed_filled_size_not_block_multiple() {
    // qemu picks the block size; 21 MiB + 4 KiB is a multiple of no block size.
    let size = 21 * MIB + 4 * KIB;
    converted_case("fixed-filled", size, "subformat=fixed", "fixed", |p| {
        filled_raw(p, size, 1, &[(2 * MIB, 3 * MIB), (size - 4 * KIB, 4 * KIB)])
    });
}

#[test]
fn dynamic_1m_filled_size_not_block_multiple() {
    let size = 37 * MIB + 512;
    converted_case(
        "dyn-1m-filled",
        size,
        "subformat=dynamic,block_size=1M",
        "dynamic",
        |p| {
            filled_raw(
                p,
                size,
                2,
                &[
                    (0, MIB),
                    (5 * MIB + 512, 2 * MIB + 1024),
                    (20 * MIB, 7 * MIB),
                ],
            )
        },
    );
}

#[test]
fn dynamic_2m_sparse() {
    let size = 50 * MIB;
    converted_case(
        "dyn-2m-sparse",
        size,
        "subformat=dynamic,block_size=2M",
        "dynamic",
        |p| {
            sparse_raw(
                p,
                size,
                3,
                &[(512, 512), (7 * MIB - 4 * KIB, 8 * KIB), (size - 512, 512)],
            )
        },
    );
}

#[test]
fn dynamic_2m_filled() {
    let size = 30 * MIB;
    converted_case(
        "dyn-2m-filled",
        size,
        "subformat=dynamic,block_size=2M",
        "dynamic",
        |p| filled_raw(p, size, 4, &[(4 * MIB, 4 * MIB), (13 * MIB, MIB)]),
    );
}

#[test]
fn dynamic_32m_filled_size_not_block_multiple() {
    let size = 100 * MIB + 512;
    converted_case(
        "dyn-32m-filled",
        size,
        "subformat=dynamic,block_size=32M",
        "dynamic",
        |p| {
            filled_raw(
                p,
                size,
                5,
                &[(32 * MIB, 32 * MIB), (70 * MIB, 3 * MIB + 512)],
            )
        },
    );
}

#[test]
fn dynamic_256m_sparse_size_not_block_multiple() {
    let size = 300 * MIB;
    converted_case(
        "dyn-256m-sparse",
        size,
        "subformat=dynamic,block_size=256M",
        "dynamic",
        |p| {
            sparse_raw(
                p,
                size,
                6,
                &[
                    (10 * MIB, 3 * MIB),
                    (256 * MIB - 512, 1024),
                    (size - MIB, MIB),
                ],
            )
        },
    );
}

#[test]
fn dynamic_empty_each_block_size() {
    for (bs, size) in [
        ("1M", 5 * MIB + 512),
        ("2M", 64 * MIB),
        ("32M", 33 * MIB),
        ("256M", 257 * MIB),
    ] {
        created_case(
            &format!("dyn-empty-{bs}"),
            size,
            &format!("subformat=dynamic,block_size={bs}"),
            "dynamic",
            &[],
        );
    }
}

#[test]
fn dynamic_written_in_place_by_qemu_io() {
    // Small writes at odd places into a created image: qemu allocates blocks as it
    // goes and leaves the rest as it was created (block_state_zero on and off).
    for zero in ["on", "off"] {
        created_case(
            &format!("dyn-qemu-io-zero-{zero}"),
            24 * MIB + 3 * 512,
            &format!("subformat=dynamic,block_size=1M,block_state_zero={zero}"),
            "dynamic",
            &[
                "write -P 0x5a 512 4096",
                "write -P 0xa5 1048064 1024",
                "write -P 0x11 20971520 3145728",
                "write -P 0x77 25166336 1024", // ends at the last byte
            ],
        );
    }
}

#[test]
fn logical_sector_size_4096() {
    // qemu-img cannot create (or even open) a VHDX with 4096-byte logical sectors.
    // Make a 512-byte one with qemu, then set its LogicalSectorSize metadata item to
    // 4096. With under 4 GiB of virtual disk there are no sector-bitmap entries in
    // the BAT for either sector size (a chunk covers 2^23 sectors), so the layout is
    // valid for both and the merged view is unchanged: qemu's view of the 512-byte
    // twin is the oracle, and libvhdi, which reads 4096-byte-sector VHDX, agrees.
    // (7-Zip 22 refuses 4096-byte-sector files whose size is not a multiple of the
    // block size, so it is no judge here.)
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("lss4096");
    let size = 45 * MIB + 4 * KIB; // a multiple of 4096, not of the block size
    let raw = dir.join("in.raw");
    filled_raw(
        &raw,
        size,
        7,
        &[(MIB, 2 * MIB), (9 * MIB + 4 * KIB, 8 * KIB)],
    );
    let twin = dir.join("twin512.vhdx");
    raw_to_vhdx(&raw, "subformat=dynamic,block_size=2M", &twin);
    let img = dir.join("lss4096.vhdx");
    std::fs::copy(&twin, &img).unwrap();
    let (off, len) = metadata_item(&img, LOGICAL_SECTOR_SIZE);
    assert_eq!(len, 4);
    patch_file(&img, off, &4096u32.to_le_bytes());
    assert_eq!(metadata_sector_sizes(&img).0, 4096);

    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vhdx", &twin, &oracle);
    assert_same_file(&oracle, &raw, "qemu-img round trip (test setup)");
    if require_tool("vhdimount") && require_fuse() {
        let m = FuseMount::vhdimount(&img, &dir.join("vhdimount"));
        assert_same_file(
            &m.merged(),
            &raw,
            "libvhdi's view of the 4096-byte-sector file",
        );
    }
    check_image(
        &dir,
        &img,
        &oracle,
        &twin,
        &Expect {
            disk_type: "dynamic",
            logical_sector_size: 4096,
        },
    );
}

#[test]
fn dynamic_beyond_first_chunk() {
    // A chunk (one sector-bitmap entry in the BAT per chunk) covers 2^23 512-byte
    // sectors = 4 GiB; past it every BAT index is shifted by the interleaved sector
    // bitmap entries. Data on both sides of the 4 GiB boundary; vdiskfs's stdout is
    // compared as it streams with qemu's (sparse) raw file, so nothing else is stored.
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("beyond-chunk");
    let size = 4 * GIB + 8 * MIB;
    let raw = dir.join("in.raw");
    sparse_raw(
        &raw,
        size,
        8,
        &[
            (0, MIB),
            (4 * GIB - MIB / 2, MIB),
            (4 * GIB + 5 * MIB + 512, 2 * MIB),
            (size - 512, 512),
        ],
    );
    let img = dir.join("big.vhdx");
    raw_to_vhdx(&raw, "subformat=dynamic,block_size=1M", &img);
    let oracle = dir.join("qemu.raw");
    qemu_to_raw("vhdx", &img, &oracle);
    assert_eq!(
        first_difference(&oracle, &raw),
        None,
        "qemu-img round trip (test setup)"
    );
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("cat").arg(&img);
    stdout_vs_file(&mut cmd, &oracle).assert_success();
    let v = info_json(&img, &[]);
    let l = &info_layers(&v)[0];
    assert_eq!(json_u64(l, "virtual_size"), size);
    assert_eq!(json_u64(l, "total_blocks"), size / MIB);
    assert!(json_u64(l, "allocated_blocks") >= 6, "{l}");
}

// ---------------------------------------------------------------------------
// Damaged headers: one bad header is survivable, two are not
// ---------------------------------------------------------------------------

/// A small filled qemu VHDX and its raw view.
fn small_image(dir: &TempDir, seed: u64) -> (PathBuf, PathBuf) {
    let raw = dir.join("in.raw");
    filled_raw(&raw, 6 * MIB, seed, &[(MIB, MIB)]);
    let img = dir.join("small.vhdx");
    raw_to_vhdx(&raw, "subformat=dynamic,block_size=1M", &img);
    (img, raw)
}

fn flip_byte(path: &Path, offset: u64) {
    let b = read_at(path, offset, 1)[0];
    patch_file(path, offset, &[!b]);
}

#[test]
fn one_corrupt_header_uses_the_other() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("one-header");
    let (img, raw) = small_image(&dir, 9);
    for header in [64 * KIB, 128 * KIB] {
        let bad = dir.join(format!("bad-header-at-{header}.vhdx"));
        std::fs::copy(&img, &bad).unwrap();
        flip_byte(&bad, header + 100);
        let out = dir.join("out.raw");
        cat_output_option(&bad, &[], &out);
        assert_same_file(&out, &raw, "cat with one header damaged");
        let v = info_json(&bad, &[]);
        assert_eq!(json_u64(&info_layers(&v)[0], "virtual_size"), 6 * MIB);
    }
}

// ---------------------------------------------------------------------------
// Bad input through the CLI
// ---------------------------------------------------------------------------

/// Both `cat` and `info` must fail cleanly on `bad`.
fn assert_rejected(bad: &Path) {
    let out = bad.with_extension("out");
    for args in [
        vec!["cat".as_ref(), bad.as_os_str()],
        vec![
            "cat".as_ref(),
            "--output".as_ref(),
            out.as_os_str(),
            bad.as_os_str(),
        ],
        vec!["info".as_ref(), bad.as_os_str()],
        vec!["info".as_ref(), "--json".as_ref(), bad.as_os_str()],
    ] {
        let o = vdiskfs(&args);
        assert_clean_failure(&o, bad);
        assert!(
            o.stdout.is_empty(),
            "`{}` printed {} bytes to stdout although the image cannot be opened",
            o.cmd,
            o.stdout.len()
        );
    }
}

#[test]
fn random_file_is_rejected() {
    let dir = TempDir::new("bad-random");
    let bad = dir.join("random.vhdx");
    make_random(&bad, MIB, 10);
    assert_rejected(&bad);
}

#[test]
fn missing_file_is_rejected() {
    let dir = TempDir::new("bad-missing");
    assert_rejected(&dir.join("does-not-exist.vhdx"));
}

#[test]
fn bad_signature_is_rejected() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("bad-signature");
    let (img, _) = small_image(&dir, 11);
    let bad = dir.join("bad-signature.vhdx");
    std::fs::copy(&img, &bad).unwrap();
    patch_file(&bad, 0, b"vhdxfilf");
    assert_rejected(&bad);
}

#[test]
fn both_headers_corrupt_is_rejected() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("bad-headers");
    let (img, _) = small_image(&dir, 12);
    let bad = dir.join("both-headers-corrupt.vhdx");
    std::fs::copy(&img, &bad).unwrap();
    flip_byte(&bad, 64 * KIB + 100);
    flip_byte(&bad, 128 * KIB + 100);
    assert_rejected(&bad);
}

#[test]
fn truncated_in_headers_is_rejected() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("bad-trunc-head");
    let (img, _) = small_image(&dir, 13);
    let bad = dir.join("truncated-100k.vhdx");
    std::fs::copy(&img, &bad).unwrap();
    set_file_len(&bad, 100 * KIB);
    assert_rejected(&bad);
}

#[test]
fn truncated_payload_is_rejected_by_cat() {
    // Cut into the last payload block: its BAT entry now points past the end of the
    // file. `cat` must say so, not return zeros or short output.
    if !require_tool("qemu-img") {
        return;
    }
    let dir = TempDir::new("bad-trunc-data");
    let (img, _) = small_image(&dir, 14);
    let bad = dir.join("truncated-payload.vhdx");
    std::fs::copy(&img, &bad).unwrap();
    let len = file_len(&bad);
    set_file_len(&bad, len - 512 * KIB);
    let out = dir.join("out.raw");
    let o = vdiskfs([
        "cat".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
        bad.as_os_str(),
    ]);
    assert_clean_failure(&o, &bad);
    let o = vdiskfs(["cat".as_ref(), bad.as_os_str()]);
    assert_clean_failure(&o, &bad);
}

// ---------------------------------------------------------------------------
// Structures that parse but must not be accepted
// ---------------------------------------------------------------------------

const FILE_PARAMETERS: &str = "caa16737-fa36-4d43-b3b6-33f0aa44e76b";

/// A copy of a small qemu image named `name`, patched by `patch`.
fn patched_copy(tag: &str, name: &str, patch: impl Fn(&Path)) -> Option<(TempDir, PathBuf)> {
    if !require_tool("qemu-img") {
        return None;
    }
    let dir = TempDir::new(tag);
    let (img, _) = small_image(&dir, 20);
    let bad = dir.join(name);
    std::fs::copy(&img, &bad).unwrap();
    patch(&bad);
    Some((dir, bad))
}

#[test]
fn logical_sector_size_not_512_or_4096_is_rejected() {
    for lss in [1024u32, 0, 8192] {
        let Some((_dir, bad)) = patched_copy("bad-lss", &format!("lss-{lss}.vhdx"), |p| {
            let (off, _) = metadata_item(p, LOGICAL_SECTOR_SIZE);
            patch_file(p, off, &lss.to_le_bytes());
        }) else {
            return;
        };
        assert_rejected(&bad);
    }
}

#[test]
fn block_size_not_power_of_two_in_range_is_rejected() {
    for bs in [3 * MIB as u32, 512 * KIB as u32, 512 * MIB as u32, 0] {
        let Some((_dir, bad)) = patched_copy("bad-bs", &format!("bs-{bs}.vhdx"), |p| {
            let (off, len) = metadata_item(p, FILE_PARAMETERS);
            assert_eq!(len, 8);
            patch_file(p, off, &bs.to_le_bytes());
        }) else {
            return;
        };
        assert_rejected(&bad);
    }
}

/// Add an entry to both region tables and fix their CRC-32C checksums.
fn add_region(p: &Path, guid: uuid::Uuid, file_offset: u64, length: u32, required: bool) {
    for table_off in [192 * KIB, 256 * KIB] {
        let mut rt = read_at(p, table_off, 64 * KIB as usize);
        assert_eq!(&rt[..4], b"regi");
        let n = le32(&rt, 8) as usize;
        let e = 16 + 32 * n;
        rt[e..e + 16].copy_from_slice(&guid.to_bytes_le());
        rt[e + 16..e + 24].copy_from_slice(&file_offset.to_le_bytes());
        rt[e + 24..e + 28].copy_from_slice(&length.to_le_bytes());
        rt[e + 28..e + 32].copy_from_slice(&(required as u32).to_le_bytes());
        rt[8..12].copy_from_slice(&((n + 1) as u32).to_le_bytes());
        rt[4..8].fill(0);
        let crc = crc32c::crc32c(&rt);
        rt[4..8].copy_from_slice(&crc.to_le_bytes());
        patch_file(p, table_off, &rt);
    }
}

#[test]
fn unknown_required_region_is_rejected() {
    // The same region marked not required must still open (the spec says ignore it).
    let guid = uuid::Uuid::parse_str("0f4c1c2e-5d6b-4a7f-9e8d-1234567890ab").unwrap();
    let Some((dir, optional)) = patched_copy("region", "optional-region.vhdx", |p| {
        let end = file_len(p);
        add_region(p, guid, end, MIB as u32, false);
        set_file_len(p, end + MIB);
    }) else {
        return;
    };
    let out = dir.join("out.raw");
    cat_output_option(&optional, &[], &out);
    assert_eq!(file_len(&out), 6 * MIB);

    let required = dir.join("required-region.vhdx");
    std::fs::copy(&optional, &required).unwrap();
    for table_off in [192 * KIB, 256 * KIB] {
        let mut rt = read_at(&required, table_off, 64 * KIB as usize);
        let n = le32(&rt, 8) as usize;
        let e = 16 + 32 * (n - 1);
        rt[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        rt[4..8].fill(0);
        let crc = crc32c::crc32c(&rt);
        rt[4..8].copy_from_slice(&crc.to_le_bytes());
        patch_file(&required, table_off, &rt);
    }
    assert_rejected(&required);
}

#[test]
fn unknown_required_metadata_item_is_rejected() {
    let Some((_dir, bad)) = patched_copy("bad-meta", "required-metadata.vhdx", |p| {
        let (lss_off, _) = metadata_item(p, LOGICAL_SECTOR_SIZE);
        let rt = read_at(p, 192 * KIB, 64 * KIB as usize);
        let n = le32(&rt, 8) as usize;
        let md_off = (0..n)
            .map(|i| 16 + 32 * i)
            .find(|&e| guid_at(&rt, e) == METADATA_REGION)
            .map(|e| le64(&rt, e + 16))
            .unwrap();
        let mut table = read_at(p, md_off, 64 * KIB as usize);
        let count = u16::from_le_bytes([table[10], table[11]]) as usize;
        let e = 32 + 32 * count;
        let guid = uuid::Uuid::parse_str("6a1f0c3b-8e2d-4b5a-a9c7-0d1e2f3a4b5c").unwrap();
        table[e..e + 16].copy_from_slice(&guid.to_bytes_le());
        // 8 bytes of data just past the last known item (still inside the region).
        let item_off = (lss_off - md_off) as u32 + 64;
        table[e + 16..e + 20].copy_from_slice(&item_off.to_le_bytes());
        table[e + 20..e + 24].copy_from_slice(&8u32.to_le_bytes());
        // IsVirtualDisk | IsRequired
        table[e + 24..e + 28].copy_from_slice(&6u32.to_le_bytes());
        table[10..12].copy_from_slice(&((count + 1) as u16).to_le_bytes());
        patch_file(p, md_off, &table);
    }) else {
        return;
    };
    assert_rejected(&bad);
}
