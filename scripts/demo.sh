#!/usr/bin/env bash
# Try vdiskfs without a VHDX of your own (run scripts/setup.sh first, then as root):
#
#   sudo scripts/demo.sh
#
# Builds a small sample chain (a base VHDX holding an ext4 file system with a few files,
# and a differencing child of it), mounts the chain, loop-mounts the guest file system
# read-only and reads a file, then mounts the child writable, writes a file into the
# guest, and shows that the base is unchanged while the child holds the new file.
# Every command is printed before it runs ("$ ..."), so you can repeat them on your
# own images. Nothing is left mounted, even when a step fails.
#
# DEMO_DIR sets where the temporary work directory goes (default /tmp); DEMO_KEEP=1
# keeps it (the images) afterwards.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}
note() { printf '\n# %s\n' "$*"; }
# Print a command, then run it.
run() {
    printf '$ %s\n' "$*"
    "$@"
}
# The same for a command line that needs the shell (redirections, pipes).
run_sh() {
    printf '$ %s\n' "$1"
    bash -c "set -euo pipefail; $1"
}

[ "$(id -u)" -eq 0 ] || die "run as root (sudo scripts/demo.sh): loop-mounting the guest file system needs it"
[ -x "$ROOT/target/release/vdiskfs" ] || die "target/release/vdiskfs not found: run scripts/setup.sh first"
for t in qemu-img mkfs.ext4 fusermount3 losetup mount sha256sum flock; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found: run scripts/setup.sh first"
done

WORK=$(mktemp -d "${DEMO_DIR:-/tmp}/vdiskfs-demo.XXXXXX")
MNT="$WORK/mnt"     # vdiskfs mount point: holds disk.raw
GUEST="$WORK/guest" # the guest ext4 file system, loop-mounted from disk.raw

# Undo whatever is still mounted: guest file systems, their loop devices, FUSE mounts.
cleanup() {
    local rc=$? d l
    set +e
    for d in "$GUEST" "$GUEST-base"; do
        mountpoint -q "$d" 2>/dev/null && umount -l "$d"
    done
    for d in "$MNT" "$MNT-base"; do
        if [ -e "$d/disk.raw" ]; then
            for l in $(losetup -j "$d/disk.raw" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
        fi
        if grep -qF " $d " /proc/self/mountinfo; then
            fusermount3 -u -z "$d" 2>/dev/null || umount -l "$d"
        fi
    done
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $WORK"
    else
        rm -rf "$WORK"
    fi
    [ "$rc" -eq 0 ] || echo "demo: failed (exit $rc); everything it mounted has been unmounted" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run from the work directory with vdiskfs on PATH, so the commands shown are the
# commands run.
export PATH="$ROOT/target/release:$PATH"
cd "$WORK"
note "Working in $WORK, with vdiskfs from $ROOT/target/release on PATH:"
echo "\$ export PATH=\"$ROOT/target/release:\$PATH\"; cd $WORK"

# ---------------------------------------------------------------------------------------
note "1. A base disk: an ext4 file system holding a few files, converted to a dynamic VHDX."
run mkdir files mnt guest
run_sh "echo 'Hello from inside a VHDX base disk.' > files/hello.txt"
run_sh "mkdir files/etc && printf 'hostname=demo-guest\nrole=example\n' > files/etc/guest.conf"
run_sh "seq 1 1000 > files/numbers.txt"
run mkfs.ext4 -q -L demo -d files base.raw 64M
run qemu-img convert -f raw -O vhdx -o subformat=dynamic base.raw base.vhdx
run rm base.raw

note "2. A differencing child of it (what Hyper-V makes for a checkpoint: an .avhdx)."
run vdiskfs create --parent base.vhdx child.vhdx
run vdiskfs info child.vhdx
run_sh "sha256sum base.vhdx | tee base.sha256"

# ---------------------------------------------------------------------------------------
note "3. Mount the chain read-only: mnt/disk.raw is the merged raw disk (child over base)."
run vdiskfs mount --read-only child.vhdx mnt
run ls -l mnt
note "   Loop-mount the guest file system in it, read-only, and read a file."
run mount -o loop,ro mnt/disk.raw guest
run ls -l guest guest/etc
run cat guest/hello.txt
run cat guest/etc/guest.conf
note "   Unmount: the guest first, then the chain."
run umount guest
run vdiskfs umount mnt

# ---------------------------------------------------------------------------------------
note "4. Mount the child writable and write into the guest: the change lands in child.vhdx only."
run vdiskfs mount child.vhdx mnt
run mount -o loop mnt/disk.raw guest
run_sh "echo 'Written through vdiskfs on $(date -u +%Y-%m-%d).' > guest/written-by-demo.txt"
run_sh "echo 'role=changed-by-demo' >> guest/etc/guest.conf"
run umount guest
run vdiskfs umount mnt
note "   vdiskfs umount returns once the mount is gone; the daemon then flushes and closes
#   child.vhdx. Wait for it to let go of the file (its lock) before using the file again:"
run flock -x -w 30 child.vhdx true

# ---------------------------------------------------------------------------------------
note "5. The base is byte-for-byte unchanged; the child grew and checks clean."
run sha256sum -c base.sha256
run ls -l base.vhdx child.vhdx
run vdiskfs check child.vhdx

note "6. Remount the chain read-only: the new file is there."
run vdiskfs mount --read-only child.vhdx mnt
run mount -o loop,ro mnt/disk.raw guest
run ls -l guest
run cat guest/written-by-demo.txt
run cat guest/etc/guest.conf
run umount guest
run vdiskfs umount mnt

note "7. The base alone (mounted by itself) still has the original files only."
run mkdir mnt-base guest-base
run vdiskfs mount --read-only base.vhdx mnt-base
run mount -o loop,ro mnt-base/disk.raw guest-base
run ls -l guest-base
run cat guest-base/etc/guest.conf
run umount guest-base
run vdiskfs umount mnt-base

note "Done. To do the same with your own images:"
cat <<'EOF'
    vdiskfs mount --read-only  YOUR.avhdx /mnt/disk      # parents are found from the child's locators
    mount -o loop,ro /mnt/disk/disk.raw /mnt/guest       # partitioned disk: mount -o loop,ro /mnt/disk/p2 /mnt/guest
    ...
    umount /mnt/guest && vdiskfs umount /mnt/disk
EOF
