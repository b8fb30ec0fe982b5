//! Crash safety of writable mounts (issue 6): a writer thread writes through a writable
//! mount of a small child (pwrite at random offsets and lengths, and one op in five a
//! discard: fallocate punch-hole or zero-range of whole 2 MiB blocks or of any range
//! (issue 15); fsync every few ops, remembering which ops an fsync acknowledged; a
//! discarded range reads zeros once acknowledged, before that old or zeros) while the test kills the daemon with
//! SIGKILL at a random moment. After each kill: `vdiskfs check` reports no damage,
//! `vdiskfs cat` holds every acknowledged write (an unacknowledged one may or may not be
//! there, byte by byte; every fifth cycle libvhdi's view is held to the same rule, judged
//! by the last cycle that ran the writer, because libvhdi ignores a pending log), and
//! the next cycle writes on into the same file (so a pending VHDX log is replayed by
//! the next writable open). Every few cycles a new child is
//! stacked on the current one, so allocation keeps happening. At the end the chain is
//! closed cleanly and judged by 7-Zip (VHDX) and libvhdi (both formats).
//!
//! VDISKFS_CRASH_CYCLES: kill cycles per format (default 100, about a minute).
//! VDISKFS_CRASH_SEED: the random seed (default: from the clock; printed).
//! VDISKFS_CRASH_NEW_CHILD_EVERY: cycles per child before a new one is stacked (25).
//!
//! A failure names the seed and cycle, the byte, its value in every view and in the parent
//! chain, the ops covering it and the last ops, whether the kill came during an fsync,
//! and the child's log state after the kill and now.
//!
//! Needs /dev/fuse, fusermount3, qemu-img, 7zz, vhdimount. Skips with a message unless
//! VDISKFS_REQUIRE_FUSE=1, where it fails. Mounts are undone by drop guards.

mod common;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::fcntl::{fallocate, FallocateFlags};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- the workload

/// The byte a write of generation `gen` puts at disk offset `pos`.
fn value(pos: u64, gen: u64) -> u8 {
    let mut z = (pos >> 3) ^ gen.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> ((pos & 7) * 8)) as u8
}

fn fill(buf: &mut [u8], off: u64, gen: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = value(off + i as u64, gen);
    }
}

#[derive(Clone, Copy, Debug)]
struct Op {
    off: u64,
    len: u64,
    gen: u64,
    /// A discard (fallocate punch-hole or zero-range): the range reads zeros.
    discard: bool,
}

impl Op {
    /// The byte this op leaves at `pos` (inside it).
    fn byte(&self, pos: u64) -> u8 {
        if self.discard {
            0
        } else {
            value(pos, self.gen)
        }
    }

    fn apply(&self, model: &mut [u8]) {
        let r = &mut model[self.off as usize..(self.off + self.len) as usize];
        if self.discard {
            r.fill(0);
        } else {
            fill(r, self.off, self.gen);
        }
    }
}

#[derive(Default, Clone)]
struct Journal {
    /// Every write issued (recorded before the pwrite), in order.
    ops: Vec<Op>,
    /// ops[..acked] were followed by an fsync that returned success.
    acked: usize,
    /// The writer was inside fsync when it stopped (the kill came during a flush).
    syncing: bool,
}

