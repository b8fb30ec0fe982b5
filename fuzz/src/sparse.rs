//! The "sparse image" encoding shared by the fuzz targets, `fuzz/make_corpus.sh` and the
//! regression tests (integration/hostile.rs includes this file with `#[path]`).
//!
//! Image files are megabytes of mostly zeros (a VHDX has a 1 MiB header section, a log,
//! a metadata region and a BAT region before any data), far too large for a fuzzer to
//! mutate byte by byte. An input therefore describes a sparse file:
//!
//! ```text
//! input  := length:u64le record*
//! record := sector:u32le count:u16le bytes[count]   (bytes at offset sector * 512)
//! ```
//!
//! The file is `length` bytes long (clamped to `MAX_LEN`) and holds zeros except where a
//! record puts bytes. A record offset is taken modulo `MAX_LEN`; a record that would end
//! past the length extends the file; a truncated last record keeps what is there. Every
//! byte string decodes to some file, so no input is wasted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest file an input can describe. Big enough for every structure of a small VHDX
/// to sit where qemu or Hyper-V put it, and for BATs of a few MiB; the file is sparse
/// (tmpfs holes), so it costs no memory.
pub const MAX_LEN: u64 = 256 << 20;

/// One piece of a sparse file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// Decode `input` into (file length, records).
pub fn decode(input: &[u8]) -> (u64, Vec<Record<'_>>) {
    let mut len_bytes = [0u8; 8];
    let n = input.len().min(8);
    len_bytes[..n].copy_from_slice(&input[..n]);
    let mut len = u64::from_le_bytes(len_bytes) % (MAX_LEN + 1);
    let mut rest = &input[n..];
    let mut records = Vec::new();
    while rest.len() >= 6 {
        let sector = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as u64;
        let count = u16::from_le_bytes(rest[4..6].try_into().unwrap()) as usize;
        rest = &rest[6..];
        let take = count.min(rest.len());
        let offset = (sector * 512) % MAX_LEN;
        let bytes = &rest[..take];
        rest = &rest[take..];
        len = len.max(offset + bytes.len() as u64);
        records.push(Record { offset, bytes });
    }
    (len, records)
}

/// Write the file `input` describes to `path` (created or truncated).
pub fn write_file(path: &Path, input: &[u8]) -> io::Result<u64> {
    let (len, records) = decode(input);
    let f = File::create(path)?;
    f.set_len(len)?;
    for r in &records {
        f.write_all_at(r.bytes, r.offset)?;
    }
    Ok(len)
}

/// Encode a real file's bytes (for seeds and regression files): its length, then one
/// record per run of non-zero 512-byte sectors (at most 64 sectors a record).
pub fn encode(file: &[u8]) -> Vec<u8> {
    let mut out = (file.len() as u64).to_le_bytes().to_vec();
    let sectors = file.len().div_ceil(512);
    let sector = |i: usize| &file[i * 512..((i + 1) * 512).min(file.len())];
    let mut i = 0;
    while i < sectors {
        if sector(i).iter().all(|&b| b == 0) {
            i += 1;
            continue;
        }
        let start = i;
        while i < sectors && i - start < 64 && sector(i).iter().any(|&b| b != 0) {
            i += 1;
        }
        let bytes = &file[start * 512..(i * 512).min(file.len())];
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Checksums stop a fuzzer cold: a mutated VHDX header or region table fails its CRC-32C
/// and nothing behind it is reached. Unless the input's length field has bit 63 set
/// (a mode the fuzzer can still choose), the targets recompute the checksums of the
/// structures that carry one: both headers, both region tables, and each log entry the
/// current header's log region holds (entries found at 4 KiB steps by signature).
pub fn fix_checksums_wanted(input: &[u8]) -> bool {
    input.len() < 8 || input[7] & 0x80 == 0
}

pub fn fix_vhdx_checksums(path: &Path) {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let fix = |off: u64, size: usize, sig: &[u8]| -> Option<Vec<u8>> {
        let mut b = vec![0u8; size];
        f.read_exact_at(&mut b, off).ok()?;
        if &b[..4] != sig {
            return None;
        }
        b[4..8].fill(0);
        let crc = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&b[4..8], off + 4).ok()?;
        Some(b)
    };
    let mut logs = Vec::new();
    for off in [64u64 << 10, 128 << 10] {
        if let Some(h) = fix(off, 4096, b"head") {
            let log_len = u32::from_le_bytes(h[68..72].try_into().unwrap()) as u64;
            let log_off = u64::from_le_bytes(h[72..80].try_into().unwrap());
            logs.push((log_off, log_len));
        }
    }
    for off in [192u64 << 10, 256 << 10] {
        fix(off, 64 << 10, b"regi");
    }
    for (log_off, log_len) in logs {
        // Only logs inside the (sparse, at most 256 MiB) file, and at most 16 MiB of them.
        let Some(end) = log_off.checked_add(log_len.min(16 << 20)) else {
            continue;
        };
        if end > len {
            continue;
        }
        let mut pos = log_off;
        while pos + 4096 <= end {
            let mut h = [0u8; 12];
            if f.read_exact_at(&mut h, pos).is_err() {
                break;
            }
            let elen = u32::from_le_bytes(h[8..12].try_into().unwrap()) as u64;
            if &h[..4] == b"loge" && elen >= 4096 && elen.is_multiple_of(4096) && pos + elen <= end
            {
                fix(pos, elen as usize, b"loge");
                pos += elen;
            } else {
                pos += 4096;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut f = vec![0u8; 5000];
        f[3] = 1;
        f[4000] = 2;
        f[4999] = 3;
        let enc = encode(&f);
        let (len, recs) = decode(&enc);
        assert_eq!(len, 5000);
        let mut back = vec![0u8; len as usize];
        for r in recs {
            back[r.offset as usize..r.offset as usize + r.bytes.len()].copy_from_slice(r.bytes);
        }
        assert_eq!(back, f);
    }
}
