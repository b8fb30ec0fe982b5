//! Tests of the VHD reader, writer and creator: real fixtures, files made by qemu-img,
//! libvhdi (vhdiinfo, vhdimount) as an independent judge, and damaged files.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::create::{create_differencing, create_dynamic, DEFAULT_BLOCK_SIZE};
use super::footer::{checksum, Geometry};
use super::Vhd;
use crate::chain::Chain;
use crate::disk::{Disk, DiskOptions};
use crate::error::{Defect, Error, VhdDefect, Warning};
use crate::layer::{Layer, OpenOptions, Run, WritableLayer};

const RO: OpenOptions = OpenOptions::read_only();
const RW: OpenOptions = OpenOptions::writable();

use crate::test_support::{fixture, TempDir as TmpDir};

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {tool} not installed");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img check` where qemu supports it. qemu's vpc driver has no check ("This
/// image format does not support checks"), so that answer counts as "nothing found";
/// `qemu-img info` must accept the file in any case.
fn qemu_check(p: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() || err.contains("does not support checks"),
        "qemu-img check {}: {err}",
        p.display()
    );
    run(Command::new("qemu-img").args(["info", "-f", "vpc"]).arg(p));
}

fn sha256(data: &[u8], dir: &TmpDir) -> String {
    let p = dir.join("sha-input");
    std::fs::write(&p, data).unwrap();
    let out = run(Command::new("sha256sum").arg(&p));
    out.split_whitespace().next().unwrap().to_string()
}

/// The merged view of `layers` (top first) through `Disk`.
fn merged(layers: Vec<Arc<dyn Layer>>) -> Vec<u8> {
    let n = layers.len();
    let chain = Chain {
        layers,
        found: vec![None; n],
        warnings: vec![],
    };
    let disk = Disk::new(chain, DiskOptions::default());
    let mut buf = vec![0u8; disk.len() as usize];
    assert_eq!(disk.read_at(0, &mut buf).unwrap(), buf.len());
    buf
}

fn open(p: &Path) -> Arc<dyn Layer> {
    Arc::new(Vhd::open(p, RO).unwrap())
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

// ---------------------------------------------------------------- fixtures

#[test]
fn ext2_fixture_matches_known_hash() {
    let Some(p) = fixture("ext2.vhd") else { return };
    let t = TmpDir::new("vhd");
    let v = Vhd::open(&p, RO).unwrap();
    let info = v.info().unwrap();
    assert_eq!(info.disk_type, "dynamic");
    assert_eq!(info.virtual_size, 4_212_736);
    assert_eq!(info.block_size, 2 << 20);
    assert_eq!((info.allocated_blocks, info.total_blocks), (1, 3));
    assert_eq!(info.bytes_held, 4_212_736);
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    assert!(info
        .extra
        .iter()
        .any(|(k, v)| k == "creator_application" && v == "qemu"));
    assert!(v.parent().is_none());
    // Runs: block 0 held, the rest zeros.
    let mut runs = Vec::new();
    v.map(0, v.virtual_size(), &mut runs).unwrap();
    assert_eq!(
        runs,
        vec![
            Run::Held {
                len: 2 << 20,
                file_offset: 4 * 512 + 512
            },
            Run::Zero {
                len: 4_212_736 - (2 << 20)
            }
        ]
    );
    let data = merged(vec![Arc::new(v)]);
    assert_eq!(
        sha256(&data, &t),
        "870be7ae16c1fa8faab05c6eb9205dc9a7ae35c5f552c5cf8a267c0bc6a5cb99"
    );
}

#[test]
fn image_pair_with_bad_checksums_reads_with_warnings() {
    let (Some(base), Some(child)) = (fixture("image.vhd"), fixture("image-differential.vhd"))
    else {
        return;
    };
    let t = TmpDir::new("vhd");
    let b = Vhd::open(&base, RO).unwrap();
    let bi = b.info().unwrap();
    assert!(
        bi.warnings.contains(&Warning::VhdChecksum {
            structure: "footer"
        }),
        "{:?}",
        bi.warnings
    );
    let c = Vhd::open(&child, RO).unwrap();
    let ci = c.info().unwrap();
    assert_eq!(ci.disk_type, "differencing");
    assert!(ci.warnings.contains(&Warning::VhdChecksum {
        structure: "footer"
    }));
    assert!(ci.warnings.contains(&Warning::VhdChecksum {
        structure: "dynamic disk header"
    }));
    let pr = c.parent().unwrap();
    assert_eq!(
        pr.candidates,
        vec![("parent_unicode_name".to_string(), "image.vhd".to_string())]
    );
    assert_eq!(pr.linkage, vec![b.linkage_id().unwrap()]);
    let data = merged(vec![Arc::new(c), Arc::new(b)]);
    assert_eq!(
        sha256(&data, &t),
        "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25"
    );
    let base_only = merged(vec![open(&base)]);
    assert_eq!(
        sha256(&base_only, &t),
        "c6db12a7db548e193c29420c1b4533e4708b20c5033db5cc29ef075d48316d25"
    );
    // A writable open of a file with a bad checksum is refused.
    let copy = t.join("image.vhd");
    std::fs::copy(&base, &copy).unwrap();
    let e = Vhd::open(&copy, RW).err().unwrap();
    assert!(
        matches!(
            &e,
            Error::Corrupt {
                path,
                defect: Defect::Vhd(VhdDefect::ChecksumWritable { .. })
            } if *path == copy
        ),
        "{e}"
    );
}

#[test]
fn windows_differencing_fixture_locators() {
    let Some(p) = fixture("fat-differential.vhd") else {
        return;
    };
    let v = Vhd::open(&p, RO).unwrap();
    let pr = v.parent().unwrap();
    let names: Vec<(&str, &str)> = pr
        .candidates
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("W2ru", ".\\fat-parent.vhd"),
            ("W2ku", "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"),
            (
                "parent_unicode_name",
                "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
            ),
        ]
    );
    assert_eq!(
        pr.linkage[0].to_string(),
        "5fa21a55-f394-aa4d-9958-1951a67d5540"
    );
    assert_eq!(pr.timestamp, Some(0));
    let info = v.info().unwrap();
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    assert_eq!(info.parent_locator.len(), 2);
    assert_eq!(info.virtual_size, 4 << 20);
    // One allocated block; what it holds is less than the whole block.
    assert_eq!(info.allocated_blocks, 1);
    assert!(info.bytes_held > 0 && info.bytes_held <= 2 << 20);
    // Over a zero "parent" (none given here) the map is consistent in length.
    let mut runs = Vec::new();
    v.map(0, 4 << 20, &mut runs).unwrap();
    assert_eq!(runs.iter().map(|r| r.len()).sum::<u64>(), 4 << 20);
    assert!(runs.iter().any(|r| matches!(r, Run::Absent { .. })));
}

