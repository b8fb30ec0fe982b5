#!/usr/bin/env bash
# Prepare a Debian machine for building and testing vdiskfs.
#
#   scripts/setup.sh           # what the build, the tests and the demo need
#   scripts/setup.sh --bench   # also what only scripts/bench.sh needs (fio, hyperfine,
#                              # qemu-storage-daemon), where that removes nothing
#
# scripts/fresh-check.sh tests this script on fresh Debian 12 chroots.
#
# Idempotent: installs only the Debian packages that are missing (as root, or through
# sudo), makes sure the FUSE and loop devices exist, checks for cargo, installs cargo-deb
# (for the .deb and its test) and builds the
# release binary (target/release/vdiskfs). VDISKFS_SETUP_NO_BUILD=1 stops before the
# Rust part (scripts/fresh-check.sh uses it with FRESH_BUILD=0 to test only the apt part).
#
# It NEVER removes or downgrades an installed package. Every install is first simulated
# (`apt-get install -s`); if apt's plan removes or downgrades anything, setup stops and
# names the packages instead of installing. The real install also runs with --no-remove.
#
# Machine facts (checked on the project's machine image, 2026-11-30), so nobody has to
# rediscover them:
#   - The image is Debian 12 (bookworm) with qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1
#     preinstalled from bookworm-backports, but NO backports apt source is configured.
#     apt therefore only offers qemu 7.2 (bookworm, bookworm-security) for everything else.
#   - qemu-storage-daemon (bench only) is in qemu-utils 10.x (Debian 13's packaging, so
#     also the backport on the image), but in qemu-system-common for Debian 12's 7.2.
#   - Installing bookworm's qemu-system-common (7.2) next to qemu-utils 10.0.2 conflicts,
#     and apt "solves" it by REMOVING qemu-utils (and so qemu-img). That is why
#     qemu-system-common is bench-only, only for a qemu-utils without the daemon, and
#     installed only at the exact version of the installed qemu-utils.
#   - libfuse3-dev cannot be installed from the image's (stale) package lists
#     (libpcre2-dev wants an older libpcre2-8-0 than the one installed); nothing of ours
#     needs it: fuser is built without libfuse (default-features = false), and the
#     mount uses the fusermount3 binary from fuse3.
#   - Preinstalled: e2fsprogs, libfuse3-3, man-db, util-linux, mount, bsdutils (script).
#     Not preinstalled: fuse3, libvhdi-utils, ntfs-3g, dosfstools, mtools, gdisk, 7zip.
#   - The kernel has no vfat module (FAT guests are tested with mtools), /dev/fuse and
#     loop devices work for root, and `losetup -P` creates no partition nodes.
#   - The test suite accepts qemu 7.2 or 10.x as a judge (see integration/common).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: warning: %s\n' "$*" >&2; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

BENCH=0
for a in "$@"; do
    case "$a" in
    --bench) BENCH=1 ;;
    -h | --help)
        sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $a (try --help)" ;;
    esac
done

# What the build, the tests and the demo use:
#   fuse3                          fusermount3 and /dev/fuse for `vdiskfs mount`
#   qemu-utils                     qemu-img: makes test images and judges our output
#                                  (any installed version is kept: 7.2 or 10.x)
#   libvhdi-utils                  vhdimount/vhdiinfo: an independent VHD/VHDX reader
#   e2fsprogs ntfs-3g dosfstools   guest file systems for the mount tests (mkfs.*)
#   mtools                         FAT guests without the kernel's vfat (mcopy, mdir...)
#   gdisk util-linux mount         sgdisk, losetup, mount for partitioned guests
#   7zip                           7zz, another independent VHD/VHDX reader
#   man-db bsdutils                `man -w` and `script` (pseudo-terminal) in the tests
PACKAGES=(
    fuse3
    qemu-utils
    libvhdi-utils
    e2fsprogs ntfs-3g dosfstools mtools
    gdisk util-linux mount
    7zip
    man-db bsdutils
)
# Only scripts/bench.sh needs these (qemu-system-common is handled on its own below).
BENCH_PACKAGES=(fio hyperfine)

