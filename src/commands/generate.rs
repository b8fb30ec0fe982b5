//! `vdiskfs generate` (hidden): the man pages and shell completions, made from the clap
//! definitions so they never drift from `--help`. scripts/deb.sh and scripts/install.sh
//! run it; the output is not kept in the repository.
//!
//! Pages: vdiskfs(1) and one vdiskfs-COMMAND(1) per visible command, each clap_mangen's
//! NAME, SYNOPSIS, DESCRIPTION, OPTIONS (and COMMANDS for the top page), followed by
//! the hand-written sections below (exit status, the mount helper and fstab, examples,
//! see also).

use std::fs;
use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Inline, Roff};
use clap_mangen::Man;

use crate::cli::{Cli, GenerateArgs, GenerateWhat};
use crate::error::{Error, Result};

pub fn run(args: &GenerateArgs) -> Result<i32> {
    match &args.what {
        GenerateWhat::Man { dir } => {
            for p in write_man_pages(dir)? {
                println!("{}", p.display());
            }
        }
        GenerateWhat::Completions { shell, dir } => match dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|e| Error::file(dir, "create", e))?;
                let mut cmd = visible_command();
                let p = clap_complete::generate_to(*shell, &mut cmd, "vdiskfs", dir)
                    .map_err(|e| Error::file(dir, "write completions into", e))?;
                println!("{}", p.display());
            }
            None => {
                let mut cmd = visible_command();
                clap_complete::generate(*shell, &mut cmd, "vdiskfs", &mut std::io::stdout());
            }
        },
    }
    Ok(0)
}

/// The command line without its hidden commands (clap_complete would offer them).
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("vdiskfs").version(env!("CARGO_PKG_VERSION"));
    for a in full.get_arguments() {
        cmd = cmd.arg(a.clone());
    }
    for s in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        cmd = cmd.subcommand(s.clone());
    }
    cmd
}

/// Write vdiskfs.1 and vdiskfs-COMMAND.1 into `dir` (created if missing); returns the
/// paths written.
pub fn write_man_pages(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    fs::create_dir_all(dir).map_err(|e| Error::file(dir, "create", e))?;
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let mut pages = vec![(top.clone(), "")];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((sub.clone(), sub.get_name()));
    }
    let mut written = Vec::new();
    for (cmd, name) in pages {
        let man = Man::new(cmd.clone())
            .manual("vdiskfs manual")
            .source(concat!("vdiskfs ", env!("CARGO_PKG_VERSION")));
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        render(&man, &cmd, name, &mut text).map_err(|e| Error::file(&path, "render", e))?;
        let mut f = fs::File::create(&path).map_err(|e| Error::file(&path, "create", e))?;
        f.write_all(&text)
            .and_then(|()| f.flush())
            .map_err(|e| Error::file(&path, "write", e))?;
        written.push(path);
    }
    Ok(written)
}

fn render(man: &Man, cmd: &clap::Command, name: &str, w: &mut dyn Write) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if name.is_empty() {
        man.render_subcommands_section(w)?;
    }
    let mut r = Roff::new();
    extra_sections(&mut r, name);
    r.to_writer(w)
}

/// A paragraph of plain text.
fn para(r: &mut Roff, text: &str) {
    r.control("PP", []).text([roman(text)]);
}

/// A literal block (examples, fstab lines), indented.
fn literal(r: &mut Roff, lines: &[&str]) {
    r.control("PP", []).control("RS", ["4"]).control("nf", []);
    for l in lines {
        r.text([roman(*l)]);
    }
    r.control("fi", []).control("RE", []);
}

/// A tagged item: `tag` in bold, then the text indented.
fn item(r: &mut Roff, tag: Vec<Inline>, text: &str) {
    r.control("TP", []).text(tag).text([roman(text)]);
}

fn see_also(r: &mut Roff, pages: &[&str]) {
    r.control("SH", ["SEE ALSO"]);
    let mut inl = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        let (n, s) = p.split_once('(').unwrap_or((p, ""));
        if i > 0 {
            inl.push(roman(", "));
        }
        inl.push(bold(n));
        inl.push(roman(format!("({s}")));
    }
    r.text(inl);
}