// ---------------------------------------------------------------- qemu-made files

fn qemu_roundtrip(subformat: &str) {
    if !have("qemu-img") {
        return;
    }
    let t = TmpDir::new("vhd");
    let raw = t.join("in.raw");
    let mut data = vec![0u8; 5 << 20];
    let mut rng = Rng(42);
    // Some random regions, some zero gaps, so dynamic files have holes.
    for (i, chunk) in data.chunks_mut(512 << 10).enumerate() {
        if i % 3 != 1 {
            rng.fill(chunk);
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let vhd = t.join("out.vhd");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vpc", "-o"])
        .arg(format!("subformat={subformat}"))
        .arg(&raw)
        .arg(&vhd));
    let back = t.join("back.raw");
    // -f vpc: probing would take a fixed VHD for a raw file (footer included).
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&vhd)
        .arg(&back));
    let expect = std::fs::read(&back).unwrap();
    let v = Vhd::open(&vhd, RO).unwrap();
    assert_eq!(v.info().unwrap().disk_type, subformat);
    let got = merged(vec![Arc::new(v)]);
    // qemu pads to CHS geometry and writes that as the footer's current size (the
    // virtual size), so qemu (7.2 and 10.x) and we agree on the size too.
    assert!(got.len() >= data.len());
    assert_eq!(got.len(), expect.len(), "virtual size vs qemu's raw view");
    assert!(got == expect, "merged view differs from qemu's");
    assert_eq!(&got[..data.len()], &data[..]);
}

#[test]
fn qemu_fixed_vhd_matches_qemu() {
    qemu_roundtrip("fixed");
}

#[test]
fn qemu_dynamic_vhd_matches_qemu() {
    qemu_roundtrip("dynamic");
}

// ---------------------------------------------------------------- damaged files

/// Byte offsets in a file made by `create_dynamic`: the dynamic header and the BAT.
pub(super) const HDR: usize = 512;
pub(super) const BAT: usize = 1536;

/// Footer (end and copy) and dynamic header checksums after an edit.
pub(super) fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    let c = checksum(&b[n - 512..], 64);
    b[n - 512 + 64..n - 512 + 68].copy_from_slice(&c.to_be_bytes());
    b.copy_within(n - 512.., 0);
    let c = checksum(&b[HDR..HDR + 1024], 36);
    b[HDR + 36..HDR + 40].copy_from_slice(&c.to_be_bytes());
}

/// A dynamic VHD of 4 blocks of 4 KiB with block 1 allocated (holding 0x11).
fn small_dynamic(t: &TmpDir) -> Vec<u8> {
    let p = t.join("small.vhd");
    create_dynamic(&p, 16 << 10, 4096).unwrap();
    {
        let v = Vhd::open(&p, RW).unwrap();
        v.write(4096, &[0x11; 4096]).unwrap();
    }
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    b
}

fn open_bytes(t: &TmpDir, name: &str, b: &[u8], opts: OpenOptions) -> crate::error::Result<Vhd> {
    let p = t.join(name);
    std::fs::write(&p, b).unwrap();
    Vhd::open(&p, opts)
}

