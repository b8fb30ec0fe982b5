//! Seed corpus generator (run by fuzz/make_corpus.sh; a normal program, not a fuzz
//! target). Usage: `seedgen OUT_DIR WORK_DIR [IMAGE...]`.
//!
//! Makes, with the library, VHDX and VHD bases and differencing children holding data
//! (including a VHDX copied after a flush and before close, so its log is pending), adds
//! the IMAGE files given (fixtures, qemu-made files), and writes each as a sparse input
//! (fuzz/src/sparse.rs) into OUT_DIR/{vhdx_open,vhd_open,read_anywhere,write_model}.
//!
//! For `partitions`: IMAGE files ending in `.raw` are partitioned disks made by
//! make_corpus.sh with sgdisk and mkfs tools; the hostile tables (past the end,
//! overlapping, EBR loops and runaway chains, hundreds of GPT entries, a bad backup or
//! primary CRC, an absurd entry count) are built here.

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vdiskfs::testing::testutil::{make_crafted_log_test_file, set_log_guid};
use vdiskfs::testing::{read_current_header, ImageFile, LogUpdate, LogWriter};
use vdiskfs::{Chain, ChainOptions, CreateOptions, Disk, DiskOptions, Format, Intent};
use vdiskfs_fuzz::memdisk::crc32;
use vdiskfs_fuzz::sparse;

const MIB: u64 = 1 << 20;
/// Type GUIDs in GPT's mixed-endian byte order.
const BASIC_DATA: [u8; 16] = [
    0xA2, 0xA0, 0xD0, 0xEB, 0xE5, 0xB9, 0x33, 0x44, 0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99, 0xC7,
];
const ESP: [u8; 16] = [
    0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
];

fn entry(boot: u8, sys: u8, start: u32, sectors: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = boot;
    e[4] = sys;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    e
}

/// An MBR-layout sector (MBR or EBR) at `lba`.
fn table(img: &mut [u8], lba: u64, entries: &[[u8; 16]]) {
    let b = (lba * 512) as usize;
    for (i, e) in entries.iter().enumerate() {
        img[b + 446 + 16 * i..b + 462 + 16 * i].copy_from_slice(e);
    }
    img[b + 510] = 0x55;
    img[b + 511] = 0xAA;
}

/// A disk with a protective MBR and both GPT copies (valid CRCs); `n` entries.
fn gpt(size: u64, ss: u64, parts: &[([u8; 16], u64, u64)], n: u32) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    let sectors = size / ss;
    table(&mut img, 0, &[entry(0, 0xEE, 1, (sectors - 1) as u32)]);
    let mut array = vec![0u8; n as usize * 128];
    for (i, (t, first, last)) in parts.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(t);
        e[16..20].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (j, c) in "part".encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
        }
    }
    let asec = (array.len() as u64).div_ceil(ss);
    for (my, alt, elba) in [(1, sectors - 1, 2), (sectors - 1, 1, sectors - 1 - asec)] {
        img[(elba * ss) as usize..][..array.len()].copy_from_slice(&array);
        let mut h = vec![0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&[0, 0, 1, 0]);
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&(2 + asec).to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 2 - asec).to_le_bytes());
        h[56..72].copy_from_slice(&[0x5A; 16]);
        h[72..80].copy_from_slice(&elba.to_le_bytes());
        h[80..84].copy_from_slice(&n.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&array).to_le_bytes());
        let c = crc32(&h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        img[(my * ss) as usize..][..92].copy_from_slice(&h);
    }
    img
}

