//! Real third-party images from ../shared/fixtures (see its README): the merged views
//! have known sha256 digests, libvhdi's `vhdimount` is an independent second reader,
//! and a Windows-made differencing VHD whose parent is missing must be refused
//! clearly (issue 3).
//!
//! The fixtures are copied to a temporary directory first (parents are found beside
//! the child, and nothing may touch the originals).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const EXT2_SHA256: &str = "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99";
const IMAGE_SHA256: &str = "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25";

/// ../shared/fixtures relative to the repository (or $VDISKFS_FIXTURES). This file
/// tests nothing else, so it fails when they are missing, even without
/// VDISKFS_REQUIRE_FUSE.
fn fixtures_dir() -> PathBuf {
    common::fixtures_dir().expect(
        "fixtures not found: expected ../shared/fixtures beside the repository \
         (or set VDISKFS_FIXTURES)",
    )
}

/// A private, writable copy of all fixtures.
fn fixture_copy(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    copy_dir_files(&fixtures_dir(), dir.path());
    dir
}

/// `vdiskfs cat` of `img` (piped, and with --output) has sha256 `want`; when FUSE and
/// vhdimount are available, vhdimount's merged view is identical.
fn check_merged(dir: &TempDir, name: &str, want: &str) {
    let img = dir.join(name);
    assert_eq!(
        cat_sha256(&img, &[]),
        want,
        "vdiskfs cat {name} | sha256sum"
    );
    let out = dir.join(format!("{name}.cat.raw"));
    cat_output_option(&img, &[], &out);
    assert_eq!(sha256_file(&out), want, "vdiskfs cat --output for {name}");

    if require_tool("vhdimount") && require_fuse() {
        let mnt = dir.join(format!("{name}.mnt"));
        let m = FuseMount::vhdimount(&img, &mnt);
        let exposed = m.merged();
        assert_same_file(
            &out,
            &exposed,
            &format!("vdiskfs cat vs vhdimount for {name}"),
        );
        drop(m);
        assert!(!is_mounted(&mnt), "{} still mounted", mnt.display());
    }
}

#[test]
fn ext2_vhd() {
    let dir = fixture_copy("fx-ext2");
    check_merged(&dir, "ext2.vhd", EXT2_SHA256);
    let v = info_json(&dir.join("ext2.vhd"), &[]);
    let l = &info_layers(&v)[0];
    assert_eq!(json_str(l, "format"), "VHD");
    assert_eq!(json_str(l, "disk_type"), "dynamic");
    assert_eq!(json_u64(l, "virtual_size"), 4_212_736);
    assert_eq!(json_u64(l, "block_size"), 2 * 1024 * 1024);
    assert_eq!(json_u64(l, "total_blocks"), 3);
    assert_eq!(json_u64(l, "allocated_blocks"), 1);
}

#[test]
fn image_vhd_with_bad_footer_checksum_reads() {
    // Its footer checksum does not match: a warning for read-only use, as libvhdi does.
    let dir = fixture_copy("fx-image");
    check_merged(&dir, "image.vhd", IMAGE_SHA256);
    let v = info_json(&dir.join("image.vhd"), &[]);
    assert_eq!(json_u64(&info_layers(&v)[0], "virtual_size"), 104_448);
}

#[test]
fn image_differential_vhd_chain() {
    let dir = fixture_copy("fx-image-diff");
    check_merged(&dir, "image-differential.vhd", IMAGE_SHA256);

    let v = info_json(&dir.join("image-differential.vhd"), &[]);
    let layers = info_layers(&v);
    assert_eq!(layers.len(), 2, "child and its parent: {v}");
    let (top, base) = (&layers[0], &layers[1]);
    assert_eq!(json_str(top, "format"), "VHD");
    assert_eq!(json_str(top, "disk_type"), "differencing");
    assert_eq!(top.get("has_parent"), Some(&Value::Bool(true)), "{top}");
    assert!(
        json_str(top, "path").ends_with("image-differential.vhd"),
        "{top}"
    );
    assert_eq!(json_str(base, "format"), "VHD");
    assert_eq!(base.get("has_parent"), Some(&Value::Bool(false)), "{base}");
    let base_path = Path::new(json_str(base, "path"));
    assert_eq!(
        std::fs::canonicalize(base_path).unwrap(),
        std::fs::canonicalize(dir.join("image.vhd")).unwrap(),
        "the parent found must be the copy beside the child"
    );
    let found = base
        .get("found_by")
        .filter(|f| f.is_object())
        .unwrap_or_else(|| panic!("the parent layer must say how it was found: {base}"));
    assert!(
        json_str(found, "recorded").contains("image.vhd"),
        "found_by.recorded: {found}"
    );
    for l in layers {
        assert_eq!(json_u64(l, "virtual_size"), 104_448, "{l}");
    }

    // The human-readable form works too.
    let o = vdiskfs([
        "info".as_ref(),
        dir.join("image-differential.vhd").as_os_str(),
    ]);
    o.assert_success();
    assert!(o.stdout_str().contains("image.vhd"), "{}", o.stdout_str());
}

#[test]
fn image_differential_parent_elsewhere() {
    // The parent moved to another directory: not found by the locators, found with
    // --search-dir (by file name), and with --parent under any name.
    let dir = fixture_copy("fx-image-diff-parent");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let moved = elsewhere.join("image.vhd");
    std::fs::rename(dir.join("image.vhd"), &moved).unwrap();
    let child = dir.join("image-differential.vhd");

    let o = vdiskfs(["cat".as_ref(), child.as_os_str()]);
    // This fixture's checksums do not match: warnings may precede the error.
    assert_failure_after_warnings(&o, &child);
    assert!(o.stderr.contains("parent not found"), "{}", o.stderr);

    let got = cat_sha256(&child, &["--search-dir", elsewhere.to_str().unwrap()]);
    assert_eq!(got, IMAGE_SHA256, "cat --search-dir");

    let renamed = elsewhere.join("renamed-parent.vhd");
    std::fs::rename(&moved, &renamed).unwrap();
    let got = cat_sha256(&child, &["--parent", renamed.to_str().unwrap()]);
    assert_eq!(got, IMAGE_SHA256, "cat --parent");
}