/// Write until an error (the daemon died) or `stop`.
fn writer(
    disk: PathBuf,
    size: u64,
    seed: u64,
    first_gen: u64,
    journal: Arc<Mutex<Journal>>,
    stop: Arc<AtomicBool>,
    zero_blocks_blind: bool,
) {
    let Ok(f) = OpenOptions::new().read(true).write(true).open(&disk) else {
        return;
    };
    let mut rng = Rng::new(seed);
    let mut gen = first_gen;
    let mut since_sync = 0;
    let mut sync_every = 1 + rng.below(6);
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if rng.below(5) == 0 {
            // A discard: whole 2 MiB blocks (a VHDX child's become zero blocks), or any
            // range (zeros written around the whole units inside), punch-hole or
            // zero-range.
            // VHDX: whole blocks only among the last two, and other discards shorter
            // than a block, so libvhdi (blind to zero blocks, see `libvhdi_blind`) still
            // judges the rest.
            let blocks = size / (2 * MIB);
            let (first_whole, short) = if zero_blocks_blind {
                (blocks - 2, 2 * MIB - 1)
            } else {
                (0, 3 * MIB)
            };
            let (off, len) = match rng.below(3) {
                0 => (
                    (first_whole + rng.below(blocks - first_whole)) * 2 * MIB,
                    2 * MIB * (1 + rng.below(2)),
                ),
                1 => (
                    rng.below(size / 4096) * 4096,
                    (4096 * (1 + rng.below(600))).min(short),
                ),
                _ => (rng.below(size), 1 + rng.below(short)),
            };
            let len = len.min(size - off);
            let mode = if rng.below(2) == 0 {
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            };
            journal.lock().unwrap().ops.push(Op {
                off,
                len,
                gen,
                discard: true,
            });
            gen += 1;
            if fallocate(&f, mode, off as i64, len as i64).is_err() {
                return;
            }
        } else {
            let len = match rng.below(10) {
                0..=3 => 1 + rng.below(4096),        // byte-granular, unaligned
                4..=7 => 512 * (1 + rng.below(128)), // whole sectors, up to 64 KiB
                _ => 1 + rng.below(MIB + 300_000),   // large, crossing blocks
            }
            .min(size);
            let off = match rng.below(4) {
                0 => rng.below(size - len + 1) / 512 * 512,
                // near a 2 MiB block boundary
                1 => {
                    let b = 1 + rng.below(size / (2 * MIB) - 1);
                    (b * 2 * MIB)
                        .saturating_sub(rng.below(len + 1))
                        .min(size - len)
                }
                _ => rng.below(size - len + 1),
            };
            buf.resize(len as usize, 0);
            fill(&mut buf, off, gen);
            journal.lock().unwrap().ops.push(Op {
                off,
                len,
                gen,
                discard: false,
            });
            gen += 1;
            if f.write_all_at(&buf, off).is_err() {
                return;
            }
        }
        since_sync += 1;
        if since_sync >= sync_every {
            let n = {
                let mut j = journal.lock().unwrap();
                j.syncing = true;
                j.ops.len()
            };
            if f.sync_all().is_err() {
                return;
            }
            let mut j = journal.lock().unwrap();
            j.acked = n;
            j.syncing = false;
            since_sync = 0;
            sync_every = 1 + rng.below(6);
        }
    }
}

// ---------------------------------------------------------------- checks

fn cat(img: &Path, ctx: &str) -> Vec<u8> {
    let o = vdiskfs([OsStr::new("cat"), img.as_os_str()]);
    assert!(
        o.success(),
        "{ctx}: `{}` failed ({}): {}",
        o.cmd,
        o.status,
        o.stderr
    );
    o.stdout
}

/// A byte that breaks the rule `verify` checks.
struct Mismatch {
    pos: u64,
    got: u8,
    /// What the acknowledged writes leave there.
    expected: u8,
}

/// `got` must hold `model` with the acknowledged ops applied; a byte may instead hold
/// the value of an unacknowledged op covering it. On success `model` becomes `got` (the
/// baseline of the next cycle); on failure the first offending byte is returned.
fn verify(got: &[u8], model: &mut [u8], j: &Journal) -> Result<(), Mismatch> {
    verify_except(got, model, j, &|_| false)
}

