//! vdiskfs as a mount helper: `mount -t fuse.vdiskfs`, `mount -t vdiskfs` and
//! `/etc/fstab`.
//!
//! Two ways in, one syntax:
//! - `mount -t fuse.vdiskfs IMAGE DIR -o OPTS` runs mount.fuse3, which runs
//!   `vdiskfs IMAGE DIR -o OPTS` through /bin/sh (the binary named after the subtype,
//!   found on PATH).
//! - `mount -t vdiskfs IMAGE DIR -o OPTS` runs `/sbin/mount.vdiskfs IMAGE DIR [-sfnv]
//!   [-N NS] [-o OPTS] [-t TYPE]` (mount(8)'s "external helper" syntax); the package
//!   installs mount.vdiskfs as a link to vdiskfs, which knows it by its name.
//!
//! Either way the call becomes `vdiskfs mount` with the `-o` list, in which vdiskfs's
//! own options (`parent=`, `search_dir=`, `cache_size=` ...) stand for the flags of the
//! same names (`absorb_own_options`); the generic ones are handled by `mount`'s option
//! parser, which also ignores what only mount(8) and fstab care about (`noauto`, `user`,
//! `_netdev`, `x-*` ...).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{ChainArgs, Cli, MountArgs};
use crate::error::{Error, MountRefusal, Result};

/// What a helper-style command line asks for.
#[derive(Debug)]
pub enum HelperCall {
    /// Mount, with this verbosity (`-v` count).
    Mount(Box<MountArgs>, u8),
    /// `-f` (mount(8)'s "fake"): check the arguments, mount nothing.
    Fake,
    /// `-h`: print the usage.
    Help,
}

pub const USAGE: &str = "usage: vdiskfs IMAGE MOUNTPOINT [-o OPTION[,OPTION...]] [-v] \
                         (the mount(8) helper form; see `man vdiskfs-mount`)";

/// Decide whether `argv` is a mount-helper call and parse it. `None`: an ordinary
/// command line, for clap.
///
/// It is one when the program is called as `mount.*` (a link named mount.vdiskfs), or
/// when the first argument is not a command but an existing path or contains a `/`,
/// and a mount point follows (`vdiskfs IMAGE MOUNTPOINT ...`, as mount.fuse3 calls it).
pub fn parse_argv(argv: &[OsString]) -> Option<Result<HelperCall>> {
    let prog = argv
        .first()
        .map(|p| Path::new(p).file_name().unwrap_or(p.as_os_str()));
    let by_name = prog.is_some_and(|n| n.as_bytes().starts_with(b"mount."));
    if !by_name {
        let first = argv.get(1)?;
        if argv.len() < 3 || first.as_bytes().starts_with(b"-") || is_command(first) {
            return None;
        }
        if !Path::new(first).exists() && !first.as_bytes().contains(&b'/') {
            return None;
        }
    }
    Some(parse_helper_args(&argv[1..]))
}

fn is_command(arg: &OsStr) -> bool {
    let cmd = Cli::command();
    let Some(arg) = arg.to_str() else {
        return false;
    };
    arg == "help"
        || cmd
            .get_subcommands()
            .any(|s| s.get_name() == arg || s.get_all_aliases().any(|a| a == arg))
}

