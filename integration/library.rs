//! The library's in-place verbs driven only through the public API (no `vdiskfs::testing`,
//! no binary): `merge`, `compact`, `resize` and `set_parent` on images made with the
//! public `create` and written through a `Disk`. What they leave is judged by qemu-img
//! where it can read it (a base: qemu-img cannot open differencing files), and by
//! vdiskfs's own reads of a freshly opened chain otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use common::{require_tool, run_ok, sha256_file, Fmt, Rng, TempDir};
use vdiskfs::{
    compact, create, merge, resize, set_parent, Chain, ChainOptions, CompactOptions, CreateOptions,
    Disk, DiskOptions, Error, Intent, MergeOptions, MergeOutcome, NewSize, Observer, Request,
    ResizeOptions, SetParentOptions, Warning,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const FORMATS: [Fmt; 2] = [Fmt::Vhdx, Fmt::Vhd];

/// What a verb told its observer.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Begin(&'static str, u64),
    Advance(u64),
    End,
    Warning(Warning),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Observer for Recorder {
    fn begin(&self, phase: &'static str, total: u64) {
        self.push(Event::Begin(phase, total));
    }
    fn advance(&self, bytes: u64) {
        self.push(Event::Advance(bytes));
    }
    fn end(&self) {
        self.push(Event::End);
    }
    fn warning(&self, w: &Warning) {
        self.push(Event::Warning(w.clone()));
    }
}

impl Recorder {
    fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
    fn warnings(&self) -> Vec<Warning> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Warning(w) => Some(w),
                _ => None,
            })
            .collect()
    }
    /// The phases begun, with their totals and the bytes advanced within each.
    fn phases(&self) -> Vec<(&'static str, u64, u64)> {
        let mut out: Vec<(&'static str, u64, u64)> = Vec::new();
        for e in self.events() {
            match e {
                Event::Begin(p, t) => out.push((p, t, 0)),
                Event::Advance(n) => out.last_mut().expect("advance inside a phase").2 += n,
                _ => {}
            }
        }
        out
    }
}

fn not_cancelled() -> AtomicBool {
    AtomicBool::new(false)
}

