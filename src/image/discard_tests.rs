//! Discard (`Disk::discard` → `WritableLayer::discard`) in both formats, bases and
//! children: content against a model, the states a discard leaves, reuse of freed space
//! only after the BAT change is durable, and crashes cut after every write.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::disk::Disk;
use crate::error::Finding;
use crate::image::crash_sim;
use crate::image::vhdx::bat::{state, PAYLOAD_BLOCK_ZERO};
use crate::image::vhdx::tests::{
    assert_every_cut_leaves_old_or_new, new_base, new_child, open_disk, read_all, Rng, TempDir,
};
use crate::image::vhdx::Vhdx;
use crate::layer::OpenOptions;

const MIB: u64 = 1 << 20;

/// A dynamic base of `size` bytes with 1 MiB blocks (VHDX with `lss`, or VHD).
fn base(path: &Path, size: u64, lss: u32) {
    if path.extension().is_some_and(|e| e == "vhd") {
        crate::image::vhd::create::create_dynamic(path, size, MIB as u32).unwrap();
    } else {
        new_base(path, size, MIB as u32, lss);
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Random writes and discards (whole blocks, runs of blocks, parts of blocks, unaligned
/// ranges) on `disk` and `model`, flushing now and then.
fn writes_and_discards(disk: &Disk, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    for i in 0..n {
        let (off, len) = match rng.below(6) {
            0 => (rng.below(size / MIB) * MIB, MIB * (1 + rng.below(3))),
            1 => (rng.below(size / 4096) * 4096, 4096 * (1 + rng.below(64))),
            2 => (rng.below(size), 1 + rng.below(3 * MIB)),
            _ => (rng.below(size - 1), 1 + rng.below(2 * MIB)),
        };
        let len = len.min(size - off);
        if i % 2 == 0 {
            disk.discard(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            assert_eq!(disk.write_at(off, &data).unwrap(), data.len());
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if rng.below(8) == 0 {
            disk.flush().unwrap();
        }
    }
}

#[test]
fn discards_read_zeros_in_bases_and_children_of_both_formats() {
    for (ext, lss) in [("vhdx", 512u32), ("vhdx", 4096), ("vhd", 512)] {
        let d = TempDir::new(&format!("discard-model-{ext}"));
        let size = 16 * MIB;
        let b = d.join(format!("base.{ext}"));
        base(&b, size, lss);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(0xD15C + lss as u64);
        {
            let disk = open_disk(&b, true);
            let mut full = vec![0u8; size as usize];
            rng.fill(&mut full);
            disk.write_at(0, &full).unwrap();
            model.copy_from_slice(&full);
            writes_and_discards(&disk, &mut model, &mut rng, 80);
            assert!(read_all(&disk) == model, "{ext}/{lss}: base while open");
            disk.close().unwrap();
        }
        let disk = open_disk(&b, false);
        assert!(read_all(&disk) == model, "{ext}/{lss}: base after reopen");
        assert_eq!(disk.layers()[0].check().unwrap(), Vec::<Finding>::new());
        drop(disk);
        let base_bytes = std::fs::read(&b).unwrap();

        let c = d.join(format!("child.{ext}"));
        new_child(&c, &b, Some("1M"));
        {
            let disk = open_disk(&c, true);
            writes_and_discards(&disk, &mut model, &mut rng, 120);
            assert!(read_all(&disk) == model, "{ext}/{lss}: child while open");
            disk.close().unwrap();
        }
        let disk = open_disk(&c, false);
        assert!(read_all(&disk) == model, "{ext}/{lss}: child after reopen");
        assert_eq!(disk.layers()[0].check().unwrap(), Vec::<Finding>::new());
        assert!(
            std::fs::read(&b).unwrap() == base_bytes,
            "{ext}: the parent never changes"
        );
    }
}

/// Whole blocks: a VHDX base's and child's become PAYLOAD_BLOCK_ZERO (a child's read
/// zeros, not the parent), their space is punched out of the host file and reused by
/// later allocations once a flush made the release durable, never before.
#[test]
fn discarded_blocks_are_given_back_and_reused_only_after_a_flush() {
    for ext in ["vhdx", "vhd"] {
        let d = TempDir::new(&format!("discard-reuse-{ext}"));
        let size = 32 * MIB;
        let b = d.join(format!("base.{ext}"));
        base(&b, size, 512);
        let mut data = vec![0u8; (8 * MIB) as usize];
        Rng(7).fill(&mut data);
        {
            let disk = open_disk(&b, true);
            disk.write_at(0, &data).unwrap();
            disk.close().unwrap();
        }
        let len0 = std::fs::metadata(&b).unwrap().len();
        let alloc0 = allocated_bytes(&b);
        let disk = open_disk(&b, true);
        disk.discard(2 * MIB, 4 * MIB).unwrap();
        let mut zeros = vec![0u8; (4 * MIB) as usize];
        disk.read_at(2 * MIB, &mut zeros).unwrap();
        assert!(zeros.iter().all(|&x| x == 0), "{ext}: discarded range");
        assert!(
            allocated_bytes(&b) + 4 * MIB - 64 * 1024 <= alloc0,
            "{ext}: the host file gave the space back ({} -> {})",
            alloc0,
            allocated_bytes(&b)
        );
        // Not flushed yet: a new block must not take a released slot.
        disk.write_at(20 * MIB, &data[..4096]).unwrap();
        let grown = std::fs::metadata(&b).unwrap().len();
        assert!(
            grown > len0,
            "{ext}: released slots are not reused before a flush"
        );
        disk.flush().unwrap();
        // Flushed: the next three new blocks take freed slots, the file does not grow.
        for i in 0..3u64 {
            disk.write_at((24 + i) * MIB + 512, &data[..8192]).unwrap();
        }
        disk.flush().unwrap();
        assert_eq!(
            std::fs::metadata(&b).unwrap().len(),
            grown,
            "{ext}: new blocks went into freed slots"
        );
        let mut model = vec![0u8; size as usize];
        model[..(8 * MIB) as usize].copy_from_slice(&data);
        model[(2 * MIB) as usize..(6 * MIB) as usize].fill(0);
        model[(20 * MIB) as usize..(20 * MIB + 4096) as usize].copy_from_slice(&data[..4096]);
        for i in 0..3u64 {
            let o = ((24 + i) * MIB + 512) as usize;
            model[o..o + 8192].copy_from_slice(&data[..8192]);
        }
        assert!(read_all(&disk) == model, "{ext}: content with reused slots");
        disk.close().unwrap();
        drop(disk);
        let disk = open_disk(&b, false);
        assert!(read_all(&disk) == model, "{ext}: after reopen");
        assert_eq!(disk.layers()[0].check().unwrap(), Vec::<Finding>::new());
        drop(disk);

        // A child: whole blocks read zeros (not the parent); VHDX records the zero state.
        let c = d.join(format!("child.{ext}"));
        new_child(&c, &b, Some("1M"));
        {
            let disk = open_disk(&c, true);
            disk.write_at(MIB, &data[..MIB as usize]).unwrap();
            disk.discard(0, 2 * MIB).unwrap();
            disk.close().unwrap();
        }
        let disk = open_disk(&c, false);
        let mut got = vec![0u8; (2 * MIB) as usize];
        disk.read_at(0, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == 0),
            "{ext}: child's discarded blocks"
        );
        drop(disk);
        if ext == "vhdx" {
            let v = Vhdx::open(&c, OpenOptions::read_only()).unwrap();
            for block in 0..2 {
                let e = v.bat.get(&v.file, v.bat.payload_index(block)).unwrap();
                assert_eq!(state(e), PAYLOAD_BLOCK_ZERO, "child block {block}");
                assert_eq!(e >> 20, 0, "no file offset");
            }
        }
    }
}

/// A crash cut after any write of discards, their flush and the reuse of the freed
/// space: every sector reads its old or its new content, and the structure is sound (two
/// BAT entries never share a slot).
#[test]
fn a_crash_after_any_write_of_discards_leaves_old_or_new() {
    for ext in ["vhdx", "vhd"] {
        let d = TempDir::new(&format!("discard-torn-{ext}"));
        let size = 8 * MIB;
        let template = d.join(format!("template.{ext}"));
        base(&template, size, 512);
        let mut old = vec![0u8; size as usize];
        Rng(11).fill(&mut old[..(6 * MIB) as usize]);
        {
            let disk = open_disk(&template, true);
            disk.write_at(0, &old[..(6 * MIB) as usize]).unwrap();
            disk.close().unwrap();
        }
        let mut new = old.clone();
        // Discard block 1 and 2 whole, part of block 4; write into block 6 (a new
        // block); flush; write into block 7 (a new block, taking a freed slot) and into
        // block 1 again.
        new[MIB as usize..(3 * MIB) as usize].fill(0);
        new[(4 * MIB + 4096) as usize..(4 * MIB + 69632) as usize].fill(0);
        let mut fresh = vec![0u8; 8192];
        Rng(12).fill(&mut fresh);
        let writes = [6 * MIB + 4096, 7 * MIB, MIB + 512];
        for &w in &writes {
            new[w as usize..w as usize + 8192].copy_from_slice(&fresh);
        }
        let work = d.join(format!("work.{ext}"));
        let attempt = |limit: Option<usize>| -> usize {
            let _ = std::fs::remove_file(&work);
            std::fs::copy(&template, &work).unwrap();
            crash_sim::fail_after(limit);
            {
                let disk = open_disk(&work, true);
                let _ = (|| -> crate::Result<()> {
                    disk.discard(MIB, 2 * MIB)?;
                    disk.discard(4 * MIB + 4096, 65536)?;
                    // A new block before the flush: it must not take a released slot
                    // (after a crash the old entry would show this block's data).
                    disk.write_at(writes[0], &fresh)?;
                    disk.flush()?;
                    for &w in &writes[1..] {
                        disk.write_at(w, &fresh)?;
                    }
                    disk.flush()?;
                    disk.close()
                })();
                let _ = disk.close();
            }
            let n = crash_sim::writes();
            crash_sim::fail_after(None);
            n
        };
        let total = attempt(None);
        assert!(
            total >= 8,
            "{ext}: the sequence has several writes ({total})"
        );
        // Discarded and written again: zeros in between.
        let discarded = |s: usize| {
            (MIB as usize..3 * MIB as usize).contains(&s)
                || (4 * MIB as usize + 4096..4 * MIB as usize + 69632).contains(&s)
        };
        assert_every_cut_leaves_old_or_new(ext, &work, total, attempt, &old, &new, discarded);
        attempt(None);
        assert!(
            read_all(&open_disk(&work, false)) == new,
            "{ext}: complete sequence"
        );
    }
}

/// Discarding what already reads zeros in a child (not held by it, no data in the
/// parents) allocates nothing: a VHD child would otherwise get a block per discarded
/// block (VHD has no zero state), e.g. for mkfs's discard of the whole device.
#[test]
fn discarding_zeros_in_a_child_allocates_nothing() {
    for ext in ["vhd", "vhdx"] {
        let d = TempDir::new(&format!("discard-child-zeros-{ext}"));
        let size = 64 * MIB;
        let b = d.join(format!("base.{ext}"));
        base(&b, size, 512);
        let mut data = vec![0u8; (3 * MIB) as usize];
        Rng(3).fill(&mut data);
        {
            let disk = open_disk(&b, true);
            disk.write_at(MIB + 512, &data).unwrap();
            disk.close().unwrap();
        }
        let c = d.join(format!("child.{ext}"));
        new_child(&c, &b, Some("1M"));
        let len0 = std::fs::metadata(&c).unwrap().len();
        {
            let disk = open_disk(&c, true);
            disk.discard(0, size).unwrap();
            disk.close().unwrap();
        }
        let disk = open_disk(&c, false);
        assert!(read_all(&disk).iter().all(|&x| x == 0), "{ext}: all zeros");
        let len1 = std::fs::metadata(&c).unwrap().len();
        // VHD: at most the 5 blocks over the parent's data (1 MiB + bitmap each).
        assert!(
            len1 <= len0 + 5 * (MIB + 4096),
            "{ext}: the child grew from {len0} to {len1} bytes"
        );
        assert_eq!(disk.layers()[0].check().unwrap(), Vec::<Finding>::new());
    }
}
