//! End-to-end tests of writable mounts (issue 6): guest file systems edited through a
//! loop device on `disk.raw`, sector-granular writes against a model, writes past the
//! end, read-only mounts that must not touch any file, and refusal of a second writer.
//!
//! Needs root (loop devices), /dev/fuse, fusermount3, qemu-img, mkfs.ext4, e2fsck,
//! vhdimount and 7zz. Without them a test prints why and passes, unless
//! VDISKFS_REQUIRE_FUSE=1, where it fails. Every FUSE mount, loop device and guest mount
//! is undone by a drop guard, also when a test fails.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

// ---------------------------------------------------------------- environment

/// `qemu-img convert -O vhdx|vpc(dynamic) raw img`.
fn qemu_from_raw(fmt: Fmt, raw: &Path, img: &Path) {
    let opts = if fmt == Fmt::Vhd {
        "subformat=dynamic"
    } else {
        ""
    };
    qemu_convert_raw(fmt.qemu(), opts, raw, img);
}

/// base.EXT of `size` (`vdiskfs create`) in `dir` and an empty child.EXT on it.
fn new_chain(dir: &Path, fmt: Fmt, size: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base.{}", fmt.ext()));
    vdiskfs([
        OsStr::new("create"),
        OsStr::new("--size"),
        OsStr::new(size),
        base.as_os_str(),
    ])
    .assert_success();
    let child = dir.join(format!("child.{}", fmt.ext()));
    create_child(&base, &child);
    (base, child)
}

/// The virtual size vdiskfs sees (`info --json`).
fn virtual_size(img: &Path) -> u64 {
    let v = info_json(img, &[]);
    json_u64(&info_layers(&v)[0], "virtual_size")
}

fn mtime_ns(p: &Path) -> i128 {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

// ---------------------------------------------------------------- daemons and guards

/// Pids of live processes running the vdiskfs binary with `mnt` among their arguments.
fn daemon_pids(mnt: &Path) -> Vec<u32> {
    let me = std::process::id();
    let want = mnt.as_os_str().as_encoded_bytes();
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"vdiskfs")) && args.contains(&want) {
            v.push(pid);
        }
    }
    v
}

/// A detached mount (`vdiskfs mount IMG MNT`, the daemon forks away once live).
struct Detached {
    mnt: PathBuf,
    live: bool,
}

impl Detached {
    fn mount(img: &Path, mnt: &Path, extra: &[&str]) -> Detached {
        fs::create_dir_all(mnt).unwrap();
        let mut args: Vec<&OsStr> = vec![OsStr::new("mount")];
        args.extend(extra.iter().map(OsStr::new));
        args.push(img.as_os_str());
        args.push(mnt.as_os_str());
        let d = Detached {
            mnt: mnt.to_path_buf(),
            live: true,
        };
        let o = vdiskfs(&args);
        o.assert_success();
        assert!(
            is_mounted(mnt),
            "`{}` returned but nothing is mounted",
            o.cmd
        );
        d
    }

    /// `vdiskfs umount`, then wait until the mount is gone from /proc/mounts and the
    /// daemon process has exited (it finishes closing the image after the unmount).
    fn umount(mut self) {
        vdiskfs_umount(&self.mnt);
        wait_gone(&self.mnt);
        self.live = false;
    }
}

