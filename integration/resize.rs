//! `vdiskfs resize` (issue 16 part 2), through the binary, judged by qemu-img (bases),
//! 7-Zip (VHDX) and libvhdi's vhdimount (both formats).
//!
//! - every type (fixed, dynamic, differencing) of both formats grown by an odd and an
//!   even number of sectors (and VHD dynamic far enough that its BAT must move; VHDX past
//!   128 GiB so its BAT region must move, then shrunk back): content below the old size
//!   unchanged, the new space zeros, `check` clean, judges agree;
//! - shrink refused while data (any layer) or a guest partition lies past the new end,
//!   naming the smallest size allowed; `--force` skips only the partition check; a VHD
//!   shrink is refused; refusals change no byte;
//! - a GPT guest's partition grown afterwards with sgdisk + resize2fs through a writable
//!   mount;
//! - SIGKILL at random moments of a resize: `check` clean, the old or the new size, data
//!   intact. VDISKFS_RESIZE_KILLS: kills per format (default 10; run 50+ by hand).

mod common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn vd(args: &[&OsStr]) -> Out {
    vdiskfs(args)
}

fn resize(img: &Path, size: &str, extra: &[&str]) -> Out {
    let mut a: Vec<&OsStr> = vec![OsStr::new("resize")];
    a.extend(extra.iter().map(OsStr::new));
    a.push(img.as_os_str());
    a.push(OsStr::new(size));
    vd(&a)
}

fn check_clean(img: &Path) {
    let o = vd(&[OsStr::new("check"), img.as_os_str()]);
    assert!(
        o.success(),
        "`{}` reports problems: {}{}",
        o.cmd,
        o.stdout_str(),
        o.stderr
    );
}

fn virtual_size(img: &Path) -> u64 {
    let v = info_json(img, &[]);
    json_u64(&info_layers(&v)[0], "virtual_size")
}

/// `vdiskfs cat IMG` must equal the file `model`.
fn assert_view(d: &TempDir, img: &Path, model: &Path, what: &str) {
    let got = d.join("view.raw");
    cat_to_file(img, &[], &got);
    assert_same_file(&got, model, what);
    fs::remove_file(&got).unwrap();
}

/// The first `n` bytes of `vdiskfs cat IMG` must equal `model` followed by zeros.
fn assert_prefix(img: &Path, model: &Path, n: u64, what: &str) {
    use std::io::Read;
    let mut child = Command::new(bin())
        .arg("cat")
        .arg(img)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = vec![0u8; n as usize];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: reading {n} bytes of `vdiskfs cat`: {e}"));
    let _ = child.kill();
    let _ = child.wait();
    let mut want = fs::read(model).unwrap();
    want.resize(n as usize, 0);
    if got != want {
        let at = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} differs from the model at byte {at:?}",
            img.display()
        );
    }
}

/// Grow the model file with zeros.
fn grow_model(model: &Path, size: u64) {
    let f = OpenOptions::new().write(true).open(model).unwrap();
    f.set_len(size).unwrap();
}

