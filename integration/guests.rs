//! FAT and NTFS guests written through a writable mount of a child (ext4 is covered by
//! write.rs and mount.rs): the guest's own tools see every change after a remount, the
//! base never changes, and vhdimount agrees with `vdiskfs cat`. NTFS goes through
//! ntfs-3g on a loop mount of disk.raw; FAT through mtools working on disk.raw itself
//! (this kernel has no vfat module; mtools is a real FAT implementation all the same).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A guest file system mounted from `disk.raw` (through a loop device), unmounted on drop
/// (retried while busy, lazily as the last resort: `umount_guest`).
struct GuestMount(PathBuf);

impl Drop for GuestMount {
    fn drop(&mut self) {
        umount_guest(&self.0);
    }
}

fn mount_guest(fs: &str, raw: &Path, dir: &Path, ro: bool) -> GuestMount {
    std::fs::create_dir_all(dir).unwrap();
    let g = GuestMount(dir.to_path_buf());
    let mut cmd = Command::new("mount");
    cmd.args(["-t", if fs == "ntfs" { "ntfs-3g" } else { "vfat" }]);
    cmd.arg("-o")
        .arg(if ro { "loop,ro" } else { "loop,rw" })
        .arg(raw)
        .arg(dir);
    run_ok(&mut cmd);
    g
}

/// The guest's files, through ntfs-3g (a mount) or mtools (on the image file).
enum Guest {
    Ntfs(GuestMount),
    Fat(PathBuf),
}

impl Guest {
    fn open(fs: &str, raw: &Path, dir: &Path, ro: bool) -> Guest {
        if fs == "ntfs" {
            Guest::Ntfs(mount_guest(fs, raw, dir, ro))
        } else {
            Guest::Fat(raw.to_path_buf())
        }
    }

    fn write(&self, name: &str, data: &[u8], scratch: &Path) {
        match self {
            Guest::Ntfs(g) => {
                let p = g.0.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, data).unwrap();
            }
            Guest::Fat(img) => {
                let mut dir = String::new();
                for part in name.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                    dir = format!("{dir}/{part}");
                    let _ = Command::new("mmd")
                        .arg("-i")
                        .arg(img)
                        .arg(format!("::{dir}"))
                        .output();
                }
                let src = scratch.join("upload.tmp");
                std::fs::write(&src, data).unwrap();
                run_ok(
                    Command::new("mcopy")
                        .args(["-o", "-i"])
                        .arg(img)
                        .arg(&src)
                        .arg(format!("::/{name}")),
                );
            }
        }
    }

    fn read(&self, name: &str, scratch: &Path) -> Option<Vec<u8>> {
        match self {
            Guest::Ntfs(g) => std::fs::read(g.0.join(name)).ok(),
            Guest::Fat(img) => {
                let dst = scratch.join("download.tmp");
                let _ = std::fs::remove_file(&dst);
                let ok = Command::new("mcopy")
                    .args(["-n", "-i"])
                    .arg(img)
                    .arg(format!("::/{name}"))
                    .arg(&dst)
                    .output()
                    .unwrap()
                    .status
                    .success();
                ok.then(|| std::fs::read(&dst).unwrap())
            }
        }
    }

    fn remove(&self, name: &str) {
        match self {
            Guest::Ntfs(g) => std::fs::remove_file(g.0.join(name)).unwrap(),
            Guest::Fat(img) => {
                run_ok(
                    Command::new("mdel")
                        .arg("-i")
                        .arg(img)
                        .arg(format!("::/{name}")),
                );
            }
        }
    }
}