/// `verify`, not judging the bytes `skip` names (a judge's known defect).
fn verify_except(
    got: &[u8],
    model: &mut [u8],
    j: &Journal,
    skip: &dyn Fn(u64) -> bool,
) -> Result<(), Mismatch> {
    assert_eq!(got.len(), model.len(), "length of the merged view");
    for op in &j.ops[..j.acked] {
        op.apply(model);
    }
    let unacked = &j.ops[j.acked..];
    const C: usize = 64 * 1024;
    for (ci, (g, m)) in got.chunks(C).zip(model.chunks(C)).enumerate() {
        if g == m {
            continue;
        }
        for (i, (&gb, &mb)) in g.iter().zip(m).enumerate() {
            if gb == mb {
                continue;
            }
            let pos = (ci * C + i) as u64;
            let ok = skip(pos)
                || unacked
                    .iter()
                    .any(|o| pos >= o.off && pos < o.off + o.len && o.byte(pos) == gb);
            if !ok {
                return Err(Mismatch {
                    pos,
                    got: gb,
                    expected: mb,
                });
            }
        }
    }
    // What is there now is the baseline of the next cycle.
    model.copy_from_slice(got);
    Ok(())
}

/// How a kill cycle went, for the failure report.
struct CycleInfo {
    cycle: u64,
    seed: u64,
    child: PathBuf,
    /// Parent of `child` (the one below it in the chain).
    parent: PathBuf,
    /// None: killed while opening/mounting, after this many ms; Some: the writer ran
    /// this many ms before the kill.
    kill: String,
}

/// Everything needed to understand a broken acknowledged byte, then panic.
fn report(
    what: &str,
    info: &CycleInfo,
    m: &Mismatch,
    j: &Journal,
    views: &[(&str, u8)],
    log_state_after_kill: &str,
) -> ! {
    let pos = m.pos;
    let covering: Vec<String> = j
        .ops
        .iter()
        .enumerate()
        .filter(|(_, o)| pos >= o.off && pos < o.off + o.len)
        .map(|(k, o)| {
            format!(
                "#{k} {} off {} len {} gen {} {} value {:#04x}",
                if o.discard { "discard" } else { "write" },
                o.off,
                o.len,
                o.gen,
                if k < j.acked { "acked" } else { "unacked" },
                o.byte(pos)
            )
        })
        .collect();
    let last: Vec<String> = j
        .ops
        .iter()
        .enumerate()
        .skip(j.ops.len().saturating_sub(8))
        .map(|(k, o)| {
            format!(
                "#{k} {} off {} len {} gen {}",
                if o.discard { "discard" } else { "write" },
                o.off,
                o.len,
                o.gen
            )
        })
        .collect();
    // Which layer the byte comes from, as far as a reader can tell: the parent chain's
    // view at the same offset (equal: most likely not in the child), and the child's
    // log state now.
    let parent_byte = {
        let o = vdiskfs([OsStr::new("cat"), info.parent.as_os_str()]);
        if o.success() {
            o.stdout
                .get(pos as usize)
                .map(|b| format!("{b:#04x}"))
                .unwrap_or_else(|| "past its end".into())
        } else {
            format!("cat failed: {}", o.stderr.trim())
        }
    };
    let log_now = log_state(&info.child);
    let views: Vec<String> = views.iter().map(|(n, b)| format!("{n} {b:#04x}")).collect();
    panic!(
        "{what}: an acknowledged byte differed from the model after a SIGKILL\n\
         VDISKFS_CRASH_SEED={} (cycle {}; rerun with VDISKFS_CRASH_CYCLES={})\n\
         image {}\n\
         byte {pos} (2 MiB block {}, +{}, sector {}) is {:#04x}, the acknowledged content \
         is {:#04x}\n\
         other views of that byte: [{}]; the parent chain ({}) has {parent_byte}\n\
         kill: {}; the kill came during an fsync: {}\n\
         child's log state after the kill: {log_state_after_kill}; now: {log_now}\n\
         {} ops issued this cycle, {} acknowledged; ops covering the byte: {covering:#?}\n\
         last ops: {last:#?}",
        info.seed,
        info.cycle,
        info.cycle + 1,
        info.child.display(),
        pos / (2 * MIB),
        pos % (2 * MIB),
        pos / 512,
        m.got,
        m.expected,
        views.join(", "),
        info.parent.display(),
        info.kill,
        j.syncing,
        j.ops.len(),
        j.acked,
    );
}

