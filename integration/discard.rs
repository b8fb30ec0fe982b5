//! Discard (TRIM) through writable mounts (issue 15, part 1): `fstrim` in an ext4 guest
//! and `blkdiscard` through a loop device on `disk.raw`, `fallocate --punch-hole` and
//! `--zero-range` on `disk.raw` itself; bases and children of both formats. After a
//! discard the range reads zeros through the mount and after remounting, in vdiskfs and
//! in the judges (qemu-img for bases, 7-Zip for VHDX, libvhdi's vhdimount), all held to a
//! raw model given the same writes and discards. A read-only mount refuses with EROFS,
//! other fallocate modes get EOPNOTSUPP.
//!
//! libvhdi 20210425 reads a PAYLOAD_BLOCK_ZERO block of a differencing VHDX from the
//! parent (MS-VHDX 2.5.1.1 says reads MUST return zeros; vdiskfs, 7-Zip and qemu do).
//! Whole blocks discarded in a VHDX child are in that state, so for VHDX children
//! vhdimount's view is held to the model except in sectors where the model has zeros
//! and libvhdi shows the parent's bytes, exactly that defect.
//!
//! Needs root (loop devices), /dev/fuse, fusermount3, qemu-img, mkfs.ext4, e2fsck,
//! fstrim, blkdiscard, fallocate, vhdimount and 7zz. Without them a test prints why and
//! passes, unless VDISKFS_REQUIRE_FUSE=1, where it fails. Mounts and loop devices are
//! undone by drop guards.

mod common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// FUSE, root, loop devices, fallocate and the judges (`can_run_loops`), and `tools`.
fn can_run(tools: &[&str]) -> bool {
    can_run_loops(&[&["fallocate", "vhdimount", "7zz"], tools].concat())
}

fn create_base(img: &Path, size: &str) {
    vdiskfs([
        OsStr::new("create"),
        OsStr::new("--size"),
        OsStr::new(size),
        OsStr::new("--block-size"),
        OsStr::new("1M"),
        img.as_os_str(),
    ])
    .assert_success();
}

fn create_child(parent: &Path, child: &Path) {
    vdiskfs([
        OsStr::new("create"),
        OsStr::new("--block-size"),
        OsStr::new("1M"),
        OsStr::new("--parent"),
        parent.as_os_str(),
        child.as_os_str(),
    ])
    .assert_success();
}

