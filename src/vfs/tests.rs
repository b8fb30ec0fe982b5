//! `Vfs` answered directly, without FUSE, on small chains made by our own `create`.

use std::path::{Path, PathBuf};

use super::*;
use crate::disk::DiskOptions;
use crate::image::crash_sim;
use crate::image::vhdx::tests::{new_base, new_child, open_chain, Rng, TempDir};

const MIB: u64 = 1 << 20;
/// Not a multiple of 4 KiB: statfs rounds up, reads and writes stop at the last sector.
const SIZE: u64 = 4 * MIB + 512;
const UID: u32 = 1234;
const GID: u32 = 5678;

/// A base with random bytes in [1 MiB, 1 MiB + 192 KiB) and an empty child on top.
struct Fixture {
    _dir: TempDir,
    top: PathBuf,
    model: Vec<u8>,
}

fn fixture(tag: &str) -> Fixture {
    let mut model = vec![0u8; SIZE as usize];
    Rng(12).fill(&mut model[MIB as usize..(MIB + (192 << 10)) as usize]);
    base_and_child(tag, model, MIB as usize..(MIB + (192 << 10)) as usize)
}

/// A base holding `model[written]` (the rest zeros) with an empty child on top.
fn base_and_child(tag: &str, model: Vec<u8>, written: std::ops::Range<usize>) -> Fixture {
    let dir = TempDir::new(tag);
    let base = dir.join("base.vhdx");
    new_base(&base, model.len() as u64, MIB as u32, 512);
    let d = open_disk(&base, true);
    d.write_at(written.start as u64, &model[written]).unwrap();
    d.close().unwrap();
    drop(d);
    let top = dir.join("child.vhdx");
    new_child(&top, &base, None);
    Fixture {
        _dir: dir,
        top,
        model,
    }
}

fn open_disk(path: &Path, writable: bool) -> Arc<Disk> {
    Arc::new(Disk::new(
        open_chain(path, writable),
        DiskOptions {
            cache_bytes: MIB,
            cache_block: 64 << 10,
        },
    ))
}

fn options(read_only: bool) -> FsOptions {
    FsOptions {
        name: "disk.raw".into(),
        read_only,
        uid: UID,
        gid: GID,
        direct_io: false,
    }
}

/// A mount of the fixture: `writable_chain` opens the top for writing, `read_only` is
/// the mount option.
fn mount(f: &Fixture, writable_chain: bool, read_only: bool) -> Vfs {
    Vfs::new(open_disk(&f.top, writable_chain), options(read_only))
}

fn read(v: &Vfs, ino: u64, fh: u64, offset: u64, len: usize) -> Reply<Vec<u8>> {
    let mut buf = vec![0xeeu8; len];
    let n = v.read(ino, fh, offset, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// What a new, independent reader of the image sees (only what has been committed).
fn fresh_read(top: &Path, offset: u64, len: usize) -> Vec<u8> {
    let d = open_disk(top, false);
    let mut buf = vec![0u8; len];
    assert_eq!(d.read_at(offset, &mut buf).unwrap(), len);
    buf
}

fn stats_text(v: &Vfs, fh: u64) -> String {
    String::from_utf8(read(v, STATS_INO, fh, 0, 1 << 16).unwrap()).unwrap()
}

fn names(v: &Vfs, offset: u64) -> Vec<String> {
    let mut out = Vec::new();
    v.readdir(ROOT_INO, offset, |e| {
        out.push(e.name.to_string_lossy().into_owned());
        false
    })
    .unwrap();
    out
}

#[test]
fn lookup_and_getattr_describe_root_disk_and_stats() {
    let f = fixture("vfs-attr");
    let v = mount(&f, true, false);
    assert!(v.is_writable());

    let root = v.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.perm, root.nlink, root.size),
        (FileKind::Directory, 0o755, 2, 0)
    );
    let disk = v.getattr(DISK_INO).unwrap();
    assert_eq!(disk.kind, FileKind::RegularFile);
    assert_eq!((disk.size, disk.blocks), (SIZE, SIZE / 512));
    assert_eq!((disk.perm, disk.nlink), (0o644, 1));
    assert_eq!((disk.uid, disk.gid, disk.blksize), (UID, GID, 4096));
    // Nothing written yet: all times are the mount's.
    assert_eq!(disk.mtime, disk.crtime);
    let stats = v.getattr(STATS_INO).unwrap();
    assert_eq!(
        (stats.kind, stats.perm, stats.size),
        (FileKind::RegularFile, 0o444, 0)
    );

    assert_eq!(v.lookup(ROOT_INO, OsStr::new("disk.raw")), Ok(disk));
    assert_eq!(v.lookup(ROOT_INO, OsStr::new(STATS_NAME)), Ok(stats));
    for name in ["", ".", "..", "DISK.RAW", "disk.raw/", "nope"] {
        assert_eq!(
            v.lookup(ROOT_INO, OsStr::new(name)),
            Err(libc::ENOENT),
            "{name:?}"
        );
    }
    // Only the root has entries.
    assert_eq!(
        v.lookup(DISK_INO, OsStr::new("disk.raw")),
        Err(libc::ENOENT)
    );
    for ino in [0, 4, u64::MAX] {
        assert_eq!(v.getattr(ino), Err(libc::ENOENT), "ino {ino}");
    }
}

#[test]
fn the_disk_is_0444_when_the_mount_or_the_chain_is_read_only() {
    let f = fixture("vfs-ro-attr");
    for (writable_chain, read_only) in [(true, true), (false, false), (false, true)] {
        let v = mount(&f, writable_chain, read_only);
        assert!(!v.is_writable());
        assert_eq!(v.getattr(DISK_INO).unwrap().perm, 0o444);
        assert_eq!(v.getattr(STATS_INO).unwrap().perm, 0o444);
    }
}