fn extra_sections(r: &mut Roff, name: &str) {
    match name {
        "" => {
            r.control("SH", ["EXIT STATUS"]);
            para(r, "0 on success. 1 on an error, printed as one line on standard error that starts with \"vdiskfs: \" and names the file concerned. vdiskfs check exits 2 when it found damage (check --azure: when the file does not meet Azure's rules). An interrupted vdiskfs convert exits 130.");
            r.control("SH", ["ENVIRONMENT"]);
            item(
                r,
                vec![bold("RUST_LOG")],
                "Overrides the log level that -v sets, e.g. RUST_LOG=vdiskfs::chain=debug.",
            );
            r.control("SH", ["MOUNT HELPER"]);
            para(r, "Called as vdiskfs IMAGE MOUNTPOINT -o OPTIONS (how mount.fuse3 runs it for mount -t fuse.vdiskfs and fstab entries of type fuse.vdiskfs), or under the name mount.vdiskfs (for mount -t vdiskfs), vdiskfs mounts IMAGE at MOUNTPOINT as vdiskfs mount does. See vdiskfs-mount(1).");
            see_also(
                r,
                &[
                    "vdiskfs-info(1)",
                    "vdiskfs-cat(1)",
                    "vdiskfs-create(1)",
                    "vdiskfs-check(1)",
                    "vdiskfs-convert(1)",
                    "vdiskfs-mount(1)",
                    "vdiskfs-umount(1)",
                    "vdiskfs-set-parent(1)",
                    "vdiskfs-resize(1)",
                    "vdiskfs-merge(1)",
                    "vdiskfs-compact(1)",
                    "qemu-img(1)",
                    "losetup(8)",
                ],
            );
        }
        "cat" => {
            r.control("SH", ["PROGRESS"]);
            para(r, "When standard error is a terminal, a progress bar shows the bytes written, the rate and the time left; in pipes and scripts nothing is shown. --quiet turns the bar off, --progress forces it (when standard error is not a terminal, as one plain line per second).");
            r.control("SH", ["EXAMPLES"]);
            literal(
                r,
                &[
                    "vdiskfs cat --output web01.raw web01.avhdx",
                    "vdiskfs cat web01.avhdx | sha256sum",
                    "vdiskfs cat --parent /mnt/usb/Base.vhdx web01.avhdx > web01.raw",
                ],
            );
            see_also(r, &["vdiskfs(1)", "vdiskfs-mount(1)"]);
        }
        "convert" => {
            r.control("SH", ["OUTPUT"]);
            para(r, "OUTPUT reads byte for byte as vdiskfs cat SOURCE and has no parent. A dynamic output allocates only blocks that hold non-zero data; a raw output is a sparse file; zero parts of written blocks and of fixed outputs are holes. Only the parts of the chain some layer holds are read, so the time follows the data, not the virtual size. Every file of the chain is opened read-only and must not be open for writing elsewhere; none of them changes.");
            para(r, "The output is written under the temporary name .NAME.vdiskfs-tmp-PID beside OUTPUT, flushed, and linked into place (with --force renamed over the old file); an existing OUTPUT is never replaced without --force. SIGINT and SIGTERM remove the temporary file and exit 130; after a kill, the next convert to the same OUTPUT removes it. A full file system is an error that leaves nothing behind.");
            r.control("SH", ["AZURE"]);
            para(r, "--azure writes a fixed VHD (implies --format vhd --type fixed) whose virtual size is rounded up to a whole MiB, at least 20 MiB, at most 32 TiB (larger sources are refused), with a footer of the fixed type, equal current and original sizes, the specification's CHS geometry and a valid checksum; the file is N MiB + 512 bytes. vdiskfs check --azure IMAGE tells whether a file meets these rules. docs/usage.md gives the source of each rule.");
            r.control("SH", ["EXAMPLES"]);
            literal(
                r,
                &[
                    "vdiskfs convert web01_9C21.avhdx web01-clone.vhdx",
                    "vdiskfs convert --type fixed web01_9C21.avhdx web01-fixed.vhdx",
                    "vdiskfs convert -f raw disk.img disk.vhdx",
                    "vdiskfs convert --azure --search-dir /mnt/usb web01_9C21.avhdx web01-azure.vhd",
                    "vdiskfs check --azure web01-azure.vhd",
                ],
            );
            see_also(
                r,
                &[
                    "vdiskfs(1)",
                    "vdiskfs-cat(1)",
                    "vdiskfs-check(1)",
                    "qemu-img(1)",
                ],
            );
        }
        "mount" => mount_sections(r),
        "umount" => {
            para(r, "As root this is umount(8) on the mount point, otherwise fusermount3 -u; unlike those, vdiskfs umount returns only once the daemon has flushed and closed the image.");
            see_also(r, &["vdiskfs-mount(1)", "fusermount3(1)", "umount(8)"]);
        }
        _ => see_also(r, &["vdiskfs(1)"]),
    }
}

