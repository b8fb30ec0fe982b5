//! The conventions of a Linux tool and FUSE file system, tested as a user meets them:
//! `mount -t fuse.vdiskfs`, `mount -t vdiskfs` and /etc/fstab lines (through mount(8)
//! and mount.fuse3, judged by findmnt and qemu-img's raw view), the man pages and shell
//! completions, the Debian package (installed with dpkg and removed again), and the
//! progress bar (on a pseudo-terminal with `script`, and absent in pipes).
//!
//! mount(8) runs its helpers with no PATH of its own (mount.fuse3's /bin/sh then looks
//! in /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin), and looks for
//! mount.TYPE only in /sbin. So the mount(8) test links the built binary into
//! /usr/local/bin and /usr/sbin for its duration (removing the links afterwards), and the
//! package test installs the package; both hold `SYSTEM` so they never overlap.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::*;

/// Held by the tests that put vdiskfs into system directories.
static SYSTEM: Mutex<()> = Mutex::new(());

fn lock_system() -> std::sync::MutexGuard<'static, ()> {
    SYSTEM.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_root() -> bool {
    nix::unistd::geteuid().as_raw() == 0
}

/// Skip (or fail under VDISKFS_REQUIRE_FUSE) unless root.
fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if required() {
        panic!("{what} needs root and {REQUIRE_ENV} is set");
    }
    eprintln!("SKIPPED: {what} needs root");
    false
}

fn bin_dir() -> PathBuf {
    Path::new(bin()).parent().unwrap().to_path_buf()
}

/// PATH with the built binary's directory first (what mount.fuse3's shell searches when
/// it is run directly, not through mount(8)).
fn path_with_bin() -> std::ffi::OsString {
    let mut dirs = vec![bin_dir()];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs).unwrap()
}

/// `findmnt` on exactly `dir`: (FSTYPE, SOURCE, OPTIONS), or None when not a mount point.
fn findmnt(dir: &Path) -> Option<(String, String, String)> {
    let o = run(Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "--mountpoint"])
        .arg(dir));
    if !o.success() {
        return None;
    }
    let text = o.stdout_str();
    let mut f = text.split_whitespace();
    Some((
        f.next()?.to_string(),
        f.next()?.to_string(),
        f.next()?.to_string(),
    ))
}

/// How many mounts sit exactly on `dir` (stacked mounts count each).
fn mount_count(dir: &Path) -> usize {
    let dir = fs::canonicalize(dir).unwrap();
    mount_points().iter().filter(|m| **m == dir).count()
}

/// A chain whose parent is findable only through a search directory:
/// `store2/Base.vhdx` (made by qemu-img from `raw`, the oracle) and
/// `child/web.avhdx` (made by vdiskfs while the base was at `store/`).
struct Chain {
    child: PathBuf,
    store: PathBuf,
    base: PathBuf,
    raw: PathBuf,
}

fn chain(t: &TempDir) -> Chain {
    let raw = t.join("oracle.raw");
    // 8 MiB of random data with a hole (an unallocated block in the base).
    filled_raw(&raw, 8 << 20, 7, &[(2 << 20, 2 << 20)]);
    fs::create_dir_all(t.join("store")).unwrap();
    fs::create_dir_all(t.join("child")).unwrap();
    let base = t.join("store/Base.vhdx");
    qemu_convert_raw("vhdx", "subformat=dynamic", &raw, &base);
    let child = t.join("child/web.avhdx");
    create_child(&base, &child);
    // Move the base away: now only `search_dir=` finds it.
    fs::rename(t.join("store"), t.join("store2")).unwrap();
    let store = t.join("store2");
    Chain {
        child: fs::canonicalize(&child).unwrap(),
        base: store.join("Base.vhdx"),
        store,
        raw,
    }
}

/// disk.raw (or `name`) under `mnt` reads as `want`, and mountinfo shows a vdiskfs
/// mount whose source is the image.
fn assert_vdiskfs_mount(mnt: &Path, name: &str, image: &Path, want: &Path, ro: bool) {
    let (fstype, source, opts) =
        findmnt(mnt).unwrap_or_else(|| panic!("{} is not mounted", mnt.display()));
    assert_eq!(fstype, "fuse.vdiskfs", "{}: {opts}", mnt.display());
    assert_eq!(Path::new(&source), image, "the mount's source is the image");
    assert_eq!(
        opts.split(',').next(),
        Some(if ro { "ro" } else { "rw" }),
        "{opts}"
    );
    assert_same_file(&mnt.join(name), want, "the mounted raw view vs qemu-img's");
}