#[test]
fn readdir_lists_dots_then_files_and_resumes_at_an_offset() {
    let f = fixture("vfs-readdir");
    let v = mount(&f, false, false);
    let mut all = Vec::new();
    v.readdir(ROOT_INO, 0, |e| {
        all.push((e.ino, e.next_offset, e.kind, e.name.to_os_string()));
        false
    })
    .unwrap();
    let dir = FileKind::Directory;
    let file = FileKind::RegularFile;
    assert_eq!(
        all,
        [
            (ROOT_INO, 1, dir, ".".into()),
            (ROOT_INO, 2, dir, "..".into()),
            (DISK_INO, 3, file, "disk.raw".into()),
            (STATS_INO, 4, file, ".stats".into()),
        ]
    );
    assert_eq!(names(&v, 2), ["disk.raw", ".stats"]);
    assert!(names(&v, 4).is_empty());
    assert!(names(&v, u64::MAX).is_empty());

    // A reply that holds one entry at a time: the refused entry comes again next time.
    let mut got = Vec::new();
    let mut offset = 0;
    loop {
        let mut page = Vec::new();
        v.readdir(ROOT_INO, offset, |e| {
            if !page.is_empty() {
                return true;
            }
            page.push((e.name.to_string_lossy().into_owned(), e.next_offset));
            false
        })
        .unwrap();
        let Some((name, next)) = page.pop() else {
            break;
        };
        got.push(name);
        offset = next;
    }
    assert_eq!(got, [".", "..", "disk.raw", ".stats"]);

    assert_eq!(v.readdir(DISK_INO, 0, |_| false), Err(libc::ENOTDIR));
    assert_eq!(v.readdir(9, 0, |_| false), Err(libc::ENOTDIR));
    assert_eq!(
        v.opendir(ROOT_INO),
        Ok(Opened {
            fh: 0,
            keep_cache: false,
            direct_io: false
        })
    );
    assert_eq!(v.opendir(DISK_INO), Err(libc::ENOTDIR));
    assert_eq!(v.opendir(STATS_INO), Err(libc::ENOTDIR));
    assert_eq!(v.fsyncdir(ROOT_INO), Ok(()));
}

/// `FsOptions::direct_io`: data files open with FOPEN_DIRECT_IO and without
/// KEEP_CACHE (reads and writes go to the daemon as the program issued them); `.stats`
/// is direct either way.
#[test]
fn direct_io_option_opens_data_files_direct() {
    let f = fixture("vfs-direct-io");
    let v = Vfs::new(
        open_disk(&f.top, true),
        FsOptions {
            direct_io: true,
            ..options(false)
        },
    );
    for flags in [libc::O_RDONLY, libc::O_RDWR] {
        let o = v.open(DISK_INO, flags).unwrap();
        assert!(o.direct_io && !o.keep_cache, "flags {flags:#o}");
    }
    let s = v.open(STATS_INO, libc::O_RDONLY).unwrap();
    assert!(s.direct_io && !s.keep_cache);
}

#[test]
fn open_checks_the_access_mode() {
    let f = fixture("vfs-open");
    let rw = mount(&f, true, false);
    let r = rw.open(DISK_INO, libc::O_RDONLY).unwrap();
    assert!(r.keep_cache && !r.direct_io);
    assert_eq!(r.fh & FH_WRITE, 0);
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDWR | libc::O_SYNC] {
        let w = rw.open(DISK_INO, flags).unwrap();
        assert_ne!(w.fh & FH_WRITE, 0, "flags {flags:#o}");
        assert!(w.keep_cache);
        assert_ne!(w.fh, r.fh);
    }
    let s = rw.open(STATS_INO, libc::O_RDONLY).unwrap();
    assert!(s.direct_io && !s.keep_cache);
    for flags in [libc::O_WRONLY, libc::O_RDWR] {
        assert_eq!(rw.open(STATS_INO, flags), Err(libc::EACCES));
    }
    assert_eq!(rw.open(ROOT_INO, libc::O_RDONLY), Err(libc::EISDIR));
    assert_eq!(rw.open(4, libc::O_RDONLY), Err(libc::ENOENT));
    drop(rw);

    let ro = mount(&f, false, true);
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_WRONLY | libc::O_APPEND,
    ] {
        assert_eq!(ro.open(DISK_INO, flags), Err(libc::EROFS), "{flags:#o}");
    }
    assert!(ro.open(DISK_INO, libc::O_RDONLY | libc::O_NOATIME).is_ok());
    // O_ACCMODE itself (3) is no write access: fuser reads it as read-only too.
    assert!(ro.open(DISK_INO, libc::O_ACCMODE).is_ok());
    assert_eq!(ro.open(STATS_INO, libc::O_RDWR), Err(libc::EACCES));
}

#[test]
fn reads_show_the_merged_chain_and_stop_at_the_end() {
    let f = fixture("vfs-read");
    let v = mount(&f, false, false);
    let fh = v.open(DISK_INO, libc::O_RDONLY).unwrap().fh;
    let m = &f.model;
    for (off, len) in [
        (0, 4096),
        (MIB - 100, 1000),
        (MIB, 192 << 10),
        (MIB + 12345, 1 << 20),
        (3 * MIB, 7),
    ] {
        assert!(
            read(&v, DISK_INO, fh, off, len).unwrap() == m[off as usize..off as usize + len],
            "read of {len} at {off}"
        );
    }
    // Short at the end, empty at and past it.
    assert_eq!(
        read(&v, DISK_INO, fh, SIZE - 512, 4096).unwrap(),
        &m[(SIZE - 512) as usize..]
    );
    assert_eq!(read(&v, DISK_INO, fh, SIZE, 4096).unwrap(), b"");
    assert_eq!(read(&v, DISK_INO, fh, u64::MAX, 4096).unwrap(), b"");
    assert_eq!(read(&v, DISK_INO, fh, 0, 0).unwrap(), b"");

    assert_eq!(read(&v, ROOT_INO, 0, 0, 10), Err(libc::EISDIR));
    assert_eq!(read(&v, 17, 0, 0, 10), Err(libc::ENOENT));
    // A .stats handle that was never opened.
    assert_eq!(read(&v, STATS_INO, fh, 0, 10), Err(libc::EBADF));
}

