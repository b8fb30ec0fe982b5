//! An in-memory disk for the `partitions` target: the sparse encoding's records
//! (fuzz/src/sparse.rs) applied in order over zeros, held as 4 KiB pages (only pages
//! some record touches exist). Nothing touches the file system, so the target is fast.

use std::collections::HashMap;

use vdiskfs::guest::ReadAt;

use crate::sparse;

const PAGE: u64 = 4096;

pub struct MemDisk {
    len: u64,
    pages: HashMap<u64, Box<[u8; PAGE as usize]>>,
}

/// CRC-32 (ISO-HDLC, as GPT uses), bit by bit.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

impl MemDisk {
    pub fn new(input: &[u8]) -> Self {
        let (len, records) = sparse::decode(input);
        let mut d = MemDisk {
            len,
            pages: HashMap::new(),
        };
        for r in records {
            d.write(r.offset, r.bytes);
        }
        d
    }

    fn write(&mut self, mut off: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let page = self
                .pages
                .entry(off / PAGE)
                .or_insert_with(|| Box::new([0; PAGE as usize]));
            let at = (off % PAGE) as usize;
            let n = data.len().min(PAGE as usize - at);
            page[at..at + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            off += n as u64;
        }
    }

    fn read(&self, off: u64, n: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        (self.read_at(off, &mut b).ok()? == n).then_some(b)
    }

    /// Recompute the CRCs of the GPT headers at LBA 1, at the last LBA and where the
    /// primary says its backup is (and of their entry arrays, when an array is at most
    /// 4096 entries of 128 bytes inside the disk), so that mutations reach the entries.
    pub fn fix_gpt_crcs(&mut self, ss: u64) {
        let sectors = self.len / ss;
        if sectors < 3 {
            return;
        }
        let mut lbas = vec![1, sectors - 1];
        if let Some(h) = self.read(ss, 40) {
            let alt = u64::from_le_bytes(h[32..40].try_into().unwrap());
            if alt > 1 && alt < sectors && !lbas.contains(&alt) {
                lbas.push(alt);
            }
        }
        for lba in lbas {
            let Some(mut h) = self.read(lba * ss, ss as usize) else {
                continue;
            };
            if &h[0..8] != b"EFI PART" {
                continue;
            }
            let n = u32::from_le_bytes(h[80..84].try_into().unwrap());
            let esz = u32::from_le_bytes(h[84..88].try_into().unwrap());
            let elba = u64::from_le_bytes(h[72..80].try_into().unwrap());
            if esz == 128 && n <= 4096 && elba < sectors {
                if let Some(a) = self.read(elba * ss, n as usize * 128) {
                    h[88..92].copy_from_slice(&crc32(&a).to_le_bytes());
                }
            }
            let hsize = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
            let hsize = if (92..=ss as usize).contains(&hsize) {
                hsize
            } else {
                92
            };
            h[16..20].fill(0);
            let c = crc32(&h[..hsize]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            self.write(lba * ss, &h);
        }
    }

    /// The whole disk (for seeds; small disks only).
    pub fn to_vec(&self) -> Vec<u8> {
        self.read(0, self.len as usize).unwrap_or_default()
    }
}

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        let mut done = 0;
        while done < n {
            let off = offset + done as u64;
            let at = (off % PAGE) as usize;
            let k = (n - done).min(PAGE as usize - at);
            let dst = &mut buf[done..done + k];
            match self.pages.get(&(off / PAGE)) {
                Some(p) => dst.copy_from_slice(&p[at..at + k]),
                None => dst.fill(0),
            }
            done += k;
        }
        Ok(n)
    }
}