// ---------------------------------------------------------------- mount helper

/// The mount.fuse3 protocol with the built binary (mount.fuse3 run directly, with PATH
/// set), `mount.vdiskfs` by name with mount(8)'s helper arguments, vdiskfs's own
/// options in `-o`, `-f` (fake), and errors that leave nothing mounted.
#[test]
fn mount_helper_protocol() {
    if !require_fuse() || !require_tools(&["mount.fuse3", "qemu-img", "findmnt"]) {
        return;
    }
    let t = TempDir::new("helper");
    let c = chain(&t);
    let mnt = t.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let base_sha = sha256_file(&c.base);

    // mount.fuse3 IMAGE DIR -t fuse.vdiskfs -o ... runs `vdiskfs IMAGE DIR -o ...`,
    // with what mount(8) and fstab put in the list.
    {
        let _guard = FuseMount::adopt(&mnt);
        let o = run(Command::new("mount.fuse3")
            .arg(&c.child)
            .arg(&mnt)
            .args(["-t", "fuse.vdiskfs", "-o"])
            .arg(format!(
                "ro,noauto,_netdev,nofail,x-systemd.automount,comment=x,search_dir={},cache_size=8",
                c.store.display()
            ))
            .env("PATH", path_with_bin()));
        o.assert_success();
        assert_vdiskfs_mount(&mnt, "disk.raw", &c.child, &c.raw, true);
        let w = fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.raw"));
        assert!(w.is_err(), "a ro mount must refuse writing");
        vdiskfs_umount(&mnt);
    }

    // mount(8)'s external-helper form, by the program's name: mount.vdiskfs SPEC DIR
    // [-sfnv] [-o OPTS] [-t TYPE]; writable, with name= and search_dir=.
    let helper = t.join("mount.vdiskfs");
    std::os::unix::fs::symlink(bin(), &helper).unwrap();
    let patch = {
        let mut r = Rng::new(99);
        let mut v = vec![0u8; 64 << 10];
        r.fill(&mut v);
        v
    };
    {
        let _guard = FuseMount::adopt(&mnt);
        let o = run(Command::new(&helper)
            .arg(&c.child)
            .arg(&mnt)
            .args(["-sn", "-o"])
            .arg(format!("rw,name=web.img,search-dir={}", c.store.display()))
            .args(["-t", "vdiskfs"]));
        o.assert_success();
        assert_vdiskfs_mount(&mnt, "web.img", &c.child, &c.raw, false);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("web.img"))
            .unwrap();
        f.write_all_at(&patch, 3 << 20).unwrap();
        f.sync_all().unwrap();
        drop(f);
        vdiskfs_umount(&mnt);
    }
    // The write went into the child; the base did not change.
    patch_file(&c.raw, 3 << 20, &patch);
    let merged = t.join("merged.raw");
    cat_to_file(
        &c.child,
        &["--search-dir", c.store.to_str().unwrap()],
        &merged,
    );
    assert_same_file(
        &merged,
        &c.raw,
        "the child after a write through mount.vdiskfs",
    );
    assert_eq!(sha256_file(&c.base), base_sha, "the base must not change");

    // -f (fake): nothing is mounted, success.
    let o = run(Command::new(&helper)
        .arg(&c.child)
        .arg(&mnt)
        .args(["-f", "-o", "ro"]));
    o.assert_success();
    assert!(!is_mounted(&mnt), "-f must not mount");

    // Errors: one line naming the file, non-zero, nothing mounted.
    let missing = t.join("nothere.vhdx");
    let o = run(Command::new("mount.fuse3")
        .arg(&missing)
        .arg(&mnt)
        .args(["-t", "fuse.vdiskfs", "-o", "ro"])
        .env("PATH", path_with_bin()));
    assert_clean_failure(&o, &missing);
    assert!(!is_mounted(&mnt));
    // Without search_dir the parent is not found: the error names the child.
    let o = run(Command::new(&helper)
        .arg(&c.child)
        .arg(&mnt)
        .args(["-o", "ro"]));
    assert_failure_after_warnings(&o, &c.child);
    assert!(!is_mounted(&mnt));
    let o = run(Command::new(&helper)
        .arg(&c.child)
        .arg(&mnt)
        .args(["-o", "ro,cache_size=lots"]));
    assert_clean_failure(&o, Path::new("cache_size"));
    assert!(!is_mounted(&mnt));
    // A typo in an option is named, not left to the kernel's EINVAL.
    let o = run(Command::new(&helper)
        .arg(&c.child)
        .arg(&mnt)
        .args(["-o", "ro,searchdir=/x"]));
    assert_clean_failure(&o, Path::new("searchdir"));
    assert!(!is_mounted(&mnt));
}