/// (name, flags, disk) seeds for the partitions target.
fn partition_seeds() -> Vec<(&'static str, u8, Vec<u8>)> {
    let mut v = Vec::new();
    // MBR: Windows' two NTFS partitions and an extended one with three logicals.
    let mut m = vec![0u8; (8 * MIB) as usize];
    table(
        &mut m,
        0,
        &[
            entry(0x80, 0x07, 2048, 2048),
            entry(0, 0x07, 4096, 4096),
            entry(0, 0x0F, 8192, 8192),
        ],
    );
    table(
        &mut m,
        8192,
        &[entry(0, 0x83, 1, 100), entry(0, 0x05, 200, 300)],
    );
    table(
        &mut m,
        8392,
        &[entry(0, 0x0B, 1, 100), entry(0, 0x05, 400, 300)],
    );
    table(&mut m, 8592, &[entry(0, 0x82, 1, 100)]);
    v.push(("mbr-logical", 0, m.clone()));
    // The third EBR links back to the first.
    let mut l = m.clone();
    table(
        &mut l,
        8592,
        &[entry(0, 0x82, 1, 100), entry(0, 0x05, 200, 10)],
    );
    v.push(("ebr-loop", 0, l));
    // A chain of 300 EBRs, one per sector.
    let mut c = vec![0u8; (8 * MIB) as usize];
    table(&mut c, 0, &[entry(0, 0x05, 2048, 8192)]);
    for k in 0..300u32 {
        table(
            &mut c,
            2048 + u64::from(k),
            &[entry(0, 0x83, 8000 - k, 1), entry(0, 0x05, k + 1, 1)],
        );
    }
    v.push(("ebr-runaway", 0, c));
    // Past the end, over the table, overlapping.
    let mut p = vec![0u8; (8 * MIB) as usize];
    table(
        &mut p,
        0,
        &[
            entry(0, 0x07, 2048, u32::MAX),
            entry(0, 0x07, u32::MAX, u32::MAX),
            entry(0, 0x83, 4000, 100),
            entry(0, 0x83, 0, 1),
        ],
    );
    v.push(("mbr-past-end-overlap", 0, p));
    // GPT: Windows' four partitions.
    let win = [
        (ESP, 2048, 6143),
        (
            [
                0x16, 0xE3, 0xC9, 0xE3, 0x5C, 0x0B, 0xB8, 0x4D, 0x81, 0x7D, 0xF9, 0x2D, 0xF0, 0x02,
                0x15, 0xAE,
            ],
            6144,
            8191,
        ),
        (BASIC_DATA, 8192, 14335),
        (
            [
                0xA4, 0xBB, 0x94, 0xDE, 0xD1, 0x06, 0x40, 0x4D, 0xA1, 0x6A, 0xBF, 0xD5, 0x01, 0x79,
                0xD6, 0xAC,
            ],
            14336,
            16349,
        ),
    ];
    let g = gpt(8 * MIB, 512, &win, 128);
    v.push(("gpt-windows", 0, g.clone()));
    // Backup header CRC broken (CRCs kept as they are: flag 2).
    let mut b = g.clone();
    b[(8 * MIB - 512 + 16) as usize] ^= 1;
    v.push(("gpt-bad-backup-crc", 2, b));
    // Primary array changed: its CRC no longer matches; the backup serves.
    let mut pa = g.clone();
    pa[2 * 512 + 40] ^= 0x10;
    v.push(("gpt-bad-primary-array", 2, pa));
    // An absurd entry count in the primary (its CRC recomputed by the target).
    let mut h = g.clone();
    h[512 + 80..512 + 84].copy_from_slice(&(1u32 << 30).to_le_bytes());
    v.push(("gpt-huge-count", 0, h));
    // Hundreds of entries.
    let many: Vec<_> = (0..300u64)
        .map(|i| (BASIC_DATA, 2048 + i * 8, 2048 + i * 8 + 7))
        .collect();
    v.push(("gpt-300-entries", 0, gpt(8 * MIB, 512, &many, 512)));
    // Past the end, backwards, at LBA 0, overlapping.
    let odd = [
        (BASIC_DATA, 0, 99),
        (BASIC_DATA, 0, 9),
        (BASIC_DATA, 500, 400),
        (BASIC_DATA, 4096, 1 << 40),
        (BASIC_DATA, 1 << 40, (1 << 40) + 10),
        (BASIC_DATA, 0, u64::MAX),
    ];
    v.push(("gpt-odd-ranges", 0, gpt(8 * MIB, 512, &odd, 128)));
    // 4 KiB sectors (flag 1).
    v.push((
        "gpt-4k",
        1,
        gpt(8 * MIB, 4096, &[(BASIC_DATA, 256, 1023)], 128),
    ));
    v
}

fn create(image: &Path, parent: Option<&Path>, size: Option<u64>, block: u32, lss: Option<u32>) {
    let fmt = if image.extension().is_some_and(|e| e == "vhd") {
        Format::Vhd
    } else {
        Format::Vhdx
    };
    vdiskfs::create(
        image,
        &CreateOptions {
            format: Some(fmt),
            parent: parent.map(Path::to_path_buf),
            size: size.unwrap_or(0),
            block_size: Some(block),
            logical_sector_size: lss,
        },
    )
    .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
}

