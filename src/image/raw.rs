//! A raw file as a base layer: every byte is held, at the same offset.

use std::path::Path;

use uuid::Uuid;

use crate::error::{Error, Request, Result};
use crate::image::ImageFile;
use crate::layer::{push_run, Format, Layer, LayerInfo, OpenOptions, ParentRef, Run};

/// `lseek(fd, at, whence)` for SEEK_DATA / SEEK_HOLE: `None` when the file system
/// cannot answer (then the caller treats everything as data), `Some(None)` for ENXIO
/// (no data at or after `at`), `Some(Some(offset))` otherwise.
pub(crate) fn seek(
    file: &std::fs::File,
    at: u64,
    whence: nix::unistd::Whence,
) -> Option<Option<u64>> {
    let at = libc::off_t::try_from(at).ok()?;
    // Moves only the file position, which nothing uses (all I/O is positioned).
    match nix::unistd::lseek(file, at, whence) {
        Ok(r) => Some(Some(r as u64)),
        Err(nix::errno::Errno::ENXIO) => Some(None),
        Err(_) => None,
    }
}

/// Bytes of `file` in `start..start + len` that are holes (not allocated): writing
/// them makes the file system allocate. 0 when the file system cannot tell.
pub(crate) fn hole_bytes(file: &std::fs::File, start: u64, len: u64) -> u64 {
    use nix::unistd::Whence;
    let end = start + len;
    let (mut pos, mut holes) = (start, 0);
    while pos < end {
        let data = match seek(file, pos, Whence::SeekData) {
            None => return holes,
            Some(None) => end,
            Some(Some(d)) => d.min(end),
        };
        holes += data - pos;
        if data >= end {
            break;
        }
        pos = match seek(file, data, Whence::SeekHole) {
            Some(Some(h)) if h > data => h,
            _ => return holes,
        };
    }
    holes
}

pub struct Raw {
    file: ImageFile,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        if opts.writable {
            return Err(Error::Request(Request::RawWritable {
                path: path.to_path_buf(),
            }));
        }
        let file = ImageFile::open_with(path, opts)?;
        let size = file.len();
        Ok(Raw { file, size })
    }
}

impl Layer for Raw {
    fn path(&self) -> &Path {
        &self.file.path
    }
    fn written_by(&self) -> Option<&str> {
        self.file.writer.as_deref()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        push_run(
            runs,
            Run::Held {
                len,
                file_offset: offset,
            },
        );
        Ok(())
    }
    /// Holes of a sparse file (SEEK_DATA / SEEK_HOLE) as zero runs, so converting a
    /// sparse raw image reads only its data. Where the file system cannot tell (or the
    /// file is a device), everything is held.
    fn data_map(&self, offset: u64, len: u64, runs: &mut Vec<Run>) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let Some(data) = seek(&self.file.file, pos, nix::unistd::Whence::SeekData) else {
                push_run(
                    runs,
                    Run::Held {
                        len: end - pos,
                        file_offset: pos,
                    },
                );
                return Ok(());
            };
            // ENXIO (None from a successful seek past the data): no data after pos.
            let data = data.unwrap_or(end).min(end);
            push_run(runs, Run::Zero { len: data - pos });
            if data >= end {
                break;
            }
            let hole = match seek(&self.file.file, data, nix::unistd::Whence::SeekHole) {
                Some(Some(h)) => h.min(end),
                _ => end,
            };
            push_run(
                runs,
                Run::Held {
                    len: hole - data,
                    file_offset: data,
                },
            );
            pos = hole;
        }
        Ok(())
    }
    fn read_held(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, file_offset)
    }
    fn parent(&self) -> Option<&ParentRef> {
        None
    }
    fn linkage_id(&self) -> Option<Uuid> {
        None
    }
    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            disk_type: "raw".into(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            bytes_held: self.size,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A sparse raw file: its holes come back as zero runs, its data as held runs at
    /// the same offsets, and the runs cover exactly the asked range.
    #[test]
    fn data_map_reports_holes_of_a_sparse_file() {
        let p = std::env::temp_dir().join(format!("vdiskfs-raw-{}", Uuid::new_v4().simple()));
        let f = std::fs::File::create(&p).unwrap();
        let mib = 1u64 << 20;
        f.set_len(64 * mib).unwrap();
        f.write_all_at(&[7u8; 4096], 8 * mib).unwrap();
        f.write_all_at(&[9u8; 4096], 40 * mib + 512).unwrap();
        f.sync_all().unwrap();
        let raw = Raw::open(&p, OpenOptions::read_only()).unwrap();
        let mut runs = Vec::new();
        raw.data_map(mib, 60 * mib, &mut runs).unwrap();
        // hole_bytes (merge's space check) agrees: only the written pieces are data.
        let holes = hole_bytes(&f, mib, 60 * mib);
        assert!(
            holes >= 56 * mib && holes <= 60 * mib - 8192,
            "hole_bytes {holes}"
        );
        assert_eq!(hole_bytes(&f, 8 * mib, 4096), 0);
        assert_eq!(hole_bytes(&f, 16 * mib, mib), mib);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.len()).sum::<u64>(),
            60 * mib,
            "{runs:?}"
        );
        let mut pos = mib;
        let mut held = Vec::new();
        for r in &runs {
            if let Run::Held { len, file_offset } = *r {
                assert_eq!(file_offset, pos, "{runs:?}");
                held.push((pos, len));
            }
            pos += r.len();
        }
        // File systems report data in their own block units; each written piece must
        // be inside a held run, and most of the file must be holes (if the file system
        // supports them at all: tmpfs, ext4, xfs, btrfs do).
        for at in [8 * mib, 40 * mib + 512] {
            assert!(
                held.iter().any(|&(o, l)| o <= at && at + 4096 <= o + l),
                "{at} not held: {runs:?}"
            );
        }
        let held_bytes: u64 = held.iter().map(|h| h.1).sum();
        assert!(held_bytes <= 4 * mib, "holes not reported: {runs:?}");
        // map (the read path) still says everything is held.
        let mut all = Vec::new();
        raw.map(0, 64 * mib, &mut all).unwrap();
        assert_eq!(
            all,
            vec![Run::Held {
                len: 64 * mib,
                file_offset: 0
            }]
        );
    }
}