/// `IMAGE MOUNTPOINT [-sfnv] [-N NS] [-o OPTS]... [-t TYPE]`, options anywhere.
fn parse_helper_args(args: &[OsString]) -> Result<HelperCall> {
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut verbose, mut fake) = (0u8, false);
    let mut it = args.iter();
    let usage = |problem: &str| {
        Error::Mount(MountRefusal::Usage {
            problem: problem.to_string(),
            usage: USAGE,
        })
    };
    while let Some(a) = it.next() {
        let b = a.as_bytes();
        if b == b"-h" || b == b"--help" {
            return Ok(HelperCall::Help);
        }
        if b == b"--" {
            positional.extend(it.by_ref().map(PathBuf::from));
            break;
        }
        if !b.starts_with(b"-") || b.len() == 1 {
            positional.push(PathBuf::from(a));
            continue;
        }
        // A cluster of single-letter flags; -o, -t and -N take a value (attached or next).
        let mut i = 1;
        while i < b.len() {
            let c = b[i];
            match c {
                b's' | b'n' => {} // sloppy, no mtab: nothing to do for us
                b'f' => fake = true,
                b'v' => verbose = verbose.saturating_add(1),
                b'o' | b't' | b'N' => {
                    let value = if i + 1 < b.len() {
                        OsStr::from_bytes(&b[i + 1..]).to_os_string()
                    } else {
                        it.next()
                            .cloned()
                            .ok_or_else(|| usage(&format!("-{} needs a value", c as char)))?
                    };
                    match c {
                        b'o' => options.push(
                            value
                                .into_string()
                                .map_err(|option| Error::Mount(MountRefusal::NotUtf8 { option }))?,
                        ),
                        b't' => {} // the type we were called for
                        _ => {
                            return Err(Error::Mount(MountRefusal::Namespace {
                                namespace: value.to_string_lossy().into_owned(),
                            }))
                        }
                    }
                    break;
                }
                _ => {
                    return Err(usage(&format!(
                        "unknown option -{}",
                        String::from_utf8_lossy(&[c])
                    )))
                }
            }
            i += 1;
        }
    }
    let [image, mountpoint]: [PathBuf; 2] = positional
        .try_into()
        .map_err(|p: Vec<PathBuf>| usage(&format!("{} arguments given, 2 expected", p.len())))?;
    if image.as_os_str().is_empty() {
        return Err(usage("the image (mount source) is empty"));
    }
    if fake {
        return Ok(HelperCall::Fake);
    }
    Ok(HelperCall::Mount(
        Box::new(MountArgs {
            image,
            mountpoint,
            name: "disk.raw".into(),
            read_only: false,
            foreground: false,
            options,
            cache_size: 256,
            cache_block: "64K".into(),
            threads: 4,
            log_file: None,
            no_partitions: false,
            direct_io: false,
            transport: None,
            chain: ChainArgs {
                search_dirs: Vec::new(),
                parents: Vec::new(),
                ignore_linkage: false,
                allow_device_parent: false,
            },
        }),
        verbose,
    ))
}

/// vdiskfs's own `-o` options, with what they stand for (for the docs and the man page).
pub const OWN_OPTIONS: &[(&str, &str)] = &[
    ("parent=PATH", "--parent PATH (repeatable, in order)"),
    ("search_dir=DIR", "--search-dir DIR (repeatable)"),
    ("ignore_linkage", "--ignore-linkage"),
    ("allow_device_parent", "--allow-device-parent"),
    ("name=NAME", "--name NAME"),
    ("cache_size=MIB", "--cache-size MIB"),
    ("cache_block=N", "--cache-block N"),
    ("threads=N", "--threads N"),
    ("log_file=FILE", "--log-file FILE"),
    ("no_partitions", "--no-partitions"),
    (
        "transport=auto|uring|classic",
        "--transport auto|uring|classic",
    ),
    ("direct_io", "--direct-io"),
];