fn writable(p: &Path) -> Disk {
    let c = Chain::open(
        p,
        &ChainOptions {
            intent: Intent::WriteTop,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    Disk::new(c, DiskOptions::default())
}

fn fill(d: &Disk, writes: &[(u64, usize, u8)]) {
    for &(off, len, b) in writes {
        let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8)).collect();
        d.write_at(off, &data).expect("write");
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (out, work) = (&args[0], &args[1]);
    fs::create_dir_all(work).unwrap();
    let mut images: Vec<PathBuf> = args[2..].to_vec();

    for (ext, block, lss) in [
        ("vhdx", 1 << 20, 512),
        ("vhdx", 1 << 20, 4096),
        ("vhd", 512 << 10, 512),
    ] {
        let tag = format!("{ext}{lss}");
        let base = work.join(format!("base{tag}.{ext}"));
        let child = work.join(format!("child{tag}.{ext}"));
        let _ = fs::remove_file(&base);
        let _ = fs::remove_file(&child);
        let lss_arg = (ext == "vhdx").then_some(lss);
        create(&base, None, Some(4 << 20), block, lss_arg);
        let empty = work.join(format!("empty{tag}.{ext}"));
        let _ = fs::remove_file(&empty);
        fs::copy(&base, &empty).unwrap();
        images.push(empty);
        let d = writable(&base);
        fill(&d, &[(0, 8192, 1), ((3 << 20) - 4096, 4096, 2)]);
        d.close().unwrap();
        drop(d);
        let with_data = work.join(format!("data{tag}.{ext}"));
        fs::copy(&base, &with_data).unwrap();
        images.push(with_data);
        create(&child, Some(&base), None, block, None);
        let d = writable(&child);
        fill(&d, &[(4096, 4096, 3), ((1 << 20) + 512 * 7, 512 * 3, 4)]);
        d.flush().unwrap();
        if ext == "vhdx" {
            // Flushed but not closed: the metadata updates sit in a pending log.
            let pending = work.join(format!("pending{tag}.{ext}"));
            let _ = fs::remove_file(&pending);
            fs::copy(&child, &pending).unwrap();
            images.push(pending);
        }
        d.close().unwrap();
        drop(d);
        images.push(child);
    }

    for t in ["vhdx_open", "vhd_open", "read_anywhere", "write_model"] {
        fs::create_dir_all(out.join(t)).unwrap();
    }
    // Hostile pending logs (issue 11), in their own compact encoding.
    for (name, enc) in hostile_logs(work) {
        fs::write(out.join("vhdx_open").join(&name), &enc).unwrap();
        eprintln!("seed {name}: {} bytes", enc.len());
    }
    let (raws, images): (Vec<PathBuf>, Vec<PathBuf>) = images
        .into_iter()
        .partition(|p| p.extension().is_some_and(|e| e == "raw"));
    for img in &images {
        let bytes = fs::read(img).unwrap_or_else(|e| panic!("read {}: {e}", img.display()));
        let enc = sparse::encode(&bytes);
        let name = img.file_name().unwrap().to_string_lossy().to_string();
        let vhdx = bytes.starts_with(b"vhdxfile");
        let t = if vhdx { "vhdx_open" } else { "vhd_open" };
        fs::write(out.join(t).join(&name), &enc).unwrap();
        // read_anywhere: the image, three ranges, the count.
        let mut ra = enc.clone();
        for (off, len) in [(0u64, 65536u32), (4096 + 17, 9000), (u64::MAX, 1 << 20)] {
            ra.extend_from_slice(&off.to_le_bytes());
            ra.extend_from_slice(&len.to_le_bytes());
        }
        ra.push(3);
        fs::write(out.join("read_anywhere").join(&name), &ra).unwrap();
        eprintln!("seed {name}: {} bytes from {}", enc.len(), bytes.len());
    }
    // write_model: both formats, aligned and unaligned writes, flushes and reopens.
    for fmt in [0u8, 1] {
        let mut v = vec![fmt];
        for (off, len, seed, flags) in [
            (0u32, 4095u16, 1u8, 0u8),
            (1 << 20, 511, 2, 1),
            ((2 << 20) + 3, 65535, 3, 2),
            ((4 << 20) - 100, 200, 4, 3),
            (700_000, 20_000, 5, 0),
        ] {
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.push(seed);
            v.push(flags);
        }
        fs::write(out.join("write_model").join(format!("ops{fmt}")), &v).unwrap();
    }
    // partitions: a flags byte, then the sparse disk.
    let dir = out.join("partitions");
    fs::create_dir_all(&dir).unwrap();
    let mut seeds: Vec<(String, u8, Vec<u8>)> = partition_seeds()
        .into_iter()
        .map(|(n, f, d)| (n.to_string(), f, d))
        .collect();
    for r in &raws {
        let name = r.file_stem().unwrap().to_string_lossy().to_string();
        seeds.push((name, 0, fs::read(r).unwrap()));
    }
    for (name, flags, disk) in seeds {
        let mut input = vec![flags];
        input.extend(sparse::encode(&disk));
        eprintln!("seed partitions/{name}: {} bytes", input.len());
        fs::write(dir.join(name), &input).unwrap();
    }
}

/// Give the clean VHDX `path` a pending log of one entry of `updates` with LastFileOffset
/// `last` (our log writer, then the header's LogGuid).
fn pending(path: &Path, updates: &[LogUpdate], last: u64) {
    let f = ImageFile::open(path, true).unwrap();
    let (h, _, _) = read_current_header(&f).unwrap();
    let guid = Uuid::new_v4();
    LogWriter::new(h.log_offset, u64::from(h.log_length), guid, 1)
        .write_updates(&f, updates, f.len() / MIB * MIB, last)
        .unwrap();
    drop(f);
    set_log_guid(path, guid).unwrap();
}

fn fresh(path: &Path, parent: Option<&Path>) {
    let _ = fs::remove_file(path);
    if parent.is_some() {
        create(path, parent, None, 1 << 20, None);
    } else {
        create(path, None, Some(4 << 20), 1 << 20, Some(512));
    }
}

/// The hostile files of issue 11. Seeds (returned, encoded): `hostile-log2` (a pending
/// 2 MiB log every 4 KiB slot of which claims the whole log; the scan used to read all of
/// it at every slot, quadratic in the log; the seed's log is kept small because a larger
/// one slows every fuzzing run that mutates it: with an 8 MiB log `vhdx_open` ran 2.5
/// times slower), `hostile-grow` (a pending log whose LastFileOffset is 8 TiB)
/// and `hostile-zero` (a log zeroing 245 MiB of a sparse 250 MiB file, within the
/// 256 MiB an input can describe). Left in WORK_DIR to time and measure:
/// `hostile-log16.vhdx` and `hostile-log64.vhdx` (the same with a 16 and a 64 MiB log:
/// 20 and 68 MiB files),
/// `hostile-log64d.vhdx` (the same with descriptors filling the entry),
/// `hostile-grow.vhdx`, and the chain `hostile-zero1.vhdx` (base) ..
/// `hostile-zero7.vhdx` (top), each layer with such a zeroing log.
fn hostile_logs(work: &Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    // The 64 MiB-log image twice: DescriptorCount 0, and DescriptorCount filling the
    // whole log (16,256 data descriptors in 128 descriptor sectors; the first sector's
    // 126 descriptors plausible), which gets past the header checks. Only the 2 MiB one
    // is a seed.
    for (name, log_len, count) in [
        ("hostile-log2", 2 * MIB, 0),
        ("hostile-log16", 16 * MIB, 0),
        ("hostile-log64", 64 * MIB, 0),
        ("hostile-log64d", 64 * MIB, 16_256),
    ] {
        let p = work.join(format!("{name}.vhdx"));
        fresh(&p, None);
        let (log_at, _) = make_crafted_log_test_file(&p, log_len, count).unwrap();
        if name == "hostile-log2" {
            // The usual encoding would spend a 512-byte record per slot; a slot's
            // header is 48 bytes (31 KB for the seed instead of 270 KB).
            let bytes = fs::read(&p).unwrap();
            let mut enc = sparse::encode(&bytes[..log_at as usize]);
            enc[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            for at in (log_at..log_at + log_len).step_by(4096) {
                enc.extend_from_slice(&((at / 512) as u32).to_le_bytes());
                enc.extend_from_slice(&48u16.to_le_bytes());
                enc.extend_from_slice(&bytes[at as usize..at as usize + 48]);
            }
            seeds.push((name.to_string(), enc));
        }
    }
    let grow = work.join("hostile-grow.vhdx");
    fresh(&grow, None);
    let page = vec![0x5au8; 4096];
    pending(
        &grow,
        &[LogUpdate::Data {
            file_offset: 512 << 10,
            data: &page,
        }],
        8 << 40,
    );
    seeds.push((
        "hostile-grow".into(),
        sparse::encode(&fs::read(&grow).unwrap()),
    ));
    let mut parent: Option<PathBuf> = None;
    for i in 1..=7 {
        let p = work.join(format!("hostile-zero{i}.vhdx"));
        fresh(&p, parent.as_deref());
        parent = Some(p);
    }
    for i in 1..=7 {
        let p = work.join(format!("hostile-zero{i}.vhdx"));
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(250 * MIB)
            .unwrap();
        let zero = LogUpdate::Zero {
            file_offset: 4 * MIB,
            len: 245 * MIB,
        };
        pending(&p, &[zero], 250 * MIB);
        if i == 1 {
            seeds.push((
                "hostile-zero".into(),
                sparse::encode(&fs::read(&p).unwrap()),
            ));
        }
    }
    seeds
}