fn wait_gone(mnt: &Path) {
    let t0 = Instant::now();
    while is_mounted(mnt) || !daemon_pids(mnt).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon for {} still there 30 s after unmount",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if self.live {
            fuse_unmount(&self.mnt);
            let t0 = Instant::now();
            while !daemon_pids(&self.mnt).is_empty() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

// ---------------------------------------------------------------- judges

/// vhdimount's view of `img` compared with `want`; None when identical, else the first
/// differing offset. vhdimount exposes one file per layer, base first (`vhdi1` is the
/// base): the highest `vhdiN` is the image named on its command line, merged through
/// its parents.
fn vhdimount_diff(img: &Path, dir: &Path, want: &Path) -> Option<u64> {
    let m = FuseMount::vhdimount(img, dir);
    let top = m.merged();
    let d = first_difference(&top, want);
    drop(m);
    d
}

/// libvhdi (vhdimount) must agree with vdiskfs, for VHD and VHDX chains; for VHDX,
/// 7-Zip must agree as well.
fn judge(fmt: Fmt, img: &Path, vm: &Path, want: &Path) {
    if fmt == Fmt::Vhdx {
        judge_7zz(img, want);
    }
    if let Some(at) = vhdimount_diff(img, vm, want) {
        panic!(
            "vhdimount's view of {} differs from vdiskfs's ({}) at byte {at}",
            img.display(),
            want.display()
        );
    }
}
// ---------------------------------------------------------------- ext4 in a child

fn ext4_round_trip(fmt: Fmt) {
    if !can_run_loops(&["mkfs.ext4", "e2fsck", "losetup", "vhdimount", "7zz"]) {
        return;
    }
    let t = TempDir::new(&format!("w-ext4-{}", fmt.ext()));
    // The base: ext4 with known files.
    let files = t.join("files");
    fs::create_dir_all(files.join("sub")).unwrap();
    write_file(&files.join("hello.txt"), b"hello world\n");
    let mut big = vec![0u8; 1_500_000];
    Rng::new(1).fill(&mut big);
    write_file(&files.join("big.bin"), &big);
    write_file(&files.join("sub/keep.txt"), b"keep me\n");
    write_file(&files.join("sub/gone.txt"), b"delete me\n");
    let raw = t.join("base.raw");
    make_sparse(&raw, 64 * MIB);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&files)
            .arg(&raw),
    );
    let base = t.join(format!("base.{}", fmt.ext()));
    qemu_from_raw(fmt, &raw, &base);
    fs::remove_file(&raw).unwrap();
    let base_sha = sha256_file(&base);
    let child = t.join(format!("child.{}", fmt.ext()));
    create_child(&base, &child);

    // Edit the guest through a writable mount of the child (detached daemon).
    let mnt = t.join("mnt");
    let guest = t.join("guest");
    let mut new_big = vec![0u8; 3_000_000];
    Rng::new(2).fill(&mut new_big);
    let mut patch = vec![0u8; 4096];
    Rng::new(3).fill(&mut patch);
    {
        let m = Detached::mount(&child, &mnt, &[]);
        let mut lp = Loop::attach(&mnt.join("disk.raw"), false);
        lp.mount(&guest, false);
        fs::write(guest.join("hello.txt"), b"hello world\nmodified\n").unwrap();
        fs::write(guest.join("new.txt"), b"a new file\n").unwrap();
        fs::write(guest.join("new_big.bin"), &new_big).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(guest.join("big.bin"))
            .unwrap();
        f.write_all_at(&patch, 700_001).unwrap();
        drop(f);
        fs::remove_file(guest.join("sub/gone.txt")).unwrap();
        fs::create_dir(guest.join("newdir")).unwrap();
        fs::write(guest.join("newdir/x.txt"), b"x\n").unwrap();
        run_ok(Command::new("sync").arg("-f").arg(guest.join("new.txt")));
        lp.finish();
        m.umount();
    }
    assert_eq!(sha256_file(&base), base_sha, "the base changed");

    // Remount read-only and find the changes.
    big[700_001..700_001 + 4096].copy_from_slice(&patch);
    {
        let m = Detached::mount(&child, &mnt, &["--read-only"]);
        let mut lp = Loop::attach(&mnt.join("disk.raw"), true);
        lp.mount(&guest, true);
        let rd = |n: &str| fs::read(guest.join(n)).unwrap_or_else(|e| panic!("read {n}: {e}"));
        assert_eq!(rd("hello.txt"), b"hello world\nmodified\n");
        assert_eq!(rd("new.txt"), b"a new file\n");
        assert!(rd("new_big.bin") == new_big, "new_big.bin differs");
        assert!(rd("big.bin") == big, "big.bin (patched in place) differs");
        assert_eq!(rd("sub/keep.txt"), b"keep me\n");
        assert_eq!(rd("newdir/x.txt"), b"x\n");
        assert!(
            !guest.join("sub/gone.txt").exists(),
            "deleted file came back"
        );
        lp.finish();
        m.umount();
    }
    assert_eq!(sha256_file(&base), base_sha, "the base changed");
    check_ok(&child);
    let merged = t.join("merged.raw");
    cat_to_file(&child, &[], &merged);
    assert_e2fsck_clean(&merged);
    judge(fmt, &child, &t.join("vm"), &merged);
    assert_eq!(sha256_file(&base), base_sha, "the base changed");
}

#[test]
fn ext4_edit_in_vhdx_child() {
    ext4_round_trip(Fmt::Vhdx);
}

#[test]
fn ext4_edit_in_vhd_child() {
    ext4_round_trip(Fmt::Vhd);
}

// ---------------------------------------------------------------- writes vs a model

/// Apply `data` at `off` to `model` and through the writable `disk` file.
fn write_both(disk: &File, model: &mut [u8], off: u64, data: &[u8]) {
    disk.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("pwrite {} bytes at {off}: {e}", data.len()));
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn rand_vec(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v);
    v
}

/// Read all of `file` and compare it with `model`; panics with the first difference.
fn assert_file_eq(file: &Path, model: &[u8], what: &str) {
    let mut got = Vec::with_capacity(model.len());
    File::open(file)
        .unwrap_or_else(|e| panic!("open {}: {e}", file.display()))
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert_eq!(got.len(), model.len(), "{what}: length");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs from the model at byte {i} (block {}, +{}): got {:#04x}, want {:#04x}",
            i as u64 / BLOCK,
            i as u64 % BLOCK,
            got[i],
            model[i]
        );
    }
}

/// The writes of the sector-granular test at disk size `size`: odd 512-byte and 4 KiB
/// writes, block-straddling writes, byte-granular unaligned writes, the last sector,
/// rewrites, and random small writes.
fn write_set(disk: &File, model: &mut [u8], rng: &mut Rng) {
    let size = model.len() as u64;
    let w = |off: u64, len: usize, rng: &mut Rng, model: &mut [u8]| {
        let d = rand_vec(rng, len);
        write_both(disk, model, off, &d);
    };
    // 512-byte writes at odd sector offsets.
    w(7 * 512, 512, rng, model);
    w(5 * BLOCK + 13 * 512, 512, rng, model);
    w(2 * BLOCK + 3 * 512, 512, rng, model); // a block the middle layer holds partly
                                             // 4 KiB writes at offsets that are not 4 KiB aligned.
    w(3 * 4096 + 512, 4096, rng, model);
    w(7 * BLOCK + 1536, 4096, rng, model);
    w(4 * BLOCK + 60 * 1024 + 512, 4096, rng, model); // across the middle's data edge
                                                      // Straddling block boundaries.
    w(9 * BLOCK - 4096, 8192, rng, model);
    w(11 * BLOCK - 300 * 512, MIB as usize, rng, model);
    w(13 * BLOCK - MIB - 512, 3 * MIB as usize, rng, model);
    // Byte-granular, unaligned.
    w(15 * BLOCK + 1, 1, rng, model);
    w(15 * BLOCK + 4095, 7, rng, model);
    w(16 * BLOCK - 500, 1000, rng, model);
    w(17 * BLOCK + 333, 513, rng, model);
    w(6 * BLOCK + 100_003, 70_001, rng, model); // middle holds part of block 6
                                                // The end of the disk.
    w(size - 512, 512, rng, model);
    w(size - 100, 100, rng, model);
    w(size - BLOCK - 10, 20, rng, model);
    // Rewrites of what this session wrote (in place), partly.
    w(7 * 512 + 100, 10, rng, model);
    w(9 * BLOCK - 2048, 1024, rng, model);
    // Random writes, small and large.
    for _ in 0..150 {
        let max = if rng.below(4) == 0 { 300_000 } else { 9000 };
        let len = 1 + rng.below(max) as usize;
        let off = rng.below(size - len as u64);
        w(off, len, rng, model);
    }
}