fn new_base(path: &Path) {
    create(
        path,
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

fn new_child(path: &Path, parent: &Path) {
    create(
        path,
        &CreateOptions {
            parent: Some(parent.to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

fn open(path: &Path, opts: ChainOptions) -> Disk {
    let chain = Chain::open(path, &opts).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Disk::new(chain, DiskOptions::default())
}

/// Write `writes` (offset, data) into the top of `path`'s chain through a `Disk`.
fn write(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let disk = open(
        path,
        ChainOptions {
            intent: Intent::WriteTop,
            ..Default::default()
        },
    );
    for (off, data) in writes {
        assert_eq!(disk.write_at(*off, data).unwrap(), data.len());
    }
    disk.close().unwrap();
}

fn random(rng: &mut Rng, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize];
    rng.fill(&mut v);
    v
}

/// The merged view of `path`'s chain, read by vdiskfs (opened with `opts`).
fn read_all_with(path: &Path, opts: ChainOptions) -> Vec<u8> {
    let disk = open(path, opts);
    let mut v = vec![0u8; disk.len() as usize];
    let mut done = 0;
    while done < v.len() {
        let n = disk.read_at(done as u64, &mut v[done..]).unwrap();
        assert!(n > 0, "{}: short read at {done}", path.display());
        done += n;
    }
    v
}

fn read_all(path: &Path) -> Vec<u8> {
    read_all_with(path, ChainOptions::default())
}

/// qemu-img's reading of the base `img` as raw bytes (VHD at its current size, see
/// `qemu_image_opts`), after `qemu-img check` finds it clean.
fn qemu_read(t: &TempDir, fmt: Fmt, img: &Path) -> Vec<u8> {
    let spec = common::qemu_image_opts(fmt.qemu(), img);
    if fmt == Fmt::Vhdx {
        run_ok(
            Command::new("qemu-img")
                .args(["check", "-q", "-f", "vhdx"])
                .arg(img),
        );
    }
    let out = t.join("qemu.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "--image-opts", &spec, "-O", "raw"])
            .arg(&out),
    );
    std::fs::read(&out).unwrap()
}

/// qemu-img's virtual size of the base `img`.
fn qemu_size(fmt: Fmt, img: &Path) -> u64 {
    let v = common::qemu_info_opts(&common::qemu_image_opts(fmt.qemu(), img));
    v["virtual-size"].as_u64().expect("virtual-size")
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap()
}

/// The first differing byte of two views, for messages.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// A base with data in its first half, a child over it with data of its own (whole
/// blocks, pieces across a block boundary, single sectors, and zeros over base data).
fn base_and_child(t: &TempDir, fmt: Fmt, seed: u64) -> (PathBuf, PathBuf) {
    let mut rng = Rng::new(seed);
    let base = t.join(format!("base.{}", fmt.ext()));
    let child = t.join(format!("child.{}", fmt.ext()));
    new_base(&base);
    write(
        &base,
        &[
            (0, random(&mut rng, 8 * MIB)),
            (20 * MIB + 4096, random(&mut rng, 3 * MIB)),
        ],
    );
    new_child(&child, &base);
    write(
        &child,
        &[
            (MIB + 512, random(&mut rng, 512)),
            (2 * MIB - 4096, random(&mut rng, 8192)),
            (4 * MIB, vec![0u8; 2 * MIB as usize]),
            (40 * MIB, random(&mut rng, 2 * MIB)),
            (SIZE - 512, random(&mut rng, 512)),
        ],
    );
    (base, child)
}

#[test]
fn merge_folds_the_child_into_its_parent() {
    if !require_tool("qemu-img") {
        return;
    }
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-merge-{}", fmt.ext()));
        let (base, child) = base_and_child(&t, fmt, 11);
        // Another child of the base: merging into the base breaks it.
        let other = t.join(format!("other.{}", fmt.ext()));
        new_child(&other, &base);
        let want = read_all(&child);
        let (base_sha, child_sha) = (sha256_file(&base), sha256_file(&child));
        let opts = MergeOptions {
            child: child.clone(),
            dry_run: true,
            ..Default::default()
        };

        // Dry run: the plan, and no byte changed.
        let r = merge(&opts, &(), &not_cancelled()).unwrap();
        assert_eq!(r.outcome, MergeOutcome::DryRun);
        assert_eq!(r.layers, vec![canonical(&child)]);
        assert_eq!(r.ancestor, canonical(&base));
        assert!(
            r.bytes >= 2 * MIB + 4096 && r.bytes <= 16 * MIB,
            "{fmt:?}: {} bytes to merge",
            r.bytes
        );
        assert_eq!(
            r.dependents
                .iter()
                .map(|d| (d.path.clone(), d.parent.clone()))
                .collect::<Vec<_>>(),
            vec![(canonical(&other), canonical(&base))],
            "{fmt:?}"
        );
        assert_eq!(sha256_file(&base), base_sha);
        assert_eq!(sha256_file(&child), child_sha);

        // Refused without `force` (the other child would break): nothing changed.
        let e = merge(
            &MergeOptions {
                dry_run: false,
                ..opts.clone()
            },
            &(),
            &not_cancelled(),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Request(Request::MergeDependents { .. })),
            "{fmt:?}: {e}"
        );
        assert_eq!(sha256_file(&base), base_sha);
        assert_eq!(sha256_file(&child), child_sha);

        // With `force`: merged, the child deleted, the base reads what the child read.
        let obs = Recorder::default();
        let r = merge(
            &MergeOptions {
                dry_run: false,
                force: true,
                ..opts.clone()
            },
            &obs,
            &not_cancelled(),
        )
        .unwrap();
        assert_eq!(r.outcome, MergeOutcome::Merged);
        assert_eq!(
            obs.warnings(),
            vec![Warning::MergeBreaksDependent {
                path: canonical(&other),
                parent: canonical(&base),
            }]
        );
        assert_eq!(obs.phases(), vec![("merge", r.bytes, r.bytes)], "{fmt:?}");
        assert!(!child.exists(), "{fmt:?}: the merged child is deleted");
        same(
            &qemu_read(&t, fmt, &base),
            &want,
            &format!("{fmt:?}: qemu-img reads the base"),
        );
        same(
            &read_all(&base),
            &want,
            &format!("{fmt:?}: vdiskfs reads the base"),
        );
    }
}

#[test]
fn merge_keep_leaves_the_child() {
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-merge-keep-{}", fmt.ext()));
        let (base, child) = base_and_child(&t, fmt, 12);
        let want = read_all(&child);
        let r = merge(
            &MergeOptions {
                child: child.clone(),
                keep: true,
                ..Default::default()
            },
            &(),
            &not_cancelled(),
        )
        .unwrap();
        assert_eq!(r.outcome, MergeOutcome::Merged);
        assert!(child.exists(), "{fmt:?}: kept");
        same(&read_all(&base), &want, &format!("{fmt:?}: the base"));
    }
}

#[test]
fn compact_gives_zero_blocks_back_and_keeps_the_content() {
    if !require_tool("qemu-img") {
        return;
    }
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-compact-{}", fmt.ext()));
        let mut rng = Rng::new(21);
        let base = t.join(format!("base.{}", fmt.ext()));
        new_base(&base);
        // Eight 2 MiB blocks of data, then zeros over four of them (they stay allocated)
        // and over half of another.
        let mut writes: Vec<(u64, Vec<u8>)> = (0..8)
            .map(|i| (i * 6 * MIB, random(&mut rng, 2 * MIB)))
            .collect();
        write(&base, &writes);
        writes = [0u64, 12, 24, 36]
            .iter()
            .map(|&m| (m * MIB, vec![0u8; 2 * MIB as usize]))
            .collect();
        writes.push((42 * MIB, vec![0u8; MIB as usize]));
        write(&base, &writes);
        let want = qemu_read(&t, fmt, &base);
        same(&read_all(&base), &want, &format!("{fmt:?}: before"));
        let (len0, sha0) = (common::file_len(&base), sha256_file(&base));
        let opts = CompactOptions {
            image: base.clone(),
            dry_run: true,
            ..Default::default()
        };

        let plan = compact(&opts, &(), &not_cancelled()).unwrap();
        assert_eq!(
            sha256_file(&base),
            sha0,
            "{fmt:?}: a dry run changes nothing"
        );
        assert_eq!(plan.len_before, len0);
        assert_eq!(plan.allocated_blocks, 8, "{fmt:?}");
        assert_eq!(plan.zero_blocks, 4, "{fmt:?}");
        assert!(plan.len_after < len0, "{fmt:?}: {plan:?}");

        let obs = Recorder::default();
        let r = compact(
            &CompactOptions {
                dry_run: false,
                ..opts
            },
            &obs,
            &not_cancelled(),
        )
        .unwrap();
        assert!(!r.interrupted);
        assert_eq!(r.released, 4, "{fmt:?}: {r:?}");
        assert_eq!(r.len_before, len0);
        assert_eq!(common::file_len(&base), r.len_after);
        assert!(
            r.len_after + 4 * 2 * MIB <= len0,
            "{fmt:?}: four blocks' worth smaller: {r:?}"
        );
        assert_eq!(r.len_after, plan.len_after, "{fmt:?}: as the dry run said");
        let phases = obs.phases();
        assert_eq!(
            phases[0],
            ("compact: scan", 8 * 2 * MIB, 8 * 2 * MIB),
            "{fmt:?}"
        );
        if r.moved > 0 {
            assert_eq!(
                phases[1..],
                [("compact: move", r.moved_bytes, r.moved_bytes)],
                "{fmt:?}"
            );
        }
        same(
            &qemu_read(&t, fmt, &base),
            &want,
            &format!("{fmt:?}: qemu-img after"),
        );
        same(&read_all(&base), &want, &format!("{fmt:?}: vdiskfs after"));
    }
}

#[test]
fn resize_grows_and_shrinks() {
    if !require_tool("qemu-img") {
        return;
    }
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-resize-{}", fmt.ext()));
        let mut rng = Rng::new(31);
        let base = t.join(format!("base.{}", fmt.ext()));
        new_base(&base);
        let data = random(&mut rng, 3 * MIB);
        write(&base, &[(MIB, data.clone())]);
        let mut want = vec![0u8; SIZE as usize];
        want[MIB as usize..4 * MIB as usize].copy_from_slice(&data);
        let opts = ResizeOptions {
            image: base.clone(),
            size: NewSize::Grow(32 * MIB),
            chain: ChainOptions::default(),
            force: false,
            dry_run: true,
        };

        let sha = sha256_file(&base);
        let r = resize(&opts, &()).unwrap();
        assert_eq!((r.old_size, r.new_size), (SIZE, SIZE + 32 * MIB));
        assert_eq!(
            sha256_file(&base),
            sha,
            "{fmt:?}: a dry run changes nothing"
        );

        let r = resize(
            &ResizeOptions {
                dry_run: false,
                ..opts.clone()
            },
            &(),
        )
        .unwrap();
        assert_eq!((r.old_size, r.new_size), (SIZE, SIZE + 32 * MIB), "{fmt:?}");
        assert_eq!(qemu_size(fmt, &base), SIZE + 32 * MIB, "{fmt:?}");
        want.resize((SIZE + 32 * MIB) as usize, 0);
        same(
            &qemu_read(&t, fmt, &base),
            &want,
            &format!("{fmt:?}: grown"),
        );

        // Shrinking: never below the data; VHD never.
        let shrink = |to: u64| {
            resize(
                &ResizeOptions {
                    size: NewSize::Bytes(to),
                    dry_run: false,
                    ..opts.clone()
                },
                &(),
            )
        };
        let sha = sha256_file(&base);
        let e = shrink(2 * MIB).unwrap_err();
        match fmt {
            Fmt::Vhdx => assert!(
                matches!(e, Error::Request(Request::ShrinkBelowMinimum { .. })),
                "{e}"
            ),
            Fmt::Vhd => assert!(
                matches!(e, Error::Request(Request::VhdShrink { .. })),
                "{e}"
            ),
        }
        assert_eq!(
            sha256_file(&base),
            sha,
            "{fmt:?}: a refusal changes nothing"
        );
        if fmt == Fmt::Vhdx {
            let r = shrink(5 * MIB + 4096).unwrap();
            assert_eq!(r.new_size, 5 * MIB + 4096);
            assert_eq!(qemu_size(fmt, &base), 5 * MIB + 4096);
            want.truncate((5 * MIB + 4096) as usize);
            same(&qemu_read(&t, fmt, &base), &want, "shrunk");
            same(&read_all(&base), &want, "vdiskfs: shrunk");
        }
    }
}

