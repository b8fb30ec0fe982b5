//! The FUSE-over-io_uring transport (Linux 6.14+): the kernel hands requests to ring
//! entries the daemon registered per queue (one queue per possible CPU; a request goes
//! to the queue of the CPU its caller runs on), and the daemon answers each one and asks
//! for the next in one `COMMIT_AND_FETCH` command: no read(2)/write(2) pair per request.
//!
//! The connection is made and INIT is answered by fuser as for the classic transport
//! (`fuse.rs`, which asks for `FUSE_OVER_IO_URING` when told to). Once the kernel has
//! agreed, `start` runs the queue threads here; fuser's workers keep serving what the
//! kernel still sends through /dev/fuse (forgets, interrupts, and anything sent before
//! the rings were ready). Every request is answered by the same `vfs::Vfs` functions the
//! fuser adapter calls; this module only decodes (`proto.rs`) and encodes.
//!
//! The kernel holds every request back until every queue has an entry (once the
//! connection has agreed to io_uring), and a failed REGISTER makes it go back to
//! /dev/fuse for good. `start` therefore reports whether all queues registered.

pub mod proto;

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::sys::{FuseRing, FuseRingEntry};
use crate::vfs::{Vfs, XattrList};
use proto::{Op, Request};

/// The kernel's switch for FUSE over io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Ring entries per queue thread. One: the kernel hands a request to any entry on the
/// queue's free list, so a second entry of a thread that is busy answering would make
/// that request wait behind the one being answered while another thread of the queue
/// sits idle (measured: 4 KiB random reads with 4 jobs fell to a fifth of the classic
/// transport's rate with two entries per thread). With one, a free entry is an idle
/// thread.
const ENTRIES_PER_THREAD: usize = 1;

/// Why the io_uring transport cannot serve, if it cannot: checked before the mount, so
/// that INIT asks for it only when the rest can follow.
pub fn unavailable() -> Option<String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Err(_) => {
            return Some(format!(
                "the kernel has no FUSE over io_uring ({ENABLE_URING} is missing; Linux 6.14+ \
                 with CONFIG_FUSE_IO_URING)"
            ))
        }
        Ok(v) if v.trim() != "Y" => {
            return Some(format!(
                "FUSE over io_uring is off ({ENABLE_URING} is {}; root can set it to Y)",
                v.trim()
            ))
        }
        Ok(_) => {}
    }
    if let Err(e) = FuseRing::new(4) {
        return Some(format!(
            "io_uring with 128-byte entries is not available: {e}"
        ));
    }
    if possible_cpus().is_err() {
        return Some("cannot read /sys/devices/system/cpu/possible".into());
    }
    None
}

/// The number of the kernel's FUSE queues: one per possible CPU (ids 0..n).
fn possible_cpus() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(&text).ok_or_else(|| std::io::Error::other("unexpected cpu list"))
}

/// The highest CPU id + 1 of a list such as "0-3,5".
fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut max = None;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next()?.trim().parse::<usize>().ok()?;
        max = Some(max.map_or(last, |m: usize| m.max(last)));
    }
    max.map(|m| m + 1)
}

/// The running queue threads.
pub struct Running {
    /// Closed (all senders dropped) when every thread has ended.
    done: mpsc::Receiver<()>,
    pub queues: usize,
    pub threads: usize,
}