#[test]
fn writes_reach_the_disk_stop_at_its_end_and_set_the_mtime() {
    let f = fixture("vfs-write");
    let v = mount(&f, true, false);
    let fh = v.open(DISK_INO, libc::O_RDWR).unwrap().fh;
    let before = v.getattr(DISK_INO).unwrap();
    let mut data = vec![0u8; 10_000];
    Rng(5).fill(&mut data);
    // Unaligned, across the 2 MiB block boundary (read-modify-write of both edges).
    let off = 2 * MIB - 4321;
    assert_eq!(v.write(DISK_INO, fh, off, &data), Ok(10_000));
    let mut model = f.model.clone();
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert!(read(&v, DISK_INO, fh, 0, SIZE as usize).unwrap() == model);

    let after = v.getattr(DISK_INO).unwrap();
    assert!(
        after.mtime > before.mtime,
        "{:?} > {:?}",
        after.mtime,
        before.mtime
    );
    assert_eq!((after.atime, after.ctime), (after.mtime, after.mtime));
    assert_eq!(after.crtime, before.crtime);
    // Only the data file changed.
    assert_eq!(v.getattr(STATS_INO).unwrap().mtime, before.crtime);
    assert_eq!(v.getattr(ROOT_INO).unwrap().mtime, before.crtime);

    // Short at the end, ENOSPC past it; an empty write anywhere is 0 bytes.
    assert_eq!(v.write(DISK_INO, fh, SIZE - 100, &data[..1000]), Ok(100));
    assert_eq!(v.write(DISK_INO, fh, SIZE, &data[..1]), Err(libc::ENOSPC));
    assert_eq!(v.write(DISK_INO, fh, u64::MAX, &data), Err(libc::ENOSPC));
    assert_eq!(v.write(DISK_INO, fh, SIZE + 1, &[]), Ok(0));
    assert_eq!(
        read(&v, DISK_INO, fh, SIZE - 100, 100).unwrap(),
        &data[..100]
    );

    assert_eq!(v.write(STATS_INO, fh, 0, b"x"), Err(libc::EBADF));
    assert_eq!(v.write(ROOT_INO, fh, 0, b"x"), Err(libc::EISDIR));
    assert_eq!(v.write(8, fh, 0, b"x"), Err(libc::ENOENT));
    let s = v.open(STATS_INO, libc::O_RDONLY).unwrap().fh;
    assert!(
        stats_text(&v, s).contains("written_bytes 10100\n"),
        "{}",
        stats_text(&v, s)
    );
}

#[test]
fn a_read_only_mount_changes_no_byte_of_the_image() {
    let f = fixture("vfs-ro");
    let image_before = std::fs::read(&f.top).unwrap();
    for (writable_chain, read_only) in [(true, true), (false, false)] {
        let v = mount(&f, writable_chain, read_only);
        let fh = v.open(DISK_INO, libc::O_RDONLY).unwrap().fh;
        assert_eq!(v.write(DISK_INO, fh, 0, b"x"), Err(libc::EROFS));
        assert_eq!(v.write(DISK_INO, fh, SIZE, b"x"), Err(libc::EROFS));
        assert_eq!(v.access(DISK_INO, libc::W_OK), Err(libc::EROFS));
        let set = SetAttr {
            size: Some(0),
            ..Default::default()
        };
        assert_eq!(v.setattr(DISK_INO, &set), Err(libc::EROFS));
        assert_eq!(v.fsync(DISK_INO, fh, false), Ok(()));
        assert_eq!(v.flush(DISK_INO, fh), Ok(()));
        let attr = v.getattr(DISK_INO).unwrap();
        assert_eq!(attr.mtime, attr.crtime);
        v.destroy();
    }
    assert!(std::fs::read(&f.top).unwrap() == image_before);
}

#[test]
fn stats_is_a_snapshot_taken_at_open() {
    let f = fixture("vfs-stats");
    let v = mount(&f, true, false);
    let a = v.open(STATS_INO, libc::O_RDONLY).unwrap().fh;
    let text_a = stats_text(&v, a);
    assert!(
        text_a.starts_with(&format!("pid {}\n", std::process::id())),
        "{text_a}"
    );
    assert!(text_a.contains("layer1_bytes "), "{text_a}");
    assert!(text_a.contains("written_bytes 0\n"), "{text_a}");

    assert_eq!(v.write(DISK_INO, 0, 4096, &[7u8; 4096]), Ok(4096));
    // The open handle keeps its text; a new open sees the write.
    assert_eq!(stats_text(&v, a), text_a);
    let b = v.open(STATS_INO, libc::O_RDONLY).unwrap().fh;
    let text_b = stats_text(&v, b);
    assert!(text_b.contains("written_bytes 4096\n"), "{text_b}");

    // Read in pieces, as `cat` with a small buffer would.
    let mut pieces = Vec::new();
    let mut off = 0;
    loop {
        let p = read(&v, STATS_INO, a, off, 7).unwrap();
        if p.is_empty() {
            break;
        }
        off += p.len() as u64;
        pieces.extend(p);
    }
    assert_eq!(pieces, text_a.as_bytes());
    assert_eq!(read(&v, STATS_INO, a, u64::MAX, 10).unwrap(), b"");

    // release forgets the handle, and only that one.
    assert_eq!(v.release(STATS_INO, a), Ok(()));
    assert_eq!(read(&v, STATS_INO, a, 0, 10), Err(libc::EBADF));
    assert_eq!(stats_text(&v, b), text_b);
    // The disk's handles have nothing to release.
    assert_eq!(v.release(DISK_INO, b), Ok(()));
    assert_eq!(stats_text(&v, b), text_b);
}