#[test]
fn set_parent_points_the_child_at_the_moved_parent() {
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-set-parent-{}", fmt.ext()));
        let (base, child) = base_and_child(&t, fmt, 41);
        let want = read_all(&child);
        // The parent moves to another directory: the chain no longer opens by itself.
        std::fs::create_dir(t.join("moved")).unwrap();
        let moved = t.join("moved").join(base.file_name().unwrap());
        std::fs::rename(&base, &moved).unwrap();
        assert!(Chain::open(&child, &ChainOptions::default()).is_err());
        let opts = SetParentOptions {
            child: child.clone(),
            new_parent: moved.clone(),
            dry_run: true,
            ..Default::default()
        };

        let sha = sha256_file(&child);
        let plan = set_parent(&opts, &()).unwrap();
        assert_eq!(
            sha256_file(&child),
            sha,
            "{fmt:?}: a dry run changes nothing"
        );
        assert_ne!(plan.old_locator, plan.new_locator, "{fmt:?}");
        assert!(plan.id_matched);
        assert!(
            plan.new_locator.iter().any(|(_, v)| v.contains("moved")),
            "{fmt:?}: {:?}",
            plan.new_locator
        );
        assert!(Chain::open(&child, &ChainOptions::default()).is_err());

        // A disk of the same size that is not the parent: refused, nothing changed.
        let stranger = t.join(format!("stranger.{}", fmt.ext()));
        new_base(&stranger);
        let e = set_parent(
            &SetParentOptions {
                new_parent: stranger.clone(),
                dry_run: false,
                ..opts.clone()
            },
            &(),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Request(Request::ParentIdMismatch { .. })),
            "{fmt:?}: {e}"
        );
        assert_eq!(
            sha256_file(&child),
            sha,
            "{fmt:?}: a refusal changes nothing"
        );

        let r = set_parent(
            &SetParentOptions {
                dry_run: false,
                ..opts.clone()
            },
            &(),
        )
        .unwrap();
        assert_eq!(
            r.new_locator, plan.new_locator,
            "{fmt:?}: as the dry run said"
        );
        // Now the chain opens without any option, through the new place.
        let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
        assert_eq!(chain.layers.len(), 2);
        assert_eq!(canonical(chain.layers[1].path()), canonical(&moved));
        drop(chain);
        same(
            &read_all(&child),
            &want,
            &format!("{fmt:?}: the child's view"),
        );

        // --ignore-id-mismatch: the stranger is recorded, with a warning.
        let obs = Recorder::default();
        let r = set_parent(
            &SetParentOptions {
                new_parent: stranger.clone(),
                ignore_id_mismatch: true,
                dry_run: false,
                ..opts.clone()
            },
            &obs,
        )
        .unwrap();
        assert!(!r.id_matched);
        assert!(
            matches!(&obs.warnings()[..], [Warning::IdMismatchIgnored { .. }]),
            "{fmt:?}: {:?}",
            obs.events()
        );
        let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
        assert_eq!(canonical(chain.layers[1].path()), canonical(&stranger));
    }
}