/// `vdiskfs umount DIR`: returns once the daemon has flushed and closed the image.
/// Retried while busy: a detached loop device lets go of `disk.raw` asynchronously.
fn umount(m: FuseMount) {
    vdiskfs_umount(m.dir());
    assert!(!is_mounted(m.dir()), "{} still mounted", m.dir().display());
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------- judges

/// Every judge of `img` against `want` (a raw file): vdiskfs cat, qemu-img (bases),
/// 7-Zip (VHDX), vhdimount. `parent_view`: for a VHDX child, the parent chain's merged
/// view, for libvhdi's defect with zero blocks (see the top of this file).
fn judge_all(
    fmt: Fmt,
    img: &Path,
    want: &Path,
    base: bool,
    parent_view: Option<&Path>,
    t: &TempDir,
) {
    check_ok(img);
    let got = t.join("judge-cat.raw");
    cat_to_file(img, &[], &got);
    assert_same_file(&got, want, "vdiskfs cat vs the model");
    fs::remove_file(&got).unwrap();
    if base {
        let q = t.join("judge-qemu.raw");
        qemu_to_raw(fmt.qemu(), img, &q);
        assert_same_file(&q, want, "qemu-img convert -O raw vs the model");
        fs::remove_file(&q).unwrap();
    }
    if fmt == Fmt::Vhdx {
        judge_7zz(img, want);
    }
    let m = FuseMount::vhdimount(img, &t.join("vm"));
    let lv = fs::read(m.merged()).expect("read vhdimount's view");
    drop(m);
    let model = fs::read(want).unwrap();
    assert_eq!(lv.len(), model.len(), "vhdimount's size");
    match parent_view.filter(|_| fmt == Fmt::Vhdx && !base) {
        None => assert!(
            lv == model,
            "vhdimount's view of {} differs from the model at byte {:?}",
            img.display(),
            lv.iter().zip(&model).position(|(a, b)| a != b)
        ),
        Some(p) => {
            let parent = fs::read(p).unwrap();
            let mut defect = 0;
            for (s, (l, m)) in lv.chunks(512).zip(model.chunks(512)).enumerate() {
                if l == m {
                    continue;
                }
                let pp = &parent[s * 512..s * 512 + l.len()];
                assert!(
                    m.iter().all(|&b| b == 0) && l == pp,
                    "vhdimount's view of {} differs from the model in sector {s}, and not \
                     as libvhdi's zero-block defect (the model's sector is zeros: {}, \
                     libvhdi shows the parent's: {})",
                    img.display(),
                    m.iter().all(|&b| b == 0),
                    l == pp
                );
                defect += 1;
            }
            eprintln!(
                "vhdimount: {defect} sectors of zero blocks read from the parent (libvhdi's defect)"
            );
        }
    }
}

// ---------------------------------------------------------------- fstrim in ext4

fn write_random_file(path: &Path, len: usize, seed: u64) -> String {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    write_file(path, &v);
    sha256_file(path)
}

/// Blocks of 1 MiB that are all zeros in a raw file.
fn zero_blocks(raw: &Path) -> usize {
    fs::read(raw)
        .unwrap()
        .chunks(MIB as usize)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count()
}

/// The WSL case, small: files written into an ext4 guest, some deleted, `fstrim` through
/// the loop device. A base gives the space of the deleted files back to the host; a
/// child over a base that holds them reads zeros there (not the parent's data). The
/// remaining files are unchanged, e2fsck is clean, every judge agrees.
fn fstrim_case(fmt: Fmt, child: bool) {
    if !can_run(&["mkfs.ext4", "e2fsck", "fstrim"]) {
        return;
    }
    let t = TempDir::new(&format!("discard-fstrim-{}-{child}", fmt.ext()));
    let base = t.join(format!("base.{}", fmt.ext()));
    create_base(&base, "96M");
    let mnt = t.join("mnt");
    let guest = t.join("guest");
    let junk = 4usize;
    let mut sums = Vec::new();
    let trim = |lp: &Loop, top: &Path| -> (u64, u64) {
        let g = lp.guest.as_ref().unwrap();
        for i in 0..junk {
            fs::remove_file(g.join(format!("junk{i}.bin"))).unwrap();
        }
        run_ok(Command::new("sync").arg("-f").arg(g.join("keep1.bin")));
        let before = allocated(top);
        let o = run_ok(Command::new("fstrim").arg("-v").arg(g));
        eprintln!("{}", o.stdout_str().trim());
        (before, allocated(top))
    };
    {
        let m = vdiskfs_mount(&base, &mnt, false);
        let mut lp = Loop::attach(&mnt.join("disk.raw"), false);
        lp.assert_discards();
        // Inode tables zeroed by mkfs, not by the kernel's ext4lazyinit thread at a
        // random moment (0 to 5 s) after a read-write mount: that thread's zeroing would
        // otherwise land, or not, between the allocation measurements around fstrim
        // (in the child, its zeros over the parent's data take space).
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0"])
                .arg(&lp.dev),
        );
        lp.mount(&guest, false);
        sums.push((
            "keep1.bin",
            write_random_file(&guest.join("keep1.bin"), 3_000_000, 1),
        ));
        fs::write(guest.join("keep2.txt"), b"keep me\n").unwrap();
        for i in 0..junk {
            write_random_file(&guest.join(format!("junk{i}.bin")), 10 << 20, 10 + i as u64);
        }
        sums.push((
            "keep3.bin",
            write_random_file(&guest.join("keep3.bin"), 700_000, 2),
        ));
        run_ok(Command::new("sync").arg("-f").arg(guest.join("keep1.bin")));
        if !child {
            let (before, after) = trim(&lp, &base);
            eprintln!("{}: allocated {before} -> {after} bytes", fmt.ext());
            assert!(
                before - after >= 30 * MIB,
                "fstrim gave back {} bytes of the 40 MiB deleted ({before} -> {after})",
                before.saturating_sub(after)
            );
        }
        lp.finish();
        umount(m);
    }
    let base_view = t.join("base-view.raw");
    cat_to_file(&base, &[], &base_view);
    let top = if child {
        let c = t.join(format!("child.{}", fmt.ext()));
        create_child(&base, &c);
        let base_sha = sha256_file(&base);
        let m = vdiskfs_mount(&c, &mnt, false);
        let mut lp = Loop::attach(&mnt.join("disk.raw"), false);
        lp.assert_discards();
        lp.mount(&guest, false);
        let (before, after) = trim(&lp, &c);
        eprintln!("{} child: allocated {before} -> {after} bytes", fmt.ext());
        // Zero blocks (VHDX) and bitmaps over holes (VHD) cost next to no space.
        assert!(
            after <= before + 4 * MIB,
            "trimming in the child took {} bytes of host space",
            after.saturating_sub(before)
        );
        lp.finish();
        umount(m);
        assert_eq!(sha256_file(&base), base_sha, "the base changed");
        c
    } else {
        base.clone()
    };
    let merged = t.join("merged.raw");
    cat_to_file(&top, &[], &merged);
    if child {
        let (zb, zc) = (zero_blocks(&base_view), zero_blocks(&merged));
        assert!(
            zc >= zb + 30,
            "the child reads zeros where the deleted files were ({zb} zero blocks in the base, {zc} in the child)"
        );
    }
    assert_e2fsck_clean(&merged);
    // Remount read-only: the remaining files are unchanged, the deleted ones gone.
    {
        let m = vdiskfs_mount(&top, &mnt, true);
        let mut lp = Loop::attach(&mnt.join("disk.raw"), true);
        lp.mount(&guest, true);
        for (name, sum) in &sums {
            assert_eq!(&sha256_file(&guest.join(name)), sum, "{name} changed");
        }
        assert_eq!(fs::read(guest.join("keep2.txt")).unwrap(), b"keep me\n");
        assert!(!guest.join("junk0.bin").exists());
        lp.finish();
        umount(m);
    }
    judge_all(fmt, &top, &merged, !child, Some(&base_view), &t);
}