/// Give a layer some partial blocks (the middle of a 3-level chain): blocks 2, 4 and 6
/// get data in part, block 8 in full.
fn middle_writes(disk: &File, model: &mut [u8], rng: &mut Rng) {
    for (off, len) in [
        (2 * BLOCK + 4096, 8192usize),
        (4 * BLOCK, 64 * 1024),
        (6 * BLOCK + 512 * 1024, 300 * 1024),
        (8 * BLOCK, BLOCK as usize),
        (10 * BLOCK + 1000, 3000),
    ] {
        let d = rand_vec(rng, len);
        write_both(disk, model, off, &d);
    }
}

/// base (qemu-made from random data with holes, or vdiskfs-made with 4 KiB sectors and
/// written through a mount) <- mid (partly written) <- top (the write set), all compared
/// with a model.
fn sector_writes_chain(fmt: Fmt, sector4k: bool) {
    if !can_run_loops(&["vhdimount", "7zz"]) {
        return;
    }
    let t = TempDir::new(&format!("w-sect-{}", fmt.ext()));
    let size = 64 * MIB;
    let mut rng = Rng::new(if sector4k { 44 } else { 42 });
    let mut model = vec![0u8; size as usize];
    let base = t.join(format!("base.{}", fmt.ext()));
    if sector4k {
        vdiskfs([
            OsStr::new("create"),
            OsStr::new("--size"),
            OsStr::new("64M"),
            OsStr::new("--logical-sector-size"),
            OsStr::new("4096"),
            base.as_os_str(),
        ])
        .assert_success();
        let d = Daemon::start(&base, &t.join("mb"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        for b in [0u64, 1, 2, 5, 6, 9, 12, 20, 31] {
            let data = rand_vec(&mut rng, (BLOCK / 2) as usize);
            write_both(&f, &mut model, b * BLOCK + BLOCK / 4, &data);
        }
        f.sync_all().unwrap();
        drop(f);
        d.stop();
        check_ok(&base);
    } else {
        // Random data with holes: every third block is left out.
        Rng::new(7).fill(&mut model);
        for b in (0..size / BLOCK).filter(|b| b % 3 == 1) {
            model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(0);
        }
        let raw = t.join("base.raw");
        write_file(&raw, &model);
        qemu_from_raw(fmt, &raw, &base);
        fs::remove_file(&raw).unwrap();
        // qemu's vpc rounds the size up to its CHS geometry: the tail reads zeros.
        model.resize(virtual_size(&base) as usize, 0);
    }
    let base_sha = sha256_file(&base);

    let mid = t.join(format!("mid.{}", fmt.ext()));
    create_child(&base, &mid);
    {
        let d = Daemon::start(&mid, &t.join("mm"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        middle_writes(&f, &mut model, &mut rng);
        f.sync_all().unwrap();
        drop(f);
        d.stop();
    }
    let mid_sha = sha256_file(&mid);
    let top = t.join(format!("top.{}", fmt.ext()));
    create_child(&mid, &top);
    {
        let d = Daemon::start(&top, &t.join("mt"), &[]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.disk())
            .unwrap();
        write_set(&f, &mut model, &mut rng);
        f.sync_all().unwrap();
        drop(f);
        assert_file_eq(&d.disk(), &model, "disk.raw before unmount");
        d.stop();
    }
    assert_eq!(sha256_file(&base), base_sha, "the base changed");
    assert_eq!(sha256_file(&mid), mid_sha, "the middle layer changed");
    {
        let d = Daemon::start(&top, &t.join("mr"), &["--read-only"]);
        assert_file_eq(&d.disk(), &model, "disk.raw after remount (read-only)");
        d.stop();
    }
    check_ok(&top);
    let model_file = t.join("model.raw");
    write_file(&model_file, &model);
    let o = stdout_vs_file(Command::new(bin()).arg("cat").arg(&top), &model_file);
    o.assert_success();
    judge(fmt, &top, &t.join("vm"), &model_file);
}

#[test]
fn sector_writes_vhdx_3_level_chain() {
    sector_writes_chain(Fmt::Vhdx, false);
}

#[test]
fn sector_writes_vhd_3_level_chain() {
    sector_writes_chain(Fmt::Vhd, false);
}

#[test]
fn sector_writes_vhdx_4k_sectors() {
    sector_writes_chain(Fmt::Vhdx, true);
}

/// A 512-byte-sector VHDX has 4 GiB chunks (2^23 sectors per sector-bitmap block):
/// writes straddling the first chunk boundary, in a child and in its child, compared
/// with a model in a window around the boundary.
#[test]
fn vhdx_writes_across_chunk_boundary() {
    if !can_run_loops(&["vhdimount"]) {
        return;
    }
    let t = TempDir::new("w-chunk");
    const G4: u64 = 4 << 30;
    let size = G4 + 8 * MIB;
    let w0 = G4 - 8 * MIB; // the window the model covers: [w0, size)
    let mut model = vec![0u8; (size - w0) as usize];
    let mut rng = Rng::new(99);
    let base = t.join("base.vhdx");
    vdiskfs([
        OsStr::new("create"),
        OsStr::new("--size"),
        OsStr::new(&format!("{}", size)),
        base.as_os_str(),
    ])
    .assert_success();
    let put = |f: &File, model: &mut [u8], off: u64, len: usize, rng: &mut Rng| {
        let d = rand_vec(rng, len);
        f.write_all_at(&d, off)
            .unwrap_or_else(|e| panic!("pwrite {len} at {off}: {e}"));
        model[(off - w0) as usize..(off - w0) as usize + len].copy_from_slice(&d);
    };
    let mid = t.join("mid.vhdx");
    create_child(&base, &mid);
    {
        let d = Daemon::start(&mid, &t.join("mm"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        put(&f, &mut model, G4 - 512 * 1024, MIB as usize, &mut rng);
        put(&f, &mut model, G4 - 3 * MIB, 4096, &mut rng);
        f.sync_all().unwrap();
        drop(f);
        d.stop();
    }
    check_ok(&mid);
    let mid_sha = sha256_file(&mid);
    let top = t.join("top.vhdx");
    create_child(&mid, &top);
    {
        let d = Daemon::start(&top, &t.join("mt"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        put(&f, &mut model, G4 - 32 * 1024 + 512, 64 * 1024, &mut rng);
        put(
            &f,
            &mut model,
            G4 - 3 * MIB / 2 + 1000,
            3 * MIB as usize,
            &mut rng,
        );
        put(&f, &mut model, G4 - 512, 512, &mut rng);
        put(&f, &mut model, G4, 512, &mut rng);
        put(&f, &mut model, G4 - 1, 2, &mut rng);
        put(&f, &mut model, G4 + 5 * MIB + 7, 12345, &mut rng);
        put(&f, &mut model, G4 - 7 * MIB, 4096, &mut rng);
        f.sync_all().unwrap();
        drop(f);
        d.stop();
    }
    assert_eq!(sha256_file(&mid), mid_sha, "the middle layer changed");
    check_ok(&top);
    let d = Daemon::start(&top, &t.join("mr"), &["--read-only"]);
    let f = File::open(d.disk()).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut got = vec![0u8; model.len()];
    f.read_exact_at(&mut got, w0).unwrap();
    if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "chunk-boundary window differs from the model at disk offset {}",
            w0 + i as u64
        );
    }
    // Far outside the window nothing was written.
    let mut z = vec![0xAAu8; MIB as usize];
    f.read_exact_at(&mut z, MIB).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    drop(f);
    d.stop();
    // libvhdi's view of the window.
    let m = FuseMount::vhdimount(&top, &t.join("vm"));
    let mut lv = vec![0u8; model.len()];
    File::open(m.merged())
        .unwrap()
        .read_exact_at(&mut lv, w0)
        .unwrap();
    if let Some(i) = lv.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "vhdimount disagrees with the model on {} at disk offset {}",
            top.display(),
            w0 + i as u64
        );
    }
}

// ---------------------------------------------------------------- dynamic tops: qemu-img check

/// A dynamic (non-differencing) image written directly: `qemu-img check` must pass
/// (VHDX; qemu-img cannot check VHD files) and qemu-img's raw view, libvhdi's, and
/// vdiskfs's must all equal the model.
fn written_dynamic_top(fmt: Fmt, qemu_made: bool) {
    if !can_run_loops(&["vhdimount", "7zz"]) {
        return;
    }
    let t = TempDir::new(&format!("w-dyn-{}", fmt.ext()));
    let size = 32 * MIB;
    let img = t.join(format!("top.{}", fmt.ext()));
    let mut model = vec![0u8; size as usize];
    if qemu_made {
        Rng::new(5).fill(&mut model[..(6 * MIB) as usize]);
        model[(2 * MIB) as usize..(4 * MIB) as usize].fill(0);
        let raw = t.join("src.raw");
        write_file(&raw, &model);
        qemu_from_raw(fmt, &raw, &img);
    } else {
        vdiskfs([
            OsStr::new("create"),
            OsStr::new("--size"),
            OsStr::new("32M"),
            img.as_os_str(),
        ])
        .assert_success();
    }
    // qemu's vpc rounds a new image's size up to its CHS geometry.
    let vsize = virtual_size(&img);
    model.resize(vsize as usize, 0);
    let mut rng = Rng::new(6);
    {
        let d = Daemon::start(&img, &t.join("m"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        assert_eq!(f.metadata().unwrap().len(), vsize);
        for (off, len) in [
            (512u64, 512usize),
            (BLOCK + 4096 + 512, 4096),
            (3 * BLOCK - 1000, 5000),
            (5 * BLOCK + 1, 3),
            (9 * BLOCK, 2 * BLOCK as usize),
            (vsize - 700, 700),
        ] {
            let dd = rand_vec(&mut rng, len);
            write_both(&f, &mut model, off, &dd);
        }
        f.sync_all().unwrap();
        drop(f);
        d.stop();
    }
    if fmt == Fmt::Vhdx {
        let o = run(Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(&img));
        assert!(
            o.success(),
            "`{}` failed ({}):\n{}{}",
            o.cmd,
            o.status,
            o.stdout_str(),
            o.stderr
        );
    }
    check_ok(&img);
    let model_file = t.join("model.raw");
    write_file(&model_file, &model);
    // qemu 7.2 takes a VHD's size from its CHS geometry unless the creator is one it
    // knows (vdiskfs writes "vdfs"); ask for the footer's current size, as Hyper-V uses.
    let spec = qemu_image_opts(fmt.qemu(), &img);
    let qraw = t.join("qemu.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "--image-opts", &spec, "-O", "raw"])
            .arg(&qraw),
    );
    assert_same_file(&qraw, &model_file, "qemu-img's view of the written image");
    let o = stdout_vs_file(Command::new(bin()).arg("cat").arg(&img), &model_file);
    o.assert_success();
    judge(fmt, &img, &t.join("vm"), &model_file);
}

#[test]
fn qemu_check_written_qemu_made_vhdx() {
    written_dynamic_top(Fmt::Vhdx, true);
}

#[test]
fn qemu_check_written_qemu_made_vhd() {
    written_dynamic_top(Fmt::Vhd, true);
}

#[test]
fn qemu_check_written_vdiskfs_made_vhdx() {
    written_dynamic_top(Fmt::Vhdx, false);
}

#[test]
fn qemu_check_written_vdiskfs_made_vhd() {
    written_dynamic_top(Fmt::Vhd, false);
}

// ---------------------------------------------------------------- past the end

fn past_end(fmt: Fmt) {
    if !can_run_loops(&[]) {
        return;
    }
    let t = TempDir::new(&format!("w-end-{}", fmt.ext()));
    let (_, child) = new_chain(t.path(), fmt, "8M");
    let size = 8 * MIB;
    let child_len0 = file_len(&child);
    {
        let d = Daemon::start(&child, &t.join("m"), &[]);
        let disk = d.disk();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
        // Straddling the end: short (or refused), never growth.
        let data = vec![0x5Au8; 4096];
        match f.write_at(&data, size - 1000) {
            Ok(n) => assert!(n <= 1000, "a write straddling the end wrote {n} bytes"),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EFBIG)),
                "write straddling the end: {e}"
            ),
        }
        // Entirely past the end: ENOSPC (EFBIG accepted), or 0 bytes.
        for off in [size, size + 1, size + 4096, size + 100 * MIB] {
            match f.write_at(&data, off) {
                Ok(n) => assert_eq!(n, 0, "a write at {off} (past the end) wrote {n} bytes"),
                Err(e) => assert!(
                    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EFBIG)),
                    "write at {off}, past the end: unexpected error {e}"
                ),
            }
            assert_eq!(
                fs::metadata(&disk).unwrap().len(),
                size,
                "disk.raw grew after a write at {off}"
            );
        }
        assert!(f.set_len(size + 4096).is_err(), "disk.raw could be grown");
        assert!(f.set_len(size - 4096).is_err(), "disk.raw could be shrunk");
        let _ = f.sync_all();
        assert_eq!(f.metadata().unwrap().len(), size);
        // Whatever the short write wrote is inside the disk.
        let mut tail = vec![0u8; 1000];
        f.read_exact_at(&mut tail, size - 1000).unwrap();
        assert!(tail.iter().all(|&b| b == 0 || b == 0x5A));
        let mut past = [0u8; 16];
        assert_eq!(f.read_at(&mut past, size).unwrap(), 0, "read past the end");
        drop(f);
        d.stop();
    }
    check_ok(&child);
    let merged = t.join("merged.raw");
    cat_to_file(&child, &[], &merged);
    assert_eq!(file_len(&merged), size, "`vdiskfs cat` length");
    // The child grew at most by what an allocation inside the disk needs.
    assert!(file_len(&child) <= child_len0 + 3 * BLOCK);
    let d = Daemon::start(&child, &t.join("m2"), &["--read-only"]);
    assert_eq!(fs::metadata(d.disk()).unwrap().len(), size);
    d.stop();
}

#[test]
fn vhdx_write_past_end() {
    past_end(Fmt::Vhdx);
}

#[test]
fn vhd_write_past_end() {
    past_end(Fmt::Vhd);
}

// ---------------------------------------------------------------- read-only mounts

/// sha256 and mtime of every file.
fn fingerprints(files: &[&Path]) -> Vec<(PathBuf, String, i128)> {
    files
        .iter()
        .map(|p| (p.to_path_buf(), sha256_file(p), mtime_ns(p)))
        .collect()
}

fn read_only_mount_changes_nothing(fmt: Fmt) {
    if !can_run_loops(&[]) {
        return;
    }
    let t = TempDir::new(&format!("w-ro-{}", fmt.ext()));
    let size = 16 * MIB;
    let mut model = vec![0u8; size as usize];
    Rng::new(11).fill(&mut model[..(4 * MIB) as usize]);
    let raw = t.join("src.raw");
    write_file(&raw, &model);
    let base = t.join(format!("base.{}", fmt.ext()));
    qemu_from_raw(fmt, &raw, &base);
    fs::remove_file(&raw).unwrap();
    model.resize(virtual_size(&base) as usize, 0);
    let child = t.join(format!("child.{}", fmt.ext()));
    create_child(&base, &child);

    // Write through a writable mount, fsync, then kill -9 the daemon: for a VHDX this
    // leaves a pending log (LogGuid set; cleared only at a clean close).
    let mut rng = Rng::new(12);
    {
        let mut d = Daemon::start(&child, &t.join("mw"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        for (off, len) in [
            (4096u64, 8192usize),
            (3 * BLOCK + 512, 70_000),
            (7 * BLOCK, 4096),
        ] {
            let dd = rand_vec(&mut rng, len);
            write_both(&f, &mut model, off, &dd);
        }
        f.sync_all().unwrap();
        d.kill9();
        drop(f);
    }
    if fmt == Fmt::Vhdx {
        let v = info_json(&child, &[]);
        let top = &info_layers(&v)[0];
        let s = top.to_string();
        assert!(
            !s.contains("\"log_state\":\"clean\"") && !s.contains("clean (no pending log)"),
            "expected a pending log in {} after kill -9: {s}",
            child.display()
        );
    }
    let before = fingerprints(&[&child, &base]);
    std::thread::sleep(Duration::from_millis(20)); // so an mtime change would show
    {
        let d = Daemon::start(&child, &t.join("mr"), &["--read-only"]);
        let disk = d.disk();
        // Writes are refused.
        for how in ["rw", "w"] {
            let r = OpenOptions::new().read(how == "rw").write(true).open(&disk);
            match r {
                Err(e) => assert!(
                    matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
                    "open({how}) of a read-only disk.raw: {e}"
                ),
                Ok(f) => {
                    let e = f
                        .write_at(b"x", 0)
                        .expect_err("write to a read-only mount succeeded");
                    assert!(matches!(
                        e.raw_os_error(),
                        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EBADF)
                    ));
                }
            }
        }
        assert!(OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.set_len(0))
            .is_err());
        // The pending log is replayed in memory: the fsynced writes are visible.
        assert_file_eq(&disk, &model, "read-only view after kill -9");
        d.stop();
    }
    // `vdiskfs cat`, `info` and `check` are read-only too.
    let merged = t.join("merged.raw");
    cat_to_file(&child, &[], &merged);
    info_json(&child, &[]);
    let _ = vdiskfs([OsStr::new("check"), child.as_os_str()]);
    let after = fingerprints(&[&child, &base]);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            b.1,
            a.1,
            "{} changed (sha256) under a read-only mount",
            b.0.display()
        );
        assert_eq!(
            b.2,
            a.2,
            "{} mtime changed under a read-only mount",
            b.0.display()
        );
    }
    let mf = t.join("model.raw");
    write_file(&mf, &model);
    assert_same_file(&merged, &mf, "`vdiskfs cat` after kill -9");
    // The next writable open replays the log and closes clean.
    let d = Daemon::start(&child, &t.join("mw2"), &[]);
    d.stop();
    check_ok(&child);
    let o = stdout_vs_file(Command::new(bin()).arg("cat").arg(&child), &mf);
    o.assert_success();
}

