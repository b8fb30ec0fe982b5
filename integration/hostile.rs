//! Hostile images and a hostile environment, end to end (docs/security.md):
//! - fuzz regressions (fuzz/regressions/*.bin, sparse inputs) open without a panic;
//! - peak RSS of `vdiskfs info` / `cat` on crafted images claiming huge sizes stays
//!   under the documented ceiling;
//! - parents: two images naming each other (a cycle), a FIFO and a device as parent;
//! - the daemon: options (allow_other off by default, default_permissions with it),
//!   nothing in the mount but the disk and `.stats`, owner, a panic in a worker is EIO
//!   for that request only, and a parent truncated under a mount gives EIO, never
//!   wrong bytes.
//!
//! FUSE tests need /dev/fuse and fusermount3; without them they print why and pass,
//! unless VDISKFS_REQUIRE_FUSE=1 (CI), where they fail.

mod common;

#[path = "../fuzz/src/sparse.rs"]
#[allow(dead_code)]
mod sparse;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{have, set_file_len, TempDir};
use vdiskfs::Run;
use vdiskfs::{Chain, ChainOptions, Disk, DiskOptions, Intent, OpenOptions};

const MIB: u64 = 1 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_vdiskfs");

// ------------------------------------------------------------------ helpers

fn vdiskfs(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = Command::new(BIN);
    for a in args {
        c.arg(a);
    }
    c.output().expect("run vdiskfs")
}

fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = vdiskfs(args);
    assert!(
        o.status.success(),
        "vdiskfs failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = vdiskfs(args);
    assert!(!o.status.success(), "vdiskfs succeeded but should not");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// Peak RSS in MiB of `sh -c script` (GNU time's %M of the last command run under it).
fn peak_rss_mib(script: &str) -> f64 {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    let err = String::from_utf8_lossy(&o.stderr);
    // GNU time says "Command exited with non-zero status" when the command failed (a
    // cat ended by head's EPIPE exits 0 or by SIGPIPE, which time reports differently).
    assert!(!err.contains("non-zero status"), "{script}: {err}");
    let kib: f64 = err
        .lines()
        .filter_map(|l| l.strip_prefix("MAXRSS "))
        .next_back()
        .unwrap_or_else(|| panic!("no MAXRSS line from {script:?}: {err}"))
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

// VHDX crafting on files made by `vdiskfs create` (BAT at 3 MiB, metadata at 2 MiB).
const META: u64 = 2 * MIB;
const VIRTUAL_DISK_SIZE: &str = "2fa54224-cd1b-4876-b211-5dbed83bf4b8";

fn meta_item_at(path: &Path, id: &str) -> u64 {
    let t = read(path, META, 64 << 10);
    let count = u16::from_le_bytes([t[10], t[11]]) as usize;
    (0..count)
        .map(|i| 32 + i * 32)
        .find(|&e| uuid::Uuid::from_bytes_le(t[e..e + 16].try_into().unwrap()).to_string() == id)
        .map(|e| META + u32::from_le_bytes(t[e + 16..e + 20].try_into().unwrap()) as u64)
        .expect("metadata item")
}

fn set_bat_region_length(path: &Path, len: u32) {
    for off in [192u64 << 10, 256 << 10] {
        let mut t = read(path, off, 64 << 10);
        t[16 + 24..16 + 28].copy_from_slice(&len.to_le_bytes());
        t[4..8].fill(0);
        let c = crc32c::crc32c(&t);
        t[4..8].copy_from_slice(&c.to_le_bytes());
        patch(path, off, &t);
    }
}

/// A VHDX claiming 64 TiB in `block`-byte blocks, its BAT region large enough, sparse.
fn huge_vhdx(dir: &Path, name: &str, block: &str, bat_region: u64) -> PathBuf {
    let p = dir.join(name);
    ok(&[&"create", &"--size", &"4M", &"--block-size", &block, &p]);
    patch(
        &p,
        meta_item_at(&p, VIRTUAL_DISK_SIZE),
        &(64u64 << 40).to_le_bytes(),
    );
    set_bat_region_length(&p, bat_region as u32);
    set_file_len(&p, 3 * MIB + bat_region);
    p
}

// ------------------------------------------------------------------ fuzz regressions

/// What the fuzz targets do with one input, in process.
fn exercise(path: &Path) {
    for allow_raw in [false] {
        if let Ok(l) = vdiskfs::open_layer(path, OpenOptions::default(), allow_raw) {
            let size = l.virtual_size();
            if size <= 1 << 40 {
                let _ = l.info();
                let _ = l.check();
            }
            for (off, len) in [(0, size.min(MIB)), (size - size.min(MIB), size.min(MIB))] {
                let mut runs = Vec::new();
                if l.map(off, len, &mut runs).is_ok() {
                    assert_eq!(runs.iter().map(Run::len).sum::<u64>(), len);
                    for r in runs {
                        if let Run::Held { len, file_offset } = r {
                            let mut b = vec![0u8; len as usize];
                            let _ = l.read_held(file_offset, &mut b);
                        }
                    }
                }
            }
        }
    }
    let opts = ChainOptions {
        ignore_linkage: true,
        ..Default::default()
    };
    if let Ok(chain) = Chain::open(path, &opts) {
        let d = Disk::new(
            chain,
            DiskOptions {
                cache_bytes: MIB,
                cache_block: 64 << 10,
            },
        );
        let mut b = vec![0u8; MIB as usize];
        let _ = d.read_at(0, &mut b);
        let _ = d.read_at(d.len().saturating_sub(4096), &mut b);
    }
}

#[test]
fn fuzz_regressions_open_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let t = TempDir::new("hostile-regr");
    let mut n = 0;
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "bin") {
            continue;
        }
        let mut input = fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("read_anywhere_") {
            // That target's input ends with its ranges: count byte, count x 12 bytes.
            if let Some(&count) = input.last() {
                let cut = 1 + (count % 9) as usize * 12;
                input.truncate(input.len().saturating_sub(cut));
            }
        }
        let img = t.join("img");
        sparse::write_file(&img, &input).unwrap();
        if sparse::fix_checksums_wanted(&input) {
            sparse::fix_vhdx_checksums(&img);
        }
        eprintln!("regression {}", p.display());
        exercise(&img);
        n += 1;
    }
    eprintln!("{n} fuzz regression inputs");
}