impl Running {
    /// Wait (up to `limit`) for the queue threads to end after the connection ended;
    /// whether they did.
    pub fn wait(self, limit: Duration) -> bool {
        matches!(
            self.done.recv_timeout(limit),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

/// Why `start` did not get the rings serving.
#[derive(Debug)]
pub enum StartError {
    /// The connection ended before the rings were registered (unmounted at once): not a
    /// transport failure; the session ends too.
    Gone,
    /// The rings cannot serve (the kernel went back to /dev/fuse for the connection).
    Failed(String),
}

/// Register ring entries on every queue of the connection `dev` (INIT must have agreed
/// to io_uring) and serve them with `vfs`: `threads` threads in all (at least one per
/// queue), each with its own ring. `payload` is the payload buffer size (at least the
/// kernel's largest request). Returns when every thread has registered its entries or
/// one failed (then the kernel has gone back to /dev/fuse for this connection).
pub fn start(
    vfs: Arc<Vfs>,
    dev: &OwnedFd,
    threads: usize,
    payload: usize,
) -> Result<Running, StartError> {
    let failed = StartError::Failed;
    let queues = possible_cpus().map_err(|e| failed(format!("possible CPUs: {e}")))?;
    let per_queue = threads.div_ceil(queues).max(1);
    let (done_tx, done) = mpsc::channel::<()>();
    let (reg_tx, reg_rx) = mpsc::channel::<Result<(), StartError>>();
    let mut started = 0;
    for qid in 0..queues {
        for t in 0..per_queue {
            let dev = dev
                .try_clone()
                .map_err(|e| failed(format!("dup /dev/fuse: {e}")))?;
            let (vfs, done_tx, reg_tx) = (vfs.clone(), done_tx.clone(), reg_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vdiskfs-uring{qid}.{t}"))
                .spawn(move || {
                    queue_thread(&vfs, dev, qid as u16, payload, reg_tx);
                    drop(done_tx);
                });
            if let Err(e) = spawned {
                return Err(failed(format!("cannot start a ring thread: {e}")));
            }
            started += 1;
        }
    }
    drop((done_tx, reg_tx));
    for _ in 0..started {
        match reg_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(failed("a ring thread ended before registering".into())),
        }
    }
    Ok(Running {
        done,
        queues,
        threads: started,
    })
}

/// One thread: a ring, `ENTRIES_PER_THREAD` entries registered on queue `qid`, then
/// answer-and-fetch until the connection ends.
fn queue_thread(
    vfs: &Vfs,
    dev: OwnedFd,
    qid: u16,
    payload: usize,
    registered: mpsc::Sender<Result<(), StartError>>,
) {
    let failed = |m: String| Err(StartError::Failed(m));
    let fd = dev.as_raw_fd();
    let mut ring = match FuseRing::new((ENTRIES_PER_THREAD * 2) as u32) {
        Ok(r) => r,
        Err(e) => {
            let _ = registered.send(failed(format!("io_uring setup: {e}")));
            return;
        }
    };
    let mut entries: Vec<FuseRingEntry> = (0..ENTRIES_PER_THREAD)
        .map(|_| FuseRingEntry::new(proto::RING_HEADER_LEN, payload))
        .collect();
    for (i, e) in entries.iter().enumerate() {
        if let Err(err) = ring.push(fd, proto::CMD_REGISTER, proto::cmd_req(qid, 0), e, i as u64) {
            let _ = registered.send(failed(format!("queue a REGISTER: {err}")));
            return;
        }
    }
    if let Err(e) = ring.submit() {
        let _ = registered.send(failed(format!("submit REGISTER: {e}")));
        return;
    }
    // A REGISTER that fails completes at once; one that succeeds completes only with
    // the entry's first request.
    let mut done: Vec<(u64, i32)> = Vec::new();
    ring.completions(&mut done);
    if let Some(&(_, res)) = done.iter().find(|(_, r)| *r < 0) {
        let _ = registered.send(if matches!(-res, libc::ENOTCONN | libc::ECONNABORTED) {
            Err(StartError::Gone)
        } else {
            failed(format!(
                "FUSE_IO_URING_CMD_REGISTER on queue {qid}: {}",
                std::io::Error::from_raw_os_error(-res)
            ))
        });
        return;
    }
    let _ = registered.send(Ok(()));
    drop(registered);
    let mut live = ENTRIES_PER_THREAD;
    loop {
        for (ud, res) in done.drain(..) {
            let i = ud as usize;
            if res < 0 {
                // The connection ended (ENOTCONN, ECONNABORTED, ECANCELED at unmount) or
                // the kernel refused a commit; this entry is gone either way.
                let e = std::io::Error::from_raw_os_error(-res);
                match -res {
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                        log::debug!("ring queue {qid} entry {i}: {e}")
                    }
                    _ => log::error!("ring queue {qid} entry {i}: {e}"),
                }
                live -= 1;
                continue;
            }
            let Some(entry) = entries.get_mut(i) else {
                continue;
            };
            let commit_id = answer(vfs, entry);
            if let Err(e) = ring.push(
                fd,
                proto::CMD_COMMIT_AND_FETCH,
                proto::cmd_req(qid, commit_id),
                entry,
                i as u64,
            ) {
                log::error!("ring queue {qid}: {e}");
                live -= 1;
            }
        }
        if live == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait() {
            log::error!("ring queue {qid}: io_uring_enter: {e}");
            break;
        }
        ring.completions(&mut done);
    }
    log::debug!("ring queue {qid}: thread ends");
}

/// Answer the request in `entry` (reply header and payload written in place); the
/// commit id to send it back with.
fn answer(vfs: &Vfs, entry: &mut FuseRingEntry) -> u64 {
    let (header, payload) = entry.buffers();
    let req = match proto::decode(header, payload) {
        Ok(r) => r,
        Err(e) => {
            // The kernel wrote it: this is not expected. Answer what can be answered.
            log::error!("FUSE ring request: {e}");
            let (unique, commit) = proto::ids(header);
            proto::encode_reply_header(header, unique, libc::EIO, 0);
            return commit;
        }
    };
    let unique = req.header.unique;
    vfs.note_ring_request();
    let (errno, len) = match dispatch(vfs, &req, payload) {
        Ok(n) => (0, n),
        Err(e) => (e, 0),
    };
    proto::encode_reply_header(header, unique, errno, len);
    req.commit_id
}

/// Call the `Vfs` function for `req`; the answer's length in `payload`, or an errno.
fn dispatch(vfs: &Vfs, req: &Request, payload: &mut [u8]) -> Result<usize, i32> {
    let ino = req.header.nodeid;
    match &req.op {
        Op::Lookup { name } => {
            let a = vfs.lookup(ino, OsStr::from_bytes(&payload[name.clone()]))?;
            Ok(proto::encode_entry(payload, &a))
        }
        Op::Getattr => Ok(proto::encode_attr(payload, &vfs.getattr(ino)?)),
        Op::Setattr(set) => Ok(proto::encode_attr(payload, &vfs.setattr(ino, set)?)),
        Op::Open { flags } => Ok(proto::encode_open(payload, &vfs.open(ino, *flags)?)),
        Op::Read { fh, offset, size } => {
            let size = *size as usize;
            if size > payload.len() {
                return Err(libc::EINVAL);
            }
            vfs.read(ino, *fh, *offset, &mut payload[..size])
        }
        Op::Write { fh, offset, data } => {
            let n = vfs.write(ino, *fh, *offset, &payload[data.clone()])?;
            Ok(proto::encode_write(payload, n))
        }
        Op::Statfs => Ok(proto::encode_statfs(payload, &vfs.statfs())),
        Op::Release { fh } => vfs.release(ino, *fh).map(|()| 0),
        Op::Fsync { fh, datasync } => vfs.fsync(ino, *fh, *datasync).map(|()| 0),
        Op::Flush { fh } => vfs.flush(ino, *fh).map(|()| 0),
        Op::Fallocate {
            fh,
            offset,
            length,
            mode,
        } => vfs.fallocate(ino, *fh, *offset, *length, *mode).map(|()| 0),
        Op::Opendir => Ok(proto::encode_open(payload, &vfs.opendir(ino)?)),
        Op::Readdir { offset, size } => {
            let size = (*size as usize).min(payload.len());
            let mut w = proto::DirentWriter::new(&mut payload[..size]);
            vfs.readdir(ino, *offset, |e| {
                w.add(e.ino, e.next_offset, e.kind, e.name.as_bytes())
            })?;
            Ok(w.len())
        }
        // As fuser's default: nothing to do.
        Op::Releasedir => Ok(0),
        Op::Fsyncdir => vfs.fsyncdir(ino).map(|()| 0),
        Op::Access { mask } => vfs.access(ino, *mask).map(|()| 0),
        Op::Listxattr { size } => match vfs.listxattr(ino, *size)? {
            XattrList::Size(n) => Ok(proto::encode_xattr_size(payload, n)),
            XattrList::Data(d) => {
                if d.len() > payload.len() {
                    return Err(libc::ERANGE);
                }
                payload[..d.len()].copy_from_slice(d);
                Ok(d.len())
            }
        },
        Op::Refused(r) => Err(r.errno()),
        Op::Unsupported => Err(libc::ENOSYS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Chain, ChainOptions, Intent};
    use crate::disk::{Disk, DiskOptions};
    use crate::image::vhdx::tests::{new_base, TempDir};
    use crate::vfs::{FsOptions, DISK_INO, ROOT_INO};

    /// Answer one request built as the kernel lays it out: (errno, answer bytes).
    fn ask(vfs: &Vfs, opcode: u32, ino: u64, op_in: &[u8], payload_in: &[u8]) -> (i32, Vec<u8>) {
        let mut header = proto::test_header(opcode, 42, ino, op_in, payload_in.len() as u32);
        let mut payload = vec![0u8; 1 << 20];
        payload[..payload_in.len()].copy_from_slice(payload_in);
        let req = proto::decode(&header, &payload).unwrap();
        let (errno, len) = match dispatch(vfs, &req, &mut payload) {
            Ok(n) => (0, n),
            Err(e) => (e, 0),
        };
        proto::encode_reply_header(&mut header, req.header.unique, errno, len);
        payload.truncate(len);
        (errno, payload)
    }

    /// The ring transport answers through the same `Vfs` calls as the fuser adapter:
    /// lookup, open, write, read back, getattr, readdir and a refusal, on a real chain.
    #[test]
    fn dispatch_calls_the_vfs() {
        let dir = TempDir::new("uring-dispatch");
        let base = dir.join("base.vhdx");
        new_base(&base, 4 << 20, 1 << 20, 512);
        let chain = Chain::open(
            &base,
            &ChainOptions {
                intent: Intent::WriteTop,
                ..Default::default()
            },
        )
        .unwrap();
        let disk = Arc::new(Disk::new(
            chain,
            DiskOptions {
                cache_bytes: 0,
                cache_block: 64 << 10,
            },
        ));
        let vfs = Vfs::new(
            disk.clone(),
            FsOptions {
                name: "disk.raw".into(),
                read_only: false,
                uid: 1,
                gid: 2,
                direct_io: false,
            },
        );
        // lookup "disk.raw" in the root: fuse_entry_out with the disk's inode and size.
        let (e, out) = ask(&vfs, 1, ROOT_INO, &[], b"disk.raw\0");
        assert_eq!(e, 0);
        assert_eq!(out.len(), 128);
        assert_eq!(proto::test_u64(&out, 0), DISK_INO);
        assert_eq!(proto::test_u64(&out, 40 + 8), 4 << 20);
        let (e, _) = ask(&vfs, 1, ROOT_INO, &[], b"nope\0");
        assert_eq!(e, libc::ENOENT);
        // open for writing, write 3000 bytes at 5000, read them back.
        let mut open_in = vec![0u8; 8];
        open_in[..4].copy_from_slice(&(libc::O_RDWR as u32).to_le_bytes());
        let (e, out) = ask(&vfs, 14, DISK_INO, &open_in, &[]);
        assert_eq!(e, 0);
        let fh = proto::test_u64(&out, 0);
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let (e, out) = ask(
            &vfs,
            16,
            DISK_INO,
            &proto::tests::read_in(fh, 5000, 3000),
            &data,
        );
        assert_eq!(e, 0);
        assert_eq!(&out[..4], &3000u32.to_le_bytes());
        let (e, out) = ask(
            &vfs,
            15,
            DISK_INO,
            &proto::tests::read_in(fh, 4096, 8192),
            &[],
        );
        assert_eq!(e, 0);
        assert_eq!(out.len(), 8192);
        assert_eq!(&out[904..3904], &data[..]);
        let mut direct = vec![0u8; 8192];
        assert_eq!(vfs.read(DISK_INO, fh, 4096, &mut direct), Ok(8192));
        assert_eq!(out, direct, "the same bytes as Vfs::read");
        // getattr: fuse_attr_out with the size; readdir lists ., .., disk.raw, .stats.
        let (e, out) = ask(&vfs, 3, DISK_INO, &[0; 16], &[]);
        assert_eq!((e, out.len()), (0, 104));
        assert_eq!(proto::test_u64(&out, 16 + 8), 4 << 20);
        let (e, out) = ask(&vfs, 28, ROOT_INO, &proto::tests::read_in(0, 0, 4096), &[]);
        assert_eq!(e, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("disk.raw") && text.contains(".stats"),
            "{text:?}"
        );
        // fallocate (FUSE_FALLOCATE, 43): punch-hole|keep-size zeroes the range as
        // Vfs::fallocate does; other modes are EOPNOTSUPP.
        let falloc_in = |off: u64, len: u64, mode: i32| {
            let mut a = vec![0u8; 32];
            a[..8].copy_from_slice(&fh.to_le_bytes());
            a[8..16].copy_from_slice(&off.to_le_bytes());
            a[16..24].copy_from_slice(&len.to_le_bytes());
            a[24..28].copy_from_slice(&(mode as u32).to_le_bytes());
            a
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(
            ask(&vfs, 43, DISK_INO, &falloc_in(5000, 1000, punch), &[]).0,
            0
        );
        let mut after = vec![0u8; 3000];
        assert_eq!(vfs.read(DISK_INO, fh, 5000, &mut after), Ok(3000));
        assert!(
            after[..1000].iter().all(|&b| b == 0),
            "punched range reads zeros"
        );
        assert_eq!(&after[1000..], &data[1000..], "the rest is kept");
        let collapse = libc::FALLOC_FL_COLLAPSE_RANGE;
        assert_eq!(
            ask(&vfs, 43, DISK_INO, &falloc_in(0, 4096, collapse), &[]).0,
            libc::EOPNOTSUPP
        );
        // mkdir is refused as the fuser adapter refuses it; readlink is ENOSYS.
        assert_eq!(ask(&vfs, 9, ROOT_INO, &[0; 8], b"d\0").0, libc::EPERM);
        assert_eq!(ask(&vfs, 5, DISK_INO, &[], &[]).0, libc::ENOSYS);
        // release, then the chain closes cleanly.
        assert_eq!(
            ask(&vfs, 18, DISK_INO, &proto::tests::read_in(fh, 0, 0), &[]).0,
            0
        );
        vfs.destroy();
        disk.close().unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(12));
        assert_eq!(parse_cpu_list("x"), None);
    }
}