#[test]
fn flush_commits_for_a_handle_opened_for_writing_and_fsync_for_any() {
    let f = fixture("vfs-flush");
    let v = mount(&f, true, false);
    let r = v.open(DISK_INO, libc::O_RDONLY).unwrap().fh;
    let w = v.open(DISK_INO, libc::O_WRONLY).unwrap().fh;

    // A write into a block the child does not have yet: until committed, another reader
    // of the image sees the parent's zeros.
    assert_eq!(v.write(DISK_INO, w, 2 * MIB, &[0xa5; 4096]), Ok(4096));
    assert_eq!(fresh_read(&f.top, 2 * MIB, 4096), [0; 4096]);
    // close() of a read-only descriptor, and of .stats, commit nothing...
    assert_eq!(v.flush(DISK_INO, r), Ok(()));
    let s = v.open(STATS_INO, libc::O_RDONLY).unwrap().fh;
    assert_eq!(v.flush(STATS_INO, s | FH_WRITE), Ok(()));
    assert_eq!(fresh_read(&f.top, 2 * MIB, 4096), [0; 4096]);
    // ...close() of the writing one does.
    assert_eq!(v.flush(DISK_INO, w), Ok(()));
    assert_eq!(fresh_read(&f.top, 2 * MIB, 4096), [0xa5; 4096]);

    // fsync commits whatever the handle.
    assert_eq!(v.write(DISK_INO, w, 3 * MIB, &[0x3c; 4096]), Ok(4096));
    assert_eq!(fresh_read(&f.top, 3 * MIB, 4096), [0; 4096]);
    assert_eq!(v.fsync(STATS_INO, s, false), Ok(()));
    assert_eq!(fresh_read(&f.top, 3 * MIB, 4096), [0; 4096]);
    assert_eq!(v.fsync(DISK_INO, r, true), Ok(()));
    assert_eq!(fresh_read(&f.top, 3 * MIB, 4096), [0x3c; 4096]);

    // Unmount commits too.
    assert_eq!(v.write(DISK_INO, w, MIB / 2, &[0x11; 512]), Ok(512));
    v.destroy();
    assert_eq!(fresh_read(&f.top, MIB / 2, 512), [0x11; 512]);
}

#[test]
fn disk_errors_become_errnos() {
    use std::io;
    let p = Path::new("x.vhdx");
    let io_err = |errno| Error::io(p, "write", 0, io::Error::from_raw_os_error(errno));
    let file_err = |errno| Error::file(p, "fdatasync", io::Error::from_raw_os_error(errno));
    for (e, want) in [
        (io_err(libc::ENOSPC), libc::ENOSPC),
        (io_err(libc::EDQUOT), libc::EDQUOT),
        (io_err(libc::EIO), libc::EIO),
        (io_err(libc::EACCES), libc::EIO),
        (io_err(libc::EROFS), libc::EIO),
        (file_err(libc::ENOSPC), libc::ENOSPC),
        (file_err(libc::EBADF), libc::EIO),
        (
            Error::io(p, "read", 0, io::Error::other("short")),
            libc::EIO,
        ),
        (Error::corrupt(p, "bad BAT"), libc::EIO),
        (Error::unsupported(p, "feature"), libc::EIO),
        (
            Error::Request(crate::error::Request::AlreadyExists { path: p.into() }),
            libc::EIO,
        ),
        (
            Error::Usage(crate::error::Usage::BlockSizeTooLarge { block_size: 1 }),
            libc::EIO,
        ),
    ] {
        assert_eq!(errno_of(&e), want, "{e}");
    }

    // Through the file system: a failing file write, then a failing fdatasync.
    let f = fixture("vfs-errno");
    let v = mount(&f, true, false);
    let w = v.open(DISK_INO, libc::O_WRONLY).unwrap().fh;
    crash_sim::fail_after(Some(0));
    let r = v.write(DISK_INO, w, 3 * MIB, &[1; 4096]);
    crash_sim::fail_after(None);
    assert_eq!(r, Err(libc::EIO));
    let attr = v.getattr(DISK_INO).unwrap();
    assert_eq!(attr.mtime, attr.crtime, "a failed write sets no mtime");

    assert_eq!(v.write(DISK_INO, w, 3 * MIB, &[1; 4096]), Ok(4096));
    crash_sim::fail_sync(true);
    let r = v.flush(DISK_INO, w);
    crash_sim::fail_sync(false);
    assert_eq!(r, Err(libc::EIO));
}

#[test]
fn a_panic_costs_one_request_an_eio() {
    assert_eq!(guarded("t", || Ok::<_, Errno>(5)), Ok(5));
    assert_eq!(
        guarded("t", || Err::<(), _>(libc::ENOSPC)),
        Err(libc::ENOSPC)
    );
    assert_eq!(
        guarded::<()>("t", || panic!("{}", String::from("formatted"))),
        Err(libc::EIO)
    );
    assert_eq!(
        guarded::<()>("t", || std::panic::panic_any(42u8)),
        Err(libc::EIO)
    );
}

#[cfg(debug_assertions)]
#[test]
fn an_injected_panic_in_a_read_is_an_eio_and_the_file_system_goes_on() {
    let f = fixture("vfs-panic");
    let mut v = mount(&f, false, false);
    let at = MIB + 12345;
    v.faults.panic_at = Some(at);
    let fh = v.open(DISK_INO, libc::O_RDONLY).unwrap().fh;
    let m = &f.model;
    assert_eq!(read(&v, DISK_INO, fh, MIB, 64 << 10), Err(libc::EIO));
    // Reads beside it still work, and the next one covering it fails again.
    assert_eq!(
        read(&v, DISK_INO, fh, at + 1, 4096).unwrap(),
        &m[at as usize + 1..at as usize + 4097]
    );
    assert_eq!(
        read(&v, DISK_INO, fh, MIB, 12345).unwrap(),
        &m[MIB as usize..at as usize]
    );
    assert_eq!(read(&v, DISK_INO, fh, at, 1), Err(libc::EIO));
    assert_eq!(read(&v, DISK_INO, fh, 0, 4096).unwrap(), &m[..4096]);
}