// ------------------------------------------------------------------ memory ceilings

#[test]
fn peak_rss_of_info_and_cat_on_images_claiming_huge_sizes() {
    let time = Path::new("/usr/bin/time");
    if !time.exists() {
        assert!(
            !common::required(),
            "/usr/bin/time missing (scripts/setup.sh installs it)"
        );
        eprintln!("SKIP: /usr/bin/time not installed");
        return;
    }
    let t = TempDir::new("hostile-rss");
    // 64 TiB in 256 MiB blocks (BAT 2.2 MiB) and in 32 MiB blocks (BAT 17 MiB).
    let small_bat = huge_vhdx(t.path(), "huge256.vhdx", "256M", 3 * MIB);
    let big_bat = huge_vhdx(t.path(), "huge32.vhdx", "32M", 18 * MIB);
    let bin = BIN;
    let base = peak_rss_mib(&format!(
        "/usr/bin/time -f 'MAXRSS %M' {bin} --version >/dev/null"
    ));
    for (img, bat_mib) in [(&small_bat, 2.2), (&big_bat, 17.0)] {
        let info = peak_rss_mib(&format!(
            "/usr/bin/time -f 'MAXRSS %M' {bin} info {} >/dev/null",
            img.display()
        ));
        // cat of the first 256 MiB of a 64 TiB disk (head ends it with EPIPE).
        let cat = peak_rss_mib(&format!(
            "/usr/bin/time -f 'MAXRSS %M' {bin} cat {} | head -c {} >/dev/null",
            img.display(),
            256 * MIB
        ));
        eprintln!(
            "{}: peak RSS info {info:.1} MiB, cat {cat:.1} MiB (binary alone {base:.1} MiB, BAT {bat_mib} MiB)",
            img.display()
        );
        // Ceiling (docs/security.md): the binary + 32 MiB + 2 x BAT (the BAT as entries,
        // and one 1 MiB page of it raw while loading) for a one-layer chain (no cache).
        let ceiling = base + 32.0 + 2.0 * bat_mib;
        assert!(info < ceiling, "info peak {info:.1} MiB > {ceiling:.1}");
        assert!(cat < ceiling, "cat peak {cat:.1} MiB > {ceiling:.1}");
    }
    // A VHD claiming 4 TiB in 512 KiB blocks: 8 Mi BAT entries (the ceiling), a 32 MiB
    // BAT in a sparse file.
    let vhd = t.join("huge.vhd");
    ok(&[&"create", &"--size", &"4M", &"--block-size", &"512K", &vhd]);
    let mut img = fs::read(&vhd).unwrap();
    let n = img.len();
    let footer = img[n - 512..].to_vec();
    let entries: u64 = 8 << 20;
    img.truncate(n - 512);
    img.resize(1536 + entries as usize * 4, 0);
    img[1536..].fill(0xFF); // every block unallocated
    img.extend_from_slice(&footer);
    let n = img.len();
    let size = entries * 512 * 1024;
    for off in [0, n - 512] {
        img[off + 48..off + 56].copy_from_slice(&size.to_be_bytes());
    }
    img[512 + 28..512 + 32].copy_from_slice(&(entries as u32).to_be_bytes());
    let fix = |b: &mut [u8], at: usize, len: usize, ck: usize| {
        b[at + ck..at + ck + 4].fill(0);
        let s: u32 = b[at..at + len].iter().map(|&x| x as u32).sum();
        b[at + ck..at + ck + 4].copy_from_slice(&(!s).to_be_bytes());
    };
    fix(&mut img, n - 512, 512, 64);
    fix(&mut img, 0, 512, 64);
    fix(&mut img, 512, 1024, 36);
    fs::write(&vhd, &img).unwrap();
    drop(img);
    let info = peak_rss_mib(&format!(
        "/usr/bin/time -f 'MAXRSS %M' {bin} info {} >/dev/null",
        vhd.display()
    ));
    let cat = peak_rss_mib(&format!(
        "/usr/bin/time -f 'MAXRSS %M' {bin} cat {} | head -c {} >/dev/null",
        vhd.display(),
        256 * MIB
    ));
    eprintln!(
        "{}: 8 Mi entries, peak RSS info {info:.1} MiB, cat {cat:.1} MiB",
        vhd.display()
    );
    // VHD: about 40 bytes per entry (entry, bitmap slot) = 320 MiB, plus the 32 MiB read.
    let ceiling = base + 32.0 + 48.0 * 8.0 + 32.0;
    assert!(info < ceiling, "info peak {info:.1} MiB > {ceiling:.1}");
    assert!(cat < ceiling, "cat peak {cat:.1} MiB > {ceiling:.1}");
}

