//! The merged view over a chain: reads fall through the layers top to base, writes go
//! to the top layer only.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::cache::BlockCache;
use crate::chain::Chain;
use crate::error::{Defect, Error, Result};
use crate::layer::{Layer, Run};

/// Cache settings for the parent layers.
#[derive(Debug, Clone, Copy)]
pub struct DiskOptions {
    /// Bytes of parent data to cache; 0 turns the cache off.
    pub cache_bytes: u64,
    /// Cache granularity (power of two, at least 4 KiB).
    pub cache_block: u64,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            cache_bytes: 256 << 20,
            cache_block: 64 << 10,
        }
    }
}

pub struct Disk {
    chain: Chain,
    size: u64,
    sector: u64,
    cache: Option<BlockCache>,
    /// Bytes read from each layer's file (index = chain level).
    layer_bytes: Vec<AtomicU64>,
    zero_bytes: AtomicU64,
    written_bytes: AtomicU64,
    /// Serialises read-modify-write of partial sectors.
    rmw: Mutex<()>,
}

impl Disk {
    pub fn new(chain: Chain, opts: DiskOptions) -> Self {
        let size = chain.top().virtual_size();
        let sector = chain.top().logical_sector_size() as u64;
        // The cache assumes parents never change: none when another process was
        // writing one at open (a read-only look at a live system).
        let live_parent = chain
            .layers
            .iter()
            .skip(1)
            .any(|l| l.written_by().is_some());
        let cache = if chain.layers.len() > 1 && !live_parent {
            BlockCache::new(opts.cache_bytes, opts.cache_block.max(4096))
        } else {
            None
        };
        let layer_bytes = chain.layers.iter().map(|_| AtomicU64::new(0)).collect();
        Disk {
            chain,
            size,
            sector,
            cache,
            layer_bytes,
            zero_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            rmw: Mutex::new(()),
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn is_writable(&self) -> bool {
        self.chain.top().writable().is_some()
    }

    /// Read at `offset`; returns the number of bytes read, short only at the end of the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        self.read_level(0, offset, &mut buf[..n])?;
        Ok(n)
    }

    /// Fill `buf` with the merged view of `layers[level..]` at `offset`.
    fn read_level(&self, level: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(layer) = self.chain.layers.get(level) else {
            // Below the base: zeros.
            buf.fill(0);
            return Ok(());
        };
        let lsize = layer.virtual_size();
        if offset >= lsize {
            // A child larger than its parent reads zeros past the parent's end.
            buf.fill(0);
            return Ok(());
        }
        let n = (buf.len() as u64).min(lsize - offset) as usize;
        buf[n..].fill(0);
        let mut runs = Vec::new();
        layer.map(offset, n as u64, &mut runs)?;
        let total: u64 = runs.iter().map(Run::len).sum();
        if total != n as u64 {
            return Err(Error::corrupt(
                layer.path(),
                Defect::MapLength {
                    len: n,
                    offset,
                    described: total,
                },
            ));
        }
        let mut pos = 0usize;
        for run in runs {
            let len = run.len() as usize;
            let dst = &mut buf[pos..pos + len];
            let voff = offset + pos as u64;
            match run {
                Run::Held { file_offset, .. } => {
                    layer.read_held(file_offset, dst)?;
                    self.layer_bytes[level].fetch_add(len as u64, Ordering::Relaxed);
                }
                Run::Zero { .. } => {
                    dst.fill(0);
                    self.zero_bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                Run::Absent { .. } => {
                    if level == 0 && self.cache.is_some() {
                        self.read_parents_cached(voff, dst)?;
                    } else {
                        self.read_level(level + 1, voff, dst)?;
                    }
                }
            }
            pos += len;
        }
        Ok(())
    }

    /// The ranges of `[offset, offset + len)` that some layer holds data for (the upper
    /// layer deciding, as reads do), appended to `out` in order and merged when
    /// contiguous. Everything outside them reads as zeros. Reads no payload data, so a
    /// caller can visit a chain's data in time proportional to the data, not the size.
    pub fn data_ranges(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        self.data_ranges_level(0, offset, end - offset, out)
    }

    fn data_ranges_level(
        &self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let Some(layer) = self.chain.layers.get(level) else {
            return Ok(());
        };
        let lsize = layer.virtual_size();
        if offset >= lsize {
            return Ok(());
        }
        let n = len.min(lsize - offset);
        let mut runs = Vec::new();
        layer.data_map(offset, n, &mut runs)?;
        let mut pos = offset;
        for run in runs {
            let rlen = run.len();
            match run {
                Run::Held { .. } => match out.last_mut() {
                    Some((o, l)) if *o + *l == pos => *l += rlen,
                    _ => out.push((pos, rlen)),
                },
                Run::Zero { .. } => {}
                Run::Absent { .. } => self.data_ranges_level(level + 1, pos, rlen, out)?,
            }
            pos += rlen;
        }
        if pos != offset + n {
            return Err(Error::corrupt(
                layer.path(),
                format!(
                    "internal: map of {n} bytes at {offset} described {} bytes (damaged allocation tables?)",
                    pos - offset
                ),
            ));
        }
        Ok(())
    }

    /// Read the merged view of the parents (`layers[1..]`) through the block cache.
    fn read_parents_cached(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cache = self.cache.as_ref().expect("caller checked");
        let cb = cache.block_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / cb;
            let start = index * cb;
            let in_block = (pos - start) as usize;
            let n = (cb as usize - in_block).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            let block = match cache.get(index) {
                Some(b) => b,
                // A request that covers the whole block reads straight into the caller's
                // buffer and leaves the cache alone: a sequential scan neither pays for
                // a copy nor evicts the blocks random readers keep coming back to.
                None if n as u64 == cb => {
                    // Take the following whole blocks that are not cached along, so a
                    // 1 MiB request costs one pass through the parents, not sixteen.
                    let mut run = n;
                    while done + run + n <= buf.len() && cache.probe_miss(index + (run / n) as u64)
                    {
                        run += n;
                    }
                    self.read_level(1, start, &mut buf[done..done + run])?;
                    done += run;
                    continue;
                }
                None => {
                    let blen = cb.min(self.size - start) as usize;
                    let mut v = vec![0u8; blen];
                    self.read_level(1, start, &mut v)?;
                    let b = Arc::new(v);
                    cache.insert(index, b.clone());
                    b
                }
            };
            dst.copy_from_slice(&block[in_block..in_block + n]);
            done += n;
        }
        Ok(())
    }

    /// Write at `offset` into the top layer; returns bytes written (short at the end of
    /// the disk). Unaligned edges are read-modify-written from the merged view.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let top = self.chain.top();
        let Some(w) = top.writable() else {
            return Err(Error::io(
                top.path(),
                "write",
                offset,
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        };
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(Error::io(
                top.path(),
                "write past the end of the virtual disk",
                offset,
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        let n = (data.len() as u64).min(self.size - offset) as usize;
        let data = &data[..n];
        let s = (w.write_granularity() as u64).max(self.sector);
        let end = offset + n as u64;
        if offset.is_multiple_of(s) && (end.is_multiple_of(s) || end == self.size) {
            w.write(offset, data)?;
        } else {
            // Widen to whole write units (clamped to the disk's end, which is a whole
            // number of sectors), filling the edges from the current merged view.
            let _guard = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
            let a_start = offset - offset % s;
            let a_end = (end.div_ceil(s) * s).min(self.size);
            let mut buf = vec![0u8; (a_end - a_start) as usize];
            let head = (offset - a_start) as usize;
            if head != 0 {
                let l = buf.len().min(s as usize);
                self.read_level(0, a_start, &mut buf[..l])?;
            }
            if a_end != end {
                let last = ((a_end - 1 - a_start) / s * s) as usize;
                self.read_level(0, a_start + last as u64, &mut buf[last..])?;
            }
            buf[head..head + n].copy_from_slice(data);
            w.write(a_start, &buf)?;
        }
        self.written_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Discard `[offset, offset + len)` in the top layer (clamped to the disk): afterwards
    /// it reads zeros. The whole write units inside go to `WritableLayer::discard`
    /// (which gives space back); the unaligned edges get zeros written (read-modify-write
    /// by `write_at`). Durable at the next flush.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let top = self.chain.top();
        let Some(w) = top.writable() else {
            return Err(Error::io(
                top.path(),
                "discard",
                offset,
                io::Error::from_raw_os_error(libc::EROFS),
            ));
        };
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let s = (w.write_granularity() as u64).max(self.sector);
        let a = offset.div_ceil(s) * s;
        // The disk's end is a whole number of sectors, and counts as a unit boundary.
        let b = if end == self.size { end } else { end / s * s };
        let zeros = |from: u64, to: u64| -> Result<()> {
            if from < to {
                self.write_at(from, &vec![0u8; (to - from) as usize])?;
            }
            Ok(())
        };
        if a >= b {
            return zeros(offset, end);
        }
        zeros(offset, a)?;
        self.discard_units(w, a, b)?;
        zeros(b, end)
    }

    /// `w.discard` of `[a, b)` (whole write units), leaving out the 1 MiB pieces that
    /// already read zeros because the top does not hold them and no parent has data
    /// there: a differencing VHD has no zero state, so discarding those would allocate
    /// blocks only to say "zeros" (mkfs and fstrim discard whole free areas).
    fn discard_units(&self, w: &dyn crate::layer::WritableLayer, a: u64, b: u64) -> Result<()> {
        if self.chain.layers.len() == 1 {
            return w.discard(a, b - a);
        }
        const PIECE: u64 = 1 << 20;
        let top = self.chain.top();
        let mut runs = Vec::new();
        let mut data = Vec::new();
        // Start of the pending range still to be discarded.
        let mut pending: Option<u64> = None;
        let mut pos = a;
        while pos < b {
            let next = ((pos / PIECE + 1) * PIECE).min(b);
            runs.clear();
            top.map(pos, next - pos, &mut runs)?;
            let absent = runs.iter().all(|r| matches!(r, Run::Absent { .. }));
            let skip = absent && {
                data.clear();
                self.data_ranges_level(1, pos, next - pos, &mut data)?;
                data.is_empty()
            };
            match (skip, pending) {
                (true, Some(p)) => {
                    w.discard(p, pos - p)?;
                    pending = None;
                }
                (false, None) => pending = Some(pos),
                _ => {}
            }
            pos = next;
        }
        if let Some(p) = pending {
            w.discard(p, b - p)?;
        }
        Ok(())
    }

    /// Make all writes durable.
    pub fn flush(&self) -> Result<()> {
        match self.chain.top().writable() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Flush and leave the top image clean (unmount, end of a command).
    pub fn close(&self) -> Result<()> {
        match self.chain.top().writable() {
            Some(w) => w.close(),
            None => Ok(()),
        }
    }

    /// Counters as text (the `.stats` file and the `-v` exit log).
    pub fn stats_text(&self) -> String {
        let mut s = String::new();
        if let Some(c) = &self.cache {
            s.push_str(&format!(
                "cache_hits {}\ncache_misses {}\ncache_block {}\n",
                c.hits.load(Ordering::Relaxed),
                c.misses.load(Ordering::Relaxed),
                c.block_size()
            ));
        } else {
            s.push_str("cache off\n");
        }
        for (i, (l, b)) in self.chain.layers.iter().zip(&self.layer_bytes).enumerate() {
            s.push_str(&format!(
                "layer{i}_bytes {} {}\n",
                b.load(Ordering::Relaxed),
                l.path().display()
            ));
        }
        s.push_str(&format!(
            "zero_bytes {}\nwritten_bytes {}\n",
            self.zero_bytes.load(Ordering::Relaxed),
            self.written_bytes.load(Ordering::Relaxed)
        ));
        s
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.chain.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::vhdx::tests::{new_base, new_child, open_chain, random_writes, Rng, TempDir};

    fn disk(path: &std::path::Path, writable: bool, cache_bytes: u64) -> Disk {
        Disk::new(
            open_chain(path, writable),
            DiskOptions {
                cache_bytes,
                cache_block: 64 << 10,
            },
        )
    }

    /// Reads through the parent cache (whole blocks, runs of blocks, partial blocks, hits
    /// and misses) give the same bytes as reads without it, and as a model.
    #[test]
    fn cached_reads_equal_uncached_reads_and_the_model() {
        let d = TempDir::new("disk-cache");
        let size = 12u64 << 20;
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(77);
        let mut prev = d.join("l0.vhdx");
        new_base(&prev, size, 1 << 20, 512);
        for level in 0..3 {
            if level > 0 {
                let img = d.join(format!("l{level}.vhdx"));
                new_child(&img, &prev, Some("1M"));
                prev = img;
            }
            let w = disk(&prev, true, 0);
            random_writes(&w, &mut model, &mut rng, 40, 512);
            w.close().unwrap();
        }
        let cached = disk(&prev, false, 1 << 20);
        let plain = disk(&prev, false, 0);
        for i in 0..400 {
            let len = match i % 4 {
                0 => 4096,
                1 => 1 << 20,
                2 => 64 << 10,
                _ => 1 + rng.below(300_000),
            };
            let off = if i % 3 == 0 {
                rng.below(size / 65536) * 65536
            } else {
                rng.below(size)
            };
            let mut a = vec![0u8; len as usize];
            let mut b = vec![0u8; len as usize];
            let na = cached.read_at(off, &mut a).unwrap();
            let nb = plain.read_at(off, &mut b).unwrap();
            assert_eq!(na, nb);
            assert!(a[..na] == b[..nb], "read {i} at {off} len {len}");
            assert!(
                a[..na] == model[off as usize..off as usize + na],
                "model at {off}"
            );
        }
        let stats = cached.stats_text();
        assert!(
            stats.contains("cache_hits") && !stats.contains("cache_hits 0\n"),
            "the cache was used: {stats}"
        );
    }
}
