#!/usr/bin/env bash
# Prepare a fresh Debian machine for building and testing vdiskfs.
#
#   scripts/setup.sh
#
# Idempotent: installs only the Debian packages that are missing (as root, or
# through sudo), makes sure the FUSE and loop devices exist, checks for cargo,
# and builds the release binary (target/release/vdiskfs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# What the build, the tests, the benchmark and the demo use:
#   fuse3 libfuse3-dev pkg-config  FUSE (fusermount3, /dev/fuse) for `vdiskfs mount`
#   qemu-utils                     qemu-img: makes test images and judges our output
#   qemu-system-common             qemu-storage-daemon (FUSE export) for scripts/bench.sh
#   libvhdi-utils                  vhdimount/vhdiinfo: an independent VHD/VHDX reader
#   e2fsprogs ntfs-3g dosfstools   guest file systems for the mount tests (mkfs.*)
#   mtools                         FAT guests without the kernel's vfat (mcopy, mdir...)
#   gdisk util-linux mount         sgdisk, losetup, mount for partitioned guests
#   fio hyperfine                  benchmarks
#   7zip                           7zz, another independent VHD/VHDX reader
PACKAGES=(
    fuse3 libfuse3-dev pkg-config
    qemu-utils qemu-system-common
    libvhdi-utils
    e2fsprogs ntfs-3g dosfstools mtools
    gdisk util-linux mount
    fio hyperfine
    7zip
)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        SUDO=()
        NO_ROOT=1
    fi
fi

command -v dpkg-query >/dev/null 2>&1 || die "this script is for Debian (dpkg-query not found); install by hand: ${PACKAGES[*]}"

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    [ -z "${NO_ROOT:-}" ] || die "packages missing (${missing[*]}) and neither root nor sudo is available"
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A third-party source that cannot be reached must not stop us: the Debian
    # archive is what we need, and apt-get install says so if it is missing.
    "${SUDO[@]}" apt-get update -q || say "warning: apt-get update reported errors; trying to install anyway"
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "all Debian packages present"
fi

# The tools the tests call, by name: fail now rather than in the middle of a test.
for tool in qemu-img qemu-storage-daemon vhdimount vhdiinfo fusermount3 mkfs.ext4 mkntfs \
    mkfs.vfat sgdisk losetup fio hyperfine 7zz sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing packages"
done

# Kernel devices: FUSE for `vdiskfs mount`, loop for mounting the guest.
# Inside a container modprobe may be impossible; that is a warning, the
# tests themselves say what they need.
if [ ! -e /dev/fuse ]; then
    "${SUDO[@]}" modprobe fuse 2>/dev/null || say "warning: /dev/fuse missing and 'modprobe fuse' failed: mount tests need FUSE"
fi
if [ ! -e /dev/loop-control ]; then
    "${SUDO[@]}" modprobe loop 2>/dev/null || say "warning: /dev/loop-control missing and 'modprobe loop' failed: guest loop-mount tests need it"
fi

# The Rust toolchain (rustup) is expected to be installed already.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (https://rustup.rs, stable, 1.80 or newer) and make sure cargo is on PATH"

say "building release binary"
cargo build --release --locked
say "done: $(pwd)/target/release/vdiskfs"