/// Write random bytes into the top of `img` through a writable mount, and into `model`.
fn write_through_mount(d: &TempDir, img: &Path, model: &Path, writes: &[(u64, u64)], seed: u64) {
    let mnt = d.dir("mnt");
    let _m = vdiskfs_mount(img, &mnt, false);
    let f = OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .unwrap();
    let mf = OpenOptions::new().write(true).open(model).unwrap();
    let mut rng = Rng::new(seed);
    for &(off, len) in writes {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
        mf.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    vdiskfs_umount(&mnt);
}

/// A base of `size` bytes of random data, as `kind` ("fixed"/"dynamic") `ext`, made by
/// `vdiskfs convert` from the model (1 MiB blocks).
fn make_base(d: &TempDir, ext: &str, kind: &str, size: u64, seed: u64) -> (PathBuf, PathBuf) {
    let model = d.join("model.raw");
    // Data everywhere except a hole in the middle (a dynamic base leaves it unallocated).
    filled_raw(&model, size, seed, &[(3 * MIB, 2 * MIB)]);
    let img = d.join(format!("base.{ext}"));
    let words = ["convert", "-f", "raw", "--type", kind, "--block-size", "1M"];
    let mut a: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
    a.push(model.as_os_str());
    a.push(img.as_os_str());
    vd(&a).assert_success();
    (img, model)
}

/// The judges' merged views must equal `model`. `parent_size`: for a grown
/// differencing disk, libvhdi and 7-Zip read only up to the parent's end (past it
/// vhdimount fails with EIO and 7-Zip with "Unexpected end of data": they do not know
/// children larger than their parents), so only that much is judged.
fn judges_agree(d: &TempDir, img: &Path, model: &Path, parent_size: Option<u64>, ext: &str) {
    let prefix = |data: &[u8], what: &str| {
        let n = parent_size.unwrap_or(u64::MAX).min(data.len() as u64) as usize;
        let want = fs::read(model).unwrap();
        if parent_size.is_none() {
            assert_eq!(data.len(), want.len(), "{what}: length");
        }
        if data[..n] != want[..n] {
            let at = data.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "{what} of {} differs from the model at {at:?}",
                img.display()
            );
        }
    };
    if parent_size.is_none() {
        let q = d.join("qemu.raw");
        let fmt = if ext == "vhdx" { "vhdx" } else { "vpc" };
        qemu_img_os([
            OsStr::new("convert"),
            OsStr::new("--image-opts"),
            OsStr::new(&qemu_image_opts(fmt, img)),
            OsStr::new("-O"),
            OsStr::new("raw"),
            q.as_os_str(),
        ]);
        assert_same_file(&q, model, &format!("qemu-img's view of {}", img.display()));
        fs::remove_file(&q).unwrap();
    }
    if ext == "vhdx" {
        if parent_size.is_none() {
            judge_7zz(img, model);
        } else {
            let o = Command::new("7zz")
                .args(["x", "-tvhdx", "-so"])
                .arg(img)
                .stderr(Stdio::null())
                .output()
                .unwrap();
            prefix(&o.stdout, "7-Zip's view");
        }
    }
    let mnt = d.dir("vhdi");
    let m = FuseMount::vhdimount(img, &mnt);
    let got = d.join("vhdi.raw");
    // Large reads (libvhdi's small-read defect on some VHD children).
    let mut dd = Command::new("dd");
    dd.arg(format!("if={}", m.merged().display()))
        .arg(format!("of={}", got.display()))
        .args(["bs=1M", "status=none"]);
    if let Some(n) = parent_size {
        dd.arg(format!("count={}", n / MIB));
    }
    let st = dd.status().unwrap();
    assert!(st.success() || parent_size.is_some());
    drop(m);
    prefix(&fs::read(&got).unwrap(), "vhdimount's view");
    fs::remove_file(&got).unwrap();
}

