//! Partition tables and file-system signatures built byte by byte (from the
//! specifications), well-formed and hostile. Real tools' output (sgdisk, mkntfs,
//! mkfs.vfat, mkfs.ext4) is checked against blkid and partx in integration/partitions.rs.

use super::*;

const MIB: u64 = 1 << 20;

/// CRC-32 (ISO-HDLC, as GPT uses), bit by bit: test-only.
pub(crate) fn crc32(data: &[u8]) -> u32 {
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

pub(crate) fn put(img: &mut [u8], off: u64, data: &[u8]) {
    let o = off as usize;
    img[o..o + data.len()].copy_from_slice(data);
}

/// A 16-byte MBR/EBR entry.
pub(crate) fn mbr_entry(boot: u8, sys: u8, start: u32, sectors: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = boot;
    e[4] = sys;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    e
}

/// An MBR-layout sector (MBR or EBR) at `lba` with up to four entries.
pub(crate) fn mbr_sector(img: &mut [u8], lba: u64, ss: u64, entries: &[[u8; 16]]) {
    let base = lba * ss;
    for (i, e) in entries.iter().enumerate() {
        put(img, base + 446 + 16 * i as u64, e);
    }
    put(img, base + 510, &[0x55, 0xAA]);
}

pub(crate) const BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
pub(crate) const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub(crate) const MSR: &str = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE";
pub(crate) const RECOVERY: &str = "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC";

pub(crate) struct GptPart {
    pub type_guid: &'static str,
    pub first: u64,
    pub last: u64,
    pub name: &'static str,
}

pub(crate) fn guid_bytes(s: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(s).unwrap().to_bytes_le()
}

/// GPT header fields a test may bend.
#[derive(Clone)]
pub(crate) struct Hdr {
    pub my_lba: u64,
    pub alt_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub n_entries: u32,
    pub entry_size: u32,
    pub array_crc: Option<u32>,
}

pub(crate) fn gpt_header(img: &mut [u8], ss: u64, h: &Hdr, array: &[u8]) {
    let mut b = vec![0u8; 92];
    b[0..8].copy_from_slice(b"EFI PART");
    b[8..12].copy_from_slice(&[0, 0, 1, 0]);
    b[12..16].copy_from_slice(&92u32.to_le_bytes());
    b[24..32].copy_from_slice(&h.my_lba.to_le_bytes());
    b[32..40].copy_from_slice(&h.alt_lba.to_le_bytes());
    b[40..48].copy_from_slice(&h.first_usable.to_le_bytes());
    b[48..56].copy_from_slice(&h.last_usable.to_le_bytes());
    b[56..72].copy_from_slice(&guid_bytes("11111111-2222-3333-4444-555555555555"));
    b[72..80].copy_from_slice(&h.entries_lba.to_le_bytes());
    b[80..84].copy_from_slice(&h.n_entries.to_le_bytes());
    b[84..88].copy_from_slice(&h.entry_size.to_le_bytes());
    let crc = h.array_crc.unwrap_or_else(|| crc32(array));
    b[88..92].copy_from_slice(&crc.to_le_bytes());
    let hc = crc32(&b);
    b[16..20].copy_from_slice(&hc.to_le_bytes());
    put(img, h.my_lba * ss, &b);
}

pub(crate) fn gpt_array(parts: &[GptPart], n: u32) -> Vec<u8> {
    let mut a = vec![0u8; n as usize * 128];
    for (i, p) in parts.iter().enumerate() {
        let e = &mut a[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&guid_bytes(p.type_guid));
        e[16..32].copy_from_slice(&guid_bytes(&format!(
            "AAAAAAAA-0000-0000-0000-{:012X}",
            i + 1
        )));
        e[32..40].copy_from_slice(&p.first.to_le_bytes());
        e[40..48].copy_from_slice(&p.last.to_le_bytes());
        for (j, u) in p.name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    a
}

/// A disk of `size` bytes with a protective MBR and both GPT copies.
pub(crate) fn gpt_disk(size: u64, ss: u64, parts: &[GptPart], n: u32) -> (Vec<u8>, Hdr, Hdr) {
    let mut img = vec![0u8; size as usize];
    let sectors = size / ss;
    mbr_sector(
        &mut img,
        0,
        ss,
        &[mbr_entry(
            0,
            0xEE,
            1,
            (sectors - 1).min(u32::MAX as u64) as u32,
        )],
    );
    let array = gpt_array(parts, n);
    let array_sectors = (array.len() as u64).div_ceil(ss);
    let primary = Hdr {
        my_lba: 1,
        alt_lba: sectors - 1,
        first_usable: 2 + array_sectors,
        last_usable: sectors - 2 - array_sectors,
        entries_lba: 2,
        n_entries: n,
        entry_size: 128,
        array_crc: None,
    };
    let backup = Hdr {
        my_lba: sectors - 1,
        alt_lba: 1,
        entries_lba: sectors - 1 - array_sectors,
        ..primary.clone()
    };
    put(&mut img, 2 * ss, &array);
    put(&mut img, backup.entries_lba * ss, &array);
    gpt_header(&mut img, ss, &primary, &array);
    gpt_header(&mut img, ss, &backup, &array);
    (img, primary, backup)
}

/// The four partitions of a Generation 2 Windows VM, in MiB.
pub(crate) fn windows_gpt_parts() -> Vec<GptPart> {
    vec![
        GptPart {
            type_guid: ESP,
            first: 2048,
            last: 2048 + 2 * 2048 - 1,
            name: "EFI system partition",
        },
        GptPart {
            type_guid: MSR,
            first: 6144,
            last: 6144 + 2048 - 1,
            name: "Microsoft reserved partition",
        },
        GptPart {
            type_guid: BASIC_DATA,
            first: 8192,
            last: 8192 + 8 * 2048 - 1,
            name: "Basic data partition",
        },
        GptPart {
            type_guid: RECOVERY,
            first: 24576,
            last: 24576 + 2048 - 1,
            name: "",
        },
    ]
}

fn files(l: &Layout) -> Vec<(String, u64, u64)> {
    l.files()
}

fn has_warning(l: &Layout, want: impl Fn(&TableWarning) -> bool) -> bool {
    l.warnings.iter().any(want)
}

/// Whether `w` says a GPT header was not used because of `problem`.
fn gpt_refused(w: &TableWarning, problem: &dyn Fn(&GptProblem) -> bool) -> bool {
    match w {
        TableWarning::GptPrimaryInvalid { error, .. } => problem(error),
        TableWarning::NoValidGpt {
            primary, backup, ..
        } => problem(primary) || problem(backup),
        _ => false,
    }
}

#[test]
fn a_windows_gpt_disk_lists_its_four_partitions() {
    let (img, _, _) = gpt_disk(16 * MIB, 512, &windows_gpt_parts(), 128);
    let l = scan(&img, 512);
    assert_eq!(l.scheme, Scheme::Gpt);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(
        l.disk_id.as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(
        files(&l),
        vec![
            ("p1".into(), MIB, 2 * MIB),
            ("p2".into(), 3 * MIB, MIB),
            ("p3".into(), 4 * MIB, 8 * MIB),
            ("p4".into(), 12 * MIB, MIB),
        ]
    );
    let names: Vec<_> = l
        .partitions
        .iter()
        .map(|p| (p.part_type.common_name(), p.name.clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            (Some("EFI System"), Some("EFI system partition".into())),
            (
                Some("Microsoft reserved"),
                Some("Microsoft reserved partition".into())
            ),
            (
                Some("Microsoft basic data"),
                Some("Basic data partition".into())
            ),
            (Some("Windows Recovery"), None),
        ]
    );
    assert_eq!(
        l.partitions[0].guid.as_deref(),
        Some("AAAAAAAA-0000-0000-0000-000000000001")
    );
    // The protective MBR is not a partition; the first 34 and last 33 sectors and both
    // arrays are watched.
    assert!(l.touches_table(0, 1));
    assert!(l.touches_table(2 * 512 + 100, 1));
    assert!(l.touches_table(16 * MIB - 1, 1));
    assert!(!l.touches_table(4 * MIB, MIB));
    let j = l.to_json();
    assert_eq!(j["scheme"], "gpt");
    assert_eq!(j["partitions"][2]["type_name"], "Microsoft basic data");
    assert_eq!(j["partitions"][2]["file"], "p3");
}

#[test]
fn gpt_on_4k_sectors() {
    let parts = vec![GptPart {
        type_guid: BASIC_DATA,
        first: 256,
        last: 256 + 511,
        name: "data",
    }];
    let (img, _, _) = gpt_disk(4 * MIB, 4096, &parts, 128);
    let l = scan(&img, 4096);
    assert_eq!(l.scheme, Scheme::Gpt);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(files(&l), vec![("p1".into(), MIB, 2 * MIB)]);
    // Read with the wrong sector size, the same bytes are not a GPT.
    let l = scan(&img, 512);
    assert_eq!(l.scheme, Scheme::Gpt);
    assert!(l.partitions.is_empty());
    assert!(
        has_warning(&l, |w| matches!(w, TableWarning::NoValidGpt { .. })),
        "{:?}",
        l.warnings
    );
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup_and_a_damaged_backup_is_a_warning() {
    let (mut img, _, _) = gpt_disk(16 * MIB, 512, &windows_gpt_parts(), 128);
    let good = scan(&img, 512);
    // Backup header CRC broken.
    let last = 16 * MIB - 512;
    img[last as usize + 16] ^= 1;
    let l = scan(&img, 512);
    assert_eq!(files(&l), files(&good));
    assert!(
        has_warning(&l, |w| matches!(w, TableWarning::GptBackupInvalid { .. })),
        "{:?}",
        l.warnings
    );
    img[last as usize + 16] ^= 1;
    // Primary array changed (its CRC no longer matches): the backup is used.
    img[2 * 512 + 40] ^= 0x10;
    let l = scan(&img, 512);
    assert_eq!(files(&l), files(&good));
    assert_eq!(l.gpt.as_ref().unwrap().header_lba, 16 * MIB / 512 - 1);
    assert!(
        has_warning(&l, |w| matches!(w, TableWarning::GptPrimaryInvalid { .. })),
        "{:?}",
        l.warnings
    );
    // Both broken: the scheme is GPT, no partition, a warning.
    img[last as usize + 16] ^= 1;
    let l = scan(&img, 512);
    assert_eq!(l.scheme, Scheme::Gpt);
    assert!(l.partitions.is_empty());
    assert!(
        has_warning(&l, |w| matches!(w, TableWarning::NoValidGpt { .. })),
        "{:?}",
        l.warnings
    );
}

#[test]
fn gpt_headers_with_bad_geometry_are_refused_before_their_arrays_are_read() {
    let parts = windows_gpt_parts();
    type Bend = Box<dyn Fn(&mut Hdr)>;
    type Why = fn(&GptProblem) -> bool;
    let entries: Why = |p| matches!(p, GptProblem::TooManyEntries { .. });
    let entry_size: Why = |p| matches!(p, GptProblem::EntrySize { .. });
    let outside: Why = |p| matches!(p, GptProblem::ArrayOutside { .. });
    let own_place: Why = |p| {
        matches!(
            p,
            GptProblem::OwnPlace {
                recorded: 7,
                lba: 1
            }
        )
    };
    let cases: Vec<(Why, Bend)> = vec![
        (entries, Box::new(|h| h.n_entries = 1 << 30)),
        (entries, Box::new(|h| h.n_entries = u32::MAX)),
        (entry_size, Box::new(|h| h.entry_size = 256)),
        (entry_size, Box::new(|h| h.entry_size = 0)),
        (outside, Box::new(|h| h.entries_lba = u64::MAX / 2)),
        (outside, Box::new(|h| h.entries_lba = 1)),
        (outside, Box::new(|h| h.entries_lba = 0)),
        (own_place, Box::new(|h| h.my_lba = 7)),
    ];
    for (i, (why, bend)) in cases.into_iter().enumerate() {
        let (mut img, mut primary, _) = gpt_disk(16 * MIB, 512, &parts, 128);
        let array = gpt_array(&parts, 128);
        bend(&mut primary);
        // Keep the header at LBA 1 even when it records another place.
        let written = Hdr {
            my_lba: 1,
            ..primary.clone()
        };
        gpt_header(&mut img, 512, &written, &array);
        if primary.my_lba != 1 {
            // Rewrite with the bent MyLBA but placed at LBA 1.
            let mut b = read_vec(&img, 512, 92).unwrap();
            b[24..32].copy_from_slice(&primary.my_lba.to_le_bytes());
            b[16..20].fill(0);
            let c = crc32(&b);
            b[16..20].copy_from_slice(&c.to_le_bytes());
            put(&mut img, 512, &b);
        }
        let l = scan(&img, 512);
        assert!(
            has_warning(&l, |w| gpt_refused(w, &why)),
            "case {i}: {:?}",
            l.warnings
        );
        assert_eq!(l.files().len(), 4, "case {i}: the backup serves");
    }
}

#[test]
fn hundreds_of_gpt_entries_are_read_and_thousands_more_refused() {
    let parts: Vec<GptPart> = (0..300)
        .map(|i| GptPart {
            type_guid: BASIC_DATA,
            first: 2048 + i * 8,
            last: 2048 + i * 8 + 7,
            name: "x",
        })
        .collect();
    let (img, _, _) = gpt_disk(8 * MIB, 512, &parts, 384);
    let l = scan(&img, 512);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(l.files().len(), 300);
    assert_eq!(
        l.files()[299],
        ("p300".into(), (2048 + 299 * 8) * 512, 4096)
    );
    // MAX_GPT_ENTRIES is accepted, one more is not.
    let (img, _, _) = gpt_disk(8 * MIB, 512, &parts[..2], MAX_GPT_ENTRIES);
    assert_eq!(scan(&img, 512).files().len(), 2);
    let (img, _, _) = gpt_disk(8 * MIB, 512, &parts[..2], MAX_GPT_ENTRIES + 1);
    let l = scan(&img, 512);
    assert!(l.files().is_empty());
    assert!(
        has_warning(&l, |w| gpt_refused(w, &|p| matches!(
            p,
            GptProblem::TooManyEntries {
                count: 4097,
                max: 4096
            }
        ))),
        "{:?}",
        l.warnings
    );
}

#[test]
fn gpt_partitions_past_the_end_overlapping_or_backwards_are_warned_about() {
    let parts = vec![
        // Both start at LBA 0 (over the tables): gptman's own whole-table reader
        // panicked on this while finding the alignment.
        GptPart {
            type_guid: BASIC_DATA,
            first: 0,
            last: 99,
            name: "a",
        },
        GptPart {
            type_guid: BASIC_DATA,
            first: 0,
            last: 9,
            name: "b",
        },
        // Ends before it starts.
        GptPart {
            type_guid: BASIC_DATA,
            first: 500,
            last: 400,
            name: "c",
        },
        // Reaches past the end: cut.
        GptPart {
            type_guid: BASIC_DATA,
            first: 4096,
            last: 1 << 40,
            name: "d",
        },
        // Starts past the end: no file.
        GptPart {
            type_guid: BASIC_DATA,
            first: 1 << 40,
            last: (1 << 40) + 10,
            name: "e",
        },
        // Ends at u64::MAX.
        GptPart {
            type_guid: BASIC_DATA,
            first: 0,
            last: u64::MAX,
            name: "f",
        },
    ];
    let (img, _, _) = gpt_disk(4 * MIB, 512, &parts, 128);
    let l = scan(&img, 512);
    let size = 4 * MIB;
    assert_eq!(
        l.files(),
        vec![
            ("p1".into(), 0, 100 * 512),
            ("p2".into(), 0, 10 * 512),
            ("p4".into(), 2 * MIB, 2 * MIB),
            ("p6".into(), 0, size),
        ]
    );
    for f in l.files() {
        assert!(f.1 + f.2 <= size);
    }
    type Want = fn(&TableWarning) -> bool;
    let wants: [(&str, Want); 4] = [
        ("overlap", |w| matches!(w, TableWarning::Overlap { .. })),
        ("past the end: no file", |w| {
            matches!(w, TableWarning::PastEnd { .. })
        }),
        ("ends before it starts (no file)", |w| {
            matches!(w, TableWarning::EndsBeforeStart { .. })
        }),
        ("cut at the disk's end", |w| {
            matches!(w, TableWarning::CutAtEnd { .. })
        }),
    ];
    for (what, want) in wants {
        assert!(has_warning(&l, want), "{what}: {:?}", l.warnings);
    }
}

#[test]
fn a_windows_mbr_disk_and_logical_partitions() {
    let mut img = vec![0u8; (64 * MIB) as usize];
    put(&mut img, 440, &0x1234_abcdu32.to_le_bytes());
    mbr_sector(
        &mut img,
        0,
        512,
        &[
            mbr_entry(0x80, 0x07, 2048, 2048),    // System Reserved
            mbr_entry(0, 0x07, 4096, 8 * 2048),   // C:
            mbr_entry(0, 0x0F, 20480, 40 * 2048), // extended
        ],
    );
    // Three logical partitions; each EBR's second entry links to the next (relative to
    // the extended partition's start).
    let ext = 20480u32;
    let ebrs = [(0u32, 2048u32), (10 * 2048, 4096), (20 * 2048, 2048)];
    for (k, &(rel, len)) in ebrs.iter().enumerate() {
        let mut e = vec![mbr_entry(0, 0x83, 2048, len)];
        if let Some(&(next, _)) = ebrs.get(k + 1) {
            e.push(mbr_entry(0, 0x05, next, 2048 + 4096));
        }
        mbr_sector(&mut img, u64::from(ext + rel), 512, &e);
    }
    let l = scan(&img, 512);
    assert_eq!(l.scheme, Scheme::Mbr);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(l.disk_id.as_deref(), Some("1234abcd"));
    let got: Vec<_> = l
        .partitions
        .iter()
        .map(|p| (p.number, p.kind, p.file_name(), p.start / 512, p.size / 512))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, Kind::Primary, Some("p1".into()), 2048, 2048),
            (2, Kind::Primary, Some("p2".into()), 4096, 16384),
            (3, Kind::Extended, None, 20480, 81920),
            (5, Kind::Logical, Some("p5".into()), 22528, 2048),
            (
                6,
                Kind::Logical,
                Some("p6".into()),
                20480 + 20480 + 2048,
                4096
            ),
            (
                7,
                Kind::Logical,
                Some("p7".into()),
                20480 + 40960 + 2048,
                2048
            ),
        ]
    );
    assert!(l.partitions[0].bootable);
    assert_eq!(l.partitions[1].part_type.id(), "0x07");
    assert_eq!(
        l.partitions[1].part_type.common_name(),
        Some("NTFS/exFAT/HPFS")
    );
    // Every EBR is watched.
    assert!(l.touches_table((20480 + 20480) * 512, 1));
    assert!(!l.touches_table(4096 * 512, 512));
}

#[test]
fn extended_partition_loops_and_runaway_chains_stop_with_a_warning() {
    let base = || {
        let mut img = vec![0u8; (8 * MIB) as usize];
        mbr_sector(&mut img, 0, 512, &[mbr_entry(0, 0x05, 2048, 8192)]);
        img
    };
    // The second EBR links back to the first.
    let mut img = base();
    mbr_sector(
        &mut img,
        2048,
        512,
        &[mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, 100, 20)],
    );
    mbr_sector(
        &mut img,
        2148,
        512,
        &[mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, 1, 20)],
    );
    mbr_sector(
        &mut img,
        2049,
        512,
        &[mbr_entry(0, 0x83, 1, 1), mbr_entry(0, 0x05, 100, 20)],
    );
    let l = scan(&img, 512);
    assert!(
        has_warning(&l, |w| matches!(w, TableWarning::EbrLoop { .. })),
        "{:?}",
        l.warnings
    );
    assert_eq!(l.files().len(), 3);
    // An EBR linking to itself.
    let mut img = base();
    mbr_sector(
        &mut img,
        2048,
        512,
        &[mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, 0, 20)],
    );
    let l = scan(&img, 512);
    assert_eq!(l.files().len(), 1, "link 0 ends the chain");
    // A chain of more than MAX_LOGICAL EBRs, one per sector.
    let mut img = base();
    for k in 0..400u32 {
        mbr_sector(
            &mut img,
            2048 + u64::from(k),
            512,
            &[
                mbr_entry(0, 0x83, 8000 - k, 1),
                mbr_entry(0, 0x05, k + 1, 1),
            ],
        );
    }
    let l = scan(&img, 512);
    assert_eq!(l.files().len(), MAX_LOGICAL);
    assert!(
        has_warning(&l, |w| *w == TableWarning::TooManyLogical { max: 256 }),
        "{:?}",
        l.warnings
    );
    // A link out of the extended partition, and one far past the disk.
    for link in [9000u32, u32::MAX] {
        let mut img = base();
        mbr_sector(
            &mut img,
            2048,
            512,
            &[mbr_entry(0, 0x83, 1, 10), mbr_entry(0, 0x05, link, 20)],
        );
        let l = scan(&img, 512);
        assert_eq!(l.files().len(), 1);
        assert!(
            has_warning(&l, |w| matches!(w, TableWarning::EbrOutside { .. })),
            "{:?}",
            l.warnings
        );
    }
    // An empty extended partition (no EBR) is fine and quiet.
    let l = scan(&base(), 512);
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    assert_eq!(l.files().len(), 0);
    assert_eq!(l.partitions.len(), 1);
}

