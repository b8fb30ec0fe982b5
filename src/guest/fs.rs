//! Which file system starts at a byte offset of the disk, by its on-disk signature, with
//! its label and UUID where they are cheap to read (a few sectors, at most one NTFS MFT
//! record or one exFAT directory cluster).
//!
//! Written from the formats' specifications (Microsoft's FAT and exFAT specifications,
//! the NTFS boot sector and MFT record layout, the ext4, XFS and Btrfs superblocks,
//! LVM2's label header, the Linux swap header). The `kind` strings are the TYPE names
//! blkid uses, so the two can be compared; `display_name` is for people.
//!
//! Everything read is guest data: every offset is checked against the region, every read
//! is bounded, and nothing here can loop on what it reads.

use super::{read_vec, ReadAt};

/// What was found at a partition's (or the disk's) start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    /// blkid's TYPE: ntfs, vfat, exfat, ext2, ext3, ext4, jbd, xfs, btrfs, BitLocker,
    /// LVM2_member, swap.
    pub kind: &'static str,
    /// blkid's VERSION where it says something a person wants: FAT12, FAT16, FAT32.
    pub version: Option<&'static str>,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

impl FsInfo {
    /// The name to show a person: NTFS, FAT32, exFAT, ext4, XFS, Btrfs, BitLocker,
    /// LVM2 PV, Linux swap.
    pub fn display_name(&self) -> &'static str {
        match self.kind {
            "ntfs" => "NTFS",
            "vfat" => self.version.unwrap_or("FAT"),
            "exfat" => "exFAT",
            "xfs" => "XFS",
            "btrfs" => "Btrfs",
            "LVM2_member" => "LVM2 PV",
            "swap" => "Linux swap",
            "jbd" => "ext3/4 external journal",
            other => other,
        }
    }
}

/// A byte range of the source: reads outside it, or that fail, are `None`.
struct Region<'a> {
    src: &'a dyn ReadAt,
    start: u64,
    len: u64,
}

impl Region<'_> {
    fn read(&self, off: u64, n: usize) -> Option<Vec<u8>> {
        let end = off.checked_add(n as u64)?;
        if end > self.len {
            return None;
        }
        read_vec(self.src, self.start.checked_add(off)?, n).ok()
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// A fixed-size, space- or NUL-padded byte label; None when empty.
fn byte_label(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]);
    let s = s.trim_end_matches(' ');
    (!s.is_empty()).then(|| s.to_string())
}

/// UTF-16LE code units to a string (lossy), stopping at a NUL.
fn utf16_label(b: &[u8]) -> Option<String> {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let s = String::from_utf16_lossy(&units);
    (!s.is_empty()).then_some(s)
}

/// A 16-byte UUID as stored by ext/XFS/Btrfs/swap (big-endian text order); None if all zero.
fn uuid_be(b: &[u8]) -> Option<String> {
    let a: [u8; 16] = b.try_into().ok()?;
    (a != [0; 16]).then(|| uuid::Uuid::from_bytes(a).hyphenated().to_string())
}

/// A FAT/exFAT volume serial number as blkid shows it: XXXX-XXXX.
fn serial32(s: u32) -> String {
    format!("{:04X}-{:04X}", s >> 16, s & 0xffff)
}

/// The file system starting at byte `start` of `src`, within `len` bytes.
pub fn probe(src: &dyn ReadAt, start: u64, len: u64) -> Option<FsInfo> {
    let r = Region { src, start, len };
    let b0 = r.read(0, 512);
    if let Some(b0) = &b0 {
        if let Some(fs) = boot_sector(&r, b0) {
            return Some(fs);
        }
        if &b0[0..4] == b"XFSB" {
            return Some(FsInfo {
                kind: "xfs",
                version: None,
                label: byte_label(&b0[108..120]),
                uuid: uuid_be(&b0[32..48]),
            });
        }
    }
    lvm2(&r)
        .or_else(|| ext(&r))
        .or_else(|| btrfs(&r))
        .or_else(|| swap(&r))
}