fn grow_case(ext: &str, kind: &str) {
    let d = TempDir::new(&format!("resize-grow-{ext}-{kind}"));
    // An odd number of sectors, so the last block is partial.
    let size = 10 * MIB + 3 * 512;
    let (base, model) = make_base(
        &d,
        ext,
        if kind == "fixed" { "fixed" } else { "dynamic" },
        size,
        7,
    );
    let img = if kind == "differencing" {
        let child = d.join(format!("child.{ext}"));
        vd(&[
            OsStr::new("create"),
            OsStr::new("--parent"),
            base.as_os_str(),
            child.as_os_str(),
        ])
        .assert_success();
        // Whole 4 KiB pieces (libvhdi reads partly set VHD bitmap bytes wrongly); one
        // at the very end.
        write_through_mount(
            &d,
            &child,
            &model,
            &[
                (0, 4096),
                (MIB + 8192, 64 << 10),
                (size - 4096 - 1536, 4096),
            ],
            11,
        );
        child
    } else {
        base.clone()
    };
    let parent_size = (kind == "differencing").then_some(size / MIB * MIB);
    let mut cur = size;
    // Odd (6145 sectors), then even (4096 sectors) amounts.
    for add in [3 * MIB + 512, 2 * MIB] {
        let o = resize(&img, &format!("+{add}"), &[]);
        o.assert_success();
        cur += add;
        grow_model(&model, cur);
        assert_eq!(virtual_size(&img), cur, "{}", o.stdout_str());
        check_clean(&img);
        assert_view(&d, &img, &model, &format!("{ext} {kind} grown to {cur}"));
    }
    if ext == "vhd" && kind == "dynamic" {
        // 1 MiB blocks: the BAT's sectors hold 128 entries; 140 MiB needs 140.
        let o = resize(&img, "140M", &[]);
        o.assert_success();
        assert!(o.stdout_str().contains("BAT moved"), "{}", o.stdout_str());
        cur = 140 * MIB;
        grow_model(&model, cur);
        check_clean(&img);
        assert_view(&d, &img, &model, "vhd dynamic grown past its BAT");
    }
    judges_agree(&d, &img, &model, parent_size, ext);
    if ext == "vhdx" && kind != "fixed" {
        // At 300 GiB a 1 MiB BAT region is too small (1 MiB blocks, or 2 MiB blocks with sector bitmap entries): it moves. Then
        // back (nothing lies past the old end), and the view is what it was.
        let o = resize(&img, "300G", &[]);
        o.assert_success();
        assert!(o.stdout_str().contains("BAT moved"), "{}", o.stdout_str());
        assert_eq!(virtual_size(&img), 300 << 30);
        check_clean(&img);
        resize(&img, &cur.to_string(), &[]).assert_success();
        check_clean(&img);
        assert_view(&d, &img, &model, "vhdx grown to 300 GiB and shrunk back");
        judges_agree(&d, &img, &model, parent_size, ext);
    }
}

#[test]
fn grow_every_type_in_both_formats() {
    if !require_tools(&["qemu-img", "7zz", "vhdimount"]) || !require_fuse() {
        return;
    }
    for ext in ["vhdx", "vhd"] {
        for kind in ["fixed", "dynamic", "differencing"] {
            grow_case(ext, kind);
        }
    }
}