#[test]
fn mbr_partitions_past_the_end_and_overlapping() {
    let mut img = vec![0u8; (4 * MIB) as usize];
    mbr_sector(
        &mut img,
        0,
        512,
        &[
            mbr_entry(0, 0x07, 2048, u32::MAX),
            mbr_entry(0, 0x07, u32::MAX, u32::MAX),
            mbr_entry(0, 0x83, 4000, 100),
            mbr_entry(0, 0x83, 0, 1),
        ],
    );
    let l = scan(&img, 512);
    assert_eq!(
        l.files(),
        vec![
            ("p1".into(), MIB, 3 * MIB),
            ("p3".into(), 4000 * 512, 100 * 512),
            ("p4".into(), 0, 512),
        ]
    );
    type Want = fn(&TableWarning) -> bool;
    let wants: [(&str, Want); 4] = [
        ("cut at the end", |w| {
            matches!(w, TableWarning::CutAtEnd { number: 1, .. })
        }),
        ("past the end: no file", |w| {
            matches!(w, TableWarning::PastEnd { number: 2, .. })
        }),
        ("overlap", |w| matches!(w, TableWarning::Overlap { .. })),
        ("over the partition table", |w| {
            matches!(w, TableWarning::AtSectorZero { index: 4 })
        }),
    ];
    for (what, want) in wants {
        assert!(has_warning(&l, want), "{what}: {:?}", l.warnings);
    }
}