#[test]
fn merge_into_an_ancestor_two_layers_down() {
    if !require_tool("qemu-img") {
        return;
    }
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-merge-into-{}", fmt.ext()));
        let (base, mid) = base_and_child(&t, fmt, 13);
        let top = t.join(format!("top.{}", fmt.ext()));
        new_child(&top, &mid);
        let mut rng = Rng::new(14);
        write(
            &top,
            &[
                (MIB + 512, random(&mut rng, 4096)),
                (30 * MIB, random(&mut rng, 3 * MIB)),
            ],
        );
        let want = read_all(&top);
        let layers = vec![canonical(&top), canonical(&mid)];
        let r = merge(
            &MergeOptions {
                child: top.clone(),
                into: Some(base.clone()),
                ..Default::default()
            },
            &(),
            &not_cancelled(),
        )
        .unwrap();
        assert_eq!(r.outcome, MergeOutcome::Merged);
        assert_eq!(r.layers, layers, "{fmt:?}");
        assert_eq!(r.ancestor, canonical(&base));
        assert!(
            !top.exists() && !mid.exists(),
            "{fmt:?}: both merged layers deleted"
        );
        same(
            &qemu_read(&t, fmt, &base),
            &want,
            &format!("{fmt:?}: qemu-img reads the base"),
        );
    }
}