#[test]
fn fstrim_in_ext4_vhdx_base() {
    fstrim_case(Fmt::Vhdx, false);
}

#[test]
fn fstrim_in_ext4_vhdx_child() {
    fstrim_case(Fmt::Vhdx, true);
}

#[test]
fn fstrim_in_ext4_vhd_base() {
    fstrim_case(Fmt::Vhd, false);
}

#[test]
fn fstrim_in_ext4_vhd_child() {
    fstrim_case(Fmt::Vhd, true);
}

// ---------------------------------------------------------------- against a model

fn fallocate_cmd(args: &[&str], file: &Path) {
    run_ok(Command::new("fallocate").args(args).arg(file));
}

/// Writes and discards through a loop device (`blkdiscard`: whole blocks and parts of
/// blocks) and on `disk.raw` itself (`fallocate --punch-hole` and `--zero-range`,
/// unaligned, up to the disk's last byte), then writes into discarded blocks; the same
/// on a raw model. Checked through the mount before unmounting, then by every judge. In
/// a base, the new blocks take the slots discards freed: the file does not grow.
fn model_case(fmt: Fmt, child: bool) {
    if !can_run(&["blkdiscard"]) {
        return;
    }
    let t = TempDir::new(&format!("discard-model-{}-{child}", fmt.ext()));
    let size = 24 * MIB;
    let base = t.join(format!("base.{}", fmt.ext()));
    create_base(&base, "24M");
    let mnt = t.join("mnt");
    let mut model = vec![0u8; size as usize];
    Rng::new(99).fill(&mut model);
    let fill = |img: &Path, data: &[u8]| {
        let m = vdiskfs_mount(img, &mnt, false);
        let f = OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        f.write_all_at(data, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        umount(m);
    };
    fill(&base, &model);
    let base_view = t.join("base-view.raw");
    write_file(&base_view, &model);
    let top = if child {
        let c = t.join(format!("child.{}", fmt.ext()));
        create_child(&base, &c);
        c
    } else {
        base.clone()
    };
    let base_sha = sha256_file(&base);
    let zero = |m: &mut Vec<u8>, off: u64, len: u64| {
        let end = (off + len).min(size);
        m[off as usize..end as usize].fill(0);
    };
    let m = vdiskfs_mount(&top, &mnt, false);
    let disk = mnt.join("disk.raw");
    {
        let lp = Loop::attach(&disk, false);
        lp.assert_discards();
        let dev = Path::new(&lp.dev);
        // Whole blocks 2..5, part of block 8 (4 KiB aligned: the loop's granularity).
        run_ok(
            Command::new("blkdiscard")
                .args(["-o", "2097152", "-l", "3145728"])
                .arg(dev),
        );
        run_ok(
            Command::new("blkdiscard")
                .args(["-o", "8392704", "-l", "65536"])
                .arg(dev),
        );
        // Write zeroes (the loop device turns it into FALLOC_FL_ZERO_RANGE): block 6.
        run_ok(
            Command::new("blkdiscard")
                .args(["-z", "-o", "6291456", "-l", "1048576"])
                .arg(dev),
        );
        lp.finish();
    }
    zero(&mut model, 2 * MIB, 3 * MIB);
    zero(&mut model, 8 * MIB + 4096, 65536);
    zero(&mut model, 6 * MIB, MIB);
    // On the file: unaligned punches (part of block 10, block 11, part of 12), zero
    // ranges with and without KEEP_SIZE, the disk's last bytes.
    fallocate_cmd(&["-p", "-o", "10485860", "-l", "2621440"], &disk);
    zero(&mut model, 10 * MIB + 100, 2621440);
    fallocate_cmd(&["-z", "-o", "14680064", "-l", "1048576"], &disk);
    zero(&mut model, 14 * MIB, MIB);
    fallocate_cmd(&["-z", "-n", "-o", "15729153", "-l", "9000"], &disk);
    zero(&mut model, 15 * MIB + 513, 9000);
    fallocate_cmd(
        &["-p", "-o", &(size - 3000).to_string(), "-l", "10000"],
        &disk,
    );
    zero(&mut model, size - 3000, 3000);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    f.sync_all().unwrap();
    let len_before = fs::metadata(&top).unwrap().len();
    // Writes into discarded blocks (in a base: new blocks, in the freed slots).
    let mut rng = Rng::new(5);
    for off in [2 * MIB + 512, 3 * MIB + 8192, 4 * MIB, 11 * MIB + 77] {
        let mut d = vec![0u8; 20_000];
        rng.fill(&mut d);
        f.write_all_at(&d, off).unwrap();
        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    f.sync_all().unwrap();
    // Through the mount, before unmounting.
    let mut seen = vec![0u8; size as usize];
    f.read_exact_at(&mut seen, 0).unwrap();
    assert!(seen == model, "the mount's view differs from the model");
    drop(f);
    umount(m);
    if !child {
        let len_after = fs::metadata(&top).unwrap().len();
        assert!(
            len_after <= len_before,
            "new blocks took freed slots: the base grew from {len_before} to {len_after} bytes"
        );
    }
    if child {
        assert_eq!(sha256_file(&base), base_sha, "the parent changed");
    }
    let want = t.join("model.raw");
    write_file(&want, &model);
    judge_all(fmt, &top, &want, !child, Some(&base_view), &t);
}

#[test]
fn discards_against_a_model_vhdx_base() {
    model_case(Fmt::Vhdx, false);
}

#[test]
fn discards_against_a_model_vhdx_child() {
    model_case(Fmt::Vhdx, true);
}

#[test]
fn discards_against_a_model_vhd_base() {
    model_case(Fmt::Vhd, false);
}

#[test]
fn discards_against_a_model_vhd_child() {
    model_case(Fmt::Vhd, true);
}

// ---------------------------------------------------------------- refusals

/// A read-only mount refuses discards (EROFS); a writable one refuses other fallocate
/// modes (EOPNOTSUPP). Neither changes the image.
#[test]
fn read_only_mounts_and_other_modes_are_refused() {
    if !can_run(&[]) {
        return;
    }
    let t = TempDir::new("discard-refused");
    let img = t.join("base.vhdx");
    create_base(&img, "8M");
    let mnt = t.join("mnt");
    {
        let m = vdiskfs_mount(&img, &mnt, false);
        let f = OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"))
            .unwrap();
        f.write_all_at(&[0x5a; 65536], MIB).unwrap();
        drop(f);
        umount(m);
    }
    let sha = sha256_file(&img);
    let fails_with = |args: &[&str], file: &Path, errno: i32| {
        let o = run(Command::new("fallocate").args(args).arg(file));
        let msg = std::io::Error::from_raw_os_error(errno).to_string();
        let msg = msg.split(" (os error").next().unwrap().to_string();
        assert!(
            !o.success() && o.stderr.contains(&msg),
            "`{}`: expected {msg:?}, got {} {}",
            o.cmd,
            o.status,
            o.stderr
        );
    };
    let m = vdiskfs_mount(&img, &mnt, true);
    let disk = mnt.join("disk.raw");
    fails_with(&["-p", "-o", "1048576", "-l", "4096"], &disk, libc::EROFS);
    fails_with(&["-z", "-o", "1048576", "-l", "4096"], &disk, libc::EROFS);
    umount(m);
    let m = vdiskfs_mount(&img, &mnt, false);
    let disk = mnt.join("disk.raw");
    fails_with(
        &["-c", "-o", "1048576", "-l", "1048576"],
        &disk,
        libc::EOPNOTSUPP,
    );
    fails_with(
        &["-i", "-o", "1048576", "-l", "1048576"],
        &disk,
        libc::EOPNOTSUPP,
    );
    fails_with(&["-o", "0", "-l", "4096"], &disk, libc::EOPNOTSUPP);
    umount(m);
    assert_eq!(
        sha256_file(&img),
        sha,
        "a refused request changed the image"
    );
}
