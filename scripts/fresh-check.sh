#!/usr/bin/env bash
# Reproduce fresh machines in Debian 12 chroots and check scripts/setup.sh on each.
# Not run by CI (it needs the network and takes a while); run it after changing setup.sh.
#
#   scripts/fresh-check.sh            # scenarios a, b, c and d
#   scripts/fresh-check.sh b d        # only some of them
#
# Scenarios (each in its own chroot made by debootstrap, like the project's image:
# Debian 12 with build-essential, git, e2fsprogs, libfuse3-3 and man-db, apt sources
# bookworm, bookworm-updates and bookworm-security):
#   a  the project's image: qemu-utils 10.x installed from bookworm-backports, then the
#      backports source removed again (apt-get update), so apt offers only qemu 7.2.
#   b  qemu-utils 7.2 from Debian 12.
#   c  like a, and scripts/setup.sh has already run once.
#   d  qemu-utils 7.2 at a version no apt source offers any more (bookworm-security's,
#      with that source removed): --bench cannot get qemu-storage-daemon (it would need
#      qemu-system-common at that version), must say so and still exit 0.
# In each: `scripts/setup.sh` then `scripts/setup.sh --bench`. Each must exit 0, remove
# and downgrade no package (dpkg-query before/after), leave a working qemu-img (makes,
# reads and converts a VHDX and a VHD), and build target/release/vdiskfs. What --bench
# did about qemu-storage-daemon is reported (installed, or the warning why not).
#
# Needs root, the network (deb.debian.org), about 2 GB under FRESH_DIR, and a rustup
# toolchain in ~/.rustup and ~/.cargo. They are bind-mounted read-only into the chroot
# (with the crates already in ~/.cargo/registry, the build needs no network), the source
# tree is copied in (tracked and untracked, not ignored files), and target/ is shared
# between the scenarios (FRESH_DIR/vdiskfs-fresh-target): the first build is cold, the
# next ones are incremental. /proc is mounted, /dev and /sys are bound read-only.
#
# Environment:
#   FRESH_DIR        where chroots, logs and the shared target go (default /var/tmp)
#   FRESH_MIRROR     Debian mirror (default http://deb.debian.org/debian)
#   FRESH_KEEP=1     keep the base chroot and the target dir for another run
#   FRESH_BUILD=0    do not build in the chroot (passes VDISKFS_SETUP_NO_BUILD=1 to setup.sh)
#   FRESH_BENCH=1    after setup.sh --bench, a tiny scripts/bench.sh run in each chroot
#                    (BENCH_SIZE=256M BENCH_RUNTIME=2 BENCH_REPEAT=1; needs the build):
#                    must exit 0; its rows marked "n/a" are reported
#
# The host's installed packages are never changed: debootstrap, when not installed, is
# fetched with `apt-get download` and unpacked under FRESH_DIR. Every mount is undone on
# exit and checked with findmnt before anything is deleted.
#
# The command lines run inside the chroot are single-quoted on purpose.
# shellcheck disable=SC2016
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SRC=$(pwd)

FRESH_DIR=${FRESH_DIR:-/var/tmp}
MIRROR=${FRESH_MIRROR:-http://deb.debian.org/debian}
BUILD=${FRESH_BUILD:-1}
BASE="$FRESH_DIR/vdiskfs-chroot-base"
TARGET="$FRESH_DIR/vdiskfs-fresh-target"
LOGS="$FRESH_DIR/vdiskfs-fresh-logs"

say() { printf '\n== %s\n' "$*"; }
die() {
    printf 'fresh-check: error: %s\n' "$*" >&2
    exit 1
}

SCENARIOS=("$@")
[ "${#SCENARIOS[@]}" -gt 0 ] || SCENARIOS=(a b c d)
for s in "${SCENARIOS[@]}"; do
    case "$s" in a | b | c | d) ;; -h | --help)
        sed -n '2,42p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown scenario $s (a, b, c or d)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot, mounts)"
if [ ! -d "$HOME/.rustup" ] || [ ! -d "$HOME/.cargo" ]; then
    die "needs a rustup toolchain in $HOME/.rustup and $HOME/.cargo"
fi
for t in chroot mount umount findmnt dpkg-query apt-get git tar; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found"
done