#[test]
fn setattr_accepts_only_what_changes_nothing() {
    let f = fixture("vfs-setattr");
    let v = mount(&f, true, false);
    let attr = v.getattr(DISK_INO).unwrap();
    let ok = [
        SetAttr::default(),
        SetAttr {
            size: Some(SIZE),
            ..Default::default()
        },
        SetAttr {
            // The file-type bits do not count.
            mode: Some(libc::S_IFREG | 0o644),
            uid: Some(UID),
            gid: Some(GID),
            ..Default::default()
        },
    ];
    for set in ok {
        assert_eq!(v.setattr(DISK_INO, &set), Ok(attr), "{set:?}");
    }
    let refused = [
        SetAttr {
            size: Some(0),
            ..Default::default()
        },
        SetAttr {
            size: Some(SIZE + 512),
            ..Default::default()
        },
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
        SetAttr {
            uid: Some(UID + 1),
            ..Default::default()
        },
        SetAttr {
            gid: Some(0),
            ..Default::default()
        },
        SetAttr {
            flags: true,
            ..Default::default()
        },
    ];
    for set in refused {
        assert_eq!(v.setattr(DISK_INO, &set), Err(libc::EPERM), "{set:?}");
    }
    let truncate = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    // .stats is 0 bytes already.
    assert!(v.setattr(STATS_INO, &truncate).is_ok());
    let grow = SetAttr {
        size: Some(10),
        ..Default::default()
    };
    assert_eq!(v.setattr(STATS_INO, &grow), Err(libc::EPERM));
    assert_eq!(v.setattr(ROOT_INO, &grow), Err(libc::EPERM));
    assert_eq!(v.setattr(5, &SetAttr::default()), Err(libc::ENOENT));
    // A read-only mount says so for the disk, but .stats is simply not changeable.
    let ro = mount(&f, false, false);
    assert_eq!(ro.setattr(DISK_INO, &truncate), Err(libc::EROFS));
    assert_eq!(ro.setattr(STATS_INO, &grow), Err(libc::EPERM));
}

#[test]
fn access_follows_the_permission_bits() {
    let f = fixture("vfs-access");
    let v = mount(&f, true, false);
    let rw = libc::R_OK | libc::W_OK;
    assert_eq!(v.access(DISK_INO, libc::F_OK), Ok(()));
    assert_eq!(v.access(DISK_INO, rw), Ok(()));
    assert_eq!(v.access(DISK_INO, libc::X_OK), Err(libc::EACCES));
    assert_eq!(v.access(STATS_INO, libc::R_OK), Ok(()));
    assert_eq!(v.access(STATS_INO, rw), Err(libc::EACCES));
    assert_eq!(v.access(STATS_INO, libc::X_OK), Err(libc::EACCES));
    assert_eq!(v.access(ROOT_INO, rw | libc::X_OK), Ok(()));
    assert_eq!(v.access(6, libc::F_OK), Err(libc::ENOENT));
    drop(v);
    let ro = mount(&f, true, true);
    assert_eq!(ro.access(DISK_INO, libc::R_OK), Ok(()));
    assert_eq!(ro.access(DISK_INO, rw), Err(libc::EROFS));
    assert_eq!(ro.access(STATS_INO, libc::W_OK), Err(libc::EACCES));
}

#[test]
fn statfs_counts_the_disk_in_4k_blocks_and_the_nodes() {
    let f = fixture("vfs-statfs");
    let mut v = mount(&f, false, false);
    let s = v.statfs();
    assert_eq!(s.blocks, SIZE.div_ceil(4096));
    assert_eq!(s.blocks, 4 * MIB / 4096 + 1);
    assert_eq!((s.bfree, s.bavail, s.ffree), (0, 0, 0));
    assert_eq!(
        (s.files, s.bsize, s.frsize, s.namelen),
        (3, 4096, 4096, 255)
    );
    v.add_window(OsStr::new("p1"), 0, MIB).unwrap();
    assert_eq!(v.statfs().files, 4);
}

#[test]
fn refused_requests_get_their_errnos() {
    for (r, want) in [
        (Refused::ChangeTree, libc::EPERM),
        (Refused::SetXattr, libc::EPERM),
        (Refused::RemoveXattr, libc::EPERM),
        (Refused::GetXattr, libc::ENODATA),
        (Refused::Ioctl, libc::ENOTTY),
        (Refused::Poll, libc::ENOSYS),
        (Refused::Fallocate, libc::EOPNOTSUPP),
        (Refused::Lseek, libc::ENOSYS),
    ] {
        assert_eq!(r.errno(), want, "{r:?}");
    }
    let f = fixture("vfs-xattr");
    let v = mount(&f, false, false);
    assert_eq!(v.listxattr(DISK_INO, 0), Ok(XattrList::Size(0)));
    assert_eq!(v.listxattr(DISK_INO, 100), Ok(XattrList::Data(&[])));
}