/// A cancel flag already set: merge stops before its first change, compact before its
/// first block; both leave the content as it was.
#[test]
fn a_cancel_before_the_start_changes_no_content() {
    for fmt in FORMATS {
        let t = TempDir::new(&format!("lib-cancel-{}", fmt.ext()));
        let (base, child) = base_and_child(&t, fmt, 51);
        let want = read_all(&child);
        let (base_sha, child_sha) = (sha256_file(&base), sha256_file(&child));
        let cancelled = AtomicBool::new(true);
        let r = merge(
            &MergeOptions {
                child: child.clone(),
                ..Default::default()
            },
            &(),
            &cancelled,
        )
        .unwrap();
        assert_eq!(r.outcome, MergeOutcome::Cancelled, "{fmt:?}");
        assert_eq!(sha256_file(&base), base_sha, "{fmt:?}");
        assert_eq!(sha256_file(&child), child_sha, "{fmt:?}");
        // No merge record was left: the chain opens as before.
        same(
            &read_all(&child),
            &want,
            &format!("{fmt:?}: after the cancelled merge"),
        );

        let obs = Recorder::default();
        let r = compact(
            &CompactOptions {
                image: child.clone(),
                ..Default::default()
            },
            &obs,
            &cancelled,
        )
        .unwrap();
        assert!(r.interrupted, "{fmt:?}: {r:?}");
        assert_eq!((r.zero_blocks, r.released, r.moved), (0, 0, 0), "{fmt:?}");
        assert_eq!(obs.phases()[0].2, 0, "{fmt:?}: nothing scanned");
        same(
            &read_all(&child),
            &want,
            &format!("{fmt:?}: after the cancelled compact"),
        );
    }
}