# ---------------------------------------------------------------------------------------
# Mounts and cleanup. MOUNTED lists mount points in the order they were made.
MOUNTED=()
CHROOTS=()
mnt() { # mnt TARGET mount-args...
    local t=$1
    shift
    mkdir -p "$t"
    mount "$@" "$t"
    MOUNTED+=("$t")
}
mounts_under() { # mount points at or under DIR, deepest first
    findmnt -rn -o TARGET | awk -v d="$1" 'index($0, d) == 1 && (length($0) == length(d) || substr($0, length(d) + 1, 1) == "/")' | sort -r
}
unmount_all() {
    local i m
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        m=${MOUNTED[$i]}
        if findmnt -rn "$m" >/dev/null 2>&1; then
            umount "$m" 2>/dev/null || umount -l "$m" || true
        fi
    done
    MOUNTED=()
}
# Delete a chroot only when nothing is mounted under it any more (a bind mount left
# behind would let rm -rf reach into the host).
remove_tree() {
    local d=$1 left
    [ -d "$d" ] || return 0
    for m in $(mounts_under "$d"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    left=$(mounts_under "$d")
    if [ -n "$left" ]; then
        printf 'fresh-check: NOT deleting %s: still mounted: %s\n' "$d" "$left" >&2
        return 1
    fi
    rm -rf "$d"
}
cleanup() {
    local rc=$?
    set +e
    unmount_all
    for c in "${CHROOTS[@]}"; do remove_tree "$c"; done
    if [ "${FRESH_KEEP:-0}" != 1 ]; then
        remove_tree "$BASE"
        rm -rf "$TARGET" "$FRESH_DIR/vdiskfs-debootstrap"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# The base chroot (made once, copied for each scenario).
DEBOOTSTRAP=(debootstrap)
if ! command -v debootstrap >/dev/null 2>&1; then
    d="$FRESH_DIR/vdiskfs-debootstrap"
    if [ ! -x "$d/usr/sbin/debootstrap" ]; then
        mkdir -p "$d/deb"
        (cd "$d/deb" && apt-get download debootstrap >/dev/null 2>&1) ||
            die "debootstrap is not installed and 'apt-get download debootstrap' failed"
        dpkg -x "$d"/deb/debootstrap_*.deb "$d"
    fi
    DEBOOTSTRAP=(env "DEBOOTSTRAP_DIR=$d/usr/share/debootstrap" "$d/usr/sbin/debootstrap")
fi

mkdir -p "$LOGS"
if [ ! -e "$BASE/etc/vdiskfs-fresh-base" ]; then
    remove_tree "$BASE"
    say "base: debootstrap bookworm into $BASE (log: $LOGS/debootstrap.log)"
    t0=$(date +%s)
    "${DEBOOTSTRAP[@]}" --variant=minbase \
        --include=ca-certificates,e2fsprogs,libfuse3-3,man-db,build-essential,git,pkg-config \
        bookworm "$BASE" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 ||
        die "debootstrap failed: $(tail -n 5 "$LOGS/debootstrap.log")"
    # apt sources as on the project's image (deb822, no backports).
    rm -f "$BASE/etc/apt/sources.list"
    cat >"$BASE/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # No daemon may start inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$BASE/usr/sbin/policy-rc.d"
    chmod 755 "$BASE/usr/sbin/policy-rc.d"
    date -u >"$BASE/etc/vdiskfs-fresh-base"
    echo "base made in $(($(date +%s) - t0)) s"
fi

# ---------------------------------------------------------------------------------------
# One scenario's chroot: a copy of the base with the mounts setup.sh needs.
ROOT=""
enter() { # enter NAME: make the chroot, mount, copy the source
    ROOT="$FRESH_DIR/vdiskfs-chroot-$1"
    remove_tree "$ROOT"
    CHROOTS+=("$ROOT")
    cp -a "$BASE" "$ROOT"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    mnt "$ROOT/proc" -t proc proc
    mnt "$ROOT/sys" --bind -o ro /sys
    mnt "$ROOT/dev" --bind -o ro /dev
    mnt "$ROOT/root/.rustup" --bind -o ro "$HOME/.rustup"
    mnt "$ROOT/root/.cargo" --bind -o ro "$HOME/.cargo"
    mkdir -p "$ROOT/src/vdiskfs" "$TARGET"
    git -C "$SRC" ls-files -z -c -o --exclude-standard | tar -C "$SRC" --null -T - -cf - | tar -C "$ROOT/src/vdiskfs" -xf -
    mnt "$ROOT/src/vdiskfs/target" --bind "$TARGET"
}
leave() {
    unmount_all
    remove_tree "$ROOT"
    ROOT=""
}
# Run a command line inside the chroot, with a clean environment like a login shell
# (cargo is not on PATH: setup.sh finds it through ~/.cargo/env).
in_root() {
    local nobuild=()
    [ "$BUILD" = 1 ] || nobuild=(VDISKFS_SETUP_NO_BUILD=1)
    env -i HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${nobuild[@]}" \
        chroot "$ROOT" bash -c "$1"
}
packages() { # packages FILE: installed packages with versions
    in_root "dpkg-query -W -f='\${db:Status-Abbrev} \${Package} \${Version}\n'" |
        awk '$1 ~ /^.i/ {print $2, $3}' | sort >"$1"
}
# Compare two package lists: print what was installed, upgraded, removed, downgraded;
# return 1 if anything was removed or downgraded.
compare() { # compare BEFORE AFTER
    local bad=0 name old new
    declare -A B A
    while read -r name old; do B[$name]=$old; done <"$1"
    while read -r name new; do A[$name]=$new; done <"$2"
    local inst=() up=() rm=() down=()
    for name in "${!A[@]}"; do
        if [ -z "${B[$name]:-}" ]; then
            inst+=("$name=${A[$name]}")
        elif [ "${B[$name]}" != "${A[$name]}" ]; then
            if dpkg --compare-versions "${A[$name]}" lt "${B[$name]}"; then
                down+=("$name ${B[$name]} -> ${A[$name]}")
            else
                up+=("$name ${B[$name]} -> ${A[$name]}")
            fi
        fi
    done
    for name in "${!B[@]}"; do [ -n "${A[$name]:-}" ] || rm+=("$name=${B[$name]}"); done
    echo "  installed ${#inst[@]}: $(printf '%s\n' "${inst[@]}" | sort | tr '\n' ' ')"
    [ "${#up[@]}" -eq 0 ] || echo "  upgraded ${#up[@]}: $(printf '%s, ' "${up[@]}")"
    if [ "${#rm[@]}" -gt 0 ]; then
        echo "  REMOVED ${#rm[@]}: ${rm[*]}"
        bad=1
    fi
    if [ "${#down[@]}" -gt 0 ]; then
        echo "  DOWNGRADED ${#down[@]}: $(printf '%s, ' "${down[@]}")"
        bad=1
    fi
    [ "$bad" = 0 ] && echo "  removed 0, downgraded 0"
    return "$bad"
}
# qemu-img works: version, and a VHDX and a VHD made, filled, read back and checked.
qemu_works() {
    in_root 'set -e
        d=$(mktemp -d); trap "rm -rf $d" EXIT
        qemu-img --version | head -n 1
        head -c 3145728 /dev/urandom > $d/in.raw
        qemu-img convert -f raw -O vhdx -o subformat=dynamic $d/in.raw $d/x.vhdx
        qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on $d/in.raw $d/x.vhd
        qemu-img check -q -f vhdx $d/x.vhdx
        for f in vhdx:x.vhdx vpc:x.vhd; do
            qemu-img convert -f ${f%%:*} -O raw $d/${f#*:} $d/out.raw
            cmp $d/in.raw $d/out.raw
        done
        qemu-img info --output=json -f vhdx $d/x.vhdx | grep -q "\"virtual-size\": 3145728"
        qemu-io -f vhdx -c "write -q -P 0x5a 4096 8192" -c "read -q -P 0x5a 4096 8192" $d/x.vhdx
        echo "qemu-img works (vhdx and vhd round trips, check, info, qemu-io)"'
}

FAILED=()
step() { # step NAME SCENARIO COMMAND: run setup.sh, compare package lists, check qemu-img
    local name=$1 sc=$2 cmd=$3 log rc t0 secs
    log="$LOGS/$sc.$name.log"
    packages "$LOGS/$sc.$name.before"
    echo "+ $cmd   (log: $log)"
    t0=$(date +%s)
    set +e
    in_root "cd /src/vdiskfs && $cmd" >"$log" 2>&1
    rc=$?
    set -e
    secs=$(($(date +%s) - t0))
    packages "$LOGS/$sc.$name.after"
    echo "  exit $rc after $secs s"
    [ "$rc" = 0 ] || {
        FAILED+=("$sc: $cmd exited $rc")
        tail -n 15 "$log" | sed 's/^/  | /'
    }
    compare "$LOGS/$sc.$name.before" "$LOGS/$sc.$name.after" || FAILED+=("$sc: $cmd removed or downgraded packages")
    grep -E '^setup: (installing|all Debian|qemu-img:|warning:|error:)' "$log" | sed 's/^/  | /' || true
    if qemu_works >"$log.qemu" 2>&1; then
        sed 's/^/  /' "$log.qemu"
    else
        FAILED+=("$sc: qemu-img broken after $cmd")
        sed 's/^/  BROKEN: /' "$log.qemu"
    fi
    if [ "$BUILD" = 1 ] && [ "$rc" = 0 ]; then
        in_root '/src/vdiskfs/target/release/vdiskfs --version' | sed 's/^/  built: /' ||
            FAILED+=("$sc: target/release/vdiskfs does not run")
    fi
    if in_root 'command -v qemu-storage-daemon' >/dev/null 2>&1; then
        echo "  qemu-storage-daemon: $(in_root 'qemu-storage-daemon --version | head -n 1')"
    else
        echo "  qemu-storage-daemon: not installed"
    fi
}

# ---------------------------------------------------------------------------------------
for sc in "${SCENARIOS[@]}"; do
    case $sc in
    a) say "scenario a: qemu-utils 10.x from bookworm-backports, backports source removed" ;;
    b) say "scenario b: qemu-utils 7.2 from Debian 12" ;;
    c) say "scenario c: as a, and setup.sh has already run once" ;;
    d) say "scenario d: qemu-utils 7.2 at a version no apt source offers (bookworm-security's, source removed)" ;;
    esac
    enter "$sc"
    prep="$LOGS/$sc.prepare.log"
    case $sc in
    a | c)
        # The image's qemu-utils came from bookworm-backports; take that exact version
        # if backports still has it, else its current one.
        in_root 'set -e
            echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
            apt-get update -q
            v=$(apt-cache madison qemu-utils | awk -F"|" "/bookworm-backports/ {gsub(/ /,\"\",\$2); print \$2}" | grep -xF "1:10.0.2+ds-2+deb13u1~bpo12+1" || true)
            if [ -n "$v" ]; then q="qemu-utils=$v"; else q="qemu-utils/bookworm-backports"; fi
            apt-get install -y -q --no-install-recommends "$q"
            rm /etc/apt/sources.list.d/backports.list
            apt-get update -q' >"$prep" 2>&1 || die "scenario $sc: preparing failed (log: $prep)"
        ;;
    b)
        in_root 'apt-get update -q && apt-get install -y -q --no-install-recommends qemu-utils' >"$prep" 2>&1 ||
            die "scenario b: preparing failed (log: $prep)"
        ;;
    d)
        in_root 'set -e
            apt-get update -q
            apt-get install -y -q --no-install-recommends qemu-utils/bookworm-security
            f=/etc/apt/sources.list.d/debian.sources
            awk "BEGIN {RS=\"\"; ORS=\"\n\n\"} !/bookworm-security/" $f > $f.new
            mv $f.new $f
            apt-get update -q' >"$prep" 2>&1 || die "scenario d: preparing failed (log: $prep)"
        ;;
    esac
    echo "prepared: $(in_root 'dpkg-query -W -f="qemu-utils \${Version}" qemu-utils') installed; the apt sources offer qemu-utils $(in_root 'apt-cache madison qemu-utils' | awk -F'|' '{gsub(/ /, "", $2); printf "%s%s", sep, $2; sep=", "}')"
    if [ "$sc" = c ]; then
        in_root 'cd /src/vdiskfs && scripts/setup.sh' >"$LOGS/c.first-run.log" 2>&1 ||
            die "scenario c: the first setup.sh run failed (log: $LOGS/c.first-run.log)"
        echo "setup.sh ran once (log: $LOGS/c.first-run.log)"
    fi
    step setup "$sc" scripts/setup.sh
    step bench "$sc" 'scripts/setup.sh --bench'
    if [ "${FRESH_BENCH:-0}" = 1 ] && [ "$BUILD" = 1 ]; then
        log="$LOGS/$sc.bench-run.log"
        echo "+ BENCH_SIZE=256M BENCH_RUNTIME=2 BENCH_REPEAT=1 scripts/bench.sh   (log: $log)"
        if in_root 'cd /src/vdiskfs && BENCH_SIZE=256M BENCH_RUNTIME=2 BENCH_REPEAT=1 scripts/bench.sh' >"$log" 2>&1; then
            echo "  exit 0; rows not measured: $(grep -c 'n/a (' "$log" || true) lines with n/a"
            grep -E '^bench: skipping' "$log" | sort -u | sed 's/^/  | /' || true
        else
            FAILED+=("$sc: scripts/bench.sh failed")
            tail -n 15 "$log" | sed 's/^/  | /'
        fi
    fi
    leave
done

say "summary (logs in $LOGS)"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf '  FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "  all scenarios passed: ${SCENARIOS[*]}"
