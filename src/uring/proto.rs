//! The FUSE wire format as FUSE-over-io_uring carries it (include/linux/fuse.h, kernel
//! Documentation/filesystems/fuse/fuse-io-uring.rst), decoded from and encoded into plain
//! byte buffers, so every layout is unit-tested without a kernel.
//!
//! A ring entry has two buffers. The header buffer (`struct fuse_uring_req_header`,
//! `RING_HEADER_LEN` bytes) holds `in_out` (the request's `fuse_in_header`; the reply's
//! `fuse_out_header` goes to the same place), `op_in` (the operation's fixed-size
//! argument, such as `fuse_read_in`) and `ring_ent_in_out` (the commit id and the size of
//! what is in the payload buffer). The payload buffer holds the rest of the request's
//! arguments (a name, write data) and, in the reply, the operation's answer (an
//! attribute structure, read data, directory entries), without the out header.
//!
//! All fields are little-endian on the machines vdiskfs runs on (the kernel uses the
//! host's order; vdiskfs builds for x86_64 and aarch64 Linux only).

use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::vfs::{Attr, FileKind, Opened, Refused, SetAttr, Statfs};

/// `sizeof(struct fuse_uring_req_header)`.
pub const RING_HEADER_LEN: usize = 288;
/// Offset of `op_in` in the header buffer (after the 128-byte `in_out`).
const OP_IN: usize = 128;
/// Size of `op_in`.
const OP_IN_LEN: usize = 128;
/// Offset of `ring_ent_in_out` (after `op_in`).
const ENT_IN_OUT: usize = 256;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER_LEN: usize = 16;

/// `enum fuse_uring_cmd`: the `cmd_op` of an IORING_OP_URING_CMD on /dev/fuse.
pub const CMD_REGISTER: u32 = 1;
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

/// The opcodes vdiskfs answers (the rest get ENOSYS, as fuser's defaults do).
mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const TMPFILE: u32 = 51;
}

/// setattr `valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
/// fsync_flags: only the data.
const FSYNC_FDATASYNC: u32 = 1;
/// open_flags of `fuse_open_out`.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// Why a ring entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A buffer shorter than its structure.
    Short(&'static str),
    /// `payload_sz` larger than the payload buffer.
    PayloadSize(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short(what) => write!(f, "{what} too short"),
            DecodeError::PayloadSize(n) => write!(f, "payload size {n} beyond the buffer"),
        }
    }
}