#[test]
fn a_window_shows_and_changes_only_its_bytes_of_the_disk() {
    let f = fixture("vfs-window");
    let mut v = mount(&f, true, false);
    let start = MIB + 4096;
    let len = 2 * MIB;
    let ino = v.add_window(OsStr::new("part1"), start, len).unwrap();
    assert_eq!(ino, 4);
    let attr = v.lookup(ROOT_INO, OsStr::new("part1")).unwrap();
    assert_eq!((attr.ino, attr.size, attr.perm), (4, len, 0o644));
    assert_eq!(v.getattr(4), Ok(attr));
    assert_eq!(names(&v, 0), [".", "..", "disk.raw", ".stats", "part1"]);

    let fh = v.open(ino, libc::O_RDWR).unwrap().fh;
    let mut model = f.model.clone();
    let win = |m: &[u8], off: u64, n: usize| m[(start + off) as usize..][..n].to_vec();
    assert_eq!(
        read(&v, ino, fh, 0, 64 << 10).unwrap(),
        win(&model, 0, 64 << 10)
    );
    assert_eq!(
        read(&v, ino, fh, len - 10, 4096).unwrap(),
        win(&model, len - 10, 10)
    );
    assert_eq!(read(&v, ino, fh, len, 4096).unwrap(), b"");

    assert_eq!(v.write(ino, fh, 10, &[0x77; 1000]), Ok(1000));
    assert_eq!(v.write(ino, fh, len - 512, &[0x88; 4096]), Ok(512));
    assert_eq!(v.write(ino, fh, len, &[1]), Err(libc::ENOSPC));
    model[(start + 10) as usize..][..1000].fill(0x77);
    model[(start + len - 512) as usize..][..512].fill(0x88);
    assert!(read(&v, DISK_INO, fh, 0, SIZE as usize).unwrap() == model);
    assert_eq!(v.flush(ino, fh), Ok(()));
    assert_eq!(fresh_read(&f.top, start + 10, 1000), [0x77; 1000]);

    for (name, s, l) in [
        ("disk.raw", 0, 1),
        (".stats", 0, 1),
        ("part1", 0, 1),
        ("", 0, 1),
        (".", 0, 1),
        ("..", 0, 1),
        ("a/b", 0, 1),
        ("tail", SIZE - 511, 512),
        ("huge", 1, u64::MAX),
    ] {
        assert!(
            v.add_window(OsStr::new(name), s, l).is_err(),
            "{name} {s}+{l}"
        );
    }
    // The whole disk again, under another name, is fine.
    assert_eq!(v.add_window(OsStr::new("all"), 0, SIZE).unwrap(), 5);

    let mut ro = mount(&f, false, false);
    let ino = ro.add_window(OsStr::new("part1"), start, len).unwrap();
    assert_eq!(ro.getattr(ino).unwrap().perm, 0o444);
    assert_eq!(ro.open(ino, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(ro.write(ino, 0, 0, b"x"), Err(libc::EROFS));
    assert_eq!(ro.access(ino, libc::W_OK), Err(libc::EROFS));
}

// ---------------------------------------------------------------------------
// Partitions as files
// ---------------------------------------------------------------------------

use crate::guest::tests::{gpt_disk, windows_gpt_parts, GptPart, BASIC_DATA};

const PSIZE: u64 = 16 * MIB;

/// A base holding a Windows GPT layout (p1..p4 at 1, 3, 4 and 12 MiB) with random bytes
/// in [1 MiB, 13 MiB), and an empty child on top.
fn partitioned(tag: &str) -> Fixture {
    let (mut model, _, _) = gpt_disk(PSIZE, 512, &windows_gpt_parts(), 128);
    Rng(17).fill(&mut model[MIB as usize..13 * MIB as usize]);
    let all = 0..model.len();
    base_and_child(tag, model, all)
}

/// Records what the file system asks the kernel to invalidate.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Notify for Recorder {
    fn inval_data(&self, ino: u64, offset: u64, len: u64) {
        self.0
            .lock()
            .unwrap()
            .push(format!("data {ino} {offset}+{len}"));
    }
    fn inval_entry(&self, parent: u64, name: &OsStr) {
        self.0
            .lock()
            .unwrap()
            .push(format!("entry {parent} {}", name.to_string_lossy()));
    }
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

fn ino_of(v: &Vfs, name: &str) -> u64 {
    v.lookup(ROOT_INO, OsStr::new(name)).unwrap().ino
}

fn stale(v: &Vfs) -> bool {
    v.partitions.as_ref().unwrap().stale.load(Ordering::Acquire)
}

#[test]
fn partitions_are_files_showing_and_changing_only_their_bytes() {
    let f = partitioned("vfs-parts");
    let mut v = mount(&f, true, false);
    assert_eq!(v.enable_partitions(), []);
    let rec = Recorder::default();
    assert!(v.notify_slot().set(Box::new(rec.clone())).is_ok());
    assert_eq!(
        names(&v, 0),
        [".", "..", "disk.raw", ".stats", "p1", "p2", "p3", "p4"]
    );
    let p3 = v.lookup(ROOT_INO, OsStr::new("p3")).unwrap();
    assert_eq!((p3.size, p3.perm), (8 * MIB, 0o644));
    let (start, len) = (4 * MIB, 8 * MIB);

    // Data files do not keep the page cache across opens here (their bytes alias).
    let fh = v.open(p3.ino, libc::O_RDWR).unwrap();
    assert!(!fh.keep_cache && !fh.direct_io);
    assert!(!v.open(DISK_INO, libc::O_RDONLY).unwrap().keep_cache);
    let fh = fh.fh;

    let mut model = f.model.clone();
    assert!(
        read(&v, p3.ino, fh, 0, len as usize).unwrap() == model[start as usize..][..len as usize]
    );
    assert_eq!(v.write(p3.ino, fh, 100, &[0x55; 1000]), Ok(1000));
    assert_eq!(v.write(p3.ino, fh, len - 512, &[0x66; 4096]), Ok(512));
    assert_eq!(v.write(p3.ino, fh, len, &[1; 512]), Err(libc::ENOSPC));
    assert_eq!(
        v.write(p3.ino, fh, len + 4096, &[1; 512]),
        Err(libc::ENOSPC)
    );
    model[(start + 100) as usize..][..1000].fill(0x55);
    model[(start + len - 512) as usize..][..512].fill(0x66);
    assert!(read(&v, DISK_INO, fh, 0, PSIZE as usize).unwrap() == model);
    // disk.raw's copy of the written bytes is invalidated (and no other file's: none
    // overlaps p3).
    assert_eq!(
        rec.take(),
        [
            format!("data {DISK_INO} {}+1000", start + 100),
            format!("data {DISK_INO} {}+512", start + len - 512),
        ]
    );
    // A write through disk.raw across p1's end and p2's start invalidates both.
    let p1 = ino_of(&v, "p1");
    let p2 = ino_of(&v, "p2");
    assert_eq!(
        v.write(DISK_INO, fh, 3 * MIB - 512, &[0x77; 1024]),
        Ok(1024)
    );
    assert_eq!(
        rec.take(),
        [
            format!("data {p1} {}+512", 2 * MIB - 512),
            format!("data {p2} 0+512"),
        ]
    );
    // Writes in the partitions' data do not make the list stale.
    assert!(!stale(&v));
    assert_eq!(v.flush(p3.ino, fh), Ok(()));
    assert_eq!(fresh_read(&f.top, start + 100, 1000), [0x55; 1000]);
    v.destroy();
    drop(v);
    model[(3 * MIB - 512) as usize..][..1024].fill(0x77);

    // Read-only: same files, 0444, cached across opens, EROFS.
    let mut ro = mount(&f, false, false);
    ro.enable_partitions();
    let p3 = ro.lookup(ROOT_INO, OsStr::new("p3")).unwrap();
    assert_eq!((p3.size, p3.perm), (8 * MIB, 0o444));
    assert!(ro.open(p3.ino, libc::O_RDONLY).unwrap().keep_cache);
    assert_eq!(ro.open(p3.ino, libc::O_RDWR), Err(libc::EROFS));
    assert_eq!(ro.write(p3.ino, 0, 0, b"x"), Err(libc::EROFS));
    assert!(read(&ro, p3.ino, 0, 0, 4096).unwrap() == model[start as usize..][..4096]);
    drop(ro);
    // Writable without partition files: nothing aliases, the cache is kept.
    let plain = mount(&f, true, false);
    assert!(plain.open(DISK_INO, libc::O_RDWR).unwrap().keep_cache);
    assert_eq!(names(&plain, 0), [".", "..", "disk.raw", ".stats"]);
}

#[test]
fn the_partition_list_follows_a_table_rewritten_through_the_mount() {
    let f = partitioned("vfs-parts-follow");
    let mut v = mount(&f, true, false);
    v.enable_partitions();
    let rec = Recorder::default();
    assert!(v.notify_slot().set(Box::new(rec.clone())).is_ok());
    let (p1, p2, p3) = (ino_of(&v, "p1"), ino_of(&v, "p2"), ino_of(&v, "p3"));
    let fh3 = v.open(p3, libc::O_RDONLY).unwrap().fh;

    // As sgdisk would: p3 grows to the end of the usable space, p4 is deleted, a new
    // partition 5 appears. The first 34 and the last 33 sectors are rewritten.
    let mut parts = windows_gpt_parts();
    parts.truncate(3);
    parts[2].last = PSIZE / 512 - 34 - 2048;
    parts.push(GptPart {
        type_guid: BASIC_DATA,
        first: PSIZE / 512 - 34 - 2047,
        last: PSIZE / 512 - 34,
        name: "new",
    });
    let (table, _, _) = gpt_disk(PSIZE, 512, &parts, 128);
    // Entry 5 instead of 4: move the fourth entry one slot on.
    let mut table = table;
    for at in [2 * 512, PSIZE as usize - 33 * 512] {
        let e: Vec<u8> = table[at + 3 * 128..at + 4 * 128].to_vec();
        table[at + 4 * 128..at + 5 * 128].copy_from_slice(&e);
        table[at + 3 * 128..at + 4 * 128].fill(0);
    }
    // (The moved entry breaks the arrays' CRCs: recompute both headers.)
    let (_, mut ph, mut bh) = gpt_disk(PSIZE, 512, &parts, 128);
    ph.array_crc = None;
    bh.array_crc = None;
    let array = table[2 * 512..2 * 512 + 128 * 128].to_vec();
    crate::guest::tests::gpt_header(&mut table, 512, &ph, &array);
    crate::guest::tests::gpt_header(&mut table, 512, &bh, &array);
    assert_eq!(
        crate::guest::scan_table(&table, 512)
            .files()
            .iter()
            .map(|f| f.0.as_str())
            .collect::<Vec<_>>(),
        ["p1", "p2", "p3", "p5"]
    );
    let head = 34 * 512;
    assert_eq!(v.write(DISK_INO, 0, 0, &table[..head]), Ok(head as u32));
    assert!(stale(&v));
    let tail = PSIZE as usize - 33 * 512;
    assert_eq!(
        v.write(DISK_INO, 0, tail as u64, &table[tail..]),
        Ok(33 * 512)
    );
    rec.take();
    // Until a lookup or opendir the old list stands; then it follows.
    assert_eq!(
        names(&v, 0),
        [".", "..", "disk.raw", ".stats", "p1", "p2", "p3", "p4"]
    );
    assert!(v.opendir(ROOT_INO).is_ok());
    assert!(!stale(&v));
    assert_eq!(
        names(&v, 0),
        [".", "..", "disk.raw", ".stats", "p1", "p2", "p3", "p5"]
    );
    assert_eq!((ino_of(&v, "p1"), ino_of(&v, "p2")), (p1, p2));
    let new_p3 = v.lookup(ROOT_INO, OsStr::new("p3")).unwrap();
    assert_ne!(new_p3.ino, p3);
    assert_eq!(new_p3.size, (parts[2].last - parts[2].first + 1) * 512);
    assert_eq!(rec.take(), ["entry 1 p3", "entry 1 p4"]);
    // The old p3 is gone: its inode is not found, its open handle is stale.
    assert_eq!(v.getattr(p3), Err(libc::ENOENT));
    assert_eq!(v.open(p3, libc::O_RDONLY), Err(libc::ENOENT));
    assert_eq!(read(&v, p3, fh3, 0, 512), Err(libc::ESTALE));
    assert_eq!(v.write(p3, fh3, 0, b"x"), Err(libc::ESTALE));
    assert_eq!(v.lookup(ROOT_INO, OsStr::new("p4")), Err(libc::ENOENT));

    // The table wiped: no partition files left.
    assert_eq!(v.write(DISK_INO, 0, 0, &[0; 1024]), Ok(1024));
    assert_eq!(v.lookup(ROOT_INO, OsStr::new("p1")), Err(libc::ENOENT));
    assert_eq!(names(&v, 0), [".", "..", "disk.raw", ".stats"]);
    // The flushed image holds what was written.
    v.destroy();
    assert_eq!(fresh_read(&f.top, 0, 1024), [0u8; 1024]);
}

// ---------------------------------------------------------------------------
// fallocate: discard through the mount
// ---------------------------------------------------------------------------

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Punching a hole and zeroing a range read zeros afterwards, through the mount and in
/// the image after a flush, in a child over the parent's data (zeros, not the parent);
/// a window maps the range as a write does; a range past the end is clamped with
/// KEEP_SIZE and refused (ENOSPC) without; the data files' mtime changes.
#[test]
fn fallocate_punches_and_zeroes_ranges_that_then_read_zeros() {
    let f = fixture("vfs-fallocate");
    let mut v = mount(&f, true, false);
    let start = MIB + 4096;
    let len = 2 * MIB;
    let win = v.add_window(OsStr::new("part1"), start, len).unwrap();
    let fh = v.open(DISK_INO, libc::O_RDWR).unwrap().fh;
    let mut model = f.model.clone();
    assert!(model[MIB as usize..][..4096].iter().any(|&b| b != 0));
    let before = v.getattr(DISK_INO).unwrap().mtime;

    // The parent's data under a hole punched in the child: zeros.
    assert_eq!(v.fallocate(DISK_INO, fh, MIB + 100, 5000, PUNCH), Ok(()));
    model[(MIB + 100) as usize..][..5000].fill(0);
    // Zero range with and without KEEP_SIZE, inside the file.
    let zero_keep = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        v.fallocate(DISK_INO, fh, MIB + 65536, 8192, libc::FALLOC_FL_ZERO_RANGE),
        Ok(())
    );
    model[(MIB + 65536) as usize..][..8192].fill(0);
    // Through the window: its offset 0 is disk byte `start`.
    assert_eq!(v.fallocate(win, fh, 0, 70_000, zero_keep), Ok(()));
    model[start as usize..][..70_000].fill(0);
    assert!(read(&v, DISK_INO, fh, 0, SIZE as usize).unwrap() == model);
    assert!(v.getattr(DISK_INO).unwrap().mtime > before, "mtime moved");

    // Past the end: clamped with KEEP_SIZE, refused without (the file cannot grow).
    assert_eq!(v.fallocate(win, fh, len - 512, 4096, PUNCH), Ok(()));
    model[(start + len - 512) as usize..][..512].fill(0);
    assert_eq!(
        v.fallocate(win, fh, len - 512, 4096, libc::FALLOC_FL_ZERO_RANGE),
        Err(libc::ENOSPC)
    );
    assert_eq!(v.fallocate(DISK_INO, fh, SIZE, 4096, PUNCH), Ok(()));
    assert_eq!(v.fallocate(DISK_INO, fh, 0, 0, PUNCH), Err(libc::EINVAL));
    assert!(read(&v, DISK_INO, fh, 0, SIZE as usize).unwrap() == model);

    // Whole blocks and the disk's last (partial) sector run.
    assert_eq!(v.fallocate(DISK_INO, fh, 0, SIZE, PUNCH), Ok(()));
    model.fill(0);
    assert!(read(&v, DISK_INO, fh, 0, SIZE as usize).unwrap() == model);
    assert_eq!(v.fsync(DISK_INO, fh, false), Ok(()));
    assert!(fresh_read(&f.top, 0, SIZE as usize) == model);
}

/// EROFS on a read-only mount; EOPNOTSUPP for every other mode, on any mount; the
/// other nodes refuse as for writes.
#[test]
fn fallocate_refuses_read_only_mounts_other_modes_and_other_nodes() {
    let f = fixture("vfs-fallocate-refused");
    for (writable_chain, read_only) in [(false, false), (true, true)] {
        let v = mount(&f, writable_chain, read_only);
        assert_eq!(v.fallocate(DISK_INO, 0, 0, 4096, PUNCH), Err(libc::EROFS));
        assert_eq!(
            v.fallocate(DISK_INO, 0, 0, 4096, libc::FALLOC_FL_ZERO_RANGE),
            Err(libc::EROFS)
        );
    }
    let v = mount(&f, true, false);
    for mode in [
        0,
        libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
        libc::FALLOC_FL_UNSHARE_RANGE,
        PUNCH | libc::FALLOC_FL_ZERO_RANGE,
    ] {
        assert_eq!(
            v.fallocate(DISK_INO, 0, 0, 4096, mode),
            Err(libc::EOPNOTSUPP),
            "mode {mode:#x}"
        );
    }
    assert_eq!(v.fallocate(STATS_INO, 0, 0, 4096, PUNCH), Err(libc::EBADF));
    assert_eq!(v.fallocate(ROOT_INO, 0, 0, 4096, PUNCH), Err(libc::EISDIR));
    assert_eq!(v.fallocate(99, 0, 0, 4096, PUNCH), Err(libc::ENOENT));
    // Nothing changed.
    assert!(fresh_read(&f.top, 0, SIZE as usize) == f.model);
}