/// Whether a sector 0 is a volume boot record (NTFS, exFAT, FAT, BitLocker) rather than a
/// partition table: such a disk is a "superfloppy" with no table.
pub fn is_volume_boot_record(sector0: &[u8]) -> bool {
    sector0.len() >= 512 && boot_sector_kind(sector0).is_some()
}

#[derive(Clone, Copy)]
enum Vbr {
    Ntfs,
    Exfat,
    BitLocker,
    Fat,
}

fn boot_sector_kind(b: &[u8]) -> Option<Vbr> {
    match &b[3..11] {
        b"NTFS    " => return Some(Vbr::Ntfs),
        b"EXFAT   " => return Some(Vbr::Exfat),
        b"-FVE-FS-" => return Some(Vbr::BitLocker),
        _ => {}
    }
    let jump = (b[0] == 0xEB && b[2] == 0x90) || b[0] == 0xE9;
    let fat_string = b[0x36..0x39] == *b"FAT" || b[0x52..0x57] == *b"FAT32";
    (jump && fat_string && fat_bpb(b).is_some()).then_some(Vbr::Fat)
}

fn boot_sector(r: &Region, b: &[u8]) -> Option<FsInfo> {
    match boot_sector_kind(b)? {
        Vbr::Ntfs => Some(ntfs(r, b)),
        Vbr::Exfat => Some(exfat(r, b)),
        Vbr::BitLocker => Some(FsInfo {
            kind: "BitLocker",
            version: None,
            label: None,
            uuid: None,
        }),
        Vbr::Fat => fat(b),
    }
}

/// FAT BIOS parameter block: (is FAT32 layout, FAT12/16/32 by the specification's rule).
fn fat_bpb(b: &[u8]) -> Option<(bool, &'static str)> {
    let bps = u64::from(u16_at(b, 0x0B));
    let spc = u64::from(b[0x0D]);
    let reserved = u64::from(u16_at(b, 0x0E));
    let fats = u64::from(b[0x10]);
    let root_entries = u64::from(u16_at(b, 0x11));
    let total16 = u64::from(u16_at(b, 0x13));
    let fat16 = u64::from(u16_at(b, 0x16));
    let total32 = u64::from(u32_at(b, 0x20));
    let fat32 = u64::from(u32_at(b, 0x24));
    if !(512..=4096).contains(&bps)
        || !bps.is_power_of_two()
        || spc == 0
        || !spc.is_power_of_two()
        || reserved == 0
        || fats == 0
    {
        return None;
    }
    let fat_size = if fat16 != 0 { fat16 } else { fat32 };
    let total = if total16 != 0 { total16 } else { total32 };
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let meta = reserved + fats * fat_size + root_sectors;
    if fat_size == 0 || meta >= total {
        return None;
    }
    let clusters = (total - meta) / spc;
    // The layout decides FAT32 (no 16-bit FAT size, an extended BPB at 0x40); between
    // FAT12 and FAT16 the cluster count does, as the specification says.
    let version = if fat16 == 0 {
        "FAT32"
    } else if clusters < 4085 {
        "FAT12"
    } else {
        "FAT16"
    };
    Some((fat16 == 0, version))
}

fn fat(b: &[u8]) -> Option<FsInfo> {
    let (is32, version) = fat_bpb(b)?;
    let ext = if is32 { 0x40 } else { 0x24 };
    // Extended boot signature 0x29: serial and label follow; 0x28: only the serial.
    let sig = b[ext + 2];
    let uuid = (sig == 0x29 || sig == 0x28).then(|| serial32(u32_at(b, ext + 3)));
    let label = (sig == 0x29)
        .then(|| byte_label(&b[ext + 7..ext + 18]))
        .flatten()
        .filter(|l| l != "NO NAME");
    Some(FsInfo {
        kind: "vfat",
        version: Some(version),
        label,
        uuid,
    })
}