#[cfg(test)]
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct fuse_in_header`, the fields vdiskfs uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// One request's operation, with its arguments. Byte ranges point into the payload
/// buffer (a name, write data), so the reply can reuse that buffer afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The name (without its NUL) at this range of the payload.
    Lookup {
        name: Range<usize>,
    },
    Getattr,
    Setattr(SetAttr),
    Open {
        flags: i32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    /// The data at this range of the payload.
    Write {
        fh: u64,
        offset: u64,
        data: Range<usize>,
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Flush {
        fh: u64,
    },
    /// `struct fuse_fallocate_in`: fh, offset, length, mode.
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Releasedir,
    Fsyncdir,
    Access {
        mask: i32,
    },
    Listxattr {
        size: u32,
    },
    /// Requests the file system refuses whatever their arguments.
    Refused(Refused),
    /// Anything else: ENOSYS.
    Unsupported,
}

/// A decoded request: header, operation, and the commit id its reply goes back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub header: InHeader,
    pub op: Op,
    pub commit_id: u64,
}

/// The 80-byte command area of a FUSE ring SQE (`struct fuse_uring_cmd_req`).
pub fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    // flags (0) at 0, commit_id at 8, qid at 16.
    put_u64(&mut c, 8, commit_id);
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

/// Decode the request a ring entry holds. `payload` is the whole payload buffer; the
/// length used is the `payload_sz` the kernel wrote.
pub fn decode(header: &[u8], payload: &[u8]) -> Result<Request, DecodeError> {
    if header.len() < RING_HEADER_LEN {
        return Err(DecodeError::Short("ring header"));
    }
    let h = InHeader {
        opcode: u32_at(header, 4),
        unique: u64_at(header, 8),
        nodeid: u64_at(header, 16),
        uid: u32_at(header, 24),
        gid: u32_at(header, 28),
        pid: u32_at(header, 32),
    };
    const { assert!(IN_HEADER_LEN <= OP_IN) };
    let commit_id = u64_at(header, ENT_IN_OUT + 8);
    let payload_sz = u32_at(header, ENT_IN_OUT + 16);
    if payload_sz as usize > payload.len() {
        return Err(DecodeError::PayloadSize(payload_sz));
    }
    let plen = payload_sz as usize;
    let a = &header[OP_IN..OP_IN + OP_IN_LEN];
    let op = match h.opcode {
        op::LOOKUP => {
            // The name, NUL-terminated.
            let p = &payload[..plen];
            let end = p.iter().position(|&c| c == 0).unwrap_or(plen);
            Op::Lookup { name: 0..end }
        }
        op::GETATTR => Op::Getattr,
        op::SETATTR => {
            let valid = u32_at(a, 0);
            let pick32 = |bit: u32, at: usize| (valid & bit != 0).then(|| u32_at(a, at));
            Op::Setattr(SetAttr {
                mode: pick32(FATTR_MODE, 68),
                uid: pick32(FATTR_UID, 76),
                gid: pick32(FATTR_GID, 80),
                size: (valid & FATTR_SIZE != 0).then(|| u64_at(a, 16)),
                flags: false,
            })
        }
        op::OPEN => Op::Open {
            flags: u32_at(a, 0) as i32,
        },
        op::READ => Op::Read {
            fh: u64_at(a, 0),
            offset: u64_at(a, 8),
            size: u32_at(a, 16),
        },
        op::WRITE => {
            let size = (u32_at(a, 16) as usize).min(plen);
            Op::Write {
                fh: u64_at(a, 0),
                offset: u64_at(a, 8),
                data: 0..size,
            }
        }
        op::STATFS => Op::Statfs,
        op::RELEASE => Op::Release { fh: u64_at(a, 0) },
        op::FSYNC => Op::Fsync {
            fh: u64_at(a, 0),
            datasync: u32_at(a, 8) & FSYNC_FDATASYNC != 0,
        },
        op::FLUSH => Op::Flush { fh: u64_at(a, 0) },
        op::OPENDIR => Op::Opendir,
        op::READDIR => Op::Readdir {
            offset: u64_at(a, 8),
            size: u32_at(a, 16),
        },
        op::RELEASEDIR => Op::Releasedir,
        op::FSYNCDIR => Op::Fsyncdir,
        op::ACCESS => Op::Access {
            mask: u32_at(a, 0) as i32,
        },
        op::LISTXATTR => Op::Listxattr { size: u32_at(a, 0) },
        op::GETXATTR => Op::Refused(Refused::GetXattr),
        op::SETXATTR => Op::Refused(Refused::SetXattr),
        op::REMOVEXATTR => Op::Refused(Refused::RemoveXattr),
        op::MKNOD
        | op::MKDIR
        | op::UNLINK
        | op::RMDIR
        | op::SYMLINK
        | op::RENAME
        | op::RENAME2
        | op::LINK
        | op::CREATE
        | op::TMPFILE => Op::Refused(Refused::ChangeTree),
        op::IOCTL => Op::Refused(Refused::Ioctl),
        op::POLL => Op::Refused(Refused::Poll),
        op::FALLOCATE => Op::Fallocate {
            fh: u64_at(a, 0),
            offset: u64_at(a, 8),
            length: u64_at(a, 16),
            mode: u32_at(a, 24) as i32,
        },
        op::LSEEK => Op::Refused(Refused::Lseek),
        _ => Op::Unsupported,
    };
    Ok(Request {
        header: h,
        op,
        commit_id,
    })
}

/// The request's unique id and commit id, read even when the rest cannot be decoded.
pub fn ids(header: &[u8]) -> (u64, u64) {
    if header.len() < RING_HEADER_LEN {
        return (0, 0);
    }
    (u64_at(header, 8), u64_at(header, ENT_IN_OUT + 8))
}

/// Write the reply's `fuse_out_header` (`error` is a positive errno or 0) and the size
/// of the answer in the payload buffer into the header buffer.
pub fn encode_reply_header(header: &mut [u8], unique: u64, errno: i32, payload_len: usize) {
    let len = OUT_HEADER_LEN + if errno == 0 { payload_len } else { 0 };
    put_u32(header, 0, len as u32);
    put_u32(header, 4, (-errno) as u32);
    put_u64(header, 8, unique);
    let payload_sz = if errno == 0 { payload_len as u32 } else { 0 };
    put_u32(header, ENT_IN_OUT + 16, payload_sz);
}

/// (seconds, nanoseconds) of a time, negative seconds before 1970.
fn time_parts(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut s, mut n) = (-(d.as_secs() as i64), d.subsec_nanos());
            if n > 0 {
                s -= 1;
                n = 1_000_000_000 - n;
            }
            (s as u64, n)
        }
    }
}

const FUSE_ATTR_LEN: usize = 88;

/// `struct fuse_attr` at `b[..88]`.
fn put_attr(b: &mut [u8], a: &Attr) {
    let b = &mut b[..FUSE_ATTR_LEN];
    b.fill(0);
    put_u64(b, 0, a.ino);
    put_u64(b, 8, a.size);
    put_u64(b, 16, a.blocks);
    let (at, atn) = time_parts(a.atime);
    let (mt, mtn) = time_parts(a.mtime);
    let (ct, ctn) = time_parts(a.ctime);
    put_u64(b, 24, at);
    put_u64(b, 32, mt);
    put_u64(b, 40, ct);
    put_u32(b, 48, atn);
    put_u32(b, 52, mtn);
    put_u32(b, 56, ctn);
    put_u32(b, 60, mode_of(a.kind) | u32::from(a.perm));
    put_u32(b, 64, a.nlink);
    put_u32(b, 68, a.uid);
    put_u32(b, 72, a.gid);
    // rdev (76) 0.
    put_u32(b, 80, a.blksize);
    // flags (84) 0.
}

fn mode_of(k: FileKind) -> u32 {
    match k {
        FileKind::Directory => libc::S_IFDIR,
        FileKind::RegularFile => libc::S_IFREG,
    }
}

/// The validity of cached names and attributes, as (seconds, nanoseconds).
fn ttl_parts() -> (u64, u32) {
    let t = crate::vfs::ATTR_TTL;
    (t.as_secs(), t.subsec_nanos())
}

/// `struct fuse_entry_out` (lookup's answer); its length.
pub fn encode_entry(p: &mut [u8], a: &Attr) -> usize {
    const LEN: usize = 40 + FUSE_ATTR_LEN;
    let b = &mut p[..LEN];
    b.fill(0);
    let (s, n) = ttl_parts();
    put_u64(b, 0, a.ino);
    // generation (8) 0.
    put_u64(b, 16, s);
    put_u64(b, 24, s);
    put_u32(b, 32, n);
    put_u32(b, 36, n);
    put_attr(&mut b[40..], a);
    LEN
}

/// `struct fuse_attr_out` (getattr's and setattr's answer); its length.
pub fn encode_attr(p: &mut [u8], a: &Attr) -> usize {
    const LEN: usize = 16 + FUSE_ATTR_LEN;
    let b = &mut p[..LEN];
    b.fill(0);
    let (s, n) = ttl_parts();
    put_u64(b, 0, s);
    put_u32(b, 8, n);
    put_attr(&mut b[16..], a);
    LEN
}

/// `struct fuse_open_out`; its length.
pub fn encode_open(p: &mut [u8], o: &Opened) -> usize {
    let b = &mut p[..16];
    b.fill(0);
    put_u64(b, 0, o.fh);
    let mut flags = 0;
    if o.keep_cache {
        flags |= FOPEN_KEEP_CACHE;
    }
    if o.direct_io {
        flags |= FOPEN_DIRECT_IO;
    }
    put_u32(b, 8, flags);
    16
}

/// `struct fuse_write_out`; its length.
pub fn encode_write(p: &mut [u8], written: u32) -> usize {
    let b = &mut p[..8];
    b.fill(0);
    put_u32(b, 0, written);
    8
}

/// `struct fuse_getxattr_out` (the size a listxattr needs); its length.
pub fn encode_xattr_size(p: &mut [u8], size: u32) -> usize {
    let b = &mut p[..8];
    b.fill(0);
    put_u32(b, 0, size);
    8
}

/// `struct fuse_statfs_out`; its length.
pub fn encode_statfs(p: &mut [u8], s: &Statfs) -> usize {
    let b = &mut p[..80];
    b.fill(0);
    put_u64(b, 0, s.blocks);
    put_u64(b, 8, s.bfree);
    put_u64(b, 16, s.bavail);
    put_u64(b, 24, s.files);
    put_u64(b, 32, s.ffree);
    put_u32(b, 40, s.bsize);
    put_u32(b, 44, s.namelen);
    put_u32(b, 48, s.frsize);
    80
}

/// Fills a readdir answer (`struct fuse_dirent`s, each padded to 8 bytes) into a buffer
/// of the size the kernel asked for.
pub struct DirentWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> DirentWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        DirentWriter { buf, len: 0 }
    }

    /// Add one entry; true when it did not fit (the answer is full).
    pub fn add(&mut self, ino: u64, next_offset: u64, kind: FileKind, name: &[u8]) -> bool {
        let rec = (24 + name.len()).next_multiple_of(8);
        if self.len + rec > self.buf.len() {
            return true;
        }
        let b = &mut self.buf[self.len..self.len + rec];
        b.fill(0);
        put_u64(b, 0, ino);
        put_u64(b, 8, next_offset);
        put_u32(b, 16, name.len() as u32);
        let dt = match kind {
            FileKind::Directory => libc::DT_DIR,
            FileKind::RegularFile => libc::DT_REG,
        };
        put_u32(b, 20, u32::from(dt));
        b[24..24 + name.len()].copy_from_slice(name);
        self.len += rec;
        false
    }

    /// Bytes used.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// A ring header holding a request as the kernel lays it out (for tests).
#[cfg(test)]
pub(crate) fn test_header(
    opcode: u32,
    unique: u64,
    nodeid: u64,
    op_in: &[u8],
    payload_sz: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; RING_HEADER_LEN];
    put_u32(&mut h, 0, (IN_HEADER_LEN + op_in.len()) as u32);
    put_u32(&mut h, 4, opcode);
    put_u64(&mut h, 8, unique);
    put_u64(&mut h, 16, nodeid);
    put_u32(&mut h, 24, 1000);
    put_u32(&mut h, 28, 100);
    put_u32(&mut h, 32, 4242);
    h[OP_IN..OP_IN + op_in.len()].copy_from_slice(op_in);
    put_u64(&mut h, ENT_IN_OUT + 8, unique);
    put_u32(&mut h, ENT_IN_OUT + 16, payload_sz);
    h
}

/// Read a little-endian field (for tests).
#[cfg(test)]
pub(crate) fn test_u64(b: &[u8], at: usize) -> u64 {
    u64_at(b, at)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::test_header as header;
    use super::*;
    use std::time::Duration;

    pub(crate) fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut a = vec![0u8; 40];
        put_u64(&mut a, 0, fh);
        put_u64(&mut a, 8, offset);
        put_u32(&mut a, 16, size);
        a
    }

    #[test]
    fn decodes_the_in_header_and_commit_id() {
        let h = header(op::GETATTR, 0x1234, 2, &[0; 16], 0);
        let r = decode(&h, &[]).unwrap();
        assert_eq!(
            r.header,
            InHeader {
                opcode: op::GETATTR,
                unique: 0x1234,
                nodeid: 2,
                uid: 1000,
                gid: 100,
                pid: 4242
            }
        );
        assert_eq!(r.commit_id, 0x1234);
        assert_eq!(r.op, Op::Getattr);
    }

    #[test]
    fn decodes_read_write_and_lookup() {
        let h = header(op::READ, 8, 2, &read_in(77, 1 << 40, 1 << 20), 0);
        assert_eq!(
            decode(&h, &[]).unwrap().op,
            Op::Read {
                fh: 77,
                offset: 1 << 40,
                size: 1 << 20
            }
        );
        // Write: the data is in the payload; its size in fuse_write_in.
        let payload = [9u8; 4096];
        let h = header(op::WRITE, 10, 2, &read_in(5, 4096, 3000), 3000);
        assert_eq!(
            decode(&h, &payload).unwrap().op,
            Op::Write {
                fh: 5,
                offset: 4096,
                data: 0..3000
            }
        );
        // A write_in size beyond payload_sz is cut to what was sent.
        let h = header(op::WRITE, 10, 2, &read_in(5, 0, 5000), 100);
        assert_eq!(
            decode(&h, &payload).unwrap().op,
            Op::Write {
                fh: 5,
                offset: 0,
                data: 0..100
            }
        );
        // Lookup: empty op_in, the name and its NUL in the payload.
        let mut p = vec![0u8; 64];
        p[..9].copy_from_slice(b"disk.raw\0");
        let h = header(op::LOOKUP, 12, 1, &[], 9);
        let r = decode(&h, &p).unwrap();
        assert_eq!(r.op, Op::Lookup { name: 0..8 });
        // payload_sz larger than the buffer is refused.
        let h = header(op::LOOKUP, 12, 1, &[], 65);
        assert_eq!(decode(&h, &p), Err(DecodeError::PayloadSize(65)));
        assert_eq!(
            decode(&h[..100], &p),
            Err(DecodeError::Short("ring header"))
        );
    }

    #[test]
    fn decodes_setattr_open_fsync_access_and_refusals() {
        let mut a = vec![0u8; 88];
        put_u32(&mut a, 0, FATTR_MODE | FATTR_SIZE);
        put_u64(&mut a, 16, 1 << 30);
        put_u32(&mut a, 68, 0o100644);
        put_u32(&mut a, 76, 5); // uid, not marked valid
        let h = header(op::SETATTR, 3, 2, &a, 0);
        assert_eq!(
            decode(&h, &[]).unwrap().op,
            Op::Setattr(SetAttr {
                mode: Some(0o100644),
                uid: None,
                gid: None,
                size: Some(1 << 30),
                flags: false
            })
        );
        let mut o = vec![0u8; 8];
        put_u32(&mut o, 0, libc::O_RDWR as u32);
        assert_eq!(
            decode(&header(op::OPEN, 1, 2, &o, 0), &[]).unwrap().op,
            Op::Open {
                flags: libc::O_RDWR
            }
        );
        let mut f = vec![0u8; 16];
        put_u64(&mut f, 0, 9);
        put_u32(&mut f, 8, FSYNC_FDATASYNC);
        assert_eq!(
            decode(&header(op::FSYNC, 1, 2, &f, 0), &[]).unwrap().op,
            Op::Fsync {
                fh: 9,
                datasync: true
            }
        );
        let mut m = vec![0u8; 8];
        put_u32(&mut m, 0, libc::W_OK as u32);
        assert_eq!(
            decode(&header(op::ACCESS, 1, 2, &m, 0), &[]).unwrap().op,
            Op::Access { mask: libc::W_OK }
        );
        assert_eq!(
            decode(&header(op::MKDIR, 1, 1, &[0; 8], 0), &[])
                .unwrap()
                .op,
            Op::Refused(Refused::ChangeTree)
        );
        assert_eq!(
            decode(&header(op::GETXATTR, 1, 2, &[0; 8], 0), &[])
                .unwrap()
                .op,
            Op::Refused(Refused::GetXattr)
        );
        assert_eq!(
            decode(&header(5 /* READLINK */, 1, 2, &[], 0), &[])
                .unwrap()
                .op,
            Op::Unsupported
        );
    }

    #[test]
    fn encodes_reply_header_with_payload_size() {
        let mut h = vec![0xffu8; RING_HEADER_LEN];
        encode_reply_header(&mut h, 77, 0, 104);
        assert_eq!(u32_at(&h, 0), 16 + 104);
        assert_eq!(u32_at(&h, 4), 0);
        assert_eq!(u64_at(&h, 8), 77);
        assert_eq!(u32_at(&h, ENT_IN_OUT + 16), 104);
        // An error carries no payload and a negative errno.
        encode_reply_header(&mut h, 78, libc::EROFS, 104);
        assert_eq!(u32_at(&h, 0), 16);
        assert_eq!(u32_at(&h, 4) as i32, -libc::EROFS);
        assert_eq!(u32_at(&h, ENT_IN_OUT + 16), 0);
    }

    fn attr() -> Attr {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        Attr {
            ino: 2,
            size: 1 << 30,
            blocks: 1 << 21,
            atime: t,
            mtime: t + Duration::from_secs(1),
            ctime: t,
            crtime: t,
            kind: FileKind::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: 1000,
            gid: 100,
            blksize: 4096,
        }
    }

    #[test]
    fn encodes_attr_entry_open_write_statfs() {
        let mut p = vec![0xaau8; 256];
        assert_eq!(encode_attr(&mut p, &attr()), 104);
        assert_eq!(u64_at(&p, 0), 1); // attr_valid: ATTR_TTL
        let a = &p[16..];
        assert_eq!(u64_at(a, 0), 2);
        assert_eq!(u64_at(a, 8), 1 << 30);
        assert_eq!(u64_at(a, 32), 1_700_000_001);
        assert_eq!(u32_at(a, 48), 5);
        assert_eq!(u32_at(a, 60), libc::S_IFREG | 0o644);
        assert_eq!(u32_at(a, 68), 1000);
        assert_eq!(u32_at(a, 80), 4096);

        assert_eq!(encode_entry(&mut p, &attr()), 128);
        assert_eq!(u64_at(&p, 0), 2);
        assert_eq!(u64_at(&p, 16), 1);
        assert_eq!(u64_at(&p, 40), 2); // attr.ino

        let o = Opened {
            fh: 0x55,
            keep_cache: true,
            direct_io: true,
        };
        assert_eq!(encode_open(&mut p, &o), 16);
        assert_eq!(u64_at(&p, 0), 0x55);
        assert_eq!(u32_at(&p, 8), FOPEN_KEEP_CACHE | FOPEN_DIRECT_IO);

        assert_eq!(encode_write(&mut p, 4096), 8);
        assert_eq!(u32_at(&p, 0), 4096);

        let s = Statfs {
            blocks: 10,
            bfree: 0,
            bavail: 0,
            files: 3,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        };
        assert_eq!(encode_statfs(&mut p, &s), 80);
        assert_eq!(u64_at(&p, 0), 10);
        assert_eq!(u32_at(&p, 44), 255);
        assert_eq!(u32_at(&p, 52), 0);
    }

    #[test]
    fn times_before_1970() {
        let t = UNIX_EPOCH - Duration::new(1, 250_000_000);
        assert_eq!(time_parts(t), ((-2i64) as u64, 750_000_000));
    }

    #[test]
    fn dirents_are_padded_and_stop_when_full() {
        let mut buf = vec![0u8; 64];
        let mut w = DirentWriter::new(&mut buf);
        assert!(!w.add(1, 1, FileKind::Directory, b"."));
        assert_eq!(w.len(), 32);
        assert!(!w.add(2, 2, FileKind::RegularFile, b"disk.raw"));
        assert_eq!(w.len(), 64);
        assert!(w.add(3, 3, FileKind::RegularFile, b"x"), "full");
        assert_eq!(w.len(), 64);
        assert_eq!(u64_at(&buf, 32), 2);
        assert_eq!(u64_at(&buf, 40), 2);
        assert_eq!(u32_at(&buf, 48), 8);
        assert_eq!(u32_at(&buf, 52), u32::from(libc::DT_REG));
        assert_eq!(&buf[56..64], b"disk.raw");
    }

    #[test]
    fn command_area() {
        let c = cmd_req(3, 0xabcdef);
        assert_eq!(u64_at(&c, 0), 0);
        assert_eq!(u64_at(&c, 8), 0xabcdef);
        assert_eq!(u16_at(&c, 16), 3);
        assert!(c[18..].iter().all(|&b| b == 0));
    }
}
