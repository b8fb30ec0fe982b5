//! Helpers shared by the integration tests: run the built `vdiskfs` binary and other
//! tools as a user would, temporary directories that clean up after themselves,
//! sha256 through `sha256sum`, random raw files, qemu-img wrappers, FUSE mounts
//! that are always unmounted, and "skip unless the tool is there" checks.
//!
//! Each test file includes this with `mod common;` and uses what it needs.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// Temporary directories, fixtures, `required()`, mount points: shared with the unit
// tests.
#[path = "../../src/test_support.rs"]
mod test_support;
pub use test_support::*;

/// Tools `scripts/setup.sh` installs (keep in step with it).
pub const SETUP_TOOLS: &[&str] = &[
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "vhdimount",
    "vhdiinfo",
    "fusermount3",
    "mkfs.ext4",
    "mke2fs",
    "debugfs",
    "mkntfs",
    "ntfs-3g",
    "mkfs.vfat",
    "mcopy",
    "sgdisk",
    "partx",
    "blkid",
    "fuse2fs",
    "useradd",
    "userdel",
    "runuser",
    "losetup",
    "mount",
    "umount",
    "7zz",
    "sha256sum",
    "mount.fuse3",
    "findmnt",
    "man",
    "script",
    "cargo-deb",
];

/// The vdiskfs binary cargo built for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vdiskfs")
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// What a finished command left behind.
pub struct Out {
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Out {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panic with the command, exit status and stderr unless it succeeded.
    pub fn assert_success(&self) -> &Out {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\nstderr:\n{}\nstdout:\n{}",
            self.cmd,
            self.status,
            self.stderr,
            truncate(&self.stdout_str(), 4000)
        );
        self
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A command line as a user would type it, for messages.
pub fn cmd_string(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command to completion, capturing stdout and stderr (stdin is empty).
pub fn run(cmd: &mut Command) -> Out {
    let desc = cmd_string(cmd);
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    Out {
        cmd: desc,
        status: o.status,
        stdout: o.stdout,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Run and assert success.
pub fn run_ok(cmd: &mut Command) -> Out {
    let o = run(cmd);
    o.assert_success();
    o
}

/// `vdiskfs ARGS...`, captured.
pub fn vdiskfs<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(bin()).args(args))
}

/// `vdiskfs ARGS... > stdout_file`: stdout goes straight to a regular file, as a
/// shell redirection would; stderr is captured.
pub fn vdiskfs_to_file<I, S>(args: I, stdout_file: &Path) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let f = File::create(stdout_file)
        .unwrap_or_else(|e| panic!("create {}: {e}", stdout_file.display()));
    let mut cmd = Command::new(bin());
    cmd.args(args);
    let desc = format!("{} > {}", cmd_string(&cmd), stdout_file.display());
    let o = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    Out {
        cmd: desc,
        status: o.status,
        stdout: Vec::new(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `cmd` (described as `desc`) started with no stdin and stdout and stderr piped; its
/// stderr is drained on a thread (returned) so a chatty child cannot block on a full
/// pipe.
fn spawn_piped(cmd: &mut Command, desc: &str) -> (Child, std::thread::JoinHandle<Vec<u8>>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{desc}`: {e}"));
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    (child, err_thread)
}

/// Run `cmd` with its stdout piped into `sha256sum` (nothing is stored, so this works
/// for outputs of many GiB). Returns the digest of stdout and the command's result
/// (with empty `stdout`).
pub fn sha256_of_stdout(cmd: &mut Command) -> (String, Out) {
    let desc = format!("{} | sha256sum", cmd_string(cmd));
    let (mut child, err_thread) = spawn_piped(cmd, &desc);
    let pipe = child.stdout.take().expect("stdout piped");
    let hasher = Command::new("sha256sum")
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    let h = hasher.wait_with_output().expect("wait for sha256sum");
    let status = child.wait().expect("wait for command");
    let stderr = err_thread.join().expect("stderr reader");
    assert!(h.status.success(), "sha256sum failed for `{desc}`");
    let digest = String::from_utf8_lossy(&h.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    (
        digest,
        Out {
            cmd: desc,
            status,
            stdout: Vec::new(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        },
    )
}

/// Run `cmd` and compare its stdout, as it streams, with the contents of `want`
/// (nothing is stored, so this works for outputs of many GiB at memory speed).
/// Panics with the first differing offset. Returns the command's result (with empty
/// `stdout`) for the caller to check.
pub fn stdout_vs_file(cmd: &mut Command, want: &Path) -> Out {
    let desc = cmd_string(cmd);
    let (mut child, err_thread) = spawn_piped(cmd, &desc);
    let mut pipe = child.stdout.take().expect("stdout piped");
    let mut f = File::open(want).unwrap_or_else(|e| panic!("open {}: {e}", want.display()));
    let mut got_buf = vec![0u8; 1 << 20];
    let mut want_buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    let mismatch = loop {
        let mut n = 0;
        while n < got_buf.len() {
            match pipe.read(&mut got_buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read stdout of `{desc}`: {e}"),
            }
        }
        let m = read_full(&mut f, &mut want_buf[..n.max(1)]);
        if n == 0 {
            break if m == 0 {
                None
            } else {
                Some((off, "stdout ended early"))
            };
        }
        if m != n {
            break Some((off + m as u64, "stdout is longer than the expected file"));
        }
        if got_buf[..n] != want_buf[..n] {
            let i = got_buf[..n]
                .iter()
                .zip(&want_buf[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            break Some((off + i as u64, "bytes differ"));
        }
        off += n as u64;
    };
    drop(pipe);
    let status = child.wait().expect("wait for command");
    let stderr = String::from_utf8_lossy(&err_thread.join().expect("stderr reader")).into_owned();
    if let Some((at, what)) = mismatch {
        panic!(
            "`{desc}` vs {}: {what} at byte offset {at} ({status}); stderr:\n{stderr}",
            want.display()
        );
    }
    Out {
        cmd: desc,
        status,
        stdout: Vec::new(),
        stderr,
    }
}

/// sha256 of a file, by `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let o = run_ok(Command::new("sha256sum").arg(path));
    let s = o.stdout_str();
    let d = s.split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(d.len(), 64, "unexpected sha256sum output: {s}");
    d
}

/// The first offset where two files differ (or where the shorter one ends), or None
/// when they are identical. For messages that say *where* two outputs disagree.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y);
            return Some(off + i.unwrap_or(0) as u64);
        }
        if na != nb {
            return Some(off + n as u64);
        }
        if na == 0 {
            return None;
        }
        off += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    n
}

/// Assert two files hold the same bytes: compares sha256 (by `sha256sum`) and on a
/// mismatch says where the first difference is.
pub fn assert_same_file(got: &Path, want: &Path, what: &str) {
    let (g, w) = (sha256_file(got), sha256_file(want));
    if g != w {
        let at = first_difference(got, want);
        panic!(
            "{what}: {} (sha256 {g}, {} bytes) differs from {} (sha256 {w}, {} bytes); \
             first difference at byte offset {at:?}",
            got.display(),
            file_len(got),
            want.display(),
            file_len(want)
        );
    }
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

// ---------------------------------------------------------------------------
// Making raw files
// ---------------------------------------------------------------------------

/// A small, fast, deterministic generator (splitmix64) for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let k = rest.len();
        rest.copy_from_slice(&last[..k]);
    }

    /// A value in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Create (or truncate) `path` as a sparse file of `size` bytes: all zeros, no data.
pub fn make_sparse(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size)
        .unwrap_or_else(|e| panic!("set_len {}: {e}", path.display()));
}

/// Write `len` pseudo-random bytes (from `seed`) at `offset` of an existing file,
/// like `dd if=/dev/urandom of=PATH bs=1 seek=OFFSET count=LEN conv=notrunc`.
pub fn write_random_at(path: &Path, offset: u64, len: u64, seed: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], offset + done)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        done += n as u64;
    }
}