SUDO=()
NO_ROOT=
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        NO_ROOT=1
    fi
fi

command -v dpkg-query >/dev/null 2>&1 || die "this script is for Debian (dpkg-query not found); install by hand: ${PACKAGES[*]}"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }

UPDATED=0
apt_update_once() {
    [ "$UPDATED" = 1 ] && return 0
    UPDATED=1
    # A third-party source that cannot be reached must not stop us: the Debian archive is
    # what we need, and the simulation below says so if a package is missing.
    "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 || warn "apt-get update reported errors; trying with the package lists as they are"
}

# safe_install [--try] PKG...: simulate, refuse any removal or downgrade, then install.
# A refusal or failure stops setup, or with --try (bench extras) is a warning and
# returns 1.
safe_install() {
    local fail=die
    if [ "$1" = --try ]; then
        fail=warn
        shift
    fi
    if [ -n "$NO_ROOT" ]; then
        $fail "packages missing ($*) and neither root nor sudo is available"
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_update_once
    local sim
    if ! sim=$("${SUDO[@]}" apt-get install -s -q --no-install-recommends "$@" 2>&1); then
        printf '%s\n' "$sim" | grep -E '^(E:| [^ ].*: (Depends|Conflicts|Breaks))' >&2 || true
        $fail "apt cannot install $* on this machine without breaking installed packages (above); nothing was changed. Install them by hand or fix the apt sources."
        return 1
    fi
    local removes downgrades="" name old new
    removes=$(printf '%s\n' "$sim" | awk '/^Remv /{print $2}' | tr '\n' ' ')
    # "Inst NAME [OLD] (NEW ...)" replaces an installed version: refuse if NEW < OLD.
    while read -r name old new; do
        if dpkg --compare-versions "$new" lt "$old"; then downgrades+="$name "; fi
    done < <(printf '%s\n' "$sim" | sed -nE 's/^Inst ([^ ]+) \[([^]]+)\] \(([^ ]+) .*/\1 \2 \3/p')
    if [ -n "$removes" ] || [ -n "$downgrades" ]; then
        local what=""
        [ -z "$removes" ] || what="remove ${removes% }"
        [ -z "$downgrades" ] || what="${what:+$what and }downgrade ${downgrades% }"
        $fail "apt would $what to install $*; refusing (setup never removes or downgrades a package). Nothing was changed."
        return 1
    fi
    say "installing: $*"
    if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends --no-remove "$@"; then
        $fail "apt-get install $* failed (above)"
        return 1
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
# Any qemu-img will do as a judge; never pull in another qemu over an existing one.
if command -v qemu-img >/dev/null 2>&1; then
    keep=()
    for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || keep+=("$p"); done
    missing=("${keep[@]}")
fi

if [ "${#missing[@]}" -gt 0 ]; then
    safe_install "${missing[@]}"
else
    say "all Debian packages present"
fi

# Bench extras are installed on their own: if apt cannot install them cleanly, setup
# still succeeds (with a warning) and bench.sh says which rows it cannot run.
if [ "$BENCH" = 1 ]; then
    bench_missing=()
    for p in "${BENCH_PACKAGES[@]}"; do installed "$p" || bench_missing+=("$p"); done
    if [ "${#bench_missing[@]}" -gt 0 ]; then
        safe_install --try "${bench_missing[@]}" ||
            warn "not installed: ${bench_missing[*]}. bench.sh needs fio for every measurement and hyperfine for the 'vdiskfs cat' rows."
    else
        say "bench packages present: ${BENCH_PACKAGES[*]}"
    fi
fi

# The tools the tests call, by name: fail now rather than in the middle of a test.
for tool in qemu-img qemu-io vhdimount vhdiinfo fusermount3 mkfs.ext4 mkntfs ntfs-3g \
    mkfs.vfat mcopy sgdisk losetup 7zz sha256sum man script; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing packages"
done
say "qemu-img: $(qemu-img --version | head -1)"

# qemu-storage-daemon (bench only): qemu-utils 10.x has it; for 7.2 it lives in
# qemu-system-common, which must be the exact version of the installed qemu-utils
# (anything else makes apt remove qemu-utils). Unavailable is a warning, not a failure:
# bench.sh then skips (and marks) the qemu-storage-daemon rows.
if [ "$BENCH" = 1 ] && ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    qv=$(installed_version qemu-utils || true)
    [ -n "$NO_ROOT" ] || apt_update_once
    if [ -z "$qv" ]; then
        warn "qemu-img is not from the qemu-utils package; not installing qemu-storage-daemon. bench.sh skips the qemu-storage-daemon rows."
    elif apt-cache madison qemu-system-common 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$qv"; then
        safe_install --try "qemu-system-common=$qv" ||
            warn "qemu-storage-daemon not installed; bench.sh skips the qemu-storage-daemon rows."
    else
        how="add the apt source that qemu-utils $qv came from (a ~bpo version: 'deb http://deb.debian.org/debian bookworm-backports main') and rerun 'scripts/setup.sh --bench'"
        # Or move qemu-utils up to a version that apt has both packages of (setup never
        # changes the judge's version by itself).
        cand=$(apt-cache policy qemu-utils 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -n "$cand" ] && dpkg --compare-versions "$cand" gt "$qv" &&
            apt-cache madison qemu-system-common 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$cand"; then
            how="$how, or upgrade qemu-img with it: apt-get install qemu-utils=$cand qemu-system-common=$cand"
        fi
        warn "qemu-storage-daemon needs qemu-system-common $qv (the version of the installed qemu-utils; qemu-utils 10.x would include it), which no configured apt source offers. bench.sh skips the qemu-storage-daemon rows. To get them: $how."
    fi
fi
if [ "$BENCH" = 1 ] && command -v qemu-storage-daemon >/dev/null 2>&1; then
    say "qemu-storage-daemon: $(qemu-storage-daemon --version | head -n 1)"
fi

# Kernel devices: FUSE for `vdiskfs mount`, loop for mounting the guest.
# Inside a container modprobe may be impossible; that is a warning, the
# tests themselves say what they need.
if [ ! -e /dev/fuse ]; then
    "${SUDO[@]}" modprobe fuse 2>/dev/null || warn "/dev/fuse missing and 'modprobe fuse' failed: mount tests need FUSE"
fi
if [ ! -e /dev/loop-control ]; then
    "${SUDO[@]}" modprobe loop 2>/dev/null || warn "/dev/loop-control missing and 'modprobe loop' failed: guest loop-mount tests need it"
fi

if [ "${VDISKFS_SETUP_NO_BUILD:-0}" = 1 ]; then
    say "VDISKFS_SETUP_NO_BUILD=1: not checking cargo, not building"
    exit 0
fi

# The Rust toolchain (rustup) is expected to be installed already.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (https://rustup.rs, stable, 1.89 or newer) and make sure cargo is on PATH"

# cargo-deb builds the Debian package (scripts/deb.sh, integration/package.rs). Pinned to
# a version that builds with rustc 1.95 (and needs >= 1.85); installing it compiles ~70
# crates: about 2 CPU-minutes (7 min wall on a busy 2-core machine). Kept if present.
CARGO_DEB_VERSION=3.8.0
if ! command -v cargo-deb >/dev/null 2>&1; then
    say "installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)"
    cargo install --locked --version "$CARGO_DEB_VERSION" cargo-deb
fi

say "building release binary"
cargo build --release --locked
say "done: $(pwd)/target/release/vdiskfs"