/// The VHD defect of an error.
fn vhd_defect(e: &Error) -> &VhdDefect {
    match e {
        Error::Corrupt {
            defect: Defect::Vhd(d),
            ..
        } => d,
        e => panic!("expected a VHD defect: {e}"),
    }
}

#[test]
fn damaged_files_give_clear_errors() {
    let t = TmpDir::new("vhd");
    let good = small_dynamic(&t);
    let ok = open_bytes(&t, "good.vhd", &good, RO).unwrap();
    assert_eq!(merged(vec![Arc::new(ok)])[4096..8192], [0x11; 4096]);

    // Each damage gives its defect (or unsupported feature), about the file opened.
    type Want = dyn Fn(&Error) -> bool;
    let case = |name: &str, f: &dyn Fn(&mut Vec<u8>), fix: bool, want: &Want| {
        let mut b = good.clone();
        f(&mut b);
        if fix {
            fix_checksums(&mut b);
        }
        let e = open_bytes(&t, name, &b, RO)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        let path = match &e {
            Error::Corrupt { path, .. } | Error::Unsupported { path, .. } => path,
            e => panic!("{name}: {e}"),
        };
        assert!(path.ends_with(name), "{name}: {e}");
        assert!(want(&e), "{name}: {e}");
    };
    fn defect(e: &Error) -> Option<VhdDefect> {
        match e {
            Error::Corrupt {
                defect: Defect::Vhd(d),
                ..
            } => Some(d.clone()),
            _ => None,
        }
    }
    let n = good.len();
    case(
        "cookie.vhd",
        &|b| {
            b[n - 512] = b'x';
            b[0] = b'x';
        },
        false,
        &|e| matches!(defect(e), Some(VhdDefect::NoFooter { .. })),
    );
    case("hdrcookie.vhd", &|b| b[HDR] = b'x', false, &|e| {
        matches!(defect(e), Some(VhdDefect::HeaderCookie { .. }))
    });
    case(
        "bs0.vhd",
        &|b| b[HDR + 32..HDR + 36].copy_from_slice(&0u32.to_be_bytes()),
        true,
        &|e| matches!(defect(e), Some(VhdDefect::BlockSize { block_size: 0, .. })),
    );
    case(
        "bs3k.vhd",
        &|b| b[HDR + 32..HDR + 36].copy_from_slice(&3072u32.to_be_bytes()),
        true,
        &|e| {
            matches!(
                defect(e),
                Some(VhdDefect::BlockSize {
                    block_size: 3072,
                    ..
                })
            )
        },
    );
    case(
        "bshuge.vhd",
        &|b| b[HDR + 32..HDR + 36].copy_from_slice(&(1u32 << 31).to_be_bytes()),
        true,
        &|e| matches!(defect(e), Some(VhdDefect::BlockSize { .. })),
    );
    case(
        "maxent.vhd",
        &|b| b[HDR + 28..HDR + 32].copy_from_slice(&2u32.to_be_bytes()),
        true,
        &|e| matches!(defect(e), Some(VhdDefect::BatTooSmall { entries: 2, .. })),
    );
    case(
        "batpast.vhd",
        &|b| b[HDR + 16..HDR + 24].copy_from_slice(&(n as u64 - 8).to_be_bytes()),
        true,
        &|e| matches!(defect(e), Some(VhdDefect::BatPastEnd { .. })),
    );
    case(
        "entrypast.vhd",
        &|b| b[BAT + 8..BAT + 12].copy_from_slice(&0x00FF_0000u32.to_be_bytes()),
        false,
        &|e| matches!(defect(e), Some(VhdDefect::BlockOutside { entry: 2, .. })),
    );
    case(
        "entrybat.vhd",
        &|b| b[BAT + 8..BAT + 12].copy_from_slice(&3u32.to_be_bytes()),
        false,
        &|e| {
            matches!(
                defect(e),
                Some(VhdDefect::BlockOverlapsBat { entry: 2, .. })
            )
        },
    );
    case(
        "dup.vhd",
        &|b| {
            let e: [u8; 4] = b[BAT + 4..BAT + 8].try_into().unwrap();
            b[BAT + 8..BAT + 12].copy_from_slice(&e);
        },
        false,
        &|e| matches!(defect(e), Some(VhdDefect::BlocksOverlap { .. })),
    );
    case(
        "hdrpast.vhd",
        &|b| {
            let l = n as u64;
            b[n - 512 + 16..n - 512 + 24].copy_from_slice(&l.to_be_bytes());
        },
        true,
        &|e| matches!(defect(e), Some(VhdDefect::HeaderPastEnd { .. })),
    );
    case("type.vhd", &|b| b[n - 512 + 63] = 5, true, &|e| {
        matches!(
            e,
            Error::Unsupported {
                feature: crate::error::Feature::VhdDiskType { disk_type: 5, .. },
                ..
            }
        )
    });
    case("short.vhd", &|b| b.truncate(100), false, &|e| {
        matches!(defect(e), Some(VhdDefect::NoFooter { .. }))
    });

    // Locators: make it differencing with a W2ru entry, then break the entry.
    let mut diff = good.clone();
    diff[n - 512 + 63] = 4;
    let loc = HDR + 576;
    let put = |b: &mut Vec<u8>, off: u64, len: u32| {
        b[loc..loc + 4].copy_from_slice(b"W2ru");
        b[loc + 4..loc + 8].copy_from_slice(&512u32.to_be_bytes());
        b[loc + 8..loc + 12].copy_from_slice(&len.to_be_bytes());
        b[loc + 16..loc + 24].copy_from_slice(&off.to_be_bytes());
    };
    let mut d = diff.clone();
    put(&mut d, 0, 8); // the footer copy's first 8 bytes "conectix": 4 UTF-16LE units
    fix_checksums(&mut d);
    let v = open_bytes(&t, "locok.vhd", &d, RO).unwrap();
    assert_eq!(v.parent().unwrap().candidates[0].0, "W2ru");
    let dl = diff.clone();
    case(
        "locpast.vhd",
        &|b| {
            *b = dl.clone();
            put(b, n as u64 - 4, 8)
        },
        true,
        &|e| matches!(defect(e), Some(VhdDefect::LocatorPastEnd { .. })),
    );
    case(
        "locwrap.vhd",
        &|b| {
            *b = dl.clone();
            put(b, u64::MAX - 2, 8)
        },
        true,
        &|e| matches!(defect(e), Some(VhdDefect::LocatorPastEnd { .. })),
    );
    case(
        "lochuge.vhd",
        &|b| {
            *b = dl.clone();
            put(b, 0, 1 << 30)
        },
        true,
        &|e| matches!(defect(e), Some(VhdDefect::LocatorTooLong { .. })),
    );
    case(
        "locodd.vhd",
        &|b| {
            *b = dl.clone();
            put(b, 0, 7)
        },
        true,
        &|e| matches!(defect(e), Some(VhdDefect::LocatorOddLength { .. })),
    );
}