/// A link put into a system directory for the duration of a test.
struct SystemLink(PathBuf);

impl SystemLink {
    /// Link `path` to the built binary. A link left by an earlier, interrupted run
    /// (pointing into a cargo target directory) is replaced; anything else is left alone
    /// and the test cannot run (None).
    fn new(path: &Path) -> Option<SystemLink> {
        if let Ok(md) = fs::symlink_metadata(path) {
            let ours = md.file_type().is_symlink()
                && fs::read_link(path)
                    .is_ok_and(|t| t.ends_with("debug/vdiskfs") || t.ends_with("release/vdiskfs"));
            if !ours {
                let msg = format!(
                    "{} exists (an installed vdiskfs?); the mount(8) test would not test the \
                     built binary",
                    path.display()
                );
                if required() {
                    panic!("{msg}");
                }
                eprintln!("SKIPPED: {msg}");
                return None;
            }
            fs::remove_file(path).unwrap();
        }
        std::os::unix::fs::symlink(bin(), path)
            .unwrap_or_else(|e| panic!("link {}: {e}", path.display()));
        Some(SystemLink(path.to_path_buf()))
    }
}

impl Drop for SystemLink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What mount(8) runs for the helper: no PATH of its own, so mount.fuse3's shell uses
/// its default one.
fn mount8(args: &[&OsStr]) -> Out {
    run(Command::new("mount").args(args))
}

/// Real mount(8) calls with the built binary: `mount -t fuse.vdiskfs`, `mount -t
/// vdiskfs`, an fstab line through `mount -T FSTAB DIR` (a mount point with a space,
/// written \040), `mount -a` not mounting it twice, and `umount`.
#[test]
fn mount_8_and_fstab() {
    if !require_root("mount(8) with a system helper")
        || !require_fuse()
        || !require_tools(&["mount", "umount", "mount.fuse3", "qemu-img", "findmnt"])
    {
        return;
    }
    let _system = lock_system();
    let Some(_bin_link) = SystemLink::new(Path::new("/usr/local/bin/vdiskfs")) else {
        return;
    };
    let Some(_helper_link) = SystemLink::new(Path::new("/usr/sbin/mount.vdiskfs")) else {
        return;
    };
    let t = TempDir::new("mount8");
    let c = chain(&t);
    let mnt = t.join("mnt dir");
    fs::create_dir_all(&mnt).unwrap();
    let search = format!("search_dir={}", c.store.display());

    for fstype in ["fuse.vdiskfs", "vdiskfs"] {
        let _guard = FuseMount::adopt(&mnt);
        let o = mount8(&[
            OsStr::new("-t"),
            OsStr::new(fstype),
            OsStr::new("-o"),
            OsStr::new(&format!("ro,{search}")),
            c.child.as_os_str(),
            mnt.as_os_str(),
        ]);
        o.assert_success();
        assert_vdiskfs_mount(&mnt, "disk.raw", &c.child, &c.raw, true);
        assert!(
            umount_retrying(&mnt),
            "umount {} kept failing",
            mnt.display()
        );
        assert!(!is_mounted(&mnt), "umount {fstype}");
    }

    // /etc/fstab syntax, with what fstab lines carry besides the options for vdiskfs.
    let fstab = t.join("fstab");
    let esc = |p: &Path| p.to_str().unwrap().replace(' ', "\\040");
    write_file(
        &fstab,
        format!(
            "# vdiskfs test\n{}  {}  fuse.vdiskfs  ro,nofail,_netdev,x-test.opt=1,{search},cache_size=8  0  0\n",
            esc(&c.child),
            esc(&mnt)
        )
        .as_bytes(),
    );
    {
        let _guard = FuseMount::adopt(&mnt);
        mount8(&[OsStr::new("-T"), fstab.as_os_str(), mnt.as_os_str()]).assert_success();
        assert_vdiskfs_mount(&mnt, "disk.raw", &c.child, &c.raw, true);
        // mount -a knows the entry is mounted (the mount's source is the image, as in
        // fstab) and leaves it alone.
        mount8(&[OsStr::new("-a"), OsStr::new("-T"), fstab.as_os_str()]).assert_success();
        assert_eq!(
            mount_count(&mnt),
            1,
            "mount -a must not mount the entry again"
        );
        assert!(
            umount_retrying(&mnt),
            "umount {} kept failing",
            mnt.display()
        );
        assert!(!is_mounted(&mnt));
    }
}