/// A 64 MiB raw disk with an MBR partition (sectors 2048.., 40 MiB) and data at `data`.
fn mbr_raw(path: &Path, data: (u64, u64)) {
    sparse_raw(path, 64 * MIB, 3, &[data]);
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((40 * MIB / 512) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    patch_file(path, 0, &mbr);
}

#[test]
fn shrink_only_when_nothing_lies_past_the_new_end() {
    let d = TempDir::new("resize-shrink");
    let part_end = MIB + 40 * MIB;
    for (ext, child) in [("vhdx", false), ("vhdx", true)] {
        let raw = d.join("disk.raw");
        let _ = fs::remove_file(&raw);
        // Data at 50 MiB + 100 .. 51 MiB - 100 (not sector aligned).
        mbr_raw(&raw, (50 * MIB + 100, MIB - 200));
        let base = d.join(format!("s-base-{child}.{ext}"));
        let mut a: Vec<&OsStr> = ["convert", "-f", "raw", "--block-size", "1M"]
            .iter()
            .map(OsStr::new)
            .collect();
        a.push(raw.as_os_str());
        a.push(base.as_os_str());
        vd(&a).assert_success();
        let img = if child {
            let c = d.join(format!("s-child.{ext}"));
            vd(&[
                OsStr::new("create"),
                OsStr::new("--parent"),
                base.as_os_str(),
                c.as_os_str(),
            ])
            .assert_success();
            c
        } else {
            base.clone()
        };
        let before = (sha256_file(&img), sha256_file(&base));
        let data_min = (51 * MIB - 100).next_multiple_of(512);
        // Data past the end: refused even with --force, naming the minimum.
        for extra in [&[][..], &["--force"][..]] {
            let o = resize(&img, "32M", extra);
            assert!(!o.success(), "shrink over data succeeded");
            assert!(
                o.stderr
                    .contains(&format!("smallest size allowed is {data_min} bytes")),
                "{}",
                o.stderr
            );
            assert_clean_failure(&o, &img);
        }
        // Just below the data's end: refused; the dry run too.
        let o = resize(&img, &(data_min - 512).to_string(), &["--dry-run"]);
        assert!(!o.success());
        assert_eq!((sha256_file(&img), sha256_file(&base)), before);
        // At the minimum: fine. The content is the first data_min bytes.
        resize(&img, &data_min.to_string(), &[]).assert_success();
        assert_eq!(virtual_size(&img), data_min);
        check_clean(&img);
        let model = d.join("model.raw");
        fs::copy(&raw, &model).unwrap();
        grow_model(&model, data_min);
        assert_view(&d, &img, &model, "shrunk to the data's end");

        // Now clear the data (write zeros through the library path: a fresh image
        // without it) and test the partition rule on a disk without data past 32 MiB.
        let raw2 = d.join("disk2.raw");
        let _ = fs::remove_file(&raw2);
        mbr_raw(&raw2, (20 * MIB, MIB));
        let img2 = d.join(format!("p-{child}.{ext}"));
        let mut a: Vec<&OsStr> = ["convert", "-f", "raw", "--block-size", "1M"]
            .iter()
            .map(OsStr::new)
            .collect();
        a.push(raw2.as_os_str());
        a.push(img2.as_os_str());
        vd(&a).assert_success();
        let before = sha256_file(&img2);
        let o = resize(&img2, "32M", &[]);
        assert!(!o.success());
        assert!(o.stderr.contains("partition 1"), "{}", o.stderr);
        assert!(
            o.stderr
                .contains(&format!("smallest size allowed is {part_end} bytes")),
            "{}",
            o.stderr
        );
        assert_clean_failure(&o, &img2);
        assert_eq!(sha256_file(&img2), before);
        // --force skips the partition check only.
        resize(&img2, "32M", &["--force"]).assert_success();
        check_clean(&img2);
        let model2 = d.join("model2.raw");
        fs::copy(&raw2, &model2).unwrap();
        grow_model(&model2, 32 * MIB);
        assert_view(&d, &img2, &model2, "shrunk with --force past a partition");
        fs::remove_file(&img2).unwrap();
    }
    // A VHD is never shrunk.
    let raw = d.join("v.raw");
    sparse_raw(&raw, 8 * MIB, 1, &[(0, 4096)]);
    let vhd = d.join("v.vhd");
    let mut a: Vec<&OsStr> = vec![OsStr::new("convert"), OsStr::new("-f"), OsStr::new("raw")];
    a.push(raw.as_os_str());
    a.push(vhd.as_os_str());
    vd(&a).assert_success();
    let before = sha256_file(&vhd);
    let o = resize(&vhd, "4M", &[]);
    assert!(!o.success());
    assert!(o.stderr.contains("cannot be shrunk"), "{}", o.stderr);
    assert_clean_failure(&o, &vhd);
    assert_eq!(sha256_file(&vhd), before);
}

fn sh(cmd: &mut Command) -> Out {
    let o = run(cmd);
    assert!(
        o.success(),
        "`{}` failed: {}{}",
        o.cmd,
        o.stdout_str(),
        o.stderr
    );
    o
}

#[test]
fn grown_gpt_partition_extended_with_sgdisk_and_resize2fs() {
    if !require_tools(&["sgdisk", "mkfs.ext4", "resize2fs", "e2fsck", "debugfs"]) || !require_fuse()
    {
        return;
    }
    for ext in ["vhdx", "vhd"] {
        let d = TempDir::new(&format!("resize-gpt-{ext}"));
        let img = d.join(format!("g.{ext}"));
        vd(&[
            OsStr::new("create"),
            OsStr::new("--size"),
            OsStr::new("48M"),
            img.as_os_str(),
        ])
        .assert_success();
        let payload = d.join("payload.bin");
        make_random(&payload, 300_000, 9);
        let mnt = d.dir("m");
        {
            let _m = vdiskfs_mount(&img, &mnt, false);
            let raw = mnt.join("disk.raw");
            sh(Command::new("sgdisk")
                .args(["-n", "1:2048:0", "-t", "1:8300"])
                .arg(&raw));
            sh(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(mnt.join("p1")));
            sh(Command::new("debugfs")
                .args(["-w", "-R"])
                .arg(format!("write {} payload", payload.display()))
                .arg(mnt.join("p1")));
            vdiskfs_umount(&mnt);
        }
        resize(&img, "+40M", &[]).assert_success();
        check_clean(&img);
        {
            let _m = vdiskfs_mount(&img, &mnt, false);
            let raw = mnt.join("disk.raw");
            // docs/usage.md's recipe: the backup GPT to the new end, then partition 1
            // recreated with the same start, type and GUID, to the end.
            let guid_before = sh(Command::new("sgdisk").args(["-i", "1"]).arg(&raw)).stdout_str();
            sh(Command::new("sh").current_dir(&mnt).arg("-c").arg(
                "set -e
                 sgdisk -e disk.raw
                 START=$(sgdisk -i 1 disk.raw | awk '/^First sector/ {print $3}')
                 GUID=$(sgdisk -i 1 disk.raw | awk '/unique GUID/ {print $4}')
                 sgdisk -d 1 -n 1:\"$START\":0 -t 1:8300 -u 1:\"$GUID\" disk.raw",
            ));
            let guid_after = sh(Command::new("sgdisk").args(["-i", "1"]).arg(&raw)).stdout_str();
            let line = |t: &str, k: &str| t.lines().find(|l| l.starts_with(k)).map(str::to_string);
            assert_eq!(
                line(&guid_before, "Partition unique GUID"),
                line(&guid_after, "Partition unique GUID")
            );
            assert_eq!(
                line(&guid_before, "First sector"),
                line(&guid_after, "First sector")
            );
            let p1 = mnt.join("p1");
            let psize = fs::metadata(&p1).unwrap().len();
            assert!(psize > 80 * MIB, "p1 is {psize} bytes after the table grew");
            sh(Command::new("e2fsck").args(["-f", "-y"]).arg(&p1));
            sh(Command::new("resize2fs").arg(&p1));
            sh(Command::new("e2fsck").args(["-f", "-n"]).arg(&p1));
            let o = sh(Command::new("dumpe2fs").arg("-h").arg(&p1));
            let text = o.stdout_str();
            let blocks: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("Block count:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("dumpe2fs block count");
            let bsize: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("Block size:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("dumpe2fs block size");
            assert!(
                blocks * bsize > psize - 4 * MIB,
                "file system of {} bytes in a {psize}-byte partition",
                blocks * bsize
            );
            let out = d.join("payload.out");
            sh(Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump payload {}", out.display()))
                .arg(&p1));
            assert_same_file(&out, &payload, "the file written before the resize");
            vdiskfs_umount(&mnt);
        }
        check_clean(&img);
    }
}

/// One SIGKILL cycle: a fresh copy of `orig`, `vdiskfs resize COPY target` killed after
/// `delay`; then the copy must check clean (a VHD killed between its end footer and the
/// copy at offset 0 may report exactly that, and a second resize must finish it) and
/// show the old or new size with the data intact. Returns where the kill landed: 0 before
/// any change, 1 after some change with the old size still showing, 2 with the new size
/// showing but the process killed, 3 after the resize finished.
fn kill_cycle(
    d: &TempDir,
    orig: &Path,
    model: &Path,
    old: u64,
    target: u64,
    delay: Duration,
) -> usize {
    let img = d.join(
        orig.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace("orig", "copy"),
    );
    fs::copy(orig, &img).unwrap();
    let mut child = Command::new(bin())
        .arg("resize")
        .arg(&img)
        .arg(target.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let status = child.wait().unwrap();
    let killed = !status.success();
    let untouched = sha256_file(&img) == sha256_file(orig);
    let o = vd(&[OsStr::new("check"), img.as_os_str()]);
    if !o.success() {
        assert!(
            o.stdout_str().contains("footer copy at offset 0 differs")
                && o.stdout_str().lines().count() <= 2,
            "after a kill: `{}`: {}{}",
            o.cmd,
            o.stdout_str(),
            o.stderr
        );
        let size = virtual_size(&img);
        resize(&img, &size.to_string(), &[]).assert_success();
        check_clean(&img);
    }
    let size = virtual_size(&img);
    let landed = match (killed, untouched, size == target) {
        (false, _, _) => 3,
        (true, true, _) => 0,
        (true, false, false) => 1,
        (true, false, true) => 2,
    };
    assert!(
        size == old || size == target,
        "size {size} after a kill: neither {old} nor {target}"
    );
    let n = (old + 4 * MIB).min(size);
    assert_prefix(&img, model, n, &format!("after a kill at {delay:?}"));
    // And a resize run again finishes the job.
    resize(&img, &target.to_string(), &[]).assert_success();
    check_clean(&img);
    assert_eq!(virtual_size(&img), target);
    fs::remove_file(&img).unwrap();
    landed
}

#[test]
fn sigkill_during_resize_leaves_old_or_new_size() {
    let kills: u64 = std::env::var("VDISKFS_RESIZE_KILLS")
        .ok()
        .map(|v| v.parse().expect("VDISKFS_RESIZE_KILLS: a number"))
        .unwrap_or(10);
    let seed = std::env::var("VDISKFS_RESIZE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("VDISKFS_RESIZE_SEED={seed}");
    let mut rng = Rng::new(seed);
    let d = TempDir::new("resize-kill");
    // VHDX dynamic (BAT moves past 128 GiB), VHD dynamic (BAT moves past 128 MiB) and
    // VHD fixed (the footer moves).
    for (ext, kind, target) in [
        ("vhdx", "dynamic", 130u64 << 30),
        ("vhdx", "fixed", 24 * MIB),
        ("vhd", "dynamic", 140 * MIB),
        ("vhd", "fixed", 24 * MIB + 512),
    ] {
        let size = 10 * MIB + 1536;
        let model = d.join(format!("model-{ext}-{kind}.raw"));
        filled_raw(&model, size, 5, &[(3 * MIB, 2 * MIB)]);
        let orig = d.join(format!("orig-{kind}.{ext}"));
        let words = ["convert", "-f", "raw", "--type", kind, "--block-size", "1M"];
        let mut a: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
        a.push(model.as_os_str());
        a.push(orig.as_os_str());
        vd(&a).assert_success();
        // How long one uninterrupted run takes: kills land in [0, 1.2 x that].
        let copy = d.join("timing.img");
        fs::copy(&orig, &copy).unwrap();
        let t0 = Instant::now();
        let o = run(Command::new(bin())
            .arg("resize")
            .arg(&copy)
            .arg(target.to_string()));
        assert!(o.success(), "{}", o.stderr);
        let span = t0.elapsed();
        fs::remove_file(&copy).unwrap();
        let mut landed = [0; 4];
        for _ in 0..kills {
            let delay = span.mul_f64(rng.below(1200) as f64 / 1000.0);
            landed[kill_cycle(&d, &orig, &model, size, target, delay)] += 1;
        }
        eprintln!(
            "{ext} {kind}: {kills} kills (a run takes {span:?}): {} before any change, {} mid-way at the old size, {} mid-way at the new size, {} after the end",
            landed[0], landed[1], landed[2], landed[3]
        );
    }
}

/// A GPT disk shrinks too: the backup GPT moves to the new end (its old place is not
/// data to keep; its new place must hold none), the primary header follows; refused
/// below the partition's end plus the backup's 33 sectors. Base and child.
#[test]
fn shrinking_a_gpt_disk_moves_its_backup_table() {
    if !require_tools(&["sgdisk", "mkfs.ext4", "debugfs", "e2fsck"]) || !require_fuse() {
        return;
    }
    for child in [false, true] {
        let d = TempDir::new(&format!("resize-gpt-shrink-{child}"));
        let base = d.join("g.vhdx");
        vd(&[
            OsStr::new("create"),
            OsStr::new("--size"),
            OsStr::new("64M"),
            base.as_os_str(),
        ])
        .assert_success();
        let payload = d.join("payload.bin");
        make_random(&payload, 200_000, 4);
        let mnt = d.dir("m");
        {
            let _m = vdiskfs_mount(&base, &mnt, false);
            sh(Command::new("sgdisk")
                .args(["-n", "1:2048:+20M", "-t", "1:8300"])
                .arg(mnt.join("disk.raw")));
            sh(Command::new("mkfs.ext4").arg("-q").arg(mnt.join("p1")));
            sh(Command::new("debugfs")
                .args(["-w", "-R"])
                .arg(format!("write {} payload", payload.display()))
                .arg(mnt.join("p1")));
            vdiskfs_umount(&mnt);
        }
        let img = if child {
            let c = d.join("c.vhdx");
            vd(&[
                OsStr::new("create"),
                OsStr::new("--parent"),
                base.as_os_str(),
                c.as_os_str(),
            ])
            .assert_success();
            c
        } else {
            base.clone()
        };
        let minimum = 21 * MIB + 33 * 512;
        let before = sha256_file(&img);
        let o = resize(&img, "21M", &[]);
        assert_clean_failure(&o, &img);
        assert!(
            o.stderr
                .contains(&format!("smallest size allowed is {minimum} bytes")),
            "{}",
            o.stderr
        );
        let o = resize(&img, "32M", &["--dry-run"]);
        o.assert_success();
        assert!(o.stdout_str().contains("backup GPT"), "{}", o.stdout_str());
        assert_eq!(sha256_file(&img), before, "a dry run changed the file");
        let o = resize(&img, &minimum.to_string(), &[]);
        o.assert_success();
        assert_eq!(virtual_size(&img), minimum);
        check_clean(&img);
        let raw = d.join("out.raw");
        cat_to_file(&img, &[], &raw);
        let v = sh(Command::new("sgdisk").arg("-v").arg(&raw)).stdout_str();
        assert!(v.contains("No problems found"), "sgdisk -v: {v}");
        {
            let _m = vdiskfs_mount(&img, &mnt, true);
            let p1 = mnt.join("p1");
            sh(Command::new("e2fsck").args(["-f", "-n"]).arg(&p1));
            let out = d.join("payload.out");
            sh(Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump payload {}", out.display()))
                .arg(&p1));
            assert_same_file(&out, &payload, "the file in the shrunk disk's partition");
        }
    }
}

/// Bases qemu-img made (it sizes its own VHDs by CHS geometry, creator "qemu"): grown
/// by an odd number of sectors, a VHD's size is rounded up to a size the geometry
/// describes (as qemu-img create rounds), so plain `qemu-img` (no size override) reads
/// the same disk as vdiskfs; VHDX to whole sectors.
#[test]
fn qemu_made_bases_grow_as_qemu_reads_them() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let d = TempDir::new("resize-qemu");
    for (fmt, sub) in [
        ("vpc", "dynamic"),
        ("vpc", "fixed"),
        ("vhdx", "dynamic"),
        ("vhdx", "fixed"),
    ] {
        let img = d.join(format!("q-{sub}.{fmt}"));
        let p = img.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            &format!("subformat={sub}"),
            p,
            "10M",
        ]);
        sh(Command::new("qemu-io").args(["-f", fmt, "-c", "write -P 0x5a 1M 3M", p]));
        let o = resize(&img, &format!("+{}", 3 * MIB + 512), &[]);
        o.assert_success();
        if fmt == "vpc" {
            assert!(
                o.stdout_str().contains("CHS geometry"),
                "{}",
                o.stdout_str()
            );
        }
        check_clean(&img);
        let size = virtual_size(&img);
        let q = d.join("q.raw");
        let _ = fs::remove_file(&q);
        qemu_img(&["convert", "-f", fmt, "-O", "raw", p, q.to_str().unwrap()]);
        assert_eq!(file_len(&q), size, "{fmt} {sub}: qemu-img's size");
        let mut model = vec![0u8; size as usize];
        model[MIB as usize..4 * MIB as usize].fill(0x5a);
        let m = d.join("model.raw");
        write_file(&m, &model);
        assert_same_file(&q, &m, &format!("qemu-img's view of {fmt} {sub}"));
        assert_view(&d, &img, &m, &format!("{fmt} {sub}"));
    }
}