#[test]
fn no_table_empty_disks_and_garbage() {
    assert_eq!(scan(&vec![0u8; 4096], 512).scheme, Scheme::None);
    assert_eq!(scan(&vec![0u8; 100], 512).scheme, Scheme::None);
    assert_eq!(scan(&Vec::new(), 512).scheme, Scheme::None);
    // 55 AA with an invalid boot flag is not an MBR.
    let mut img = vec![0u8; 4096];
    mbr_sector(&mut img, 0, 512, &[mbr_entry(0x12, 0x07, 1, 2)]);
    assert_eq!(scan(&img, 512).scheme, Scheme::None);
    // A protective MBR on a tiny disk.
    let mut img = vec![0u8; 1024];
    mbr_sector(&mut img, 0, 512, &[mbr_entry(0, 0xEE, 1, 1)]);
    let l = scan(&img, 512);
    assert_eq!(l.scheme, Scheme::Gpt);
    assert!(l.partitions.is_empty());
    // Pseudo-random bytes, many seeds, two sector sizes: never a panic, files inside.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let mut img = vec![0u8; 64 << 10];
        for b in img.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        img[510] = 0x55;
        img[511] = 0xAA;
        for ss in [512, 4096] {
            let l = scan(&img, ss);
            for (_, s, n) in l.files() {
                assert!(s + n <= img.len() as u64);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// File-system signatures
// ---------------------------------------------------------------------------

fn fat32_boot(label: &[u8; 11], serial: u32) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    b[3..11].copy_from_slice(b"mkfs.fat");
    b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
    b[0x0D] = 1;
    b[0x0E..0x10].copy_from_slice(&32u16.to_le_bytes());
    b[0x10] = 2;
    b[0x20..0x24].copy_from_slice(&200_000u32.to_le_bytes());
    b[0x24..0x28].copy_from_slice(&1550u32.to_le_bytes());
    b[0x42] = 0x29;
    b[0x43..0x47].copy_from_slice(&serial.to_le_bytes());
    b[0x47..0x52].copy_from_slice(label);
    b[0x52..0x5A].copy_from_slice(b"FAT32   ");
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

#[test]
fn fat_boot_sectors() {
    let img = fat32_boot(b"SYSTEM     ", 0x1234_ABCD);
    let f = fs::probe(&img, 0, 512).unwrap();
    assert_eq!(f.kind, "vfat");
    assert_eq!(f.display_name(), "FAT32");
    assert_eq!(f.label.as_deref(), Some("SYSTEM"));
    assert_eq!(f.uuid.as_deref(), Some("1234-ABCD"));
    // "NO NAME" is no label.
    let img = fat32_boot(b"NO NAME    ", 1);
    assert_eq!(fs::probe(&img, 0, 512).unwrap().label, None);
    // FAT16: 16-bit FAT size, cluster count decides 12 vs 16.
    let mut b = vec![0u8; 512];
    b[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
    b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
    b[0x0D] = 4;
    b[0x0E..0x10].copy_from_slice(&4u16.to_le_bytes());
    b[0x10] = 2;
    b[0x11..0x13].copy_from_slice(&512u16.to_le_bytes());
    b[0x16..0x18].copy_from_slice(&100u16.to_le_bytes());
    b[0x20..0x24].copy_from_slice(&100_000u32.to_le_bytes());
    b[0x26] = 0x29;
    b[0x27..0x2B].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    b[0x2B..0x36].copy_from_slice(b"DATA       ");
    b[0x36..0x3E].copy_from_slice(b"FAT16   ");
    let f = fs::probe(&b, 0, 512).unwrap();
    assert_eq!(
        (f.display_name(), f.label.as_deref()),
        ("FAT16", Some("DATA"))
    );
    assert_eq!(f.uuid.as_deref(), Some("DEAD-BEEF"));
    b[0x20..0x24].copy_from_slice(&10_000u32.to_le_bytes());
    assert_eq!(fs::probe(&b, 0, 512).unwrap().display_name(), "FAT12");
    // A BPB whose metadata exceeds the volume is not FAT.
    b[0x20..0x24].copy_from_slice(&10u32.to_le_bytes());
    assert_eq!(fs::probe(&b, 0, 512), None);
    // A FAT boot sector at sector 0 is a whole-disk file system, not an MBR.
    let mut disk = fat32_boot(b"USB        ", 7);
    disk.resize(MIB as usize, 0);
    let l = scan(&disk, 512);
    assert_eq!(l.scheme, Scheme::None);
    assert_eq!(l.whole_disk.unwrap().label.as_deref(), Some("USB"));
}

/// An NTFS boot sector and MFT record 3 with a $VOLUME_NAME, fixups applied.
fn ntfs_volume(label: &str, break_fixup: bool) -> Vec<u8> {
    let mut img = vec![0u8; 64 << 10];
    let b = &mut img[..512];
    b[0..3].copy_from_slice(&[0xEB, 0x52, 0x90]);
    b[3..11].copy_from_slice(b"NTFS    ");
    b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
    b[0x0D] = 8; // 4 KiB clusters
    b[0x30..0x38].copy_from_slice(&2u64.to_le_bytes()); // MFT at cluster 2 (8 KiB)
    b[0x40] = 0xF6; // records of 2^10 bytes
    b[0x48..0x50].copy_from_slice(&0x0123_4567_89AB_CDEFu64.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xAA;
    let rec_off = 8192 + 3 * 1024;
    let mut r = vec![0u8; 1024];
    r[0..4].copy_from_slice(b"FILE");
    r[4..6].copy_from_slice(&0x30u16.to_le_bytes()); // update sequence array
    r[6..8].copy_from_slice(&3u16.to_le_bytes()); // 1 + 2 strides
    r[0x14..0x16].copy_from_slice(&0x38u16.to_le_bytes()); // first attribute
                                                           // $STANDARD_INFORMATION-like filler attribute, then $VOLUME_NAME.
    let mut off = 0x38;
    r[off..off + 4].copy_from_slice(&0x10u32.to_le_bytes());
    r[off + 4..off + 8].copy_from_slice(&0x60u32.to_le_bytes());
    off += 0x60;
    let name: Vec<u8> = label.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let alen = (0x18 + name.len()).div_ceil(8) * 8;
    r[off..off + 4].copy_from_slice(&0x60u32.to_le_bytes());
    r[off + 4..off + 8].copy_from_slice(&(alen as u32).to_le_bytes());
    r[off + 0x10..off + 0x14].copy_from_slice(&(name.len() as u32).to_le_bytes());
    r[off + 0x14..off + 0x16].copy_from_slice(&0x18u16.to_le_bytes());
    r[off + 0x18..off + 0x18 + name.len()].copy_from_slice(&name);
    off += alen;
    r[off..off + 4].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
    // Fixups: sequence number 0x0007 at both stride ends; originals in the array.
    for i in 1..3usize {
        let end = i * 512;
        let orig = [r[end - 2], r[end - 1]];
        r[0x30 + 2 * i..0x32 + 2 * i].copy_from_slice(&orig);
        r[end - 2..end].copy_from_slice(&[7, 0]);
    }
    r[0x30..0x32].copy_from_slice(&[7, 0]);
    if break_fixup {
        r[1022] = 9;
    }
    img[rec_off..rec_off + 1024].copy_from_slice(&r);
    img
}

#[test]
fn ntfs_label_from_the_mft_and_serial() {
    let img = ntfs_volume("Windows 11 ☃", false);
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!(f.kind, "ntfs");
    assert_eq!(f.label.as_deref(), Some("Windows 11 ☃"));
    assert_eq!(f.uuid.as_deref(), Some("0123456789ABCDEF"));
    // A record whose fixups do not match: still NTFS, no label.
    let img = ntfs_volume("x", true);
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!((f.kind, f.label), ("ntfs", None));
    // The record outside the partition: no label, no panic.
    let f = fs::probe(&img, 0, 4096).unwrap();
    assert_eq!(f.label, None);
    // Hostile boot sector fields: absurd cluster and record sizes, MFT at the end of
    // the address space.
    for (at, val) in [
        (0x0D, vec![0x81u8]),
        (0x0D, vec![0u8]),
        (0x40, vec![0x80u8]),
        (0x40, vec![0x7Fu8]),
        (0x30, u64::MAX.to_le_bytes().to_vec()),
        (0x0B, 0xFFFFu16.to_le_bytes().to_vec()),
    ] {
        let mut img = ntfs_volume("x", false);
        put(&mut img, at, &val);
        assert_eq!(fs::probe(&img, 0, img.len() as u64).unwrap().kind, "ntfs");
    }
}

#[test]
fn linux_and_other_signatures() {
    // ext4: superblock at 1024 with extents (incompat 0x40) and a journal.
    let mut img = vec![0u8; 128 << 10];
    let sb = 1024;
    put(&mut img, sb + 0x38, &0xEF53u16.to_le_bytes());
    put(&mut img, sb + 0x4C, &1u32.to_le_bytes());
    put(&mut img, sb + 0x5C, &4u32.to_le_bytes());
    put(&mut img, sb + 0x60, &(0x2u32 | 0x40).to_le_bytes());
    put(&mut img, sb + 0x68, &[0xAB; 16]);
    put(&mut img, sb + 0x78, b"rootfs");
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!(f.kind, "ext4");
    assert_eq!(f.label.as_deref(), Some("rootfs"));
    assert_eq!(
        f.uuid.as_deref(),
        Some("abababab-abab-abab-abab-abababababab")
    );
    put(&mut img, sb + 0x60, &0x2u32.to_le_bytes());
    assert_eq!(fs::probe(&img, 0, img.len() as u64).unwrap().kind, "ext3");
    put(&mut img, sb + 0x5C, &0u32.to_le_bytes());
    assert_eq!(fs::probe(&img, 0, img.len() as u64).unwrap().kind, "ext2");

    let mut img = vec![0u8; 128 << 10];
    put(&mut img, 0, b"XFSB");
    put(&mut img, 32, &[0x11; 16]);
    put(&mut img, 108, b"xlabel");
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!((f.kind, f.label.as_deref()), ("xfs", Some("xlabel")));

    let mut img = vec![0u8; 128 << 10];
    put(&mut img, 0x10000 + 0x40, b"_BHRfS_M");
    put(&mut img, 0x10000 + 0x20, &[0x22; 16]);
    put(&mut img, 0x10000 + 0x12B, b"pool");
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!((f.kind, f.label.as_deref()), ("btrfs", Some("pool")));
    // Btrfs's superblock lies past a small partition: not found there.
    assert_eq!(fs::probe(&img, 0, 0x10000), None);

    let mut img = vec![0u8; 128 << 10];
    put(&mut img, 4096 - 10, b"SWAPSPACE2");
    put(&mut img, 1024, &1u32.to_le_bytes());
    put(&mut img, 1024 + 12, &[0x33; 16]);
    put(&mut img, 1024 + 28, b"swappy");
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!((f.kind, f.label.as_deref()), ("swap", Some("swappy")));

    let mut img = vec![0u8; 128 << 10];
    put(&mut img, 512, b"LABELONE");
    put(&mut img, 512 + 8, &1u64.to_le_bytes());
    put(&mut img, 512 + 20, &32u32.to_le_bytes());
    put(&mut img, 512 + 24, b"LVM2 001");
    put(&mut img, 512 + 32, b"abcdefghijklmnopqrstuvwxyz012345");
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!(f.kind, "LVM2_member");
    assert_eq!(
        f.uuid.as_deref(),
        Some("abcdef-ghij-klmn-opqr-stuv-wxyz-012345")
    );

    let mut img = vec![0u8; 128 << 10];
    put(&mut img, 0, &[0xEB, 0x58, 0x90]);
    put(&mut img, 3, b"-FVE-FS-");
    assert_eq!(fs::probe(&img, 0, 4096).unwrap().kind, "BitLocker");

    // exFAT: label entry in the first cluster of the root directory.
    let mut img = vec![0u8; 256 << 10];
    put(&mut img, 3, b"EXFAT   ");
    put(&mut img, 0x58, &64u32.to_le_bytes()); // cluster heap at sector 64
    put(&mut img, 0x60, &4u32.to_le_bytes()); // root directory at cluster 4
    put(&mut img, 0x64, &0xCAFE_F00Du32.to_le_bytes());
    img[0x6C] = 9;
    img[0x6D] = 3; // 4 KiB clusters
    let root = 64 * 512 + 2 * 4096;
    img[root] = 0x81; // allocation bitmap entry first
    img[root + 32] = 0x83;
    img[root + 33] = 5;
    let name: Vec<u8> = "Stick".encode_utf16().flat_map(u16::to_le_bytes).collect();
    put(&mut img, (root + 34) as u64, &name);
    let f = fs::probe(&img, 0, img.len() as u64).unwrap();
    assert_eq!(f.kind, "exfat");
    assert_eq!(f.label.as_deref(), Some("Stick"));
    assert_eq!(f.uuid.as_deref(), Some("CAFE-F00D"));
    // Hostile shifts.
    img[0x6D] = 200;
    assert_eq!(fs::probe(&img, 0, img.len() as u64).unwrap().label, None);

    assert_eq!(fs::probe(&vec![0u8; 128 << 10], 0, 128 << 10), None);
}

#[test]
fn file_systems_are_probed_at_each_partitions_start() {
    let (mut img, _, _) = gpt_disk(16 * MIB, 512, &windows_gpt_parts(), 128);
    put(&mut img, MIB, &fat32_boot(b"SYSTEM     ", 0xAAAA_5555));
    let ntfs = ntfs_volume("Windows", false);
    put(&mut img, 4 * MIB, &ntfs);
    let l = scan(&img, 512);
    let fs: Vec<_> = l
        .partitions
        .iter()
        .map(|p| p.fs.as_ref().map(|f| (f.display_name(), f.label.clone())))
        .collect();
    assert_eq!(
        fs,
        vec![
            Some(("FAT32", Some("SYSTEM".into()))),
            None,
            Some(("NTFS", Some("Windows".into()))),
            None,
        ]
    );
    // scan_table does not probe.
    assert!(scan_table(&img, 512)
        .partitions
        .iter()
        .all(|p| p.fs.is_none()));
    // With no table, a file system at sector 0 is reported for the disk.
    let l = scan(&ntfs, 512);
    assert_eq!(l.scheme, Scheme::None);
    assert_eq!(l.whole_disk.unwrap().kind, "ntfs");
}