#[test]
fn checksum_mismatch_is_warning_read_only_and_error_writable() {
    let t = TmpDir::new("vhd");
    let mut b = small_dynamic(&t);
    let n = b.len();
    b[n - 512 + 100] ^= 1; // reserved byte: checksum no longer matches
    let v = open_bytes(&t, "ck.vhd", &b, RO).unwrap();
    assert_eq!(
        v.info().unwrap().warnings,
        [Warning::VhdChecksum {
            structure: "footer"
        }]
    );
    assert_eq!(
        vhd_defect(&open_bytes(&t, "ck2.vhd", &b, RW).unwrap_err()),
        &VhdDefect::ChecksumWritable {
            structure: "footer"
        }
    );
    let mut b = small_dynamic(&t);
    b[HDR + 900] ^= 1;
    let v = open_bytes(&t, "hck.vhd", &b, RO).unwrap();
    assert_eq!(
        v.info().unwrap().warnings,
        [Warning::VhdChecksum {
            structure: "dynamic disk header"
        }]
    );
    assert_eq!(
        vhd_defect(&open_bytes(&t, "hck2.vhd", &b, RW).unwrap_err()),
        &VhdDefect::ChecksumWritable {
            structure: "dynamic disk header"
        }
    );
}

#[test]
fn footer_only_at_start_and_old_511_byte_footer() {
    let t = TmpDir::new("vhd");
    let good = small_dynamic(&t);
    let n = good.len();
    let expect = merged(vec![Arc::new(open_bytes(&t, "g.vhd", &good, RO).unwrap())]);
    // Truncated: the footer at the end is gone, the copy at 0 is used with a warning.
    let v = open_bytes(&t, "trunc.vhd", &good[..n - 512], RO).unwrap();
    assert_eq!(v.info().unwrap().warnings, [Warning::VhdFooterMissing]);
    assert_eq!(merged(vec![Arc::new(v)]), expect);
    assert_eq!(
        vhd_defect(&open_bytes(&t, "trunc2.vhd", &good[..n - 512], RW).unwrap_err()),
        &VhdDefect::FooterMissingWritable
    );
    // 511-byte footer at the end.
    let v = open_bytes(&t, "old.vhd", &good[..n - 1], RO).unwrap();
    assert!(v.info().unwrap().warnings.is_empty());
    assert_eq!(merged(vec![Arc::new(v)]), expect);
}