fn ntfs(r: &Region, b: &[u8]) -> FsInfo {
    let serial = u64_at(b, 0x48);
    FsInfo {
        kind: "ntfs",
        version: None,
        label: ntfs_label(r, b),
        uuid: (serial != 0).then(|| format!("{serial:016X}")),
    }
}

/// The volume name: the $VOLUME_NAME attribute (0x60) of MFT record 3 ($Volume).
fn ntfs_label(r: &Region, b: &[u8]) -> Option<String> {
    let bps = u64::from(u16_at(b, 0x0B));
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() {
        return None;
    }
    let spc = match b[0x0D] {
        0 => return None,
        n @ 1..=0x80 => u64::from(n),
        // Clusters above 64 KiB: the byte is a negative power of two.
        n => 1u64.checked_shl(256 - u32::from(n))?,
    };
    let cluster = bps.checked_mul(spc)?;
    let per_record = b[0x40] as i8;
    let record = if per_record > 0 {
        cluster.checked_mul(per_record as u64)?
    } else {
        1u64.checked_shl(u32::from(per_record.unsigned_abs()))?
    };
    if !(512..=65536).contains(&record) {
        return None;
    }
    let mft = u64_at(b, 0x30).checked_mul(cluster)?;
    let mut rec = r.read(mft.checked_add(3 * record)?, record as usize)?;
    if &rec[0..4] != b"FILE" {
        return None;
    }
    // Update sequence: the last two bytes of every 512-byte stride hold the sequence
    // number; the originals are in the array after it.
    let usa = usize::from(u16_at(&rec, 4));
    let usa_count = usize::from(u16_at(&rec, 6));
    if usa_count == 0 || usa + usa_count * 2 > rec.len() || (usa_count - 1) * 512 > rec.len() {
        return None;
    }
    let usn = [rec[usa], rec[usa + 1]];
    for i in 1..usa_count {
        let end = i * 512;
        if rec[end - 2..end] != usn {
            return None;
        }
        let orig = [rec[usa + 2 * i], rec[usa + 2 * i + 1]];
        rec[end - 2..end].copy_from_slice(&orig);
    }
    let mut off = usize::from(u16_at(&rec, 0x14));
    while off + 24 <= rec.len() {
        let kind = u32_at(&rec, off);
        if kind == 0xFFFF_FFFF {
            break;
        }
        let alen = u32_at(&rec, off + 4) as usize;
        if alen < 24 || off + alen > rec.len() {
            break;
        }
        if kind == 0x60 && rec[off + 8] == 0 {
            let vlen = u32_at(&rec, off + 0x10) as usize;
            let voff = usize::from(u16_at(&rec, off + 0x14));
            if voff + vlen > alen {
                return None;
            }
            return utf16_label(&rec[off + voff..off + voff + vlen]);
        }
        off += alen;
    }
    None
}

fn exfat(r: &Region, b: &[u8]) -> FsInfo {
    FsInfo {
        kind: "exfat",
        version: None,
        label: exfat_label(r, b),
        uuid: Some(serial32(u32_at(b, 0x64))),
    }
}

/// The volume label entry (type 0x83) in the first cluster of the root directory.
fn exfat_label(r: &Region, b: &[u8]) -> Option<String> {
    let bps_shift = u32::from(b[0x6C]);
    let spc_shift = u32::from(b[0x6D]);
    if !(9..=12).contains(&bps_shift) || bps_shift + spc_shift > 25 {
        return None;
    }
    let heap = u64::from(u32_at(b, 0x58)) << bps_shift;
    let root = u64::from(u32_at(b, 0x60));
    if root < 2 {
        return None;
    }
    let cluster = 1u64 << (bps_shift + spc_shift);
    let off = heap.checked_add((root - 2).checked_mul(cluster)?)?;
    let dir = r.read(off, cluster.min(64 << 10) as usize)?;
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0x83 => {
                let n = usize::from(e[1]).min(11);
                return utf16_label(&e[2..2 + 2 * n]);
            }
            _ => {}
        }
    }
    None
}

