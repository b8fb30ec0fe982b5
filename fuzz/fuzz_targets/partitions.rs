//! The guest's partition table (MBR, EBR chains, GPT with its backup) and the
//! file-system probes on arbitrary disk contents: `guest::scan`, what `info` and the
//! mount run on guest-controlled sectors. No panic, no hang, every partition file inside
//! the disk and not empty, warnings bounded, `scan_table` agreeing with `scan`.
//!
//! Input: a flags byte, then a sparse disk (fuzz/src/sparse.rs), held in memory.
//! Flags bit 0: 4096-byte sectors (else 512); bit 1: leave the GPT CRCs as they are
//! (else both headers' and arrays' CRCs are recomputed, so mutations reach the entries).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdiskfs::guest::{self, ReadAt};
use vdiskfs_fuzz::memdisk::MemDisk;

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let ss = if flags & 1 != 0 { 4096 } else { 512 };
    let mut disk = MemDisk::new(rest);
    if flags & 2 == 0 {
        disk.fix_gpt_crcs(ss);
    }
    let size = disk.size();
    let l = guest::scan(&disk, ss);
    for p in &l.partitions {
        assert!(
            p.start.checked_add(p.size).is_some_and(|e| e <= size),
            "{p:?}"
        );
    }
    let files = l.files();
    for (name, start, len) in &files {
        assert!(
            *len > 0 && start + len <= size,
            "{name} {start}+{len} of {size}"
        );
    }
    assert!(l.warnings.len() <= guest::MAX_WARNINGS + 1);
    for &(s, n) in &l.watch {
        assert!(s <= size && n <= size, "watch {s}+{n}");
    }
    let _ = l.to_json().to_string();
    // What the mount uses agrees (checked on small tables: a long EBR chain costs
    // milliseconds per pass under the sanitizers).
    if l.partitions.len() <= 8 {
        assert_eq!(guest::scan_table(&disk, ss).files(), files);
    }
});