fn mount_sections(r: &mut Roff) {
    r.control("SH", ["MOUNT OPTIONS"]);
    para(r, "The -o list takes the generic mount options and FUSE's: ro, rw, allow_other (implies default_permissions), allow_root, default_permissions, auto_unmount, nonempty, noexec, exec, noatime, sync, dirsync, dev, suid, nodev, nosuid (nodev and nosuid are the default), fsname=NAME (the mount's source; default: the image's path), subtype=NAME. Options only mount(8) and fstab use (defaults, auto, noauto, user, users, nouser, owner, group, nofail, _netdev, x-*, comment=) and access-time options (relatime, strictatime, nodiratime, lazytime ...) are accepted and ignored. max_read=N goes to the kernel; any other option is an error that names it.");
    para(r, "vdiskfs's own options can be given in the -o list as well, which is how an fstab entry gives them; each stands for the flag of the same meaning (keys may be written with _ or -):");
    for (opt, flag) in super::mount_helper::OWN_OPTIONS {
        item(r, vec![bold(*opt)], &format!("as {flag}"));
    }
    r.control("SH", ["MOUNT(8) AND FSTAB"]);
    para(r, "vdiskfs follows the mount helper protocol of FUSE file systems. mount -t fuse.vdiskfs IMAGE DIR -o OPTIONS (and an /etc/fstab entry of type fuse.vdiskfs) runs mount.fuse3, which runs vdiskfs IMAGE DIR -o OPTIONS; vdiskfs must be on the PATH of mount (the Debian package puts it in /usr/bin). mount -t vdiskfs runs /sbin/mount.vdiskfs, a link to vdiskfs that the Debian package installs. Both detach once the mount is live, as mount(8) expects, and umount DIR unmounts. Paths in fstab must be absolute; a space in a path is written \\040.");
    literal(
        r,
        &[
            "# /etc/fstab",
            "/srv/vm/web01.avhdx  /mnt/web01  fuse.vdiskfs  ro,noauto,allow_other,search_dir=/srv/vm/base  0  0",
            "",
            "mount /mnt/web01",
            "losetup -P -r --find --show /mnt/web01/disk.raw",
        ],
    );
    r.control("SH", ["EXAMPLES"]);
    literal(
        r,
        &[
            "vdiskfs mount -r web01.avhdx /mnt/disk",
            "mount -o loop,ro /mnt/disk/disk.raw /mnt/guest",
            "umount /mnt/guest; vdiskfs umount /mnt/disk",
            "",
            "mount -t fuse.vdiskfs -o ro,cache_size=64 /srv/vm/web01.avhdx /mnt/disk",
            "mount -t vdiskfs -o parent=/srv/vm/Base.vhdx /srv/vm/clone.vhdx /mnt/disk",
        ],
    );
    see_also(
        r,
        &[
            "vdiskfs(1)",
            "vdiskfs-umount(1)",
            "mount(8)",
            "fstab(5)",
            "mount.fuse3(8)",
            "fusermount3(1)",
            "losetup(8)",
        ],
    );
}