fn guest_round_trip(fs: &str, ext: &str) {
    let d = TempDir::new(&format!("guest-{fs}-{ext}"));
    let raw = d.join("base.raw");
    make_sparse(&raw, 64 << 20);
    match fs {
        "ntfs" => run_ok(Command::new("mkntfs").args(["-q", "-F", "-f"]).arg(&raw)),
        _ => run_ok(Command::new("mkfs.vfat").args(["-F", "32"]).arg(&raw)),
    };
    let mut big = vec![0u8; 3 << 20];
    Rng::new(9).fill(&mut big);
    // Files in the base.
    {
        let g = Guest::open(fs, &raw, &d.join("prep"), false);
        g.write("base.txt", b"from the base\n", d.path());
        g.write("delete-me.txt", b"old\n", d.path());
        g.write("big.bin", &big, d.path());
    }
    let base = d.join(format!("base.{ext}"));
    let fmt_args: Vec<&str> = if ext == "vhdx" {
        vec!["-O", "vhdx", "-o", "subformat=dynamic"]
    } else {
        vec!["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]
    };
    let mut q = vec!["convert", "-f", "raw"];
    q.extend(fmt_args);
    let (rs, bs) = (raw.display().to_string(), base.display().to_string());
    q.push(&rs);
    q.push(&bs);
    qemu_img(&q).assert_success();
    let base_sum = sha256_file(&base);
    let child = d.join(format!("child.{ext}"));
    vdiskfs(["create", "--parent", &bs, &child.display().to_string()]).assert_success();

    // Change the guest through a writable mount of the child.
    let mut new_big = vec![0u8; 5 << 20];
    Rng::new(10).fill(&mut new_big);
    {
        let m = vdiskfs_mount(&child, &d.join("m"), false);
        let g = Guest::open(fs, &m.dir().join("disk.raw"), &d.join("guest"), false);
        g.write("new.txt", b"written through vdiskfs\n", d.path());
        g.write("dir/sub/deep.bin", &new_big, d.path());
        g.write("base.txt", b"changed in the child\n", d.path());
        g.remove("delete-me.txt");
        drop(g);
        // `vdiskfs umount` returns only once the daemon has flushed and let go of the
        // image: the exclusive lock is free at once. Retried while busy: ntfs-3g and the
        // loop device let go of disk.raw a moment after the guest's unmount.
        vdiskfs_umount(m.dir());
        run_ok(
            Command::new("flock")
                .args(["-n", "-x"])
                .arg(&child)
                .arg("true"),
        );
        drop(m);
    }

    // Remount read-only: every change is there.
    {
        let m = vdiskfs_mount(&child, &d.join("m2"), true);
        let g = Guest::open(fs, &m.dir().join("disk.raw"), &d.join("guest2"), true);
        let s = d.path();
        assert_eq!(g.read("new.txt", s).unwrap(), b"written through vdiskfs\n");
        assert!(g.read("dir/sub/deep.bin", s).unwrap() == new_big);
        assert_eq!(g.read("base.txt", s).unwrap(), b"changed in the child\n");
        assert!(g.read("delete-me.txt", s).is_none());
        assert!(g.read("big.bin", s).unwrap() == big);
    }
    assert_eq!(
        sha256_file(&base),
        base_sum,
        "{fs}/{ext}: the base never changes"
    );
    vdiskfs(["check", &child.display().to_string()]).assert_success();
    // The guest's own checker on the merged image, and libvhdi's view of the chain.
    let merged = d.join("merged.raw");
    cat_to_file(&child, &[], &merged);
    match fs {
        "ntfs" => {
            run_ok(Command::new("ntfsfix").arg("-n").arg(&merged));
        }
        _ => {
            run_ok(Command::new("fsck.vfat").arg("-n").arg(&merged));
        }
    }
    let v = FuseMount::vhdimount(&child, &d.join("vhdi"));
    assert_same_file(
        &v.merged(),
        &merged,
        &format!("{fs}/{ext}: vhdimount vs vdiskfs cat"),
    );
}

fn ready() -> bool {
    require_fuse()
        && require_tool("mkntfs")
        && require_tool("ntfs-3g")
        && require_tool("mkfs.vfat")
        && require_tool("mcopy")
        && require_tool("vhdimount")
}

#[test]
fn fat_guest_in_vhdx_and_vhd_children() {
    if !ready() {
        return;
    }
    for ext in ["vhdx", "vhd"] {
        guest_round_trip("fat", ext);
    }
}

#[test]
fn ntfs_guest_in_vhdx_and_vhd_children() {
    if !ready() {
        return;
    }
    for ext in ["vhdx", "vhd"] {
        guest_round_trip("ntfs", ext);
    }
}