fn ext(r: &Region) -> Option<FsInfo> {
    let sb = r.read(1024, 1024)?;
    if u16_at(&sb, 0x38) != 0xEF53 {
        return None;
    }
    let (compat, incompat, ro) = if u32_at(&sb, 0x4C) == 0 {
        (0, 0, 0)
    } else {
        (u32_at(&sb, 0x5C), u32_at(&sb, 0x60), u32_at(&sb, 0x64))
    };
    const HAS_JOURNAL: u32 = 0x4;
    const INCOMPAT_FILETYPE: u32 = 0x2;
    const INCOMPAT_RECOVER: u32 = 0x4;
    const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
    const INCOMPAT_META_BG: u32 = 0x10;
    // sparse_super, large_file, btree_dir: what ext2 and ext3 read-only-compat allow.
    const RO_OLD: u32 = 0x1 | 0x2 | 0x4;
    let kind = if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        "jbd"
    } else if compat & HAS_JOURNAL == 0 {
        if incompat & !(INCOMPAT_FILETYPE | INCOMPAT_META_BG) == 0 && ro & !RO_OLD == 0 {
            "ext2"
        } else {
            "ext4"
        }
    } else if incompat & !(INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG) == 0
        && ro & !RO_OLD == 0
    {
        "ext3"
    } else {
        "ext4"
    };
    Some(FsInfo {
        kind,
        version: None,
        label: byte_label(&sb[0x78..0x88]),
        uuid: uuid_be(&sb[0x68..0x78]),
    })
}

fn btrfs(r: &Region) -> Option<FsInfo> {
    let sb = r.read(0x10000, 0x22B + 1)?;
    if &sb[0x40..0x48] != b"_BHRfS_M" {
        return None;
    }
    Some(FsInfo {
        kind: "btrfs",
        version: None,
        label: byte_label(&sb[0x12B..0x22B]),
        uuid: uuid_be(&sb[0x20..0x30]),
    })
}

fn swap(r: &Region) -> Option<FsInfo> {
    for page in [4096u64, 8192, 16384, 65536] {
        let Some(sig) = r.read(page - 10, 10) else {
            continue;
        };
        if sig != *b"SWAPSPACE2" && sig != *b"SWAP-SPACE" {
            continue;
        }
        // Version 1 header after the 1024 boot bytes: version, last page, bad pages,
        // UUID, label.
        let h = r.read(1024, 44);
        let (label, uuid) = match &h {
            Some(h) if sig == *b"SWAPSPACE2" && u32_at(h, 0) == 1 => {
                (byte_label(&h[28..44]), uuid_be(&h[12..28]))
            }
            _ => (None, None),
        };
        return Some(FsInfo {
            kind: "swap",
            version: None,
            label,
            uuid,
        });
    }
    None
}

fn lvm2(r: &Region) -> Option<FsInfo> {
    for sector in 0..4u64 {
        let s = r.read(sector * 512, 512)?;
        if &s[0..8] != b"LABELONE" || u64_at(&s, 8) != sector || &s[24..32] != b"LVM2 001" {
            continue;
        }
        let off = u32_at(&s, 20) as usize;
        let uuid = s.get(off..off + 32).and_then(|id| {
            if !id.iter().all(u8::is_ascii_alphanumeric) {
                return None;
            }
            let id = std::str::from_utf8(id).ok()?;
            // LVM shows its 32-character ids in groups of 6-4-4-4-4-4-6.
            let mut out = String::new();
            let mut pos = 0;
            for (i, n) in [6, 4, 4, 4, 4, 4, 6].into_iter().enumerate() {
                if i > 0 {
                    out.push('-');
                }
                out.push_str(&id[pos..pos + n]);
                pos += n;
            }
            Some(out)
        });
        return Some(FsInfo {
            kind: "LVM2_member",
            version: None,
            label: None,
            uuid,
        });
    }
    None
}