// ---------------------------------------------------------------- man and completions

fn man_text(page: &Path) -> String {
    let o = run(Command::new("man")
        .arg("--warnings")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("LC_ALL", "C.UTF-8"));
    o.assert_success();
    assert!(
        o.stderr.trim().is_empty(),
        "{}: groff warnings:\n{}",
        page.display(),
        o.stderr
    );
    o.stdout_str()
}

/// The hidden `generate` command and scripts/install.sh: man pages that render without
/// warnings and describe every option clap knows, and completions that complete.
#[test]
fn man_pages_and_completions() {
    if !require_tools(&["man", "bash"]) {
        return;
    }
    let t = TempDir::new("man");
    let prefix = t.join("prefix");
    run_ok(
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
            .arg("--prefix")
            .arg(&prefix)
            .arg("--bin")
            .arg(bin()),
    );
    let man1 = prefix.join("share/man/man1");
    let mut pages: Vec<String> = fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "vdiskfs-cat.1",
            "vdiskfs-check.1",
            "vdiskfs-compact.1",
            "vdiskfs-convert.1",
            "vdiskfs-create.1",
            "vdiskfs-info.1",
            "vdiskfs-merge.1",
            "vdiskfs-mount.1",
            "vdiskfs-resize.1",
            "vdiskfs-set-parent.1",
            "vdiskfs-umount.1",
            "vdiskfs.1"
        ],
        "one page per visible command (generate is hidden)"
    );
    // man finds them by name under the prefix.
    let o = run_ok(
        Command::new("man")
            .arg("-M")
            .arg(prefix.join("share/man"))
            .args(["-w", "vdiskfs-mount"]),
    );
    assert_eq!(
        o.stdout_str().trim(),
        man1.join("vdiskfs-mount.1").to_str().unwrap()
    );

    let top = man_text(&man1.join("vdiskfs.1"));
    for want in [
        "NAME",
        "SYNOPSIS",
        "vdiskfs-mount(1)",
        "EXIT STATUS",
        "--verbose",
    ] {
        assert!(top.contains(want), "vdiskfs(1) lacks {want:?}:\n{top}");
    }
    assert!(
        !top.contains("generate"),
        "the hidden command is not documented"
    );
    let mount = man_text(&man1.join("vdiskfs-mount.1"));
    for want in [
        "--read-only",
        "--cache-size",
        "--search-dir",
        "search_dir=DIR",
        "parent=PATH",
        "fuse.vdiskfs",
        "fstab",
    ] {
        assert!(
            mount.contains(want),
            "vdiskfs-mount(1) lacks {want:?}:\n{mount}"
        );
    }
    let convert = man_text(&man1.join("vdiskfs-convert.1"));
    for want in [
        "--azure",
        "--force",
        "--type",
        "--search-dir",
        "AZURE",
        "130",
    ] {
        assert!(
            convert.contains(want),
            "vdiskfs-convert(1) lacks {want:?}:\n{convert}"
        );
    }
    let cat = man_text(&man1.join("vdiskfs-cat.1"));
    for want in ["--quiet", "--progress", "--output"] {
        assert!(cat.contains(want), "vdiskfs-cat(1) lacks {want:?}:\n{cat}");
    }

    // bash: the completion function offers commands and options, not hidden ones.
    let bash_file = prefix.join("share/bash-completion/completions/vdiskfs");
    let complete = |words: &str, cword: usize| -> String {
        let script = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _vdiskfs vdiskfs \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash_file.display()
        );
        run_ok(Command::new("bash").arg("-c").arg(script)).stdout_str()
    };
    let cmds = complete("vdiskfs ''", 1);
    for want in [
        "info", "cat", "create", "check", "convert", "mount", "umount",
    ] {
        assert!(
            cmds.lines().any(|l| l == want),
            "bash offers {want}: {cmds}"
        );
    }
    assert!(!cmds.lines().any(|l| l == "generate"), "{cmds}");
    let opts = complete("vdiskfs cat --pr", 2);
    assert_eq!(opts.trim(), "--progress");
    let opts = complete("vdiskfs mount --read", 2);
    assert_eq!(opts.trim(), "--read-only");

    // zsh and fish: the files parse (when those shells are here; setup does not install
    // them, the package still ships their completions).
    let zsh = prefix.join("share/zsh/site-functions/_vdiskfs");
    let fish = prefix.join("share/fish/vendor_completions.d/vdiskfs.fish");
    assert!(fs::read_to_string(&zsh)
        .unwrap()
        .starts_with("#compdef vdiskfs"));
    assert!(fs::read_to_string(&fish)
        .unwrap()
        .contains("complete -c vdiskfs"));
    if find_tool("zsh").is_some() {
        run_ok(Command::new("zsh").arg("-n").arg(&zsh));
    }
    if find_tool("fish").is_some() {
        run_ok(Command::new("fish").arg("--no-execute").arg(&fish));
    }

    // The same command prints a completion script on stdout without --dir.
    let o = vdiskfs(["generate", "completions", "bash"]);
    o.assert_success();
    assert_eq!(o.stdout, fs::read(&bash_file).unwrap());
}

