//! Opening image files: format detection by signature, and positioned I/O on a backing
//! file with an optional in-memory overlay (a VHDX log replayed without touching the file).

pub mod durable;
pub mod raw;
pub mod vhd;
pub mod vhdx;

#[cfg(test)]
mod discard_tests;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Defect, Error, Request, Result};
use crate::layer::{Format, IfWritten, Layer, OpenOptions};
pub use durable::{create_file_atomically, create_new_file, remove_stale_temps};

/// Size of an overlay page. VHDX log entries write whole 4 KiB sectors and zero runs of
/// whole 4 KiB sectors at 4 KiB-aligned file offsets, so overlay pieces (pages and zero
/// runs) on 4 KiB boundaries represent a replayed log exactly.
pub const OVERLAY_PAGE: u64 = 4096;

/// One replayed piece of an in-memory VHDX log replay.
#[derive(Debug)]
pub enum OverlayPiece {
    /// A 4 KiB page.
    Page(Box<[u8]>),
    /// This many bytes of zeros (a zero descriptor costs the same whatever its length).
    Zeros(u64),
}

impl OverlayPiece {
    pub fn len(&self) -> u64 {
        match self {
            OverlayPiece::Page(p) => p.len() as u64,
            OverlayPiece::Zeros(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A backing file read with positioned I/O. When a VHDX log is replayed into memory
/// (read-only open), `overlay` holds the replayed pieces (keyed by file offset, never
/// overlapping) and shadows the file; reads past the end of the file inside
/// `logical_len` return zeros (a log may extend the file).
#[derive(Debug)]
pub struct ImageFile {
    pub path: PathBuf,
    pub file: File,
    overlay: BTreeMap<u64, OverlayPiece>,
    /// The file length as the image sees it (real length, or longer after in-memory replay).
    logical_len: AtomicU64,
    real_len: AtomicU64,
    /// Read-only opens: who had the file open for writing (held its exclusive lock) at
    /// open, when someone did; what is read may change.
    pub writer: Option<String>,
    /// Set by the first failed fdatasync (`durable::Poison`).
    poison: durable::Poison,
}

impl ImageFile {
    pub fn new(path: &Path, file: File) -> Result<Self> {
        let real_len = file
            .metadata()
            .map_err(|e| Error::file(path, "stat", e))?
            .len();
        Ok(ImageFile {
            path: path.to_path_buf(),
            file,
            overlay: BTreeMap::new(),
            logical_len: AtomicU64::new(real_len),
            real_len: AtomicU64::new(real_len),
            writer: None,
            poison: durable::Poison::new(),
        })
    }

    /// Open `path` read-only or read-write (see `open_with`), a read-only open warning
    /// (not failing) when another process writes the file.
    #[cfg(any(test, feature = "testing"))]
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let opts = if writable {
            OpenOptions::writable()
        } else {
            OpenOptions::read_only()
        };
        Self::open_with(path, opts)
    }

    /// Open `path` with an advisory lock (flock): exclusive for a writable open, so a
    /// second writer, or a writer of a file some other process uses as a parent, is
    /// refused; shared for a read-only open, so nobody starts writing the file while it is
    /// read. When another process already writes the file, a read-only open fails with
    /// `IfWritten::Refuse` and otherwise goes on without a lock (forensic users must
    /// always be able to look), recording who writes it (`writer`). Which rule applies to
    /// which file of a chain is decided by `chain::Intent`. Read-only opens do not change
    /// the file's access time (`O_NOATIME` when permitted).
    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<Self> {
        let file = crate::access::open_file(path, opts.writable)
            .map_err(|e| Error::file(path, "open", e))?;
        let mut writer = None;
        // A refusal is final only after a grace period; a mere warning needs none.
        let grace = opts.writable || opts.if_written != IfWritten::Warn;
        match crate::access::lock(&file, opts.writable, grace) {
            Ok(true) => {}
            Ok(false) if opts.writable => {
                return Err(Error::Request(Request::InUse {
                    path: path.to_path_buf(),
                    holders: crate::access::describe_holders(&file, false),
                }))
            }
            Ok(false) => {
                let who = crate::access::describe_holders(&file, true);
                if let IfWritten::Refuse(why) = opts.if_written {
                    return Err(Error::Request(Request::OpenForWriting {
                        path: path.to_path_buf(),
                        who,
                        why,
                    }));
                }
                writer = Some(who);
            }
            Err(e) => log::warn!("{}: cannot lock: {e}", path.display()),
        }
        let mut f = Self::new(path, file)?;
        f.writer = writer;
        Ok(f)
    }

    /// The file's length as readers see it (with a replayed log's extension). Nobody asks
    /// whether a file is empty (headers come first), hence no `is_empty`.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.logical_len.load(Ordering::Acquire)
    }

    fn real_len(&self) -> u64 {
        self.real_len.load(Ordering::Acquire)
    }

    /// Grow the real file (writable opens only; never shrinks).
    pub fn grow(&self, len: u64) -> Result<()> {
        if len <= self.real_len() {
            return Ok(());
        }
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, "extend file", len, e))?;
        self.real_len.fetch_max(len, Ordering::AcqRel);
        self.logical_len.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    /// Record a replayed piece at `offset` (in-memory replay; 4 KiB aligned, not
    /// overlapping any piece recorded before).
    pub fn overlay_piece(&mut self, offset: u64, piece: OverlayPiece) {
        debug_assert_eq!(offset % OVERLAY_PAGE, 0);
        if piece.is_empty() {
            return;
        }
        let end = offset.saturating_add(piece.len());
        debug_assert!(self.overlay.range(offset..end).next().is_none());
        self.overlay.insert(offset, piece);
        self.logical_len.fetch_max(end, Ordering::AcqRel);
    }

    /// Number of replayed pieces held (tests: zero ranges must not become pages).
    #[cfg(test)]
    pub fn overlay_pieces(&self) -> usize {
        self.overlay.len()
    }

    /// Make the logical length at least `len` (in-memory replay of LastFileOffset).
    pub fn extend_logical(&mut self, len: u64) {
        self.logical_len.fetch_max(len, Ordering::AcqRel);
    }

    /// The file's length as the file system has it now (fstat), not as the image sees it.
    pub fn stat_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::file(&self.path, "stat", e))?
            .len())
    }

    /// After a replay written to the file itself, re-read the real length.
    pub fn refresh_len(&mut self) -> Result<()> {
        let len = self.stat_len()?;
        self.real_len.store(len, Ordering::Release);
        self.logical_len.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    /// Read exactly `buf.len()` bytes at `offset`. Reading past the logical end is an error
    /// (a structure that points outside the file is corrupt).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                Error::corrupt(
                    &self.path,
                    Defect::ReadPastEnd {
                        len: buf.len(),
                        offset,
                        file_len: self.len(),
                    },
                )
            })?;
        if self.overlay.is_empty() && end <= self.real_len() {
            return self.pread(buf, offset);
        }
        self.read_slow(buf, offset)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // The file shrank under us (truncated while open): never return wrong bytes.
                Error::io(
                    &self.path,
                    "read",
                    offset,
                    std::io::Error::from_raw_os_error(libc::EIO),
                )
            } else {
                Error::io(&self.path, "read", offset, e)
            }
        })
    }

    /// Piece by piece: overlay pieces win, then the real file, then zeros past its end.
    fn read_slow(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let left = (buf.len() - done) as u64;
            let covering = self
                .overlay
                .range(..=pos)
                .next_back()
                .filter(|(&s, p)| pos - s < p.len());
            let n = if let Some((&start, piece)) = covering {
                let n = (start + piece.len() - pos).min(left) as usize;
                let dst = &mut buf[done..done + n];
                match piece {
                    OverlayPiece::Page(p) => {
                        let i = (pos - start) as usize;
                        dst.copy_from_slice(&p[i..i + n]);
                    }
                    OverlayPiece::Zeros(_) => dst.fill(0),
                }
                n
            } else {
                // Up to the next piece: the real file, then zeros past its end.
                let next = self
                    .overlay
                    .range(pos..)
                    .next()
                    .map_or(u64::MAX, |(&s, _)| s);
                let n = (next - pos).min(left) as usize;
                let dst = &mut buf[done..done + n];
                if pos >= self.real_len() {
                    dst.fill(0);
                } else {
                    let real = ((self.real_len() - pos) as usize).min(n);
                    self.pread(&mut dst[..real], pos)?;
                    dst[real..].fill(0);
                }
                n
            };
            done += n;
        }
        Ok(())
    }

    /// Positioned write to the real file (writable opens only).
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        #[cfg(test)]
        if crash_sim::write_fails() {
            return Err(Error::io(
                &self.path,
                "write (simulated crash)",
                offset,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, "write", offset, e))
    }

    /// Make `[offset, offset + len)` of the real file read zeros (writable opens only;
    /// inside the file, whose size does not change). `keep_allocated`: with
    /// FALLOC_FL_ZERO_RANGE, the space stays allocated (a fixed disk stays fully
    /// provisioned); otherwise with FALLOC_FL_PUNCH_HOLE, the host file system gets the
    /// space back. Where the file system has neither, zeros are written. Not durable
    /// until the next fdatasync, like a write.
    pub fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(());
        }
        #[cfg(test)]
        if crash_sim::write_fails() {
            return Err(Error::io(
                &self.path,
                "punch a hole (simulated crash)",
                offset,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let mode = if keep_allocated {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::io(
                &self.path,
                "punch a hole",
                offset,
                std::io::Error::from_raw_os_error(libc::EFBIG),
            ));
        };
        match fallocate(&self.file, mode, o, l) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64);
                    self.file
                        .write_all_at(&zeros[..n as usize], offset + done)
                        .map_err(|e| Error::io(&self.path, "write", offset + done, e))?;
                    done += n;
                }
                Ok(())
            }
            Err(e) => Err(Error::io(
                &self.path,
                "punch a hole",
                offset,
                std::io::Error::from(e),
            )),
        }
    }

    /// fdatasync the file. A failure sets the poison latch: every later
    /// `check_poison` and `flush_ordered` fails (see `durable`).
    pub fn sync_data(&self) -> Result<()> {
        let r = self.sync_data_once();
        if r.is_err() {
            self.poison.set();
        }
        r
    }

    fn sync_data_once(&self) -> Result<()> {
        #[cfg(test)]
        if crash_sim::sync_fails() {
            return Err(Error::file(
                &self.path,
                "fdatasync (simulated writeback error)",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.file
            .sync_data()
            .map_err(|e| Error::file(&self.path, "fdatasync", e))
    }

    /// EIO (`op`: `durable::POISONED_WRITE` or `POISONED_CLOSE`) once an fdatasync of
    /// this file has failed. Writers call it before every write, flush and close.
    pub fn check_poison(&self, op: &'static str) -> Result<()> {
        self.poison.check(&self.path, op)
    }

    /// An ordered flush point: fdatasync the data written so far (when `data_unsynced`),
    /// then `metadata` writes what points at it, then fdatasync again when `metadata`
    /// says it wrote something. So metadata never reaches the disk before the data it
    /// describes. Fails at once when the file is poisoned; a failed fdatasync poisons it.
    /// Extra ordering inside `metadata` (a log entry before the places it covers) uses
    /// `sync_data` between its steps.
    pub fn flush_ordered(
        &self,
        data_unsynced: bool,
        metadata: impl FnOnce() -> Result<bool>,
    ) -> Result<()> {
        self.check_poison(durable::POISONED_WRITE)?;
        if data_unsynced {
            self.sync_data()?;
        }
        if metadata()? {
            self.sync_data()?;
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` into a new buffer, where `len` comes from the file:
    /// refused (as corrupt, naming `what`) before anything is allocated when it exceeds
    /// `limit` or reaches past the end of the file.
    pub fn read_vec_at(&self, offset: u64, len: u64, limit: u64, what: &str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(Error::corrupt(
                &self.path,
                format!("{what} of {len} bytes at offset {offset} is larger than the limit of {limit} bytes"),
            ));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.len()) {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "{what}: read of {len} bytes at offset {offset} is past the end of the file ({} bytes)",
                    self.len()
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// What the first bytes of a file say it is.
pub fn detect_format(path: &Path) -> Result<Option<Format>> {
    let file = crate::access::open_file(path, false).map_err(|e| Error::file(path, "open", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::file(path, "stat", e))?
        .len();
    let mut sig = [0u8; 8];
    if len >= 8 {
        file.read_exact_at(&mut sig, 0)
            .map_err(|e| Error::io(path, "read", 0, e))?;
        if &sig == b"vhdxfile" {
            return Ok(Some(Format::Vhdx));
        }
        if &sig == b"conectix" {
            return Ok(Some(Format::Vhd));
        }
    }
    // A VHD footer at the end (fixed disks have no copy at offset 0); older tools wrote
    // a 511-byte footer.
    for back in [512u64, 511] {
        if len >= back {
            file.read_exact_at(&mut sig, len - back)
                .map_err(|e| Error::io(path, "read", len - back, e))?;
            if &sig == b"conectix" {
                return Ok(Some(Format::Vhd));
            }
        }
    }
    Ok(None)
}

/// Open one image file as a layer, detecting its format. A file that is neither VHDX nor
/// VHD is an error unless `allow_raw` (an explicit `--parent` base may be raw).
pub fn open_layer(path: &Path, opts: OpenOptions, allow_raw: bool) -> Result<Arc<dyn Layer>> {
    open_layer_within(path, opts, allow_raw, &vhdx::log::ReplayBudget::for_chain())
}

/// `open_layer` for one layer of a chain: a pending VHDX log replayed in memory is
/// charged to `budget`, which all layers of the chain share.
pub fn open_layer_within(
    path: &Path,
    opts: OpenOptions,
    allow_raw: bool,
    budget: &vhdx::log::ReplayBudget,
) -> Result<Arc<dyn Layer>> {
    match detect_format(path)? {
        Some(Format::Vhdx) => Ok(Arc::new(vhdx::Vhdx::open_within(path, opts, budget)?)),
        Some(Format::Vhd) => Ok(Arc::new(vhd::Vhd::open(path, opts)?)),
        _ if allow_raw => Ok(Arc::new(raw::Raw::open(path, opts)?)),
        _ => Err(Error::corrupt(path, Defect::NotAnImage)),
    }
}

/// Test-only crash simulation: after N more writes on this thread, every write fails,
/// as if the machine stopped there. Tests open, write and flush an image with it set,
/// then reopen the file as it was left at that point.
#[cfg(test)]
pub(crate) mod crash_sim {
    use std::cell::Cell;

    thread_local! {
        static LEFT: Cell<Option<usize>> = const { Cell::new(None) };
        static COUNT: Cell<usize> = const { Cell::new(0) };
        static FAIL_SYNC: Cell<bool> = const { Cell::new(false) };
    }

    /// Make every fdatasync on this thread fail (a writeback error) or work again.
    pub fn fail_sync(on: bool) {
        FAIL_SYNC.with(|f| f.set(on));
    }

    pub(super) fn sync_fails() -> bool {
        FAIL_SYNC.with(|f| f.get())
    }

    /// Let `n` more writes through, then fail all (None: no limit).
    pub fn fail_after(n: Option<usize>) {
        LEFT.with(|l| l.set(n));
        COUNT.with(|c| c.set(0));
    }

    /// Writes attempted since `fail_after`.
    pub fn writes() -> usize {
        COUNT.with(|c| c.get())
    }

    pub(super) fn write_fails() -> bool {
        COUNT.with(|c| c.set(c.get() + 1));
        LEFT.with(|l| match l.get() {
            None => false,
            Some(0) => true,
            Some(n) => {
                l.set(Some(n - 1));
                false
            }
        })
    }
}