#[test]
fn fat_differential_parent_missing() {
    let dir = fixture_copy("fx-fat-missing");
    let img = dir.join("fat-differential.vhd");
    for args in [
        vec!["cat".as_ref(), img.as_os_str()],
        vec!["info".as_ref(), img.as_os_str()],
    ] {
        let o = vdiskfs(&args);
        assert_clean_failure(&o, &img);
        assert!(
            o.stderr.contains("parent not found"),
            "`{}` must say \"parent not found\": {}",
            o.cmd,
            o.stderr
        );
        assert!(
            o.stderr.contains("fat-parent.vhd"),
            "`{}` must list the paths tried (fat-parent.vhd): {}",
            o.cmd,
            o.stderr
        );
        assert!(
            o.stderr.contains("Projects"),
            "`{}` must list the absolute Windows path it tried \
             (C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd): {}",
            o.cmd,
            o.stderr
        );
        assert!(o.stdout.is_empty(), "`{}` wrote to stdout", o.cmd);
    }
}

/// `vdiskfs cat --parent PARENT fat-differential.vhd` must fail the linkage check
/// and point at --ignore-linkage.
fn assert_linkage_refused(img: &Path, parent: &Path) {
    let o = vdiskfs([
        "cat".as_ref(),
        "--parent".as_ref(),
        parent.as_os_str(),
        img.as_os_str(),
    ]);
    assert_failure_after_warnings(&o, img);
    assert!(
        o.stderr.contains("--ignore-linkage"),
        "a linkage failure must point at --ignore-linkage: {}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "`{}` wrote to stdout", o.cmd);
}

#[test]
fn fat_differential_raw_zeros_parent_fails_linkage() {
    // A raw file has no unique id, so it cannot match the parent id the child
    // recorded: refused unless --ignore-linkage.
    let dir = fixture_copy("fx-fat-linkage-raw");
    let img = dir.join("fat-differential.vhd");
    let zeros = dir.join("zeros.raw");
    make_sparse(&zeros, 4 * 1024 * 1024);
    assert_linkage_refused(&img, &zeros);
}

#[test]
fn fat_differential_wrong_vhd_parent_fails_linkage() {
    // A VHD of the right size whose unique id is not the recorded one.
    if !require_tool("qemu-img") {
        return;
    }
    let dir = fixture_copy("fx-fat-linkage-vhd");
    let img = dir.join("fat-differential.vhd");
    let wrong = dir.join("fat-parent.vhd");
    qemu_create("vpc", "subformat=dynamic,force_size=on", &wrong, "4M");
    assert_linkage_refused(&img, &wrong);
    // Found by name beside the child, it is just as wrong.
    let o = vdiskfs(["cat".as_ref(), img.as_os_str()]);
    assert_failure_after_warnings(&o, &img);
    assert!(o.stderr.contains("--ignore-linkage"), "{}", o.stderr);
}

#[test]
fn fat_differential_ignore_linkage_reads() {
    let dir = fixture_copy("fx-fat-ignore");
    let img = dir.join("fat-differential.vhd");
    let zeros = dir.join("zeros.raw");
    make_sparse(&zeros, 4 * 1024 * 1024);
    let out = dir.join("out.raw");
    let o = vdiskfs([
        "cat".as_ref(),
        "--parent".as_ref(),
        zeros.as_os_str(),
        "--ignore-linkage".as_ref(),
        "--output".as_ref(),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    o.assert_success();
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    assert_eq!(
        file_len(&out),
        4 * 1024 * 1024,
        "merged view of a 4 MiB disk"
    );

    let v = info_json(
        &img,
        &["--parent", zeros.to_str().unwrap(), "--ignore-linkage"],
    );
    let layers = info_layers(&v);
    assert_eq!(layers.len(), 2, "{v}");
    assert_eq!(json_str(&layers[0], "disk_type"), "differencing");
    assert_eq!(json_str(&layers[1], "format"), "raw");
    assert_eq!(json_u64(&layers[0], "virtual_size"), 4 * 1024 * 1024);

    // What the child holds comes from the child; the rest is the parent's zeros.
    // Where the child does not hold a sector, the merged view must be zero; a raw
    // parent of random bytes shows which sectors those are.
    let noise = dir.join("noise.raw");
    make_random(&noise, 4 * 1024 * 1024, 99);
    let out2 = dir.join("out2.raw");
    vdiskfs([
        "cat".as_ref(),
        "--parent".as_ref(),
        noise.as_os_str(),
        "--ignore-linkage".as_ref(),
        "--output".as_ref(),
        out2.as_os_str(),
        img.as_os_str(),
    ])
    .assert_success();
    let (a, b, n) = (
        std::fs::read(&out).unwrap(),
        std::fs::read(&out2).unwrap(),
        std::fs::read(&noise).unwrap(),
    );
    let mut child_sectors = 0;
    for s in 0..a.len() / 512 {
        let r = s * 512..(s + 1) * 512;
        if b[r.clone()] == n[r.clone()] && a[r.clone()].iter().all(|&x| x == 0) {
            continue; // from the parent in both runs
        }
        assert_eq!(
            a[r.clone()],
            b[r.clone()],
            "sector {s}: the child's data must not depend on the parent"
        );
        child_sectors += 1;
    }
    assert!(child_sectors > 0, "the child holds some sectors of its own");
}