#[test]
fn unaligned_map_and_partial_bitmaps() {
    let t = TmpDir::new("vhd");
    let base = t.join("base.vhd");
    create_dynamic(&base, 64 << 10, 4096).unwrap();
    let child = t.join("child.vhd");
    create_differencing(&child, &Vhd::open(&base, RO).unwrap(), 4096).unwrap();
    let c = Vhd::open(&child, RW).unwrap();
    // Sectors 1 and 3..5 of block 0.
    c.write(512, &[1; 512]).unwrap();
    c.write(1536, &[3; 1024]).unwrap();
    let mut runs = Vec::new();
    c.map(100, 3000, &mut runs).unwrap();
    let lens: Vec<(char, u64)> = runs
        .iter()
        .map(|r| match r {
            Run::Held { len, .. } => ('H', *len),
            Run::Absent { len } => ('A', *len),
            Run::Zero { len } => ('Z', *len),
        })
        .collect();
    assert_eq!(
        lens,
        vec![('A', 412), ('H', 512), ('A', 512), ('H', 1024), ('A', 540)]
    );
    let info = c.info().unwrap();
    assert_eq!(info.bytes_held, 1536);
    assert_eq!(info.allocated_blocks, 1);
    // The BAT entry and bitmap reach the file at a flush.
    c.flush().unwrap();
    // A dynamic disk with a partial bitmap reads zeros where bits are clear (libvhdi).
    let mut b = std::fs::read(&child).unwrap();
    let n = b.len();
    b[n - 512 + 63] = 3;
    fix_checksums(&mut b);
    let v = open_bytes(&t, "dyn.vhd", &b, RO).unwrap();
    let mut runs = Vec::new();
    v.map(0, 4096, &mut runs).unwrap();
    assert_eq!(runs[0], Run::Zero { len: 512 });
    assert!(matches!(runs[1], Run::Held { len: 512, .. }));
}

// ---------------------------------------------------------------- create

#[test]
fn created_dynamic_base_passes_qemu_check() {
    let t = TmpDir::new("vhd");
    // A CHS-exact size, so qemu (which sizes unknown creators by CHS before 10.0) agrees.
    let size = Geometry::for_sectors((20 << 20) / 512).bytes();
    let p = t.join("base.vhd");
    create_dynamic(&p, size, DEFAULT_BLOCK_SIZE).unwrap();
    let e = create_dynamic(&p, size, DEFAULT_BLOCK_SIZE).unwrap_err();
    assert!(
        matches!(&e, Error::Request(crate::error::Request::AlreadyExists { path }) if *path == p),
        "{e}"
    );
    let v = Vhd::open(&p, RO).unwrap();
    let i = v.info().unwrap();
    assert_eq!((i.disk_type.as_str(), i.virtual_size), ("dynamic", size));
    assert_eq!(i.allocated_blocks, 0);
    assert!(i.warnings.is_empty());
    assert_eq!(merged(vec![Arc::new(v)]), vec![0u8; size as usize]);
    // Nothing but the image is left in the directory.
    let names: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("base.vhd")]);
    if have("qemu-img") {
        qemu_check(&p);
        let info = run(Command::new("qemu-img").args(["info", "-f", "vpc"]).arg(&p));
        assert!(info.contains(&format!("({size} bytes)")), "{info}");
    }
    if have("vhdiinfo") {
        let out = run(Command::new("vhdiinfo").arg(&p));
        assert!(out.contains("Dynamic"), "{out}");
    }
}

fn vhdimount_read(image: &Path, t: &TmpDir) -> Vec<u8> {
    let mnt = t.join(format!("mnt-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("vhdimount").arg(image).arg(&mnt));
    // vhdimount exposes every layer of a chain: vhdi1 is the base, the highest number
    // the image given (the merged view of the whole chain).
    let top = (1..=256)
        .take_while(|i| mnt.join(format!("vhdi{i}")).exists())
        .last()
        .unwrap_or(1);
    let data = std::fs::read(mnt.join(format!("vhdi{top}")));
    // Retried while busy (another test thread's fork may hold a copy of the descriptor
    // until it execs), so that no mount is left behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while crate::test_support::is_mounted(&mnt) && std::time::Instant::now() < deadline {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
        if crate::test_support::is_mounted(&mnt) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    data.unwrap()
}

// ---------------------------------------------------------------- writes

fn random_writes(
    write: &dyn Fn(u64, &[u8]),
    model: &mut [u8],
    rng: &mut Rng,
    count: usize,
    block: u64,
) {
    let size = model.len() as u64;
    for i in 0..count {
        let len = match i % 4 {
            0 => 512,
            1 => 4096,
            2 => 3 * 512,
            _ => 8192,
        };
        let off = if i % 5 == 0 {
            // Straddle a block boundary.
            let b = (rng.next() % (size / block - 1) + 1) * block;
            b - 1024
        } else {
            (rng.next() % ((size - len) / 512)) * 512
        };
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        write(off, &data);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

#[test]
fn writes_to_dynamic_match_model_and_pass_qemu_check() {
    let t = TmpDir::new("vhd");
    let size = Geometry::for_sectors((12 << 20) / 512).bytes();
    let p = t.join("dyn.vhd");
    create_dynamic(&p, size, 1 << 20).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(7);
    {
        let v = Vhd::open(&p, RW).unwrap();
        random_writes(
            &|o, d| v.write(o, d).unwrap(),
            &mut model,
            &mut rng,
            200,
            1 << 20,
        );
        v.flush().unwrap();
        assert_eq!(merged(vec![Arc::new(v)]), model);
    }
    let v = Vhd::open(&p, RO).unwrap();
    assert!(v.info().unwrap().warnings.is_empty());
    assert_eq!(merged(vec![Arc::new(v)]), model);
    if have("qemu-img") {
        qemu_check(&p);
        let back = t.join("back.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vpc", "-O", "raw"])
            .arg(&p)
            .arg(&back));
        assert_eq!(std::fs::read(&back).unwrap(), model);
    }
    if have("vhdimount") {
        assert_eq!(vhdimount_read(&p, &t), model);
    }
}

#[test]
fn fixed_disk_writes_in_place() {
    if !have("qemu-img") {
        return;
    }
    let t = TmpDir::new("vhd");
    let p = t.join("fixed.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-f", "vpc", "-o", "subformat=fixed"])
        .arg(&p)
        .arg("4M"));
    let size = Vhd::open(&p, RO).unwrap().virtual_size();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(3);
    {
        let v = Vhd::open(&p, RW).unwrap();
        random_writes(
            &|o, d| v.write(o, d).unwrap(),
            &mut model,
            &mut rng,
            50,
            1 << 20,
        );
        assert!(v.write(size, &[0; 512]).is_err());
        assert!(v.write(1, &[0; 512]).is_err());
    }
    assert_eq!(merged(vec![open(&p)]), model);
    qemu_check(&p);
}