/// `vdiskfs info --json`'s log_state of the top layer (read-only).
fn log_state(img: &Path) -> String {
    let o = vdiskfs([OsStr::new("info"), OsStr::new("--json"), img.as_os_str()]);
    if !o.success() {
        return format!("info failed: {}", o.stderr.trim());
    }
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| {
            info_layers(&v)
                .first()
                .and_then(|l| l.get("log_state"))
                .map(|s| s.to_string())
        })
        .unwrap_or_else(|| "(no log_state)".into())
}

// ---------------------------------------------------------------- the test

fn crash_cycles(fmt: Fmt) {
    if !require_fuse() || !require_tools(&["qemu-img", "vhdimount", "7zz"]) {
        return;
    }
    let cycles = env_u64("VDISKFS_CRASH_CYCLES", 100);
    let every = env_u64("VDISKFS_CRASH_NEW_CHILD_EVERY", 25).max(1);
    let seed = env_seed("VDISKFS_CRASH_SEED");
    eprintln!(
        "crash test {}: {cycles} cycles, new child every {every}, VDISKFS_CRASH_SEED={seed}",
        fmt.ext()
    );
    let t0 = Instant::now();
    let t = TempDir::new(&format!("crash-{}", fmt.ext()));
    let mut rng = Rng::new(seed);

    // Base: 32 MiB of random data with holes (every third 2 MiB block), made by qemu-img.
    let mut model = vec![0u8; (32 * MIB) as usize];
    Rng::new(seed ^ 0x5555).fill(&mut model);
    for b in (0..16u64).filter(|b| b % 3 == 1) {
        model[(b * 2 * MIB) as usize..((b + 1) * 2 * MIB) as usize].fill(0);
    }
    let raw = t.join("base.raw");
    write_file(&raw, &model);
    let base = t.join(format!("base.{}", fmt.ext()));
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O"]);
    match fmt {
        Fmt::Vhdx => c.arg("vhdx"),
        Fmt::Vhd => c.args(["vpc", "-o", "subformat=dynamic"]),
    };
    run_ok(c.arg(&raw).arg(&base));
    fs::remove_file(&raw).unwrap();
    let base_sha = sha256_file(&base);
    model = cat(&base, "base");
    let size = model.len() as u64;

    let mut child = base.clone();
    // Files that became parents, with their sha256 at that moment: never written again.
    let mut frozen: Vec<(PathBuf, String)> = Vec::new();
    let mut gen = 1u64;
    let mut layers = 0;
    let mut acked_total = 0usize;
    let mut issued_total = 0usize;
    let mut discards_total = 0usize;
    // What libvhdi's view of the top is judged against. libvhdi ignores a VHDX log, so it
    // sees the file as written in place: every acknowledged write (they were applied
    // before the fsync returned), and each unacknowledged one old or new, but not
    // necessarily a pending log's pages. vdiskfs's view (`model`) does include those: an
    // unacknowledged commit whose log entry became durable before the kill is replayed
    // by every reader. They reach the file's place only when the next writable open
    // replays the log; a cycle killed while opening may not get that far, so its
    // libvhdi view still has to be judged by the last cycle that ran the writer: its
    // baseline and journal. None: the file in place is `model` (a clean close).
    let mut in_place: Option<(Vec<u8>, Journal)> = None;
    let mut in_place_behind = 0usize;
    let mut libvhdi_checks = 0usize;
    // libvhdi 20210425 reads a differencing VHDX's PAYLOAD_BLOCK_ZERO block from the
    // parent (MS-VHDX: it MUST read zeros). A whole 2 MiB block discarded in a VHDX child
    // is in that state, in that layer and below the ones stacked on it later; libvhdi's
    // view is not judged in those blocks (vdiskfs's and 7-Zip's are).
    let mut libvhdi_blind: HashSet<u64> = HashSet::new();
    let mnt = t.join("mnt");
    for cycle in 0..cycles {
        if cycle % every == 0 {
            if cycle > 0 {
                // Close the current top cleanly before it becomes a parent: parents are
                // opened read-only and never replayed on disk, and 7-Zip refuses a
                // chain holding a file with a pending log.
                let mut d = Daemon::spawn(&child, &mnt, &[]);
                d.wait_live();
                d.stop();
            }
            layers += 1;
            let next = t.join(format!("c{layers}.{}", fmt.ext()));
            create_child(&child, &next);
            frozen.push((child.clone(), sha256_file(&child)));
            child = next;
            in_place = None;
        }
        let ctx = format!(
            "cycle {cycle} of {} (VDISKFS_CRASH_SEED={seed}), {}",
            fmt.ext(),
            child.display()
        );
        let journal = Arc::new(Mutex::new(Journal::default()));
        let mut d = Daemon::spawn(&child, &mnt, &[]);
        let (kill, went_live) = if rng.below(10) == 0 {
            // Kill while the daemon opens the chain (replaying a pending log) or mounts.
            let ms = rng.below(40);
            std::thread::sleep(Duration::from_millis(ms));
            d.kill9();
            (
                format!("while opening/mounting, {ms} ms after the spawn"),
                false,
            )
        } else {
            d.wait_live();
            let stop = Arc::new(AtomicBool::new(false));
            let w = {
                let (disk, j, s) = (mnt.join("disk.raw"), journal.clone(), stop.clone());
                let (wseed, g) = (rng.next_u64(), gen);
                let blind = fmt == Fmt::Vhdx;
                std::thread::spawn(move || writer(disk, size, wseed, g, j, s, blind))
            };
            let ms = 5 + rng.below(300);
            std::thread::sleep(Duration::from_millis(ms));
            d.kill9();
            stop.store(true, Ordering::Relaxed);
            w.join().expect("writer thread");
            (format!("the writer ran {ms} ms"), true)
        };
        drop(d);
        assert!(!is_mounted(&mnt), "{ctx}: mount left behind");
        let j = journal.lock().unwrap().clone();
        gen += j.ops.len() as u64;
        if fmt == Fmt::Vhdx {
            for o in j.ops.iter().filter(|o| o.discard) {
                let first = o.off.div_ceil(2 * MIB);
                let end = (o.off + o.len) / (2 * MIB);
                libvhdi_blind.extend(first..end);
            }
        }
        issued_total += j.ops.len();
        discards_total += j.ops.iter().filter(|o| o.discard).count();
        acked_total += j.acked;
        let info = CycleInfo {
            cycle,
            seed,
            child: child.clone(),
            parent: frozen.last().expect("a parent").0.clone(),
            kill,
        };
        let log_after_kill = if fmt == Fmt::Vhdx {
            log_state(&child)
        } else {
            "(VHD: no log)".into()
        };
        check_ok_ctx(&child, &ctx);
        let got = cat(&child, &ctx);
        if went_live {
            // The daemon replayed any pending log before mounting: the file in place
            // was `model`, then this cycle's writes happened.
            in_place = Some((model.clone(), j.clone()));
        }
        if let Err(m) = verify(&got, &mut model, &j) {
            report(&ctx, &info, &m, &j, &[], &log_after_kill);
        }
        if cycle % 5 == 4 {
            let m = FuseMount::vhdimount(&child, &t.join("vm"));
            let lv = fs::read(m.merged()).expect("read vhdimount's view");
            drop(m);
            libvhdi_checks += 1;
            let (mut base_view, jj) = match &in_place {
                Some((b, jj)) => (b.clone(), jj.clone()),
                None => (model.clone(), Journal::default()),
            };
            if lv != model {
                in_place_behind += 1;
                let diff = lv.iter().zip(&model).filter(|(a, b)| a != b).count();
                let at = lv.iter().zip(&model).position(|(a, b)| a != b).unwrap_or(0);
                // When this cycle was killed while opening, before its replay, this is
                // what a rule of "libvhdi sees exactly vdiskfs's view after a cycle
                // without writes" got wrong.
                eprintln!(
                    "{ctx}: libvhdi's view differs from vdiskfs's in {diff} bytes (first: \
                     byte {at}, {:#04x} vs {:#04x}; before the last writer cycle {:#04x}); \
                     kill {}; log state after the kill {log_after_kill}",
                    lv[at], model[at], base_view[at], info.kill
                );
            }
            let blind = |pos: u64| libvhdi_blind.contains(&(pos / (2 * MIB)));
            if let Err(m) = verify_except(&lv, &mut base_view, &jj, &blind) {
                let vd = got[m.pos as usize];
                report(
                    &format!(
                        "{ctx}, vhdimount's view (judged by the journal of the last cycle \
                         that ran the writer: {} ops, {} acknowledged)",
                        jj.ops.len(),
                        jj.acked
                    ),
                    &info,
                    &m,
                    &jj,
                    &[("vdiskfs cat", vd)],
                    &log_after_kill,
                );
            }
        }
    }
    eprintln!(
        "crash test {}: {cycles} kill cycles, {layers} children stacked, {issued_total} ops \
         issued ({discards_total} of them discards), {acked_total} acknowledged, {libvhdi_checks} libvhdi checks ({in_place_behind} \
         where libvhdi's view differed from vdiskfs's: a VHDX log entry of an \
         unacknowledged commit, not yet in place), in {:.1} s",
        fmt.ext(),
        t0.elapsed().as_secs_f64()
    );

    // A clean open and close (replays any pending log, leaves the files clean), then the
    // independent readers.
    let mut d = Daemon::spawn(&child, &mnt, &[]);
    d.wait_live();
    d.stop();
    check_ok_ctx(&child, "after the final clean close");
    let got = cat(&child, "after the final clean close");
    assert!(
        got == model,
        "the final clean open/close changed the content"
    );
    if fmt == Fmt::Vhdx {
        let v = info_json(&child, &[]);
        let st = info_layers(&v)[0]
            .get("log_state")
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(
            st.contains("clean"),
            "log not clean after a clean close: {st}"
        );
    }
    let model_file = t.join("model.raw");
    write_file(&model_file, &model);
    if fmt == Fmt::Vhdx {
        judge_7zz(&child, &model_file);
    }
    let m = FuseMount::vhdimount(&child, &t.join("vm"));
    let top = m.merged();
    let lv = fs::read(&top).expect("read vhdimount's view");
    drop(m);
    assert_eq!(lv.len(), model.len(), "vhdimount's size");
    if let Some(at) = (0..model.len())
        .find(|&i| lv[i] != model[i] && !libvhdi_blind.contains(&(i as u64 / (2 * MIB))))
    {
        panic!(
            "vhdimount's view of {} differs from vdiskfs's at byte {at}",
            child.display(),
        );
    }
    eprintln!(
        "crash test {}: {} of {} 2 MiB blocks not judged by libvhdi (zero blocks)",
        fmt.ext(),
        libvhdi_blind.len(),
        size / (2 * MIB)
    );
    assert_eq!(sha256_file(&base), base_sha, "the base changed");
    for (p, sha) in &frozen {
        assert_eq!(
            &sha256_file(p),
            sha,
            "{} changed after it became a parent",
            p.display()
        );
    }
}

#[test]
fn crash_vhdx_child() {
    crash_cycles(Fmt::Vhdx);
}

#[test]
fn crash_vhd_child() {
    crash_cycles(Fmt::Vhd);
}