// ------------------------------------------------------------------ parents

/// base.vhdx (with data), a.vhdx child of base, b.vhdx child of a.
fn small_chain(t: &TempDir) -> (PathBuf, PathBuf, PathBuf) {
    let base = t.join("base.vhdx");
    let a = t.join("a.vhdx");
    let b = t.join("b.vhdx");
    ok(&[&"create", &"--size", &"4M", &"--block-size", &"1M", &base]);
    {
        let chain = Chain::open(
            &base,
            &ChainOptions {
                intent: Intent::WriteTop,
                ..Default::default()
            },
        )
        .unwrap();
        let d = Disk::new(chain, DiskOptions::default());
        d.write_at(2 * MIB, &vec![0x5a; MIB as usize]).unwrap();
        d.close().unwrap();
    }
    ok(&[&"create", &"--parent", &base, &a]);
    ok(&[&"create", &"--parent", &a, &b]);
    (base, a, b)
}

/// What "did not hang" means for a command that takes milliseconds: generous, so that a
/// loaded machine (the tests run in parallel with others) cannot reach it by itself.
const NO_HANG: Duration = Duration::from_secs(60);

#[test]
fn parent_locators_pointing_at_each_other_are_a_clear_error() {
    let t = TempDir::new("hostile-cycle");
    let (base, a, b) = small_chain(&t);
    // a names "base.vhdx"; make that name b, whose parent is a: a -> b -> a.
    fs::remove_file(&base).unwrap();
    fs::rename(&b, &base).unwrap();
    let e = err(&[&"info", &a]);
    assert!(
        e.contains("does not match"),
        "linkage is checked first: {e}"
    );
    let started = Instant::now();
    let e = err(&[&"info", &"--ignore-linkage", &a]);
    assert!(e.contains("parent cycle"), "{e}");
    // Not a hang (it would never end): a bound a loaded machine cannot reach by itself.
    assert!(started.elapsed() < NO_HANG);
}