#[test]
fn writes_to_differencing_child_match_model_and_libvhdi() {
    let t = TmpDir::new("vhd");
    let size = Geometry::for_sectors((10 << 20) / 512).bytes();
    let base = t.join("base.vhd");
    create_dynamic(&base, size, DEFAULT_BLOCK_SIZE).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(99);
    {
        // Base content: a few regions, so the child's absent sectors matter.
        let b = Vhd::open(&base, RW).unwrap();
        for off in [0u64, 3 << 20, 7 << 20] {
            let mut d = vec![0u8; 1 << 20];
            rng.fill(&mut d);
            b.write(off, &d).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
    }
    let sub = t.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.vhd");
    let pl = Vhd::open(&base, RO).unwrap();
    create_differencing(&child, &pl, DEFAULT_BLOCK_SIZE).unwrap();
    {
        let c = Vhd::open(&child, RO).unwrap();
        let pr = c.parent().unwrap();
        assert_eq!(
            pr.candidates[0],
            ("W2ru".to_string(), "..\\base.vhd".to_string())
        );
        assert_eq!(pr.candidates[1].0, "W2ku");
        let abs = std::fs::canonicalize(&base).unwrap();
        assert_eq!(pr.candidates[1].1, abs.to_string_lossy().replace('/', "\\"));
        assert_eq!(pr.linkage, vec![pl.linkage_id().unwrap()]);
        assert_eq!(pr.timestamp, pl.timestamp());
        assert_eq!(c.virtual_size(), size);
    }
    {
        // Through the merged view, as the FUSE mount writes: sub-4 KiB writes are
        // widened to 4 KiB (the child's write granularity) from the parent's data.
        let c: Arc<dyn Layer> = Arc::new(Vhd::open(&child, RW).unwrap());
        assert_eq!(c.writable().unwrap().write_granularity(), 4096);
        let chain = Chain {
            layers: vec![c, open(&base)],
            found: vec![None, None],
            warnings: vec![],
        };
        let disk = Disk::new(chain, DiskOptions::default());
        random_writes(
            &|o, d| assert_eq!(disk.write_at(o, d).unwrap(), d.len()),
            &mut model,
            &mut rng,
            300,
            DEFAULT_BLOCK_SIZE as u64,
        );
        // Unaligned bytes too, and the last sectors of the disk.
        disk.write_at(1000, &[0xAB; 100]).unwrap();
        model[1000..1100].fill(0xAB);
        disk.write_at(size - 512, &[0xCD; 512]).unwrap();
        model[size as usize - 512..].fill(0xCD);
        disk.flush().unwrap();
    }
    let base_before = std::fs::read(&base).unwrap();
    let got = merged(vec![open(&child), open(&base)]);
    assert!(got == model, "merged view differs from the model");
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    let ci = Vhd::open(&child, RO).unwrap().info().unwrap();
    assert!(ci.bytes_held > 0 && ci.bytes_held < size);

    if have("vhdiinfo") && have("vhdimount") {
        // libvhdi resolves the parent by name in the child's directory.
        let flat = t.join("flat");
        std::fs::create_dir(&flat).unwrap();
        std::fs::copy(&base, flat.join("base.vhd")).unwrap();
        std::fs::copy(&child, flat.join("child.vhd")).unwrap();
        let out = run(Command::new("vhdiinfo").arg(flat.join("child.vhd")));
        assert!(out.contains("Differential"), "{out}");
        let pid = pl.linkage_id().unwrap().to_string();
        assert!(out.to_lowercase().contains(&pid), "{out}");
        assert!(out.contains("base.vhd"), "{out}");
        let via = vhdimount_read(&flat.join("child.vhd"), &t);
        if via != model {
            let first = via.iter().zip(&model).position(|(a, b)| a != b);
            panic!(
                "vhdimount view differs from the model: lengths {} {}, first difference at {first:?}",
                via.len(),
                model.len()
            );
        }
    }
}

#[test]
fn concurrent_writers_allocate_once() {
    let t = TmpDir::new("vhd");
    let p = t.join("c.vhd");
    create_dynamic(&p, 8 << 20, 1 << 20).unwrap();
    let v = Arc::new(Vhd::open(&p, RW).unwrap());
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let v = v.clone();
            std::thread::spawn(move || {
                for blk in 0..8u64 {
                    let off = blk * (1 << 20) + i as u64 * 4096;
                    v.write(off, &[i + 1; 4096]).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(v);
    let v = Vhd::open(&p, RO).unwrap();
    let i = v.info().unwrap();
    assert_eq!(i.allocated_blocks, 8);
    // Exactly 8 blocks of (bitmap + data) after the metadata.
    let len = std::fs::metadata(&p).unwrap().len();
    let data = merged(vec![Arc::new(v)]);
    for blk in 0..8usize {
        for w in 0..4usize {
            let o = blk * (1 << 20) + w * 4096;
            assert!(data[o..o + 4096].iter().all(|&x| x == w as u8 + 1));
        }
    }
    assert!(len < 9 * ((1 << 20) + 512) + 8192, "file too large: {len}");
}

// ---------------------------------------------------------------- crash states

/// Rebuild the file at each step of the allocation sequence (write.rs) and check every
/// intermediate state opens cleanly and shows either the old or the new data.
#[test]
fn every_allocation_step_leaves_a_valid_file() {
    let t = TmpDir::new("vhd");
    let p = t.join("d.vhd");
    create_dynamic(&p, 64 << 10, 4096).unwrap();
    Vhd::open(&p, RW).unwrap().write(0, &[0x55; 4096]).unwrap();
    let before = std::fs::read(&p).unwrap();
    let old = merged(vec![open(&p)]);
    Vhd::open(&p, RW)
        .unwrap()
        .write(8192, &[0x66; 1024])
        .unwrap();
    let after = std::fs::read(&p).unwrap();
    let new = merged(vec![open(&p)]);
    assert_ne!(old, new);
    let old_footer = before.len() - 512;
    let new_footer = after.len() - 512;
    assert_eq!(new_footer, old_footer + 512 + 4096);

    // Step 1 done: new footer written past a hole, the old footer still in place.
    let mut s1 = before.clone();
    s1.resize(new_footer, 0);
    s1.extend_from_slice(&after[new_footer..]);
    // Step 1 torn: only part of the new footer reached the disk.
    let s1_torn = s1[..new_footer + 100].to_vec();
    // Step 2 done: bitmap and data written, BAT not yet.
    let mut s2 = after.clone();
    let bat_entry = BAT + 2 * 4;
    s2[bat_entry..bat_entry + 4].copy_from_slice(&[0xFF; 4]);
    for (name, bytes, want, warned) in [
        ("s1.vhd", &s1, &old, false),
        ("s1torn.vhd", &s1_torn, &old, true),
        ("s2.vhd", &s2, &old, false),
        ("s3.vhd", &after, &new, false),
    ] {
        let v = open_bytes(&t, name, bytes, RO).unwrap();
        assert_eq!(!v.info().unwrap().warnings.is_empty(), warned, "{name}");
        assert!(merged(vec![Arc::new(v)]) == *want, "{name}: wrong content");
    }
    // The states with a footer at the end can be written again.
    let v = open_bytes(&t, "s2w.vhd", &s2, RW).unwrap();
    v.write(8192, &[0x77; 512]).unwrap();
    drop(v);
    let got = merged(vec![open(&t.join("s2w.vhd"))]);
    assert_eq!(got[8192..8704], [0x77; 512]);
    assert_eq!(got[..4096], [0x55; 4096]);
}

/// Batched allocation (write.rs): the footer moves past a reservation of 1, 2, 4, ...
/// blocks, BAT entries and bitmap sectors reach the file only at a flush, and close
/// gives the unused reservation back. Every state the file passes through on disk (before
/// a flush, after it, halfway through close) opens read-only and writable, checks clean
/// and reads the flushed content or something newer.
#[test]
fn batched_allocation_states_are_valid() {
    let t = TmpDir::new("vhd");
    let p = t.join("d.vhd");
    let bs = 4096u64;
    let slot = 512 + bs;
    create_dynamic(&p, 64 * bs, bs as u32).unwrap();
    let start = std::fs::metadata(&p).unwrap().len() - 512;
    let bat_entry = |b: &[u8], i: usize| {
        u32::from_be_bytes(b[BAT + 4 * i..BAT + 4 * i + 4].try_into().unwrap())
    };
    let check_state = |name: &str, bytes: &[u8], want: &[u8]| {
        for opts in [RO, RW] {
            let v = open_bytes(&t, name, bytes, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(v.check().unwrap().is_empty(), "{name}");
            assert!(v.info().unwrap().warnings.is_empty(), "{name}");
            assert!(merged(vec![Arc::new(v)]) == want, "{name}: wrong content");
        }
    };
    let mut model = vec![0u8; 64 * bs as usize];
    let v = Vhd::open(&p, RW).unwrap();
    // Blocks 0..4: reservations of 1, 2 and 4 blocks; three slots stay unused.
    for b in 0..4u64 {
        let d = vec![b as u8 + 1; 1024];
        v.write(b * bs + 1024, &d).unwrap();
        model[(b * bs + 1024) as usize..(b * bs + 2048) as usize].copy_from_slice(&d);
    }
    let unflushed = std::fs::read(&p).unwrap();
    assert_eq!(unflushed.len() as u64, start + 7 * slot + 512);
    assert_eq!(unflushed[unflushed.len() - 512..], unflushed[..512]);
    assert!(
        (0..4).all(|i| bat_entry(&unflushed, i) == 0xFFFF_FFFF),
        "BAT deferred"
    );
    check_state("unflushed.vhd", &unflushed, &vec![0u8; model.len()]);
    v.flush().unwrap();
    let flushed = std::fs::read(&p).unwrap();
    assert_eq!(flushed.len(), unflushed.len());
    for i in 0..4 {
        assert_eq!(bat_entry(&flushed, i) as u64 * 512, start + i as u64 * slot);
    }
    check_state("flushed.vhd", &flushed, &model);
    // Halfway through close: the footer after the last used slot, not yet cut.
    let mut half = flushed.clone();
    let end = (start + 4 * slot) as usize;
    half[end..end + 512].copy_from_slice(&flushed[..512]);
    check_state("half.vhd", &half, &model);
    v.write(5 * bs, &[9; 512]).unwrap();
    model[5 * bs as usize..5 * bs as usize + 512].fill(9);
    v.close().unwrap();
    let closed = std::fs::read(&p).unwrap();
    assert_eq!(closed.len() as u64, start + 5 * slot + 512);
    check_state("closed.vhd", &closed, &model);
    drop(v);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        closed,
        "a second close changes nothing"
    );
}

/// In a differencing disk, sectors made present in an allocated block are exposed by a
/// bitmap sector written at the next flush, after their data is durable.
#[test]
fn in_place_bitmap_changes_wait_for_a_flush() {
    let t = TmpDir::new("vhd");
    let base = t.join("base.vhd");
    create_dynamic(&base, 64 << 10, 4096).unwrap();
    {
        let b = Vhd::open(&base, RW).unwrap();
        b.write(0, &[0xAA; 4096]).unwrap();
    }
    let child = t.join("child.vhd");
    create_differencing(&child, &Vhd::open(&base, RO).unwrap(), 4096).unwrap();
    let c = Vhd::open(&child, RW).unwrap();
    c.write(0, &[1; 1024]).unwrap();
    c.flush().unwrap();
    let first = std::fs::read(&child).unwrap();
    c.write(2048, &[2; 1024]).unwrap();
    // Readers of this open see it at once.
    let mut runs = Vec::new();
    c.map(0, 4096, &mut runs).unwrap();
    assert!(
        matches!(
            runs[..],
            [
                Run::Held { len: 1024, .. },
                Run::Absent { len: 1024 },
                Run::Held { len: 1024, .. },
                Run::Absent { len: 1024 }
            ]
        ),
        "{runs:?}"
    );
    let read = |bytes: &[u8], name: &str| {
        let v = open_bytes(&t, name, bytes, RO).unwrap();
        assert!(v.check().unwrap().is_empty());
        merged(vec![Arc::new(v), open(&base)])
    };
    let before = std::fs::read(&child).unwrap();
    // The data is in the file, the bitmap is not yet: the sectors still come from the base.
    assert_eq!(before.len(), first.len());
    let got = read(&before, "before.vhd");
    assert_eq!(got[..1024], [1; 1024]);
    assert_eq!(got[1024..4096], [0xAA; 3072]);
    c.flush().unwrap();
    let got = read(&std::fs::read(&child).unwrap(), "after.vhd");
    assert_eq!(got[2048..3072], [2; 1024]);
    assert_eq!(got[3072..4096], [0xAA; 1024]);
}

/// A full file system while creating: an error, and no file (temporary or final) left.
#[test]
fn create_on_full_file_system_leaves_nothing() {
    let t = TmpDir::new("vhd");
    let mnt = t.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: cannot mount a tmpfs here");
        return;
    }
    // 1 GiB in 4 KiB blocks needs a 1 MiB BAT, far more than 64 KiB.
    let r = create_dynamic(&mnt.join("big.vhd"), 1 << 30, 4096);
    let listing: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = Command::new("umount").arg(&mnt).status();
    let e = r.unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(listing.is_empty(), "left behind: {listing:?}");
}