// ---------------------------------------------------------------- the Debian package

fn dpkg_installed(pkg: &str) -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .stdout_str()
        .contains("install ok installed")
}

/// Removes the package when dropped (also when the test fails half way).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_installed("vdiskfs") {
            let o = run(Command::new("dpkg").args(["-r", "vdiskfs"]));
            if !o.success() {
                eprintln!("warning: dpkg -r vdiskfs failed: {}", o.stderr);
            }
        }
    }
}

/// What a user of the package runs: a PATH without the build tree.
fn system_cmd(prog: &str) -> Command {
    let mut c = Command::new(prog);
    c.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    c
}

/// scripts/deb.sh builds the package; dpkg installs it; the installed binary, its man
/// pages, completions and mount helpers work with nothing from the build tree; dpkg -r
/// removes it all again.
#[test]
fn debian_package() {
    if !require_root("installing the .deb")
        || !require_fuse()
        || !require_tools(&["cargo-deb", "dpkg", "man", "mount", "qemu-img", "findmnt"])
    {
        return;
    }
    let _system = lock_system();
    if dpkg_installed("vdiskfs") {
        let msg = "the vdiskfs package is already installed; the package test will not \
                   replace it (remove it with `dpkg -r vdiskfs`)";
        if required() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    }
    for p in ["/usr/local/bin/vdiskfs", "/usr/local/sbin/vdiskfs"] {
        assert!(
            fs::symlink_metadata(p).is_err(),
            "{p} exists and would shadow the package's /usr/bin/vdiskfs"
        );
    }

    let o = run_ok(&mut Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/deb.sh"
    )));
    let deb = PathBuf::from(o.stdout_str().lines().last().unwrap_or("").trim());
    assert!(
        deb.extension() == Some(OsStr::new("deb")) && deb.is_file(),
        "deb.sh must print the .deb's path last, got {:?}",
        o.stdout_str()
    );
    let fields = run_ok(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .args(["Package", "Depends"]),
    )
    .stdout_str();
    assert!(fields.contains("Package: vdiskfs"), "{fields}");
    assert!(
        fields.contains("fuse3"),
        "the package must depend on fuse3: {fields}"
    );

    let _installed = Installed;
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(dpkg_installed("vdiskfs"));

    let o = run_ok(system_cmd("vdiskfs").arg("--version"));
    assert_eq!(
        o.stdout_str().trim(),
        concat!("vdiskfs ", env!("CARGO_PKG_VERSION"))
    );
    for (page, file) in [
        ("vdiskfs", "/usr/share/man/man1/vdiskfs.1.gz"),
        ("vdiskfs-mount", "/usr/share/man/man1/vdiskfs-mount.1.gz"),
        ("vdiskfs-cat", "/usr/share/man/man1/vdiskfs-cat.1.gz"),
    ] {
        let o = run_ok(system_cmd("man").args(["-w", page]));
        assert_eq!(o.stdout_str().trim(), file);
    }
    let o = run_ok(
        system_cmd("man")
            .arg("vdiskfs-mount")
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    );
    assert!(o.stdout_str().contains("fuse.vdiskfs"));
    for f in [
        "/usr/share/bash-completion/completions/vdiskfs",
        "/usr/share/zsh/vendor-completions/_vdiskfs",
        "/usr/share/fish/vendor_completions.d/vdiskfs.fish",
    ] {
        assert!(Path::new(f).is_file(), "{f} missing");
    }

    // Both mount types with only the package's files.
    let t = TempDir::new("deb");
    let raw = t.join("disk.raw");
    filled_raw(&raw, 4 << 20, 3, &[(1 << 20, 1 << 20)]);
    let img = t.join("disk.vhdx");
    qemu_convert_raw("vhdx", "", &raw, &img);
    let img = fs::canonicalize(&img).unwrap();
    let mnt = t.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    for fstype in ["fuse.vdiskfs", "vdiskfs"] {
        let _guard = FuseMount::adopt(&mnt);
        run_ok(
            system_cmd("mount")
                .args(["-t", fstype, "-o", "ro"])
                .arg(&img)
                .arg(&mnt),
        );
        assert_vdiskfs_mount(&mnt, "disk.raw", &img, &raw, true);
        assert!(
            umount_retrying(&mnt),
            "umount {} kept failing",
            mnt.display()
        );
    }

    run_ok(Command::new("dpkg").args(["-r", "vdiskfs"]));
    assert!(!dpkg_installed("vdiskfs"));
    for f in [
        "/usr/bin/vdiskfs",
        "/usr/sbin/mount.vdiskfs",
        "/usr/share/man/man1/vdiskfs.1.gz",
    ] {
        assert!(fs::symlink_metadata(f).is_err(), "{f} left after dpkg -r");
    }
    assert!(!run(system_cmd("man").args(["-w", "vdiskfs"])).success());
}