#[test]
fn fifo_and_device_parents_are_refused_without_blocking() {
    let t = TempDir::new("hostile-fifo");
    let (base, a, _b) = small_chain(&t);
    fs::remove_file(&base).unwrap();
    // A FIFO: opening it would block until a writer came; it is refused by type first.
    let st = Command::new("mkfifo").arg(&base).status().unwrap();
    assert!(st.success());
    let started = Instant::now();
    let e = err(&[&"info", &a]);
    assert!(
        e.contains("FIFO") && e.contains("--allow-device-parent"),
        "{e}"
    );
    assert!(started.elapsed() < NO_HANG);
    // A character device (through a symlink): refused the same way.
    fs::remove_file(&base).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &base).unwrap();
    let e = err(&[&"info", &a]);
    assert!(
        e.contains("device") && e.contains("--allow-device-parent"),
        "{e}"
    );
    // Allowed, /dev/zero is still not an image: a clear error, not a hang or a read of
    // endless zeros.
    let e = err(&[&"info", &"--allow-device-parent", &a]);
    assert!(
        e.contains("not a VHDX or VHD image") || e.contains("parent"),
        "{e}"
    );
}

// ------------------------------------------------------------------ the daemon

fn can_mount(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse");
    }
    if !have("fusermount3") {
        missing.push("fusermount3");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: missing {}", missing.join(", "));
    assert!(!common::required(), "{msg} (VDISKFS_REQUIRE_FUSE=1)");
    eprintln!("{msg}; skipping");
    false
}

fn mountinfo_line(dir: &Path) -> Option<String> {
    let dir = fs::canonicalize(dir).ok()?;
    let dir = dir.to_str()?;
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(dir))
        .map(str::to_string)
}

/// A foreground daemon; unmounted and reaped on drop.
struct Mounted {
    dir: PathBuf,
    child: Child,
    log: PathBuf,
}