/// Write the same byte `len` times at `offset` of an existing file (e.g. zero a range
/// of a random file to make a hole that qemu-img turns into an unallocated block).
pub fn write_byte_at(path: &Path, offset: u64, len: u64, byte: u8) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let buf = vec![byte; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], offset + done)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        done += n as u64;
    }
}

/// A file of `size` pseudo-random bytes.
pub fn make_random(path: &Path, size: u64, seed: u64) {
    make_sparse(path, size);
    write_random_at(path, 0, size, seed);
}

/// Overwrite `data` at `offset` of an existing file.
pub fn patch_file(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Truncate or extend `path` to `len` bytes.
pub fn set_file_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .set_len(len)
        .unwrap_or_else(|e| panic!("set the length of {}: {e}", path.display()));
}

/// Read `len` bytes at `offset` of a file.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// Copy every file of a directory (not recursive) into `dest`, writable.
pub fn copy_dir_files(src: &Path, dest: &Path) {
    for e in fs::read_dir(src).unwrap_or_else(|e| panic!("read_dir {}: {e}", src.display())) {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let to = dest.join(e.file_name());
            fs::copy(e.path(), &to)
                .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
            let mut perm = fs::metadata(&to).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            fs::set_permissions(&to, perm).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// qemu-img
// ---------------------------------------------------------------------------

/// `qemu-img ARGS...`, asserting success.
pub fn qemu_img(args: &[&str]) -> Out {
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-img ARGS...` where the arguments include paths.
pub fn qemu_img_os<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok(Command::new("qemu-img").args(args))
}

/// `qemu-img convert -f raw -O DRIVER [-o OPTS] RAW OUT` (no `-o` when `opts` is
/// empty): qemu-img as an independent maker of images.
pub fn qemu_convert_raw(driver: &str, opts: &str, raw: &Path, out: &Path) {
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O", driver]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    run_ok(c.arg(raw).arg(out));
}

/// `vdiskfs create --parent PARENT CHILD`: an empty child with the defaults.
pub fn create_child(parent: &Path, child: &Path) {
    vdiskfs([
        OsStr::new("create"),
        OsStr::new("--parent"),
        parent.as_os_str(),
        child.as_os_str(),
    ])
    .assert_success();
}

/// `qemu-img create -q -f DRIVER -o OPTS IMG SIZE`: an empty image made by qemu-img.
pub fn qemu_create(driver: &str, opts: &str, img: &Path, size: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", driver, "-o", opts])
            .arg(img)
            .arg(size),
    );
}

/// `qemu-img convert -f FMT -O raw IMG OUT`: qemu's merged raw view, the oracle.
pub fn qemu_to_raw(fmt: &str, img: &Path, out: &Path) {
    qemu_img_os([
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new(fmt),
        OsStr::new("-O"),
        OsStr::new("raw"),
        img.as_os_str(),
        out.as_os_str(),
    ]);
}

/// `--image-opts` for qemu to read IMG as FMT (`vhdx` or `vpc`) at its true size. For a
/// VHD it asks for the footer's current size (the spec's virtual size): qemu 7.2 sizes a
/// VHD whose creator it does not know (vdiskfs writes `vdfs`) by its CHS geometry, which
/// is up to ~0.1% smaller; qemu 10 uses the current size. Same answer from both.
pub fn qemu_image_opts(fmt: &str, img: &Path) -> String {
    let path = img.to_str().expect("test paths are UTF-8");
    assert!(!path.contains(','), "a comma would need escaping: {path}");
    let size_calc = if fmt == "vpc" {
        "force_size_calc=current_size,"
    } else {
        ""
    };
    format!("driver={fmt},{size_calc}file.filename={path}")
}

/// `qemu-img info --output=json --image-opts SPEC`, parsed.
pub fn qemu_info_opts(spec: &str) -> serde_json::Value {
    let o = qemu_img(&["info", "--output=json", "--image-opts", spec]);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info JSON: {e}: {}", o.stdout_str()))
}

/// `qemu-img info --output=json -f FMT IMG`, parsed. (qemu 10 also lists the child
/// nodes, each with its own "virtual-size": read the top-level keys only.)
pub fn qemu_info(fmt: &str, img: &Path) -> serde_json::Value {
    let o = qemu_img_os([
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-f"),
        OsStr::new(fmt),
        img.as_os_str(),
    ]);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info JSON: {e}: {}", o.stdout_str()))
}

// ---------------------------------------------------------------------------
// vdiskfs wrappers
// ---------------------------------------------------------------------------

/// `vdiskfs info --json IMG [EXTRA...]`, asserting success, parsed.
pub fn info_json(img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&OsStr> = vec![OsStr::new("info"), OsStr::new("--json")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    let o = vdiskfs(&args);
    o.assert_success();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "`{}` did not print valid JSON: {e}\n{}",
            o.cmd,
            o.stdout_str()
        )
    })
}

/// The layers array of `vdiskfs info --json`, top first.
pub fn info_layers(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v.get("layers")
        .and_then(|l| l.as_array())
        .unwrap_or_else(|| panic!("info --json has no \"layers\" array: {v}"))
}

/// A numeric field of a JSON object, with a message naming what is missing.
pub fn json_u64(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key)
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("field {key:?} missing or not an unsigned number in {v}"))
}

pub fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("field {key:?} missing or not a string in {v}"))
}

/// `vdiskfs cat IMG [EXTRA...] > OUT`, asserting success and a quiet stderr.
pub fn cat_to_file(img: &Path, extra: &[&str], out: &Path) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("cat")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    let o = vdiskfs_to_file(&args, out);
    o.assert_success();
}

/// `vdiskfs cat --output OUT IMG [EXTRA...]`, asserting success; stdout must stay empty.
pub fn cat_output_option(img: &Path, extra: &[&str], out: &Path) {
    let mut args: Vec<&OsStr> = vec![OsStr::new("cat"), OsStr::new("--output"), out.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    let o = vdiskfs(&args);
    o.assert_success();
    assert!(
        o.stdout.is_empty(),
        "`{}` wrote {} bytes to stdout although --output was given",
        o.cmd,
        o.stdout.len()
    );
}

/// sha256 of `vdiskfs cat IMG [EXTRA...]` piped (not stored), asserting success.
pub fn cat_sha256(img: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(bin());
    cmd.arg("cat").args(extra).arg(img);
    let (d, o) = sha256_of_stdout(&mut cmd);
    o.assert_success();
    d
}

/// A failure as the CLI must report it: non-zero exit (not a crash or a signal), no
/// panic, and exactly one line on stderr, starting with "vdiskfs: " and naming `file`.
pub fn assert_clean_failure(o: &Out, file: &Path) {
    let lines = failed_cleanly(o);
    assert_eq!(
        lines.len(),
        1,
        "`{}` must print exactly one line on stderr, got:\n{}",
        o.cmd,
        o.stderr
    );
    assert!(
        lines[0].starts_with("vdiskfs: "),
        "`{}`: error line must start with \"vdiskfs: \": {}",
        o.cmd,
        lines[0]
    );
    assert_names_file(o, lines[0], file);
}

/// What every failure must be: not a success, no panic, an exit code (not a signal)
/// other than a panic's 101. Returns the non-empty lines of stderr.
fn failed_cleanly(o: &Out) -> Vec<&str> {
    assert!(
        !o.status.success(),
        "`{}` succeeded but must fail; stderr:\n{}",
        o.cmd,
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked"),
        "`{}` panicked:\n{}",
        o.cmd,
        o.stderr
    );
    let code = o.status.code();
    assert!(
        code.is_some() && code != Some(101),
        "`{}` ended with {} (a signal or a panic), not a clean error exit; stderr:\n{}",
        o.cmd,
        o.status,
        o.stderr
    );
    o.stderr.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// The error line names `file` (its file name).
fn assert_names_file(o: &Out, line: &str, file: &Path) {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        line.contains(&name),
        "`{}`: error line must name the file {name}: {line}",
        o.cmd
    );
}

/// Like `assert_clean_failure`, but warnings the input legitimately causes (say a
/// checksum mismatch in a fixture) may come first: the last line on stderr is the
/// one error line, starting with "vdiskfs: " and naming `file`, and it is the only
/// line starting with "vdiskfs: ".
pub fn assert_failure_after_warnings(o: &Out, file: &Path) {
    let lines = failed_cleanly(o);
    let errors = lines.iter().filter(|l| l.starts_with("vdiskfs: ")).count();
    assert_eq!(
        errors, 1,
        "`{}`: one error line expected:\n{}",
        o.cmd, o.stderr
    );
    let last = lines.last().copied().unwrap_or("");
    assert!(
        last.starts_with("vdiskfs: "),
        "`{}`: the error must be the last line on stderr:\n{}",
        o.cmd,
        o.stderr
    );
    assert_names_file(o, last, file);
}

// ---------------------------------------------------------------------------
// Tools, FUSE, mounts
// ---------------------------------------------------------------------------

/// `command -v CMD` succeeds: the shell finds `cmd` on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where `name` is on PATH (or in the sbin directories a non-root PATH may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// True when `name` can be run. Otherwise print why the test is skipped and return
/// false; but when VDISKFS_REQUIRE_FUSE is set and `scripts/setup.sh` is supposed to
/// install `name`, fail the test instead.
///
/// Use as `if !require_tool("qemu-img") { return; }`.
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        return true;
    }
    if required() && SETUP_TOOLS.contains(&name) {
        panic!(
            "{name} not found, and {REQUIRE_ENV} is set: scripts/setup.sh should have installed it"
        );
    }
    eprintln!("SKIPPED: {name} not found (scripts/setup.sh installs it)");
    false
}

/// All of `names` (see `require_tool`).
pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// True when FUSE mounts can be made here (/dev/fuse usable and fusermount3 present).
/// Otherwise skip with a message, or fail when VDISKFS_REQUIRE_FUSE is set.
pub fn require_fuse() -> bool {
    let why = if find_tool("fusermount3").is_none() {
        Some("fusermount3 not found".to_string())
    } else {
        match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
            Ok(_) => None,
            Err(e) => Some(format!("/dev/fuse cannot be opened: {e}")),
        }
    };
    match why {
        None => true,
        Some(w) if required() => panic!("FUSE unavailable ({w}) and {REQUIRE_ENV} is set"),
        Some(w) => {
            eprintln!("SKIPPED: FUSE unavailable ({w}); set {REQUIRE_ENV}=1 to make this fail");
            false
        }
    }
}

/// Unmount a FUSE mount point: `fusermount3 -u`, retried while the mount is busy,
/// then a lazy `fusermount3 -uz` as the last resort. Returns true when unmounted.
pub fn fuse_unmount(dir: &Path) -> bool {
    if unmount_retrying(dir, "fusermount3", &["-u"]) {
        return true;
    }
    let _ = Command::new("fusermount3")
        .arg("-uz")
        .arg(dir)
        .stdin(Stdio::null())
        .status();
    !is_mounted(dir)
}

/// How long an unmount is retried while the mount is busy. Generous on purpose: a mount
/// is busy while another test thread's fork holds a descriptor into it (until that child
/// execs), while a loop device or a guest's FUSE daemon lets go of a file in it, and
/// while the kernel finishes a RELEASE; on a loaded machine each of these can take
/// seconds. Retrying costs nothing when the first attempt works.
pub const UNMOUNT_PATIENCE: Duration = Duration::from_secs(60);

/// `PROGRAM ARGS DIR` until `dir` is no longer a mount point, for up to
/// `UNMOUNT_PATIENCE`. True when it was unmounted.
fn unmount_retrying(dir: &Path, program: &str, args: &[&str]) -> bool {
    let deadline = Instant::now() + UNMOUNT_PATIENCE;
    loop {
        if !is_mounted(dir) {
            return true;
        }
        let _ = Command::new(program)
            .args(args)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !is_mounted(dir) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `umount DIR` (the kernel's unmount, for any file system, FUSE ones included), retried
/// while busy for up to `UNMOUNT_PATIENCE`; never lazy. True when it was unmounted. For
/// tests that assert an unmount works.
pub fn umount_retrying(dir: &Path) -> bool {
    unmount_retrying(dir, "umount", &[])
}

/// The processes that have `path`, or anything below it, open (a descriptor, their
/// current or root directory), as "PID (COMM): WHAT" lines, from /proc. For messages
/// and for waiting until a daemon has let go of a file.
pub fn processes_using(path: &Path) -> Vec<String> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = e.path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let mut links: Vec<PathBuf> = vec![dir.join("cwd"), dir.join("root")];
        if let Ok(fds) = fs::read_dir(dir.join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        for l in links {
            if let Ok(target) = fs::read_link(&l) {
                if target.starts_with(&path) {
                    out.push(format!(
                        "{pid} ({}): {} -> {}",
                        comm.trim(),
                        l.display(),
                        target.display()
                    ));
                }
            }
        }
    }
    out
}

/// Wait until no process has `path` open (`processes_using`), for up to 60 s; panics
/// naming the holders otherwise. A FUSE daemon (ntfs-3g, vhdimount) keeps writing and
/// holding its file for a while after `fusermount3 -u` returns: only the daemon's end
/// says the file is complete.
pub fn wait_until_closed(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holders = processes_using(path);
        if holders.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} is still open 60 s later:\n{}",
            path.display(),
            holders.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A FUSE mount made by some tool, unmounted when dropped (even when the test fails).
pub struct FuseMount {
    dir: PathBuf,
}

impl FuseMount {
    /// Take responsibility for unmounting `dir`.
    pub fn adopt(dir: &Path) -> FuseMount {
        FuseMount {
            dir: dir.to_path_buf(),
        }
    }

    /// `vhdimount IMAGE DIR` (libvhdi, which daemonises once the mount is live).
    /// It exposes one file per layer, base first: `DIR/vhdi1` is the base alone and the
    /// highest `vhdiN` is IMAGE merged through its parents (see `merged`).
    pub fn vhdimount(image: &Path, dir: &Path) -> FuseMount {
        fs::create_dir_all(dir).unwrap();
        let guard = FuseMount::adopt(dir);
        let o = run(Command::new("vhdimount").arg(image).arg(dir));
        assert!(
            o.success(),
            "`{}` failed ({}): {}{}",
            o.cmd,
            o.status,
            o.stderr,
            o.stdout_str()
        );
        assert!(
            is_mounted(dir),
            "`{}` returned but {} is not mounted",
            o.cmd,
            dir.display()
        );
        guard
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// For a vhdimount: the merged view of the whole chain (the highest `vhdiN`).
    pub fn merged(&self) -> PathBuf {
        (1..=300)
            .map(|i| self.dir.join(format!("vhdi{i}")))
            .take_while(|p| p.exists())
            .last()
            .expect("vhdimount exposes at least vhdi1")
    }
}

/// `vdiskfs mount [--read-only] IMAGE DIR` (detached), unmounted on drop. For a clean
/// end use `vdiskfs umount DIR`: it returns once the daemon has flushed and closed IMAGE.
pub fn vdiskfs_mount(image: &Path, dir: &Path, ro: bool) -> FuseMount {
    fs::create_dir_all(dir).unwrap();
    let guard = FuseMount::adopt(dir);
    let mut args = vec!["mount".to_string()];
    if ro {
        args.push("--read-only".into());
    }
    args.push(image.display().to_string());
    args.push(dir.display().to_string());
    vdiskfs(args).assert_success();
    guard
}

/// `7zz x -tvhdx -so IMG` (7-Zip's merged raw view of a VHDX chain; it finds parents
/// only in IMG's folder) must equal `want`.
pub fn judge_7zz(img: &Path, want: &Path) {
    judge_7zz_as(img, "vhdx", want);
}

/// `7zz x -tKIND -so IMG` (KIND: vhdx or vhd) must equal `want`.
pub fn judge_7zz_as(img: &Path, kind: &str, want: &Path) {
    let mut c = Command::new("7zz");
    c.args(["x", &format!("-t{kind}"), "-so"]).arg(img);
    let o = stdout_vs_file(&mut c, want);
    assert!(
        o.success(),
        "`{}` failed ({}): {}",
        o.cmd,
        o.status,
        o.stderr
    );
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if !fuse_unmount(&self.dir) {
            eprintln!("warning: could not unmount {}", self.dir.display());
        }
    }
}

/// Write bytes to a new file.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A raw file of random data with zeroed `holes` (offset, length).
pub fn filled_raw(path: &Path, size: u64, seed: u64, holes: &[(u64, u64)]) {
    make_random(path, size, seed);
    for &(off, len) in holes {
        write_byte_at(path, off, len, 0);
    }
}

/// A sparse raw file with random data only at `extents` (offset, length).
pub fn sparse_raw(path: &Path, size: u64, seed: u64, extents: &[(u64, u64)]) {
    make_sparse(path, size);
    for (i, &(off, len)) in extents.iter().enumerate() {
        write_random_at(path, off, len, seed + i as u64);
    }
}

/// `vdiskfs cat IMG > out` and `vdiskfs cat --output out IMG` both equal `oracle`.
pub fn assert_cat_equals(dir: &TempDir, img: &Path, oracle: &Path) {
    let stdout_copy = dir.join("cat-stdout.raw");
    cat_to_file(img, &[], &stdout_copy);
    assert_same_file(
        &stdout_copy,
        oracle,
        "vdiskfs cat IMG > out vs qemu-img convert -O raw",
    );
    std::fs::remove_file(&stdout_copy).unwrap();
    let output_copy = dir.join("cat-output.raw");
    cat_output_option(img, &[], &output_copy);
    assert_same_file(
        &output_copy,
        oracle,
        "vdiskfs cat --output vs qemu-img convert -O raw",
    );
    std::fs::remove_file(&output_copy).unwrap();
}

// ---------------------------------------------------------------------------
// Terminals
// ---------------------------------------------------------------------------

/// Quote for sh.
pub fn sh_quote(s: &OsStr) -> String {
    format!("'{}'", s.to_str().unwrap().replace('\'', "'\\''"))
}

/// Run `vdiskfs ARGS` on a pseudo-terminal (`script`); returns what the terminal showed.
pub fn on_terminal(args: &[&OsStr]) -> String {
    let mut line = sh_quote(OsStr::new(bin()));
    for a in args {
        line.push(' ');
        line.push_str(&sh_quote(a));
    }
    let o = run(Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(&line)
        .arg("/dev/null")
        // indicatif draws nothing on a terminal called dumb (or with TERM unset).
        .env("TERM", "xterm"));
    o.assert_success();
    o.stdout_str()
}

/// A number from the environment (test sizes and cycle counts), `default` when unset;
/// a value that is not a number fails the test.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    }
}

/// Unmount a kernel file system (a guest on a loop device): `umount`, retried while busy
/// (another test thread's fork can hold a copy of a descriptor into the guest until it
/// execs), then, naming the holders (`processes_using`) on stderr, a lazy `umount -l` as
/// the last resort. Returns true when it was unmounted without the lazy fallback.
pub fn umount_guest(dir: &Path) -> bool {
    if umount_retrying(dir) {
        return true;
    }
    eprintln!(
        "{} stayed busy for {UNMOUNT_PATIENCE:?}; holders:\n{}",
        dir.display(),
        processes_using(dir).join("\n")
    );
    let _ = Command::new("umount").arg("-l").arg(dir).status();
    false
}

/// A seed for a randomized test: `name` from the environment (to replay a failure), else
/// the clock.
pub fn env_seed(name: &str) -> u64 {
    env_u64(
        name,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    )
}

/// The two image formats a test runs over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fmt {
    Vhdx,
    Vhd,
}

impl Fmt {
    /// File name extension.
    pub fn ext(self) -> &'static str {
        match self {
            Fmt::Vhdx => "vhdx",
            Fmt::Vhd => "vhd",
        }
    }

    /// qemu-img driver name.
    pub fn qemu(self) -> &'static str {
        match self {
            Fmt::Vhdx => "vhdx",
            Fmt::Vhd => "vpc",
        }
    }
}

/// A lazy unmount of a (dead) FUSE mount: `fusermount3 -u -z`, then `umount -l`.
pub fn lazy_unmount(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

/// The exit status of `c` once it exits, None when it has not within `t`.
pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().ok().flatten() {
            return Some(s);
        }
        if t0.elapsed() > t {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vdiskfs mount -f [EXTRA] IMG MNT` as a child process of the test: we know its pid,
/// can wait for a clean exit or kill it. Unmounted (and reaped) on drop.
pub struct Daemon {
    child: Option<Child>,
    img: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawned, not waited for (`wait_live`); its standard error goes to MNT.log.
    pub fn spawn(img: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        fs::create_dir_all(mnt).unwrap();
        let log = mnt.with_extension("log");
        let err = File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["mount", "-f"])
            .args(extra)
            .arg(img)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn vdiskfs mount -f");
        Daemon {
            child: Some(child),
            img: img.to_path_buf(),
            mnt: mnt.to_path_buf(),
            log,
        }
    }

    /// Spawned, and the mount live.
    pub fn start(img: &Path, mnt: &Path, extra: &[&str]) -> Daemon {
        let mut d = Daemon::spawn(img, mnt, extra);
        d.wait_live();
        d
    }

    /// What the daemon wrote to standard error.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The mounted disk.
    pub fn disk(&self) -> PathBuf {
        self.mnt.join("disk.raw")
    }

    /// Until the mount is live; fails when the daemon exits first.
    pub fn wait_live(&mut self) {
        let t0 = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "vdiskfs mount -f {} exited ({st}) before the mount was live:\n{}",
                    self.img.display(),
                    self.log_text()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "mount of {} not live after 30 s",
                self.img.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `vdiskfs umount`, then the daemon must exit 0 (it closes the image on the way out).
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        let mut ok = false;
        let deadline = Instant::now() + UNMOUNT_PATIENCE;
        while Instant::now() < deadline {
            if vdiskfs([OsStr::new("umount"), self.mnt.as_os_str()]).success() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !ok {
            fuse_unmount(&self.mnt);
        }
        let st = wait_timeout(&mut child, Duration::from_secs(30));
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(ok, "vdiskfs umount {} kept failing", self.mnt.display());
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon for {} ended with {st:?}:\n{}",
            self.mnt.display(),
            self.log_text()
        );
    }

    /// SIGKILL the daemon (no flush, no close), reap it, then drop the dead mount lazily.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        lazy_unmount(&self.mnt);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            fuse_unmount(&self.mnt);
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        lazy_unmount(&self.mnt);
    }
}

/// A loop device on a file, optionally with the guest file system mounted; detached on
/// drop.
pub struct Loop {
    pub dev: String,
    pub guest: Option<PathBuf>,
}

impl Loop {
    pub fn attach(file: &Path, ro: bool) -> Loop {
        let mut c = Command::new("losetup");
        c.args(["-f", "--show"]);
        if ro {
            c.arg("-r");
        }
        let o = run_ok(c.arg(file));
        let dev = o.stdout_str().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        Loop { dev, guest: None }
    }

    /// The kernel passes discards on: the loop device advertises them (it does when
    /// the backing file has fallocate, which a FUSE file has).
    pub fn assert_discards(&self) {
        let name = self.dev.trim_start_matches("/dev/");
        let q = format!("/sys/block/{name}/queue/discard_max_bytes");
        let v: u64 = fs::read_to_string(&q)
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .trim()
            .parse()
            .unwrap();
        assert!(v > 0, "{q} is 0: the loop device does not pass discards on");
    }

    pub fn mount(&mut self, guest: &Path, ro: bool) {
        fs::create_dir_all(guest).unwrap();
        let mut c = Command::new("mount");
        if ro {
            c.args(["-o", "ro"]);
        }
        run_ok(c.arg(&self.dev).arg(guest));
        self.guest = Some(guest.to_path_buf());
    }

    /// Unmount the guest (retried while busy: `umount_guest`) and detach, asserting both
    /// work.
    pub fn finish(mut self) {
        if let Some(g) = self.guest.take() {
            assert!(
                umount_guest(&g),
                "umount {} ({}) kept failing: busy",
                g.display(),
                self.dev
            );
        }
        let mut ok = false;
        for _ in 0..50 {
            if Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ok, "losetup -d {} failed", self.dev);
        self.dev.clear();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(g) = self.guest.take() {
            if is_mounted(&g) {
                let _ = Command::new("umount").arg("-l").arg(&g).status();
            }
        }
        if !self.dev.is_empty() {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The effective user is root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().as_raw() == 0
}

/// FUSE, root and loop devices, qemu-img and `tools`; skip with a message or, under
/// VDISKFS_REQUIRE_FUSE=1, fail (for every tool, not only those setup.sh lists).
pub fn can_run_loops(tools: &[&str]) -> bool {
    if !require_fuse() {
        return false;
    }
    let mut missing: Vec<String> = Vec::new();
    if !is_root() {
        missing.push("root (for loop devices)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("/dev/loop-control (modprobe loop)".into());
    }
    for t in ["qemu-img", "losetup", "mount", "umount"]
        .iter()
        .chain(tools)
    {
        if find_tool(t).is_none() {
            missing.push(t.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    if required() {
        panic!("missing {} and {REQUIRE_ENV} is set", missing.join(", "));
    }
    eprintln!("SKIPPED: missing {}", missing.join(", "));
    false
}

/// `vdiskfs check IMG` reports no damage.
pub fn check_ok(img: &Path) {
    check_ok_ctx(img, "")
}

/// `check_ok`, with `ctx` (what the test was doing) leading the failure message.
pub fn check_ok_ctx(img: &Path, ctx: &str) {
    let o = vdiskfs([OsStr::new("check"), img.as_os_str()]);
    let ctx = if ctx.is_empty() {
        String::new()
    } else {
        format!("{ctx}: ")
    };
    assert!(
        o.success(),
        "{ctx}`{}` reports damage ({}):\n{}{}",
        o.cmd,
        o.status,
        o.stdout_str(),
        o.stderr
    );
}

/// `vdiskfs umount MNT`, retried while busy for up to `UNMOUNT_PATIENCE` (a detached
/// loop device, or a guest's FUSE daemon such as ntfs-3g, lets go of `disk.raw`
/// asynchronously); fails the test when it keeps failing.
pub fn vdiskfs_umount(mnt: &Path) {
    let deadline = Instant::now() + UNMOUNT_PATIENCE;
    loop {
        let o = vdiskfs([OsStr::new("umount"), mnt.as_os_str()]);
        if o.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vdiskfs umount {} kept failing: {}\nholders:\n{}",
            mnt.display(),
            o.stderr,
            processes_using(mnt).join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `e2fsck -fn` (a forced read-only check) finds the ext4 file system on `dev` (a device
/// or a raw image) clean.
pub fn assert_e2fsck_clean(dev: &Path) {
    let o = run(Command::new("e2fsck").arg("-fn").arg(dev));
    assert!(
        o.success(),
        "e2fsck -fn {} failed ({}):\n{}{}",
        dev.display(),
        o.status,
        o.stdout_str(),
        o.stderr
    );
}