// ---------------------------------------------------------------- progress

fn progress_image(t: &TempDir) -> (PathBuf, PathBuf) {
    let raw = t.join("src.raw");
    filled_raw(&raw, 24 << 20, 11, &[(4 << 20, 8 << 20)]);
    let img = t.join("p.vhdx");
    qemu_convert_raw("vhdx", "", &raw, &img);
    (img, raw)
}

/// On a terminal `cat --output` shows a bar with bytes, rate and ETA; `--quiet` shows
/// none; the output is the same either way.
#[test]
fn progress_on_a_terminal() {
    if !require_tools(&["script", "qemu-img"]) {
        return;
    }
    let t = TempDir::new("pty");
    let (img, raw) = progress_image(&t);
    let out = t.join("out.raw");
    let screen = on_terminal(&[
        OsStr::new("cat"),
        OsStr::new("--output"),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    assert_same_file(&out, &raw, "cat --output with a progress bar");
    // The final state: all bytes, a rate, an ETA; redrawn in place (carriage return).
    assert!(
        screen.contains("cat: [") && screen.contains("24.00 MiB/24.00 MiB ("),
        "no final progress bar on the terminal:\n{screen:?}"
    );
    assert!(screen.contains("/s, ETA "), "{screen:?}");
    assert!(screen.contains('\r'), "{screen:?}");
    assert!(
        screen.ends_with('\n'),
        "the bar's line must be ended: {screen:?}"
    );

    fs::remove_file(&out).unwrap();
    let screen = on_terminal(&[
        OsStr::new("cat"),
        OsStr::new("--quiet"),
        OsStr::new("--output"),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    assert_same_file(&out, &raw, "cat --quiet --output");
    assert!(screen.is_empty(), "--quiet must print nothing: {screen:?}");
}

/// In pipes and scripts nothing is shown; `--progress` forces plain lines (no carriage
/// returns or escape sequences); `--quiet` and `--progress` together are refused.
#[test]
fn progress_in_pipes() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let t = TempDir::new("pipe");
    let (img, raw) = progress_image(&t);
    let out = t.join("out.raw");

    // stderr is a pipe here.
    let o = vdiskfs([
        OsStr::new("cat"),
        OsStr::new("-o"),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    o.assert_success();
    assert_eq!(o.stderr, "", "no progress in a pipe");
    assert_same_file(&out, &raw, "cat -o, stderr a pipe");
    let o = vdiskfs_to_file([OsStr::new("cat"), img.as_os_str()], &out);
    o.assert_success();
    assert_eq!(o.stderr, "", "no progress in a pipe");

    let o = vdiskfs([
        OsStr::new("cat"),
        OsStr::new("--progress"),
        OsStr::new("-o"),
        out.as_os_str(),
        img.as_os_str(),
    ]);
    o.assert_success();
    let last = o.stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("cat: [") && last.contains("24.00 MiB/24.00 MiB ("),
        "--progress must end with the final state: {:?}",
        o.stderr
    );
    assert!(
        !o.stderr.contains('\r') && !o.stderr.contains('\x1b'),
        "plain lines only: {:?}",
        o.stderr
    );

    let o = vdiskfs([
        OsStr::new("cat"),
        OsStr::new("--quiet"),
        OsStr::new("--progress"),
        img.as_os_str(),
    ]);
    assert!(
        !o.success() && o.stderr.contains("cannot be used with"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty());
}