/// Move vdiskfs's own options out of the `-o` lists into the fields they stand for
/// (an `-o` option given after a flag of the same meaning wins; `parent=` and
/// `search_dir=` add to the lists). The rest stays in `options` for the FUSE parser.
/// Keys may be written with `_` or `-`.
pub fn absorb_own_options(args: &MountArgs) -> Result<MountArgs> {
    let mut out = args.clone();
    out.options.clear();
    let mut rest = Vec::new();
    for opt in args.options.iter().flat_map(|l| l.split(',')) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k.trim().replace('-', "_"), Some(v)),
            None => (opt.trim().replace('-', "_"), None),
        };
        let need = |v: Option<&str>| -> Result<String> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(Error::Mount(MountRefusal::NeedsValue { key: key.clone() })),
            }
        };
        let number = |v: Option<&str>| -> Result<u64> {
            let v = need(v)?;
            v.parse().map_err(|_| {
                Error::Mount(MountRefusal::NotANumber {
                    key: key.clone(),
                    value: v,
                })
            })
        };
        let flag = |v: Option<&str>| -> Result<bool> {
            match v {
                None => Ok(true),
                Some(v) => Err(Error::Mount(MountRefusal::TakesNoValue {
                    key: key.clone(),
                    value: v.to_string(),
                })),
            }
        };
        match key.as_str() {
            "parent" => out.chain.parents.push(PathBuf::from(need(value)?)),
            "search_dir" => out.chain.search_dirs.push(PathBuf::from(need(value)?)),
            "ignore_linkage" => out.chain.ignore_linkage = flag(value)?,
            "allow_device_parent" => out.chain.allow_device_parent = flag(value)?,
            "no_partitions" => out.no_partitions = flag(value)?,
            "direct_io" => out.direct_io = flag(value)?,
            "name" => out.name = need(value)?,
            "cache_size" => out.cache_size = number(value)?,
            "cache_block" => out.cache_block = need(value)?,
            "threads" => {
                out.threads = usize::try_from(number(value)?).map_err(|_| {
                    Error::Mount(MountRefusal::TooLarge {
                        key: "threads".into(),
                    })
                })?
            }
            "log_file" => out.log_file = Some(PathBuf::from(need(value)?)),
            "transport" => {
                let v = need(value)?;
                let t = clap::ValueEnum::from_str(&v, false)
                    .map_err(|_| Error::Mount(MountRefusal::Transport { value: v.clone() }))?;
                out.transport = Some(t);
            }
            _ => rest.push(opt.to_string()),
        }
    }
    if !rest.is_empty() {
        out.options.push(rest.join(","));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn mount_args(v: &[&str]) -> (MountArgs, u8) {
        match parse_argv(&argv(v)) {
            Some(Ok(HelperCall::Mount(a, verbose))) => (*a, verbose),
            other => panic!("{v:?}: {other:?}"),
        }
    }

    #[test]
    fn ordinary_command_lines_are_not_helper_calls() {
        for v in [
            &["vdiskfs", "mount", "/a.vhdx", "/mnt"][..],
            &["vdiskfs", "info", "/a.vhdx"],
            &["vdiskfs", "help", "mount"],
            &["vdiskfs", "--version"],
            &["vdiskfs", "-v", "cat", "/a.vhdx", "x"],
            &["vdiskfs", "/a.vhdx"],
            &["vdiskfs"],
            // A typo of a command is left to clap (which suggests the right one).
            &["vdiskfs", "inof", "x.vhdx"],
        ] {
            assert!(parse_argv(&argv(v)).is_none(), "{v:?}");
        }
    }

    #[test]
    fn mount_fuse3_form() {
        // What mount.fuse3 runs for `mount -t fuse.vdiskfs /i/a.vhdx /mnt -o ro,allow_other`.
        let (a, v) = mount_args(&[
            "vdiskfs",
            "/i/a.vhdx",
            "/mnt",
            "-o",
            "ro,allow_other,dev,suid",
        ]);
        assert_eq!(a.image, Path::new("/i/a.vhdx"));
        assert_eq!(a.mountpoint, Path::new("/mnt"));
        assert_eq!(a.options, ["ro,allow_other,dev,suid"]);
        assert!(!a.foreground && !a.read_only);
        assert_eq!(v, 0);
    }

    #[test]
    fn mount_helper_form_by_name() {
        // mount(8): /sbin/mount.vdiskfs SPEC DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]
        let (a, v) = mount_args(&[
            "/sbin/mount.vdiskfs",
            "a.vhdx",
            "m",
            "-sn",
            "-v",
            "-o",
            "rw,noauto",
            "-t",
            "vdiskfs",
            "-oparent=/b.vhdx",
        ]);
        assert_eq!(a.image, Path::new("a.vhdx"));
        assert_eq!(a.options, ["rw,noauto", "parent=/b.vhdx"]);
        assert_eq!(v, 1);
        // Called by name, even an image named like a command is an image.
        let (a, _) = mount_args(&["mount.vdiskfs", "info", "/mnt"]);
        assert_eq!(a.image, Path::new("info"));
        assert!(matches!(
            parse_argv(&argv(&["mount.vdiskfs", "a", "m", "-f", "-o", "ro"])),
            Some(Ok(HelperCall::Fake))
        ));
        assert!(matches!(
            parse_argv(&argv(&["mount.vdiskfs", "-h"])),
            Some(Ok(HelperCall::Help))
        ));
    }

    #[test]
    fn bad_helper_calls() {
        let usage = |problem: &str| MountRefusal::Usage {
            problem: problem.into(),
            usage: USAGE,
        };
        for (v, want) in [
            (
                &["mount.vdiskfs", "a"][..],
                usage("1 arguments given, 2 expected"),
            ),
            (
                &["mount.vdiskfs", "a", "b", "c"],
                usage("3 arguments given, 2 expected"),
            ),
            (
                &["mount.vdiskfs", "a", "b", "-x"],
                usage("unknown option -x"),
            ),
            (
                &["mount.vdiskfs", "a", "b", "-o"],
                usage("-o needs a value"),
            ),
            (
                &["mount.vdiskfs", "a", "b", "-N", "/proc/1/ns/mnt"],
                MountRefusal::Namespace {
                    namespace: "/proc/1/ns/mnt".into(),
                },
            ),
            (
                &["mount.vdiskfs", "", "b"],
                usage("the image (mount source) is empty"),
            ),
        ] {
            match parse_argv(&argv(v)) {
                Some(Err(Error::Mount(r))) => assert_eq!(r, want, "{v:?}"),
                other => panic!("{v:?}: {other:?}"),
            }
        }
        let mut v = argv(&["mount.vdiskfs", "a", "b", "-o"]);
        v.push(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(
            b"ro,\xff".to_vec(),
        ));
        assert!(matches!(
            parse_argv(&v),
            Some(Err(Error::Mount(MountRefusal::NotUtf8 { .. })))
        ));
    }

    #[test]
    fn own_options_become_flags() {
        let (mut a, _) = mount_args(&["mount.vdiskfs", "a", "m"]);
        a.chain.parents.push("/first.vhdx".into());
        a.options = vec![
            "ro,parent=/p1.vhdx,search-dir=/d,cache_size=64,allow_other".into(),
            "parent=/p2.vhdx,ignore_linkage,threads=2,name=x.img,log_file=/l,cache_block=1M".into(),
        ];
        let b = absorb_own_options(&a).unwrap();
        assert_eq!(
            b.chain.parents,
            [
                Path::new("/first.vhdx"),
                Path::new("/p1.vhdx"),
                Path::new("/p2.vhdx")
            ]
        );
        assert_eq!(b.chain.search_dirs, [Path::new("/d")]);
        assert!(b.chain.ignore_linkage && !b.chain.allow_device_parent);
        assert_eq!((b.cache_size, b.threads), (64, 2));
        assert_eq!(b.cache_block, "1M");
        assert_eq!(b.name, "x.img");
        assert_eq!(b.log_file.as_deref(), Some(Path::new("/l")));
        assert_eq!(b.options, ["ro,allow_other"]);

        let key = |k: &str| k.to_string();
        for (bad, want) in [
            (
                "cache_size=big",
                MountRefusal::NotANumber {
                    key: key("cache_size"),
                    value: "big".into(),
                },
            ),
            (
                "cache_size",
                MountRefusal::NeedsValue {
                    key: key("cache_size"),
                },
            ),
            ("parent=", MountRefusal::NeedsValue { key: key("parent") }),
            (
                "ignore_linkage=1",
                MountRefusal::TakesNoValue {
                    key: key("ignore_linkage"),
                    value: "1".into(),
                },
            ),
            (
                "threads=-1",
                MountRefusal::NotANumber {
                    key: key("threads"),
                    value: "-1".into(),
                },
            ),
        ] {
            a.options = vec![bad.into()];
            match absorb_own_options(&a) {
                Err(Error::Mount(r)) => assert_eq!(r, want, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