#[test]
fn read_only_mount_of_vhdx_with_pending_log_changes_nothing() {
    read_only_mount_changes_nothing(Fmt::Vhdx);
}

#[test]
fn read_only_mount_of_vhd_changes_nothing() {
    read_only_mount_changes_nothing(Fmt::Vhd);
}

/// A crafted pending log (library helper): a read-only mount shows the logged page
/// (replayed in memory) and leaves the file byte-identical.
#[test]
fn read_only_mount_of_crafted_pending_log() {
    if !can_run_loops(&[]) {
        return;
    }
    use vdiskfs::testing::testutil;
    let t = TempDir::new("w-ro-crafted");
    let size = 8 * MIB;
    let mut model = vec![0u8; size as usize];
    Rng::new(21).fill(&mut model);
    let raw = t.join("src.raw");
    write_file(&raw, &model);
    let img = t.join("img.vhdx");
    qemu_from_raw(Fmt::Vhdx, &raw, &img);
    // Log one BAT page equal to the current one: the log is pending, content the same.
    let bat = testutil::bat_offset(&img).unwrap();
    let page = read_at(&img, bat, 4096);
    testutil::make_pending_log_test_file(&img, &[(bat, page)]).unwrap();
    let before = fingerprints(&[&img]);
    std::thread::sleep(Duration::from_millis(20));
    let d = Daemon::start(&img, &t.join("m"), &["--read-only"]);
    assert!(OpenOptions::new().write(true).open(d.disk()).is_err());
    assert_file_eq(&d.disk(), &model, "read-only view of a crafted pending log");
    d.stop();
    let after = fingerprints(&[&img]);
    assert_eq!(before, after, "a read-only mount modified the file");
}