impl Mounted {
    fn start(
        image: &Path,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let mut c = Command::new(BIN);
        c.args(["mount", "-f", "-v"])
            .args(extra)
            .arg(image)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap();
        let mut m = Mounted {
            dir: dir.to_path_buf(),
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while mountinfo_line(dir).is_none() || !dir.join("disk.raw").exists() {
            if let Some(st) = m.child.try_wait().unwrap() {
                panic!("daemon exited early ({st}): {}", m.log_text());
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none() && mountinfo_line(&self.dir).is_some()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if mountinfo_line(&self.dir).is_some() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// pread with O_DIRECT (no page cache, no readahead: one request reaches the daemon).
fn direct_read(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // A 4 KiB-aligned buffer.
    let mut raw = vec![0u8; len + 4096];
    let pad = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[pad..pad + len];
    f.read_exact_at(buf, off)?;
    Ok(buf.to_vec())
}

#[test]
fn mount_options_and_namespace() {
    if !can_mount("mount_options_and_namespace") {
        return;
    }
    let t = TempDir::new("hostile-opts");
    let (base, _a, _b) = small_chain(&t);
    {
        let m = Mounted::start(&base, &t.join("m1"), &["-r"], &[], t.join("m1.log"));
        let line = mountinfo_line(&m.dir).unwrap();
        assert!(
            !line.contains("allow_other"),
            "allow_other by default: {line}"
        );
        // Only the disk and .stats; nothing else can be looked up or made.
        let mut names: Vec<String> = fs::read_dir(&m.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".stats", "disk.raw"]);
        for n in ["etc", "../x", "disk.raw/x", ".stats2", "DISK.RAW"] {
            assert!(fs::metadata(m.dir.join(n)).is_err(), "{n} exists");
        }
        assert!(fs::write(m.dir.join("new"), b"x").is_err());
        assert!(fs::create_dir(m.dir.join("d")).is_err());
        // Owned by the mounting user.
        let md = fs::metadata(m.dir.join("disk.raw")).unwrap();
        assert_eq!(md.uid(), nix::unistd::getuid().as_raw());
        assert_eq!(md.gid(), nix::unistd::getgid().as_raw());
    }
    if nix::unistd::geteuid().as_raw() == 0 {
        let m = Mounted::start(
            &base,
            &t.join("m2"),
            &["-r", "-o", "allow_other"],
            &[],
            t.join("m2.log"),
        );
        let line = mountinfo_line(&m.dir).unwrap();
        assert!(
            line.contains("allow_other") && line.contains("default_permissions"),
            "{line}"
        );
    } else {
        eprintln!("allow_other part skipped: not root (needs user_allow_other otherwise)");
    }
}

#[test]
fn a_panic_in_a_worker_is_eio_for_that_request_and_the_mount_stays_up() {
    if !can_mount("panic_in_worker") {
        return;
    }
    let t = TempDir::new("hostile-panic");
    let (base, _a, _b) = small_chain(&t);
    let at = 3 * MIB + 12345;
    let mut m = Mounted::start(
        &base,
        &t.join("m"),
        &["-r"],
        &[("VDISKFS_FAULT_PANIC_AT_OFFSET", &at.to_string())],
        t.join("m.log"),
    );
    let disk = m.dir.join("disk.raw");
    assert_eq!(direct_read(&disk, 2 * MIB, 4096).unwrap(), vec![0x5a; 4096]);
    let e = direct_read(&disk, 3 * MIB, 64 << 10).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Again (the worker survived, or was replaced), and other reads still work.
    let e = direct_read(&disk, 3 * MIB + 8192, 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    for _ in 0..8 {
        assert_eq!(
            direct_read(&disk, 2 * MIB + 4096, 4096).unwrap(),
            vec![0x5a; 4096]
        );
        assert_eq!(direct_read(&disk, 0, 4096).unwrap(), vec![0; 4096]);
    }
    assert!(m.alive(), "daemon died: {}", m.log_text());
    let log = m.log_text();
    assert!(
        log.contains("panic") && log.contains("EIO"),
        "the panic is logged: {log}"
    );
}

#[test]
fn a_parent_truncated_under_a_mount_gives_eio_never_wrong_bytes() {
    if !can_mount("truncated_parent") {
        return;
    }
    let t = TempDir::new("hostile-trunc");
    let (base, a, _b) = small_chain(&t);
    // The base's only payload block (virtual 2 MiB..3 MiB) is the first one allocated,
    // right after the 1 MiB BAT region at 3 MiB.
    assert_eq!(fs::metadata(&base).unwrap().len(), 5 * MIB);
    let mut m = Mounted::start(&a, &t.join("m"), &["-r"], &[], t.join("m.log"));
    let disk = m.dir.join("disk.raw");
    assert_eq!(direct_read(&disk, 2 * MIB, 4096).unwrap(), vec![0x5a; 4096]);
    // Cut the parent in the middle of that block (a parent is only read, never locked
    // against this: truncation by another process is the hostile case).
    set_file_len(&base, 4 * MIB + 512 * 1024);
    // Below the cut: still right (or EIO if the cache block straddles the cut).
    match direct_read(&disk, 2 * MIB + 4096, 4096) {
        Ok(b) => assert_eq!(b, vec![0x5a; 4096]),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    // Past the cut: EIO, not zeros and not stale bytes.
    let e = direct_read(&disk, 2 * MIB + 768 * 1024, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(m.alive(), "daemon died: {}", m.log_text());
    let log = m.log_text();
    assert!(log.contains("base.vhdx"), "the log names the file: {log}");
}