// ---------------------------------------------------------------- locking

/// A second writable mount of a mounted child, and a writable mount of a file that is a
/// mounted child's parent, must be refused with a clear error (issue 6: flock,
/// exclusive on the child, shared on parents). A read-only mount of the parent stays
/// possible.
fn second_writer_refused(fmt: Fmt) {
    if !can_run_loops(&[]) {
        return;
    }
    let t = TempDir::new(&format!("w-lock-{}", fmt.ext()));
    let (base, child) = new_chain(t.path(), fmt, "8M");
    let d = Daemon::start(&child, &t.join("m1"), &[]);
    let mut problems = Vec::new();
    for (img, what) in [
        (&child, "a second writable mount of the mounted child"),
        (&base, "a writable mount of the mounted child's parent"),
    ] {
        let mnt = t.join(format!("m-{}", img.file_stem().unwrap().to_string_lossy()));
        fs::create_dir_all(&mnt).unwrap();
        let o = vdiskfs([OsStr::new("mount"), img.as_os_str(), mnt.as_os_str()]);
        if o.success() {
            // Do not leave it behind.
            let g = Detached {
                mnt: mnt.clone(),
                live: true,
            };
            g.umount();
            problems.push(format!("{what} was accepted (`{}`)", o.cmd));
        } else {
            let e = o.stderr.to_lowercase();
            if !(e.contains("lock") || e.contains("in use") || e.contains("busy")) {
                problems.push(format!(
                    "{what} was refused, but the error does not say the file is in use: {}",
                    o.stderr.trim()
                ));
            }
            if !e.contains(&img.file_name().unwrap().to_string_lossy().to_lowercase()) {
                problems.push(format!(
                    "the error does not name the file: {}",
                    o.stderr.trim()
                ));
            }
        }
    }
    // A read-only mount of the parent is compatible with a writable child.
    let r = Daemon::start(&base, &t.join("m-ro"), &["--read-only"]);
    r.stop();
    d.stop();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn vhdx_second_writer_refused() {
    second_writer_refused(Fmt::Vhdx);
}

#[test]
fn vhd_second_writer_refused() {
    second_writer_refused(Fmt::Vhd);
}

// ---------------------------------------------------------------- chains under a writer

/// `vdiskfs OP...` must fail with one line naming `file` and the mount that writes it.
fn assert_refused_naming(o: &Out, file: &Path, mount: &Path, what: &str) {
    assert_clean_failure(o, file);
    assert!(
        o.stderr.contains(&file.display().to_string())
            && o.stderr
                .contains(&format!("vdiskfs mount at {}", mount.display())),
        "{what}: the error must name {} and the mount {}: {}",
        file.display(),
        mount.display(),
        o.stderr.trim()
    );
}

/// Issue 11: a parent mounted writable elsewhere must not change under a chain that is
/// written or created: a writable mount of a child of it is refused; a read-only look at
/// the child (mount, info, cat) still works, with a warning that the view may be
/// inconsistent; once the parent is written, `create --parent` over it is refused and
/// creates nothing. The errors name the parent and its mount (mounted detached, so the
/// daemon holding the lock is not the process that took it).
fn chain_under_a_writer(fmt: Fmt) {
    if !can_run_loops(&[]) {
        return;
    }
    let t = TempDir::new(&format!("w-under-{}", fmt.ext()));
    let dir = t.join("images");
    fs::create_dir_all(&dir).unwrap();
    let (base, child) = new_chain(&dir, fmt, "64M");
    let listing = || {
        let mut v: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing();

    // The base mounted writable. Its first write rotates a VHDX's DataWriteGuid, after
    // which its VHDX child no longer links: the child is looked at before that.
    let mb = t.join("m-base");
    let wb = Detached::mount(&base, &mb, &[]);

    // A writable mount of its child: refused, nothing mounted.
    let mc = t.join("m-child");
    fs::create_dir_all(&mc).unwrap();
    let o = vdiskfs([OsStr::new("mount"), child.as_os_str(), mc.as_os_str()]);
    if o.success() {
        Detached {
            mnt: mc.clone(),
            live: true,
        }
        .umount();
    }
    assert_refused_naming(
        &o,
        &base,
        &mb,
        "writable mount over a parent mounted writable",
    );
    assert!(!is_mounted(&mc));

    // Looking at the child works, with the warning: a read-only mount, info, cat.
    let warned = |o: &Out, what: &str| {
        assert!(
            o.stderr.contains(&base.display().to_string())
                && o.stderr.contains("may be inconsistent")
                && o.stderr
                    .contains(&format!("vdiskfs mount at {}", mb.display())),
            "{what}: no warning naming {} and its writer: {}",
            base.display(),
            o.stderr
        );
    };
    let o = vdiskfs([
        OsStr::new("mount"),
        OsStr::new("--read-only"),
        child.as_os_str(),
        mc.as_os_str(),
    ]);
    let rc = Detached {
        mnt: mc.clone(),
        live: o.success(),
    };
    o.assert_success();
    warned(&o, "mount --read-only");
    assert_eq!(read_at(&mc.join("disk.raw"), 5 * MIB, 4096), vec![0; 4096]);
    let o = vdiskfs([OsStr::new("info"), child.as_os_str()]);
    o.assert_success();
    warned(&o, "info");
    let out = t.join("cat.raw");
    let o = vdiskfs([
        OsStr::new("cat"),
        child.as_os_str(),
        OsStr::new("-o"),
        out.as_os_str(),
    ]);
    o.assert_success();
    warned(&o, "cat");

    // The base written; a snapshot of it: refused, nothing created.
    let a = vec![b'A'; 4096];
    {
        let f = OpenOptions::new()
            .write(true)
            .open(mb.join("disk.raw"))
            .unwrap();
        f.write_all_at(&a, 5 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    let snap = dir.join(format!("snap.{}", fmt.ext()));
    let o = vdiskfs([
        OsStr::new("create"),
        OsStr::new("--parent"),
        base.as_os_str(),
        snap.as_os_str(),
    ]);
    assert_refused_naming(&o, &base, &mb, "create over a parent mounted writable");
    assert!(o.stderr.contains("create a child"), "{}", o.stderr);
    assert_eq!(listing(), before, "a refused create left files behind");
    rc.umount();
    wb.umount();

    // Once the base is unmounted, a snapshot works and shows the base's data.
    create_child(&base, &snap);
    check_ok(&snap);
    cat_to_file(&snap, &[], &out);
    assert_eq!(read_at(&out, 5 * MIB, 4096), a);
    match fmt {
        // The base changed after the child was made: detected.
        Fmt::Vhdx => {
            let o = vdiskfs([OsStr::new("info"), child.as_os_str()]);
            assert!(
                !o.success() && o.stderr.contains("does not match"),
                "{}",
                o.stderr
            );
        }
        // VHD records no write id: the child shows the base's new data.
        Fmt::Vhd => {
            let d = Daemon::start(&child, &mc, &[]);
            assert_eq!(read_at(&d.disk(), 5 * MIB, 4096), a);
            d.stop();
            check_ok(&child);
        }
    }
}

#[test]
fn vhdx_chain_under_a_writer() {
    chain_under_a_writer(Fmt::Vhdx);
}

#[test]
fn vhd_chain_under_a_writer() {
    chain_under_a_writer(Fmt::Vhd);
}

// ---------------------------------------------------------------- time stamps

/// atime, mtime and ctime in nanoseconds.
fn times(p: &Path) -> [i128; 3] {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    [
        ns(m.atime(), m.atime_nsec()),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec()),
    ]
}

fn set_old_atime(p: &Path) {
    run_ok(
        Command::new("touch")
            .args(["-a", "-d", "2000-01-01"])
            .arg(p),
    );
}

/// Issue 11: read-only use changes no time stamp, also under relatime: `info`, `info
/// --json`, `cat`, `check` and a read-only mount (read to the end) leave atime, mtime and
/// ctime of every file of a depth-2 chain alone, and of their directory too (the parent is
/// found case-insensitively, which lists the directory).
fn read_only_use_keeps_times(fmt: Fmt) {
    if !can_run_loops(&[]) {
        return;
    }
    let t = TempDir::new(&format!("w-atime-{}", fmt.ext()));
    let dir = t.join("images");
    fs::create_dir_all(&dir).unwrap();
    let size = 8 * MIB;
    let mut model = vec![0u8; size as usize];
    Rng::new(31).fill(&mut model);
    let raw = t.join("src.raw");
    write_file(&raw, &model);
    let made = dir.join(format!("base.{}", fmt.ext()));
    qemu_from_raw(fmt, &raw, &made);
    let child = dir.join(format!("child.{}", fmt.ext()));
    create_child(&made, &child);
    {
        let d = Daemon::start(&child, &t.join("mw"), &[]);
        let f = OpenOptions::new().write(true).open(d.disk()).unwrap();
        write_both(&f, &mut model, MIB + 4096, &[0x5a; 3 * 4096]);
        f.sync_all().unwrap();
        drop(f);
        d.stop();
    }
    // The child records "base.*": found by a case-insensitive listing of the directory.
    let base = dir.join(format!("BASE.{}", fmt.ext()));
    fs::rename(&made, &base).unwrap();

    // The control: a plain read does change atime on this file system.
    let control = t.join("control");
    write_file(&control, b"x");
    set_old_atime(&control);
    let before = times(&control);
    fs::read(&control).unwrap();
    assert_ne!(
        times(&control)[0],
        before[0],
        "the temporary directory's file system does not update atime on reads \
         (noatime?): this test cannot see anything there"
    );

    let files = [&child, &base, &dir];
    let out = t.join("cat.raw");
    let mut changed = Vec::new();
    let commands: [(&str, &dyn Fn()); 5] = [
        ("info", &|| {
            vdiskfs([OsStr::new("info"), child.as_os_str()]).assert_success();
        }),
        ("info --json", &|| {
            vdiskfs([OsStr::new("info"), OsStr::new("--json"), child.as_os_str()]).assert_success();
        }),
        ("cat", &|| {
            let _ = fs::remove_file(&out);
            vdiskfs([
                OsStr::new("cat"),
                child.as_os_str(),
                OsStr::new("-o"),
                out.as_os_str(),
            ])
            .assert_success();
        }),
        ("check", &|| check_ok(&child)),
        ("mount --read-only, read to the end, umount", &|| {
            let d = Daemon::start(&child, &t.join("mr"), &["--read-only"]);
            let got = fs::read(d.disk()).unwrap();
            assert!(got.len() >= model.len());
            assert!(
                got[..model.len()] == model[..],
                "the read-only view is wrong"
            );
            d.stop();
        }),
    ];
    for (what, run_it) in commands {
        for p in files {
            set_old_atime(p);
        }
        let before: Vec<[i128; 3]> = files.iter().map(|p| times(p)).collect();
        run_it();
        for (p, b) in files.iter().zip(&before) {
            let a = times(p);
            for (i, name) in ["atime", "mtime", "ctime"].iter().enumerate() {
                if a[i] != b[i] {
                    changed.push(format!("{what} changed the {name} of {}", p.display()));
                }
            }
        }
    }
    assert!(changed.is_empty(), "{}", changed.join("\n"));

    // A user who does not own the files may not ask for O_NOATIME (EPERM): the opens
    // fall back to plain ones and work.
    let nobody = |args: &[&OsStr]| {
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args))
    };
    let readable = nobody(&[OsStr::new("test"), OsStr::new("-r"), child.as_os_str()]);
    if find_tool("setpriv").is_some() && readable.success() {
        let o = nobody(&[OsStr::new(bin()), OsStr::new("info"), child.as_os_str()]);
        o.assert_success();
        assert!(o.stdout_str().contains("BASE."), "{}", o.stdout_str());
    } else {
        eprintln!("note: user 65534 cannot run the check as a non-owner here; skipped that part");
    }
}

#[test]
fn vhdx_read_only_use_keeps_times() {
    read_only_use_keeps_times(Fmt::Vhdx);
}

#[test]
fn vhd_read_only_use_keeps_times() {
    read_only_use_keeps_times(Fmt::Vhd);
}
