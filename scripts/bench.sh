#!/usr/bin/env bash
# Benchmark vdiskfs against its peers on a depth-3 chain of random content.
#
#   scripts/bench.sh                      # 1 GiB chains, 20 s random runs, 3 rounds
#   BENCH_SIZE=256M BENCH_RUNTIME=3 BENCH_REPEAT=1 scripts/bench.sh   # quick smoke run
#
# Environment:
#   BENCH_SIZE     virtual disk size (K/M/G suffixes, powers of 1024; at least 256M; default 1G)
#   BENCH_RUNTIME  seconds per time-based fio run (default 20)
#   BENCH_REPEAT   rounds of the read measurements; the table shows the median (default 3)
#   BENCH_DIR      where the temporary work directory goes (default /var/tmp)
#   BENCH_KEEP=1   keep the work directory (images, fio logs) instead of deleting it
#
# Needs root (drop_caches), fuse3, qemu-img, qemu-io, vhdimount (libvhdi-utils) and fio;
# hyperfine for the `vdiskfs cat` rows and qemu-storage-daemon for the qcow2 rows.
# `scripts/setup.sh --bench` installs them. Without hyperfine or qemu-storage-daemon the
# script says which rows it cannot run and why, marks them "n/a (...)" in the tables, and
# runs the rest. qemu-storage-daemon (in qemu-system-common) is not always installable:
# setup.sh installs it only at the exact version of the installed qemu-utils.
#
# What is measured (docs/performance.md explains why):
#   Chains: base made by qemu-img from a random raw file (dynamic VHDX / dynamic VHD /
#   qcow2), two children made by `vdiskfs create --parent` (qcow2: `qemu-img create -b`),
#   each child given the same known data (through a writable `vdiskfs mount` and dd; for
#   qcow2 with qemu-io). A raw reference copy gets the same writes; every exported file
#   is compared with it (the "same bytes" column).
#   Reads, for vdiskfs (`mount --read-only`), vhdimount (same VHDX/VHD chain),
#   qemu-storage-daemon (FUSE export of the qcow2 chain) and the raw copy (page cache):
#     seq    fio 1 MiB sequential read of the whole file, psync, buffered. Before each run
#            the page cache is dropped (echo 3 > drop_caches) and the backing image files
#            are read back in, so the exported file is cold and its backing files hot.
#            The raw copy is read hot (the ceiling).
#     rand   fio 4 KiB random reads, psync, O_DIRECT on the FUSE file (so every read
#            reaches the daemon; backing files hot), 1 job (QD1) and 4 jobs. The raw copy
#            is read buffered from the page cache (the ceiling).
#   Writes (vdiskfs writable mount of a fresh child of the depth-3 chain, both formats;
#   qemu-storage-daemon writable export of a fresh qcow2 child for reference):
#     seqw   fio 1 MiB sequential write of the whole disk, buffered, end_fsync=1.
#     mixed  fio 4 KiB random 70% read / 30% write, O_DIRECT, 4 jobs, end_fsync=1,
#            on another fresh child (so writes allocate blocks as they go).
#   cat: hyperfine of `vdiskfs cat` of the page-cache-hot dynamic base VHDX (and VHD, and
#   the depth-3 VHDX chain) to /dev/null.
#   convert (the last section; BENCH_ONLY=convert runs it alone, needing only qemu-img,
#   fusermount3 and cmp): `vdiskfs convert` of a depth-3 VHDX chain of BENCH_SIZE to a
#   dynamic VHDX against `qemu-img convert -f raw -O vhdx` of the same merged raw file,
#   outputs on disk and in tmpfs, BENCH_REPEAT rounds; and a 2 TiB chain holding ~100 MiB.
#   transport (BENCH_ONLY=transport only; needs qemu-img, vhdimount, fio, mkfs.ext4,
#   losetup and a kernel with CONFIG_FUSE_IO_URING): the FUSE transports (issue 18) on a
#   written depth-2 VHDX chain holding an ext4 guest: vdiskfs --transport classic,
#   vdiskfs --transport uring (enable_uring turned on for the section, then put back),
#   vhdimount, and the raw merged disk (the ceiling), interleaved, BENCH_REPEAT rounds:
#   fio 1 MiB sequential reads, 4 KiB random reads QD1 and 4 jobs (as above), then tar
#   of the guest and find+stat of every guest file through a loop device (caches
#   dropped, backing files hot); and the 70/30 mixed write for both transports.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VD="$ROOT/target/release/vdiskfs"

SIZE_ARG=${BENCH_SIZE:-1G}
RUNTIME=${BENCH_RUNTIME:-20}
REPEAT=${BENCH_REPEAT:-3}
BASEDIR=${BENCH_DIR:-/var/tmp}
RAMP=2
[ "$RUNTIME" -le 4 ] && RAMP=0

say() { printf '\n== %s\n' "$*"; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

SIZE=$(numfmt --from=iec "$SIZE_ARG") || die "BENCH_SIZE=$SIZE_ARG: not a size"
MIB=$((1 << 20))
[ "$SIZE" -ge $((256 * MIB)) ] || die "BENCH_SIZE must be at least 256M (got $SIZE_ARG)"
[ $((SIZE % MIB)) -eq 0 ] || die "BENCH_SIZE must be a whole number of MiB"

[ "$(id -u)" -eq 0 ] || die "run as root (drop_caches, FUSE mounts)"

# BENCH_ONLY=NAME: only the self-contained section NAME (convert, resize, transport, ...:
# the `# >>> NAME section` blocks near the end of this file), which defines NAME_bench.
if [ -n "${BENCH_ONLY:-}" ]; then
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    grep -q "^# >>> ${BENCH_ONLY} section -" "${BASH_SOURCE[0]}" ||
        die "BENCH_ONLY=${BENCH_ONLY}: no such section (see the '# >>> NAME section' lines in $0)"
    # shellcheck disable=SC1090
    source <(sed -n "/^# >>> ${BENCH_ONLY} section -/,/^# <<< ${BENCH_ONLY} section/p" "${BASH_SOURCE[0]}")
    "${BENCH_ONLY}_bench"
    exit 0
fi
# cargo from rustup, as setup.sh and test.sh find it (a fresh root shell lacks it on PATH).
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
# fio runs every read and write row: without it there is nothing to compare.
command -v fio >/dev/null 2>&1 ||
    die "fio not found: it runs every read and write measurement, so nothing can be compared. Install it with 'scripts/setup.sh --bench' (Debian package fio)."
for t in cargo qemu-img qemu-io vhdimount fusermount3 cmp; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found (run scripts/setup.sh)"
done
# Optional peers: rows that need a missing tool are skipped and shown as "n/a (WHY)".
QSD=1
QSD_NA="n/a (qemu-storage-daemon not installed)"
QSD_WHY="qemu-storage-daemon is not installed, so the qsd-qcow2 rows (qcow2 chain through qemu's FUSE export: reads, writes, and the 'vs qemu-storage-daemon' targets) are not measured. It is in the Debian package qemu-system-common, which must have the exact version of the installed qemu-utils (apt removes qemu-utils otherwise); 'scripts/setup.sh --bench' installs it when a configured apt source offers that version (for a ~bpo qemu-utils: bookworm-backports)."
command -v qemu-storage-daemon >/dev/null 2>&1 || QSD=0
HYPERFINE=1
HF_NA="n/a (hyperfine not installed)"
HF_WHY="hyperfine is not installed, so the 'vdiskfs cat' rows are not measured. Install it with 'scripts/setup.sh --bench' (Debian package hyperfine)."
command -v hyperfine >/dev/null 2>&1 || HYPERFINE=0
skipped_rows() {
    [ "$QSD" = 1 ] || printf 'bench: skipping: %s\n' "$QSD_WHY" >&2
    [ "$HYPERFINE" = 1 ] || printf 'bench: skipping: %s\n' "$HF_WHY" >&2
    return 0
}
skipped_rows

# ---------------------------------------------------------------------------------------
# Cleanup: every mount, daemon and temp file goes, whatever happened.
MOUNTS=()   # FUSE mount points (directories or files)
QSD_PIDS=() # pid files of qemu-storage-daemon instances
WORK=""
cleanup() {
    local rc=$?
    set +e
    local m p f
    for f in "${QSD_PIDS[@]}"; do
        if [ -s "$f" ]; then
            p=$(cat "$f")
            kill "$p" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    for m in "${MOUNTS[@]}"; do
        if mountpoint -q "$m" 2>/dev/null || grep -qF " $m " /proc/self/mountinfo; then
            fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        fi
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${BENCH_KEEP:-0}" = 1 ]; then
            echo "bench: kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

is_mounted() { grep -qF " $1 " /proc/self/mountinfo; }

# `umount` a FUSE mount and wait until its daemon let go of IMAGE (the top image's
# exclusive flock), so the next step may open it.
vd_umount() {
    local dir=$1 img=${2:-}
    "$VD" umount "$dir"
    if [ -n "$img" ]; then
        flock -x -w 60 "$img" true || die "daemon still holds $img 60 s after unmount"
    fi
}

vd_mount() { # vd_mount IMAGE DIR [extra options...]
    local img=$1 dir=$2
    shift 2
    mkdir -p "$dir"
    MOUNTS+=("$dir")
    "$VD" mount "$@" "$img" "$dir"
}

# vhdimount exposes one file per layer, base first: DIR/vhdi1 is the base, the highest
# number the top image's merged view.
vhdi_mount() { # vhdi_mount IMAGE DIR
    mkdir -p "$2"
    MOUNTS+=("$2")
    vhdimount "$1" "$2" >/dev/null
    for _ in $(seq 100); do [ -e "$2/vhdi1" ] && return 0; sleep 0.1; done
    die "vhdimount $1 $2: vhdi1 did not appear"
}

qsd_export() { # qsd_export QCOW2 FILE writable(on|off)
    local img=$1 file=$2 wr=$3
    : >"$file"
    MOUNTS+=("$file")
    QSD_PIDS+=("$file.pid")
    qemu-storage-daemon \
        --blockdev "node-name=prot,driver=file,filename=$img" \
        --blockdev "node-name=fmt,driver=qcow2,file=prot" \
        --export "type=fuse,id=exp,node-name=fmt,mountpoint=$file,writable=$wr" \
        --pidfile "$file.pid" --daemonize
    for _ in $(seq 100); do is_mounted "$file" && return 0; sleep 0.1; done
    die "qemu-storage-daemon did not mount $file"
}

qsd_stop() { # qsd_stop FILE
    local p
    p=$(cat "$1.pid")
    kill "$p"
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    ! is_mounted "$1" || fusermount3 -u "$1"
    rm -f "$1.pid"
}

# Page cache: drop everything, then read the backing files back in.
tb_cold() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cat "$@" >/dev/null
}

# fio --minimal (terse v3) fields: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS.
fio_run() { # tb_fio LOGNAME fio-args... ; prints the terse line
    local log=$1
    shift
    fio --minimal --group_reporting --invalidate=0 "$@" >"$WORK/log/$log.terse" 2>"$WORK/log/$log.err" ||
        die "fio $log failed: $(cat "$WORK/log/$log.err")"
    tail -n 1 "$WORK/log/$log.terse"
}
field() { cut -d';' -f"$1"; }

median() { # median NUM... (prints the median; mean of the middle two when even)
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

# ---------------------------------------------------------------------------------------
say "build: cargo build --release"
cargo build --release
mkdir -p "$BASEDIR"
WORK=$(mktemp -d "$BASEDIR/vdiskfs-bench.XXXXXX")
mkdir -p "$WORK/log" "$WORK/mnt"
echo "work directory: $WORK"

say "machine"
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "cpus:    $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "kernel:  $(uname -r)"
echo "memory:  $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src/ has uncommitted changes)')"
echo "size:    $SIZE_ARG ($SIZE bytes), runtime ${RUNTIME}s, $REPEAT round(s)"

# ---------------------------------------------------------------------------------------
say "chains: random base, two children with known data"
# Known data: in each of 16 slices of the disk, child 1 writes 1 MiB of 0xc1 at +3 MiB and
# 4 KiB at +9 MiB+3.5 KiB (not 4 KiB aligned); child 2 writes 1 MiB of 0xc2 at +3.5 MiB
# (half over child 1's data) and 8 KiB at +12 MiB+2.5 KiB.
STEP=$((SIZE / 16))
W1=() W2=()
for i in $(seq 0 15); do
    W1+=("$((i * STEP + 3 * MIB)) $MIB" "$((i * STEP + 9 * MIB + 3584)) 4096")
    W2+=("$((i * STEP + 3 * MIB + MIB / 2)) $MIB" "$((i * STEP + 12 * MIB + 2560)) 8192")
done
head -c "$MIB" /dev/zero | tr '\0' '\301' >"$WORK/pat.c1"
head -c "$MIB" /dev/zero | tr '\0' '\302' >"$WORK/pat.c2"

dd_writes() { # dd_writes TARGET PATTERN "off len"...
    local target=$1 pat=$2 w
    shift 2
    for w in "$@"; do
        set -- $w
        dd if="$pat" of="$target" bs="$2" count=1 seek="$1" oflag=seek_bytes conv=notrunc status=none
    done
    sync "$target" 2>/dev/null || sync
}
qemu_io_cmds() { # qemu_io_cmds PATTERN_BYTE "off len"... -> -c "write -P .." args
    local p=$1 w
    shift
    for w in "$@"; do
        set -- $w
        printf -- '-c\0write -q -P %s %s %s\0' "$p" "$1" "$2"
    done
}

echo "+ head -c $SIZE /dev/urandom > random.raw"
head -c "$SIZE" /dev/urandom >"$WORK/random.raw"
cp "$WORK/random.raw" "$WORK/ref.raw"
dd_writes "$WORK/ref.raw" "$WORK/pat.c1" "${W1[@]}"
dd_writes "$WORK/ref.raw" "$WORK/pat.c2" "${W2[@]}"

for fmt in vhdx vhd; do
    d="$WORK/$fmt"
    mkdir -p "$d"
    # VHD: force_size=on keeps the exact size (qemu otherwise rounds it up to a CHS geometry).
    qfmt=$fmt qopt=subformat=dynamic
    [ "$fmt" = vhd ] && qfmt=vpc qopt=subformat=dynamic,force_size=on
    echo "+ qemu-img convert -f raw -O $qfmt -o $qopt random.raw $fmt/base.$fmt"
    qemu-img convert -f raw -O "$qfmt" -o "$qopt" "$WORK/random.raw" "$d/base.$fmt"
    prev="$d/base.$fmt"
    for c in c1 c2; do
        echo "+ vdiskfs create --parent $(basename "$prev") $fmt/$c.$fmt; write its known data through a writable mount"
        "$VD" create --parent "$prev" "$d/$c.$fmt" >/dev/null
        vd_mount "$d/$c.$fmt" "$WORK/mnt/w"
        if [ "$c" = c1 ]; then
            dd_writes "$WORK/mnt/w/disk.raw" "$WORK/pat.c1" "${W1[@]}"
        else
            dd_writes "$WORK/mnt/w/disk.raw" "$WORK/pat.c2" "${W2[@]}"
        fi
        vd_umount "$WORK/mnt/w" "$d/$c.$fmt"
        prev="$d/$c.$fmt"
    done
done

if [ "$QSD" = 1 ]; then
    mkdir -p "$WORK/qcow2"
    echo "+ qemu-img convert -f raw -O qcow2 random.raw qcow2/base.qcow2; qemu-img create -b ...; qemu-io write -P ..."
    qemu-img convert -f raw -O qcow2 "$WORK/random.raw" "$WORK/qcow2/base.qcow2"
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$WORK/qcow2/c1.qcow2"
    mapfile -d '' args < <(qemu_io_cmds 0xc1 "${W1[@]}")
    qemu-io -f qcow2 "${args[@]}" "$WORK/qcow2/c1.qcow2"
    qemu-img create -q -f qcow2 -b c1.qcow2 -F qcow2 "$WORK/qcow2/c2.qcow2"
    mapfile -d '' args < <(qemu_io_cmds 0xc2 "${W2[@]}")
    qemu-io -f qcow2 "${args[@]}" "$WORK/qcow2/c2.qcow2"
    CHAIN_DIRS=("$WORK/vhdx" "$WORK/vhd" "$WORK/qcow2")
else
    echo "(no qcow2 chain: it is only read through qemu-storage-daemon, which is not installed)"
    CHAIN_DIRS=("$WORK/vhdx" "$WORK/vhd")
fi
rm -f "$WORK/random.raw"
ls -l "${CHAIN_DIRS[@]}" | sed 's/^/  /'

# ---------------------------------------------------------------------------------------
say "mounts"
# ALL_TARGETS are the table rows; TARGETS the ones measured; NA[t] why a row is not.
ALL_TARGETS=(vdiskfs-vhdx vhdimount-vhdx vdiskfs-vhd vhdimount-vhd qsd-qcow2 raw-pagecache)
declare -A FILE BACKING SAME NA
[ "$QSD" = 1 ] || NA[qsd-qcow2]=$QSD_NA
TARGETS=()
for t in "${ALL_TARGETS[@]}"; do [ -n "${NA[$t]:-}" ] || TARGETS+=("$t"); done
vd_mount "$WORK/vhdx/c2.vhdx" "$WORK/mnt/vd-vhdx" --read-only
vd_mount "$WORK/vhd/c2.vhd" "$WORK/mnt/vd-vhd" --read-only
vhdi_mount "$WORK/vhdx/c2.vhdx" "$WORK/mnt/vhdi-vhdx"
vhdi_mount "$WORK/vhd/c2.vhd" "$WORK/mnt/vhdi-vhd"
[ "$QSD" = 0 ] || qsd_export "$WORK/qcow2/c2.qcow2" "$WORK/mnt/qsd.raw" off
FILE[vdiskfs-vhdx]="$WORK/mnt/vd-vhdx/disk.raw"
FILE[vdiskfs-vhd]="$WORK/mnt/vd-vhd/disk.raw"
vhdi_top() { find "$1" -maxdepth 1 -name 'vhdi*' | sort -V | tail -n 1; }
FILE[vhdimount-vhdx]=$(vhdi_top "$WORK/mnt/vhdi-vhdx")
FILE[vhdimount-vhd]=$(vhdi_top "$WORK/mnt/vhdi-vhd")
echo "vhdimount exports the merged view as $(basename "${FILE[vhdimount-vhdx]}") (vhdi1 is the base)"
FILE[qsd-qcow2]="$WORK/mnt/qsd.raw"
FILE[raw-pagecache]="$WORK/ref.raw"
BACKING[vdiskfs-vhdx]="$WORK/vhdx/base.vhdx $WORK/vhdx/c1.vhdx $WORK/vhdx/c2.vhdx"
BACKING[vhdimount-vhdx]=${BACKING[vdiskfs-vhdx]}
BACKING[vdiskfs-vhd]="$WORK/vhd/base.vhd $WORK/vhd/c1.vhd $WORK/vhd/c2.vhd"
BACKING[vhdimount-vhd]=${BACKING[vdiskfs-vhd]}
BACKING[qsd-qcow2]="$WORK/qcow2/base.qcow2 $WORK/qcow2/c1.qcow2 $WORK/qcow2/c2.qcow2"
BACKING[raw-pagecache]="$WORK/ref.raw"
echo "+ vdiskfs mount --read-only c2.vhdx|c2.vhd DIR; vhdimount c2.vhdx|c2.vhd DIR;"
if [ "$QSD" = 1 ]; then
    echo "+ qemu-storage-daemon --blockdev node-name=prot,driver=file,filename=c2.qcow2 --blockdev node-name=fmt,driver=qcow2,file=prot --export type=fuse,id=exp,node-name=fmt,mountpoint=FILE,writable=off"
else
    echo "  qsd-qcow2: $QSD_NA"
fi

say "same bytes as the reference raw copy? (cmp of the whole exported file)"
for t in "${TARGETS[@]}"; do
    [ "$t" = raw-pagecache ] && { SAME[$t]=ref; continue; }
    sz=$(stat -c %s "${FILE[$t]}")
    if [ "$sz" -ne "$SIZE" ]; then
        SAME[$t]="size $sz"
    elif cmp -s "${FILE[$t]}" "$WORK/ref.raw"; then
        SAME[$t]=yes
    else
        SAME[$t]="NO ($( (cmp "${FILE[$t]}" "$WORK/ref.raw" 2>&1 || true) | head -n1 | sed 's/.*differ: //'))"
    fi
    printf '  %-16s %s\n' "$t" "${SAME[$t]}"
done

# ---------------------------------------------------------------------------------------
say "reads: $REPEAT round(s), targets interleaved"
echo "+ fio --name=seq --filename=FILE --rw=read --bs=1M --ioengine=psync --size=$SIZE --invalidate=0   (after drop_caches + cat of the backing files)"
echo "+ fio --name=rand --filename=FILE --rw=randread --bs=4k --ioengine=psync --direct=1 --time_based --runtime=$RUNTIME --ramp_time=$RAMP --numjobs=1|4 --norandommap --randrepeat=0 --invalidate=0 --group_reporting   (raw copy: --direct=0, hot)"
declare -A SEQ RQ1 RQ4
for r in $(seq "$REPEAT"); do
    for t in "${TARGETS[@]}"; do
        f=${FILE[$t]}
        # shellcheck disable=SC2086
        tb_cold ${BACKING[$t]}
        bw=$(tb_fio "seq.$t.$r" --name=seq --filename="$f" --rw=read --bs=1M --ioengine=psync \
            --size="$SIZE" | field 7)
        SEQ[$t]="${SEQ[$t]:-} $((bw / 1024))"
        direct=1
        [ "$t" = raw-pagecache ] && direct=0
        for j in 1 4; do
            iops=$(tb_fio "rand$j.$t.$r" --name=rand --filename="$f" --rw=randread --bs=4k \
                --ioengine=psync --direct=$direct --time_based --runtime="$RUNTIME" \
                --ramp_time=$RAMP --numjobs=$j --norandommap --randrepeat=0 | field 8)
            if [ $j = 1 ]; then RQ1[$t]="${RQ1[$t]:-} $iops"; else RQ4[$t]="${RQ4[$t]:-} $iops"; fi
        done
        printf '  round %s %-16s seq %6s MiB/s  rand QD1 %7s IOPS  rand 4 jobs %7s IOPS\n' "$r" "$t" \
            "${SEQ[$t]##* }" "${RQ1[$t]##* }" "${RQ4[$t]##* }"
    done
done

for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086
    {
        SEQ[$t]=$(tb_median ${SEQ[$t]})
        RQ1[$t]=$(tb_median ${RQ1[$t]})
        RQ4[$t]=$(tb_median ${RQ4[$t]})
    }
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
# A footnote under each table for the rows that were not measured.
na_notes() { # na_notes TARGET...
    local t
    for t in "$@"; do
        case "${NA[$t]:-}" in
        "") ;;
        "$QSD_NA") printf '  %s: %s\n' "$t" "$QSD_WHY" ;;
        *) printf '  %s: %s\n' "$t" "${NA[$t]}" ;;
        esac
    done
}
ref_of() { case $1 in *-vhd) echo vdiskfs-vhd ;; *-vhdx) echo vdiskfs-vhdx ;; *) echo both ;; esac; }
cell() { # cell TARGET ARRAYNAME -> "value (ratio)"
    local t=$1 ref
    local -n arr=$2
    ref=$(ref_of "$t")
    if [ -n "${NA[$t]:-}" ]; then
        printf '%s' "${NA[$t]}"
    elif [ "$ref" = both ]; then
        printf '%s (%s|%s)' "${arr[$t]}" "$(tb_ratio "${arr[$t]}" "${arr[vdiskfs-vhdx]}")" "$(tb_ratio "${arr[$t]}" "${arr[vdiskfs-vhd]}")"
    elif [ "$ref" = "$t" ]; then
        printf '%s' "${arr[$t]}"
    else
        printf '%s (%s)' "${arr[$t]}" "$(tb_ratio "${arr[$t]}" "${arr[$ref]}")"
    fi
}

say "read results (median of $REPEAT; in brackets: the figure as a ratio to vdiskfs of the same format; qcow2/raw rows: to vdiskfs VHDX|VHD)"
printf '| %-16s | %-24s | %-26s | %-26s | %-22s |\n' target "seq read MiB/s" "4K rand read IOPS, QD1" "4K rand read IOPS, 4 jobs" "same bytes as ref"
printf '|%s|%s|%s|%s|%s|\n' ------------------ -------------------------- ---------------------------- ---------------------------- ------------------------
for t in "${ALL_TARGETS[@]}"; do
    printf '| %-16s | %-24s | %-26s | %-26s | %-22s |\n' "$t" "$(cell "$t" SEQ)" "$(cell "$t" RQ1)" "$(cell "$t" RQ4)" "${SAME[$t]:-${NA[$t]:-}}"
done
na_notes "${ALL_TARGETS[@]}"

target_line() { # tb_goal WHAT VALUE PEER FACTOR
    local v
    v=$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    if awk -v v="$v" -v f="$4" 'BEGIN { exit !(v >= f) }'; then
        printf '  %-52s %5sx (target >= %sx): met\n' "$1" "$v" "$4"
    else
        printf '  %-52s %5sx (target >= %sx): NOT met\n' "$1" "$v" "$4"
    fi
}
say "issue 5 targets"
for f in vhdx vhd; do
    tb_goal "seq read, vdiskfs $f / vhdimount $f" "${SEQ[vdiskfs-$f]}" "${SEQ[vhdimount-$f]}" 1.5
    if [ "$QSD" = 1 ]; then
        tb_goal "seq read, vdiskfs $f / qemu-storage-daemon qcow2" "${SEQ[vdiskfs-$f]}" "${SEQ[qsd-qcow2]}" 3
    else
        printf '  %-52s %s\n' "seq read, vdiskfs $f / qemu-storage-daemon qcow2" "$QSD_NA"
    fi
    tb_goal "4K rand IOPS QD1, vdiskfs $f / vhdimount $f" "${RQ1[vdiskfs-$f]}" "${RQ1[vhdimount-$f]}" 1.5
    tb_goal "4K rand IOPS 4 jobs, vdiskfs $f / vhdimount $f" "${RQ4[vdiskfs-$f]}" "${RQ4[vhdimount-$f]}" 1.5
done

# Unmount the read mounts before the write runs (they hold shared locks on c2).
for d in vd-vhdx vd-vhd; do vd_umount "$WORK/mnt/$d"; done
for d in vhdi-vhdx vhdi-vhd; do fusermount3 -u "$WORK/mnt/$d"; done
[ "$QSD" = 0 ] || qsd_stop "$WORK/mnt/qsd.raw"

# ---------------------------------------------------------------------------------------
say "writes: fresh children of the depth-3 chain"
echo "+ fio --name=seqw --filename=FILE --rw=write --bs=1M --ioengine=psync --size=$SIZE --end_fsync=1 --invalidate=0"
echo "+ fio --name=mixed --filename=FILE --rw=randrw --rwmixread=70 --bs=4k --ioengine=psync --direct=1 --numjobs=4 --time_based --runtime=$RUNTIME --end_fsync=1 --norandommap --randrepeat=0 --invalidate=0 --group_reporting"
declare -A WSEQ MIXR MIXW WCHECK
ALL_WTARGETS=(vdiskfs-vhdx vdiskfs-vhd qsd-qcow2)
WTARGETS=()
for t in "${ALL_WTARGETS[@]}"; do [ -n "${NA[$t]:-}" ] || WTARGETS+=("$t"); done
for t in "${ALL_WTARGETS[@]}"; do [ -z "${NA[$t]:-}" ] || printf '  %-14s %s\n' "$t" "${NA[$t]}"; done
for t in "${WTARGETS[@]}"; do
    for kind in seqw mixed; do
        case $t in
        vdiskfs-*)
            fmt=${t#vdiskfs-}
            img="$WORK/$fmt/$kind.$fmt"
            rm -f "$img"
            "$VD" create --parent "$WORK/$fmt/c2.$fmt" "$img" >/dev/null
            vd_mount "$img" "$WORK/mnt/w"
            f="$WORK/mnt/w/disk.raw"
            ;;
        qsd-*)
            img="$WORK/qcow2/$kind.qcow2"
            rm -f "$img"
            qemu-img create -q -f qcow2 -b c2.qcow2 -F qcow2 "$img"
            qsd_export "$img" "$WORK/mnt/qsdw.raw" on
            f="$WORK/mnt/qsdw.raw"
            ;;
        esac
        # shellcheck disable=SC2086
        tb_cold ${BACKING[$t]}
        if [ $kind = seqw ]; then
            line=$(tb_fio "$kind.$t" --name=seqw --filename="$f" --rw=write --bs=1M --ioengine=psync \
                --size="$SIZE" --end_fsync=1)
            WSEQ[$t]=$(($(tb_field 48 <<<"$line") / 1024))
        else
            line=$(tb_fio "$kind.$t" --name=mixed --filename="$f" --rw=randrw --rwmixread=70 --bs=4k \
                --ioengine=psync --direct=1 --numjobs=4 --time_based --runtime="$RUNTIME" \
                --ramp_time=$RAMP --end_fsync=1 --norandommap --randrepeat=0)
            MIXR[$t]=$(tb_field 8 <<<"$line")
            MIXW[$t]=$(tb_field 49 <<<"$line")
        fi
        case $t in
        vdiskfs-*)
            vd_umount "$WORK/mnt/w" "$img"
            if "$VD" check "$img" >"$WORK/log/check.$kind.$t" 2>&1; then
                WCHECK[$t]="${WCHECK[$t]:-}$kind ok "
            else
                WCHECK[$t]="${WCHECK[$t]:-}$kind FAILED "
            fi
            ;;
        qsd-*)
            qsd_stop "$WORK/mnt/qsdw.raw"
            if qemu-img check -q "$img" >"$WORK/log/check.$kind.$t" 2>&1; then
                WCHECK[$t]="${WCHECK[$t]:-}$kind ok "
            else
                WCHECK[$t]="${WCHECK[$t]:-}$kind FAILED "
            fi
            ;;
        esac
        printf '  %-14s %-5s done (%s)\n' "$t" "$kind" "$(ls -sh "$img" | cut -d' ' -f1) file"
        rm -f "$img"
    done
done

say "write results (one run each; ratio to vdiskfs VHDX)"
printf '| %-14s | %-22s | %-28s | %-28s | %-24s |\n' target "seq write MiB/s" "70/30 4K mixed: read IOPS" "70/30 4K mixed: write IOPS" "check afterwards"
printf '|%s|%s|%s|%s|%s|\n' ---------------- ------------------------ ------------------------------ ------------------------------ --------------------------
for t in "${ALL_WTARGETS[@]}"; do
    if [ -n "${NA[$t]:-}" ]; then
        printf '| %-14s | %-22s | %-28s | %-28s | %-24s |\n' "$t" "${NA[$t]}" "${NA[$t]}" "${NA[$t]}" "${NA[$t]}"
        continue
    fi
    printf '| %-14s | %-22s | %-28s | %-28s | %-24s |\n' "$t" \
        "${WSEQ[$t]} ($(tb_ratio "${WSEQ[$t]}" "${WSEQ[vdiskfs-vhdx]}"))" \
        "${MIXR[$t]} ($(tb_ratio "${MIXR[$t]}" "${MIXR[vdiskfs-vhdx]}"))" \
        "${MIXW[$t]} ($(tb_ratio "${MIXW[$t]}" "${MIXW[vdiskfs-vhdx]}"))" "${WCHECK[$t]}"
done
na_notes "${ALL_WTARGETS[@]}"

# ---------------------------------------------------------------------------------------
say "vdiskfs cat (hyperfine, page cache hot; issue 2 wants >= 1 GiB/s for a dynamic VHDX)"
CAT_IMAGES=("$WORK/vhdx/base.vhdx" "$WORK/vhd/base.vhd" "$WORK/vhdx/c2.vhdx")
cat "$WORK"/vhdx/*.vhdx "$WORK"/vhd/*.vhd >/dev/null
for img in "${CAT_IMAGES[@]}"; do
    rel=${img#"$WORK"/}
    if [ "$HYPERFINE" = 0 ]; then
        printf '  %-16s %s\n' "$rel" "$HF_NA"
        continue
    fi
    echo "+ hyperfine -w 1 -r 5 '$VD cat $rel > /dev/null'"
    hyperfine -w 1 -r 5 --export-csv "$WORK/log/cat.csv" "$VD cat $img > /dev/null" >"$WORK/log/cat.out" 2>&1 ||
        die "hyperfine failed: $(cat "$WORK/log/cat.out")"
    IFS=, read -r _ mean stddev _ <<<"$(tail -n 1 "$WORK/log/cat.csv")"
    awk -v s="$SIZE" -v m="$mean" -v sd="$stddev" -v n="$rel" \
        'BEGIN { printf "  %-16s %.3f s +- %.3f s  =  %.2f GiB/s (%s)\n", n, m, sd, s / m / 1073741824, (s / m >= 1073741824 ? ">= 1 GiB/s" : "below 1 GiB/s") }'
done

[ "$HYPERFINE" = 1 ] || printf '  %s\n' "$HF_WHY"

# >>> convert section ---------------------------------------------------------------------
# Self-contained: its own chain, work directory and cleanup, so that BENCH_ONLY=convert can
# run it alone (it is sourced from the top of this file then).
cb_now() { date +%s.%N; }
cb_secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# cb_time CMD...: run it; CB_REAL = wall seconds, CB_CPU = user + system seconds of the
# command and its threads (the figure the other work on a shared machine disturbs least).
cb_time() {
    local TIMEFORMAT='%R %U %S' t
    t=$( { time "$@" >/dev/null; } 2>&1 ) || die "$* failed: $t"
    read -r CB_REAL u s <<<"$(tail -n 1 <<<"$t")"
    CB_CPU=$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')
}
cb_median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
cb_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
cb_target() { # cb_target WHAT VALUE PEER FACTOR
    local v
    v=$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    if awk -v v="$v" -v f="$4" 'BEGIN { exit !(v >= f) }'; then
        printf '  %-52s %5sx (target >= %sx): met\n' "$1" "$v" "$4"
    else
        printf '  %-52s %5sx (target >= %sx): NOT met\n' "$1" "$v" "$4"
    fi
}
CB_WORK="" CB_SHM="" CB_MOUNTS=()
convert_cleanup() {
    local m
    for m in "${CB_MOUNTS[@]}"; do
        if grep -qF " $m " /proc/self/mountinfo; then
            fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"
        fi
    done
    if [ -n "$CB_WORK" ]; then
        if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $CB_WORK"; else rm -rf "$CB_WORK"; fi
    fi
    [ -z "$CB_SHM" ] || rm -rf "$CB_SHM"
    return 0
}

convert_bench() {
    local cw t0 r i c prev off
    for t in cargo qemu-img fusermount3 cmp; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (run scripts/setup.sh)"
    done
    if [ "${BENCH_ONLY:-}" = convert ]; then
        say "build: cargo build --release"
        cargo build --release
    fi
    mkdir -p "$BASEDIR"
    # After the other sections: inside their work directory, so their cleanup covers it.
    cw=$(mktemp -d "${WORK:-$BASEDIR}/vdiskfs-bench-convert.XXXXXX")
    CB_WORK=$cw
    local shm=""
    if [ -d /dev/shm ] && [ "$(df -B1 --output=avail /dev/shm | tail -n 1)" -gt $((3 * SIZE)) ]; then
        shm=$(mktemp -d /dev/shm/vdiskfs-bench-convert.XXXXXX)
        CB_SHM=$shm
    fi
    # Alone, this section owns the exit trap; after the other sections the main cleanup
    # stays and this one runs at the end of the function.
    if [ "${BENCH_ONLY:-}" = convert ]; then
        trap 'rc=$?; convert_cleanup; exit $rc' EXIT
        trap 'exit 130' INT TERM
    fi
    mkdir -p "$cw/mnt" "$cw/out"

    say "convert: machine"
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpus:    $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "size:    $SIZE_ARG, $REPEAT round(s); outputs in $cw/out (disk: $(df --output=fstype "$cw" | tail -n 1))${shm:+ and $shm (tmpfs)}"

    cb_mount() { # cb_mount IMAGE DIR
        mkdir -p "$2"
        CB_MOUNTS+=("$2")
        MOUNTS+=("$2")
        "$VD" mount "$1" "$2"
    }
    cb_umount() { # cb_umount DIR IMAGE
        "$VD" umount "$1"
        flock -x -w 60 "$2" true || die "daemon still holds $2"
    }

    say "convert: a depth-3 VHDX chain of $SIZE_ARG (random base, two children with known data)"
    echo "+ head -c $SIZE /dev/urandom > random.raw; qemu-img convert -f raw -O vhdx random.raw base.vhdx"
    head -c "$SIZE" /dev/urandom >"$cw/ref.raw"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$cw/ref.raw" "$cw/base.vhdx"
    prev="$cw/base.vhdx"
    local step=$((SIZE / 16))
    for c in c1 c2; do
        echo "+ vdiskfs create --parent $(basename "$prev") $c.vhdx; 16 x 1 MiB + 16 x 4 KiB (unaligned) through a writable mount"
        "$VD" create --parent "$prev" "$cw/$c.vhdx" >/dev/null
        cb_mount "$cw/$c.vhdx" "$cw/mnt/w"
        head -c $((MIB + 4096)) /dev/urandom >"$cw/pat"
        for i in $(seq 0 15); do
            # Child 2 writes half over child 1's data.
            off=$((i * step + 3 * MIB + 512))
            [ "$c" = c2 ] && off=$((i * step + 3 * MIB + MIB / 2))
            for f in "$cw/mnt/w/disk.raw" "$cw/ref.raw"; do
                dd if="$cw/pat" of="$f" bs=$MIB count=1 seek="$off" oflag=seek_bytes conv=notrunc status=none
                dd if="$cw/pat" of="$f" bs=4096 count=1 skip=$MIB iflag=skip_bytes \
                    seek=$((off + 9 * MIB + 3584)) oflag=seek_bytes conv=notrunc status=none
            done
        done
        cb_umount "$cw/mnt/w" "$cw/$c.vhdx"
        prev="$cw/$c.vhdx"
    done
    sync
    ls -l "$cw"/*.vhdx | sed 's/^/  /'

    say "convert: vdiskfs convert c2.vhdx -> dynamic VHDX vs qemu-img convert -f raw -O vhdx merged.raw ($REPEAT rounds)"
    echo "+ vdiskfs convert -q c2.vhdx OUT.vhdx                (ends with fdatasync: the output is durable)"
    echo "+ qemu-img convert -f raw -O vhdx ref.raw OUT.vhdx   (qemu-img's default cache=unsafe: no flush at all)"
    echo "+ ... and the same followed by 'sync OUT.vhdx'         (qemu's output made durable too)"
    echo "  page cache: the chain and ref.raw are read in before each round (both tools read hot data)"
    local dirs=("$cw/out") where
    [ -n "$shm" ] && dirs+=("$shm")
    declare -A CV_VD CV_Q CV_QS CV_VDC CV_QC
    cb_where() { if [ "$1" = "$shm" ]; then echo tmpfs; else echo disk; fi; }
    for r in $(seq "$REPEAT"); do
        for where in "${dirs[@]}"; do
            cat "$cw"/*.vhdx "$cw/ref.raw" >/dev/null
            rm -f "$where"/*.vhdx
            sync
            cb_time "$VD" convert -q "$cw/c2.vhdx" "$where/vd.vhdx"
            CV_VD[$where]="${CV_VD[$where]:-} $CB_REAL"
            CV_VDC[$where]="${CV_VDC[$where]:-} $CB_CPU"
            CB_REAL_VD=$CB_REAL CB_CPU_VD=$CB_CPU
            sync
            t0=$(cb_now)
            cb_time qemu-img convert -f raw -O vhdx "$cw/ref.raw" "$where/q.vhdx"
            sync "$where/q.vhdx"
            CV_Q[$where]="${CV_Q[$where]:-} $CB_REAL"
            CV_QC[$where]="${CV_QC[$where]:-} $CB_CPU"
            CV_QS[$where]="${CV_QS[$where]:-} $(cb_secs "$t0" "$(cb_now)")"
            printf '  round %s %-5s vdiskfs %5s s (cpu %5s s)   qemu-img %5s s (cpu %5s s)   qemu-img+sync %5s s\n' "$r" \
                "$(cb_where "$where")" "$CB_REAL_VD" "$CB_CPU_VD" "$CB_REAL" "$CB_CPU" "${CV_QS[$where]##* }"
        done
    done
    echo "+ checks: vdiskfs cat vd.vhdx | cmp - ref.raw; qemu-img check vd.vhdx; qemu-img convert -O raw vd.vhdx | cmp - ref.raw"
    local same
    if "$VD" cat "${dirs[0]}/vd.vhdx" | cmp -s - "$cw/ref.raw" && qemu-img check -q "${dirs[0]}/vd.vhdx" &&
        qemu-img convert -f vhdx -O raw "${dirs[0]}/vd.vhdx" "$cw/back.raw" && cmp -s "$cw/back.raw" "$cw/ref.raw"; then
        same=yes
    else
        same=NO
    fi
    rm -f "$cw/back.raw"
    echo "  output equals the merged chain, qemu-img check clean: $same"
    echo "  file sizes: vdiskfs $(stat -c %s "${dirs[0]}/vd.vhdx"), qemu-img $(stat -c %s "${dirs[0]}/q.vhdx") bytes"

    say "convert results (median of $REPEAT; in brackets qemu-img's figure as a ratio to vdiskfs's: above 1 = vdiskfs faster)"
    printf '| %-7s | %-16s | %-26s | %-26s | %-16s | %-26s |\n' outputs "vdiskfs wall" "qemu-img wall" "qemu-img + sync wall" "vdiskfs cpu" "qemu-img cpu"
    printf '|%s|%s|%s|%s|%s|%s|\n' --------- ------------------ ---------------------------- ---------------------------- ------------------ ----------------------------
    local vd q qs vdc qc targets=()
    for where in "${dirs[@]}"; do
        # shellcheck disable=SC2086
        {
            vd=$(cb_median ${CV_VD[$where]})
            q=$(cb_median ${CV_Q[$where]})
            qs=$(cb_median ${CV_QS[$where]})
            vdc=$(cb_median ${CV_VDC[$where]})
            qc=$(cb_median ${CV_QC[$where]})
        }
        printf '| %-7s | %-16s | %-26s | %-26s | %-16s | %-26s |\n' "$(cb_where "$where")" \
            "$vd s" "$q s ($(cb_ratio "$q" "$vd"))" "$qs s ($(cb_ratio "$qs" "$vd"))" "$vdc s" "$qc s ($(cb_ratio "$qc" "$vdc"))"
        targets+=("$(cb_target "convert to dynamic VHDX, $(cb_where "$where"): qemu-img / vdiskfs" "$q" "$vd" 1.5)")
    done
    say "issue 13 target (wall time, same run)"
    printf '%s\n' "${targets[@]}"
    for where in "${dirs[@]}"; do rm -f "$where/vd.vhdx" "$where/q.vhdx"; done
    rm -f "$cw/ref.raw" "$cw"/*.vhdx

    say "convert: a 2 TiB dynamic VHDX chain of depth 3 holding ~100 MiB -> dynamic VHDX"
    echo "+ vdiskfs create --size 2T base.vhdx; per layer 16 x 2 MiB of random data at spread, unaligned offsets (through a writable mount); two children"
    prev=""
    head -c $((32 * MIB)) /dev/urandom >"$cw/pat2"
    for c in big0 big1 big2; do
        if [ -z "$prev" ]; then
            "$VD" create --size 2T "$cw/$c.vhdx" >/dev/null
        else
            "$VD" create --parent "$prev" "$cw/$c.vhdx" >/dev/null
        fi
        cb_mount "$cw/$c.vhdx" "$cw/mnt/w"
        for i in $(seq 0 15); do
            off=$((((i * 127 + ${c#big} * 41) % 2040) * 1024 * MIB + 12345 * 512))
            dd if="$cw/pat2" of="$cw/mnt/w/disk.raw" bs=$((2 * MIB)) count=1 skip=$((i * 2 * MIB)) iflag=skip_bytes \
                seek="$off" oflag=seek_bytes conv=notrunc status=none
        done
        cb_umount "$cw/mnt/w" "$cw/$c.vhdx"
        prev="$cw/$c.vhdx"
    done
    sync
    local big=()
    for r in $(seq "$REPEAT"); do
        cat "$cw"/big*.vhdx >/dev/null
        rm -f "$cw/out/big.vhdx"
        sync
        cb_time "$VD" convert -q "$cw/big2.vhdx" "$cw/out/big.vhdx"
        big+=("$CB_REAL")
        echo "  round $r: $CB_REAL s (cpu $CB_CPU s)"
    done
    qemu-img check -q "$cw/out/big.vhdx" && same=clean || same=DAMAGED
    echo "  output: $(stat -c %s "$cw/out/big.vhdx") bytes ($(du -k "$cw/out/big.vhdx" | cut -f1) KiB allocated), qemu-img check: $same"
    printf '  2 TiB chain, ~100 MiB of data -> dynamic VHDX: median %s s (issue 13: "a few seconds")\n' "$(cb_median "${big[@]}")"

    if [ "${BENCH_ONLY:-}" != convert ]; then
        convert_cleanup
    fi
}
# <<< convert section

convert_bench

if [ "$QSD" = 0 ] || [ "$HYPERFINE" = 0 ]; then
    say "done, with rows not measured"
    skipped_rows 2>&1
else
    say "done"
fi

# >>> resize section ----------------------------------------------------------------------
# Self-contained (BENCH_ONLY=resize runs it alone; the full run does not include it):
# how long `vdiskfs resize` takes where it has work to do. No peer: qemu-img cannot resize
# vpc or vhdx files.
resize_bench() {
    local rw t0 t1
    say "build: cargo build --release"
    cargo build --release
    mkdir -p "$BASEDIR"
    rw=$(mktemp -d "$BASEDIR/vdiskfs-bench-resize.XXXXXX")
    RZ_WORK=$rw
    trap 'rm -rf "$RZ_WORK"' EXIT
    rz_time() { # rz_time LABEL CMD...
        sync
        t0=$(date +%s.%N)
        "${@:2}" >/dev/null || die "$* failed"
        t1=$(date +%s.%N)
        printf '  %-62s %6.3f s\n' "$1" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
    }
    say "resize: machine"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cpus: $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "dir:  $rw ($(df --output=fstype "$rw" | tail -n 1))"
    say "resize"
    head -c $((100 * MIB)) /dev/urandom >"$rw/data"
    truncate -s 64G "$rw/base.raw"
    dd if="$rw/data" of="$rw/base.raw" bs=1M seek=1000 conv=notrunc status=none
    "$VD" convert -q -f raw --block-size 1M "$rw/base.raw" "$rw/d.vhdx"
    rz_time "VHDX dynamic 64 GiB -> 300 GiB (1 MiB blocks: the BAT moves)" "$VD" resize "$rw/d.vhdx" 300G
    rz_time "VHDX dynamic 300 GiB -> 64 GiB (data check over 236 GiB)" "$VD" resize "$rw/d.vhdx" 64G
    rz_time "VHDX dynamic 64 GiB -> 4 TiB (a BAT of 32 MiB written)" "$VD" resize "$rw/d.vhdx" 4T
    "$VD" create --size 2G "$rw/d.vhd" >/dev/null
    rz_time "VHD dynamic 2 GiB -> 2000 GiB (2 MiB blocks: the BAT moves)" "$VD" resize "$rw/d.vhd" 2000G
    truncate -s 1G "$rw/f.raw"
    "$VD" convert -q -f raw --type fixed "$rw/f.raw" "$rw/f.vhd"
    rz_time "VHD fixed 1 GiB -> 2 GiB (sparse: the old footer zeroed)" "$VD" resize "$rw/f.vhd" 2G
    "$VD" convert -q -f raw --type fixed "$rw/f.raw" "$rw/f.vhdx"
    rz_time "VHDX fixed 1 GiB -> 2 GiB (payload allocated, sparse)" "$VD" resize "$rw/f.vhdx" 2G
    "$VD" check "$rw/d.vhdx" >/dev/null && "$VD" check "$rw/d.vhd" >/dev/null &&
        "$VD" check "$rw/f.vhd" >/dev/null && "$VD" check "$rw/f.vhdx" >/dev/null || die "check failed"
    echo "  (all four files check clean afterwards)"
}
# <<< resize section
# >>> transport section -------------------------------------------------------------------
# Self-contained (BENCH_ONLY=transport sources it from the top of this file): its own
# helpers, as the main script's are defined after that point.
tb_cold() { # drop the page cache, then read the backing files back in
    sync
    echo 3 >/proc/sys/vm/drop_caches
    cat "$@" >/dev/null
}
tb_fio() { # tb_fio LOGNAME fio-args... ; prints fio's terse line
    local log=$1
    shift
    fio --minimal --group_reporting --invalidate=0 "$@" >"$TB_WORK/log/$log.terse" 2>"$TB_WORK/log/$log.err" ||
        die "fio $log failed: $(cat "$TB_WORK/log/$log.err")"
    tail -n 1 "$TB_WORK/log/$log.terse"
}
tb_field() { cut -d';' -f"$1"; }
tb_median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
tb_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
tb_goal() { # tb_goal WHAT VALUE PEER FACTOR
    local v
    v=$(awk -v a="$2" -v b="$3" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    if awk -v v="$v" -v f="$4" 'BEGIN { exit !(v >= f) }'; then
        printf '  %-52s %5sx (goal >= %sx): met\n' "$1" "$v" "$4"
    else
        printf '  %-52s %5sx (goal >= %sx): NOT met\n' "$1" "$v" "$4"
    fi
}
transport_bench() {
    local t r f img line tw sw
    for t in cargo qemu-img vhdimount fio mkfs.ext4 losetup fusermount3 tar; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (run scripts/setup.sh --bench)"
    done
    TB_SW_FILE=/sys/module/fuse/parameters/enable_uring
    local sw_file=$TB_SW_FILE
    [ -w "$sw_file" ] || die "$sw_file not writable: the kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING, Linux 6.14+)"
    say "build: cargo build --release"
    cargo build --release
    mkdir -p "$BASEDIR"
    TB_WORK=$(mktemp -d "$BASEDIR/vdiskfs-bench-transport.XXXXXX")
    TB_SWITCH=$(cat "$sw_file")
    TB_MOUNTS=() TB_LOOPS=()
    transport_cleanup() {
        local m l
        set +e
        for m in "${TB_MOUNTS[@]}"; do
            if grep -qF " $m " /proc/self/mountinfo; then
                umount "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"
            fi
        done
        for l in "${TB_LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
        echo "$TB_SWITCH" >"$TB_SW_FILE"
        if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $TB_WORK"; else rm -rf "$TB_WORK"; fi
        return 0
    }
    trap 'rc=$?; transport_cleanup; exit $rc' EXIT
    trap 'exit 130' INT TERM
    echo Y >"$sw_file"
    local w=$TB_WORK
    mkdir -p "$w/log" "$w/mnt/w" "$w/mnt/classic" "$w/mnt/uring" "$w/mnt/dio" "$w/mnt/m" "$w/g"

    say "transport: machine"
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpus:    $(nproc); kernel $(uname -r)"
    echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "size:    $SIZE_ARG, fio runtime ${RUNTIME}s, $REPEAT round(s)"

    say "transport: an ext4 guest in a written depth-2 VHDX chain"
    # The guest: ext4 over the whole disk, 2/3 filled with files of 4 KiB..256 KiB of
    # random data in 64 directories (the base), then a child written through a vdiskfs
    # mount: more files, and a third of the base's files rewritten.
    truncate -s "$SIZE" "$w/guest.raw"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$w/guest.raw"
    mount -o loop "$w/guest.raw" "$w/g"
    TB_MOUNTS+=("$w/g")
    local fill=$((SIZE * 2 / 3 / 2)) made=0 n=0 sz
    while [ "$made" -lt "$fill" ]; do
        sz=$(((RANDOM % 64 + 1) * 4096))
        mkdir -p "$w/g/d$((n % 64))"
        head -c "$sz" /dev/urandom >"$w/g/d$((n % 64))/f$n"
        made=$((made + sz)) n=$((n + 1))
    done
    umount "$w/g"
    qemu-img convert -f raw -O vhdx -o subformat=dynamic "$w/guest.raw" "$w/base.vhdx"
    rm -f "$w/guest.raw"
    "$VD" create --parent "$w/base.vhdx" "$w/c1.vhdx" >/dev/null
    "$VD" mount "$w/c1.vhdx" "$w/mnt/w"
    TB_MOUNTS+=("$w/mnt/w")
    mount -o loop "$w/mnt/w/disk.raw" "$w/g"
    made=0
    while [ "$made" -lt "$fill" ]; do
        sz=$(((RANDOM % 64 + 1) * 4096))
        if [ $((n % 3)) = 0 ] && [ -e "$w/g/d$((n % 64))/f$((n / 2))" ]; then
            head -c "$sz" /dev/urandom >"$w/g/d$((n % 64))/f$((n / 2))"
        else
            head -c "$sz" /dev/urandom >"$w/g/d$((n % 64))/f$n"
        fi
        made=$((made + sz)) n=$((n + 1))
    done
    umount "$w/g"
    "$VD" umount "$w/mnt/w"
    flock -x -w 60 "$w/c1.vhdx" true
    "$VD" cat "$w/c1.vhdx" >"$w/ref.raw"
    echo "  $(find "$w" -maxdepth 1 -name '*.vhdx' -printf '%f %s bytes; ' ) guest files: $n"

    say "transport: mounts"
    declare -A TFILE TBACK
    "$VD" mount --read-only --transport classic "$w/c1.vhdx" "$w/mnt/classic"
    TB_MOUNTS+=("$w/mnt/classic")
    "$VD" mount --read-only --transport uring "$w/c1.vhdx" "$w/mnt/uring"
    TB_MOUNTS+=("$w/mnt/uring")
    "$VD" mount --read-only --transport uring --direct-io "$w/c1.vhdx" "$w/mnt/dio"
    TB_MOUNTS+=("$w/mnt/dio")
    grep -q '^transport uring' "$w/mnt/uring/.stats" || die "the uring mount does not say transport uring"
    grep -q '^transport classic' "$w/mnt/classic/.stats" || die "the classic mount does not say transport classic"
    mkdir -p "$w/mnt/vhdi"
    vhdimount "$w/c1.vhdx" "$w/mnt/vhdi" >/dev/null
    TB_MOUNTS+=("$w/mnt/vhdi")
    for _ in $(seq 100); do [ -e "$w/mnt/vhdi/vhdi2" ] && break; sleep 0.1; done
    local TT=(vdiskfs-classic vdiskfs-uring vdiskfs-uring-dio vhdimount raw)
    TFILE[vdiskfs-classic]="$w/mnt/classic/disk.raw"
    TFILE[vdiskfs-uring]="$w/mnt/uring/disk.raw"
    TFILE[vdiskfs-uring-dio]="$w/mnt/dio/disk.raw"
    TFILE[vhdimount]=$(find "$w/mnt/vhdi" -maxdepth 1 -name 'vhdi*' | sort -V | tail -n 1)
    TFILE[raw]="$w/ref.raw"
    for t in "${TT[@]}"; do TBACK[$t]="$w/base.vhdx $w/c1.vhdx"; done
    TBACK[raw]="$w/ref.raw"
    for t in "${TT[@]}"; do
        cmp -s "${TFILE[$t]}" "$w/ref.raw" || die "$t does not show the same bytes as vdiskfs cat"
    done
    echo "  all five show the same bytes"

    # tb_time CMD...: wall seconds of CMD into TB_S.
    tb_time() {
        local s e
        s=$(date +%s.%N)
        "$@" >/dev/null 2>&1 || die "$* failed"
        e=$(date +%s.%N)
        TB_S=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.3f", b - a }')
    }
    tb_tar() { tar -C "$1" -cf - . | cat >/dev/null; }
    tb_find() { find "$1" -printf '%s %T@ %m\n' >/dev/null; }

    say "transport: reads, $REPEAT round(s), targets interleaved"
    declare -A SEQ RQ1 RQ4 TAR FIND
    for r in $(seq "$REPEAT"); do
        for t in "${TT[@]}"; do
            f=${TFILE[$t]}
            # shellcheck disable=SC2086
            tb_cold ${TBACK[$t]}
            line=$(tb_fio "seq.$t.$r" --name=seq --filename="$f" --rw=read --bs=1M --ioengine=psync --size="$SIZE")
            SEQ[$t]="${SEQ[$t]:-} $(($(tb_field 7 <<<"$line") / 1024))"
            local direct=1
            [ "$t" = raw ] && direct=0
            for j in 1 4; do
                line=$(tb_fio "rand$j.$t.$r" --name=rand --filename="$f" --rw=randread --bs=4k \
                    --ioengine=psync --direct=$direct --time_based --runtime="$RUNTIME" \
                    --ramp_time=$RAMP --numjobs=$j --norandommap --randrepeat=0)
                if [ $j = 1 ]; then RQ1[$t]="${RQ1[$t]:-} $(tb_field 8 <<<"$line")"; else RQ4[$t]="${RQ4[$t]:-} $(tb_field 8 <<<"$line")"; fi
            done
            # The guest through a loop device, everything cold but the backing files.
            # shellcheck disable=SC2086
            tb_cold ${TBACK[$t]}
            local lo
            lo=$(losetup -r --find --show "$f")
            TB_LOOPS+=("$lo")
            mount -o ro,noload "$lo" "$w/g"
            tb_time tb_find "$w/g"
            FIND[$t]="${FIND[$t]:-} $TB_S"
            tb_time tb_tar "$w/g"
            TAR[$t]="${TAR[$t]:-} $TB_S"
            umount "$w/g"
            losetup -d "$lo"
            printf '  round %s %-16s seq %6s MiB/s  QD1 %6s IOPS  4 jobs %6s IOPS  find+stat %6s s  tar %6s s\n' \
                "$r" "$t" "${SEQ[$t]##* }" "${RQ1[$t]##* }" "${RQ4[$t]##* }" "${FIND[$t]##* }" "${TAR[$t]##* }"
        done
    done
    for t in "${TT[@]}"; do
        # shellcheck disable=SC2086
        {
            SEQ[$t]=$(tb_median ${SEQ[$t]})
            RQ1[$t]=$(tb_median ${RQ1[$t]})
            RQ4[$t]=$(tb_median ${RQ4[$t]})
            TAR[$t]=$(tb_median ${TAR[$t]})
            FIND[$t]=$(tb_median ${FIND[$t]})
        }
    done
    for d in classic uring dio; do "$VD" umount "$w/mnt/$d"; done
    fusermount3 -u "$w/mnt/vhdi"

    say "transport: 70/30 mixed 4 KiB writes (fresh child of the chain, 4 jobs, O_DIRECT), $REPEAT round(s), interleaved"
    declare -A MIXR MIXW
    for r in $(seq "$REPEAT"); do
        for t in vdiskfs-classic vdiskfs-uring; do
            img="$w/mixed.vhdx"
            rm -f "$img"
            "$VD" create --parent "$w/c1.vhdx" "$img" >/dev/null
            "$VD" mount --transport "${t#vdiskfs-}" "$img" "$w/mnt/m"
            TB_MOUNTS+=("$w/mnt/m")
            line=$(tb_fio "mixed.$t.$r" --name=mixed --filename="$w/mnt/m/disk.raw" --rw=randrw --rwmixread=70 --bs=4k \
                --ioengine=psync --direct=1 --numjobs=4 --time_based --runtime="$RUNTIME" \
                --ramp_time=$RAMP --end_fsync=1 --norandommap --randrepeat=0)
            MIXR[$t]="${MIXR[$t]:-} $(tb_field 8 <<<"$line")" MIXW[$t]="${MIXW[$t]:-} $(tb_field 49 <<<"$line")"
            "$VD" umount "$w/mnt/m"
            flock -x -w 60 "$img" true
            "$VD" check "$img" >/dev/null || die "check of $t's mixed child failed"
            printf '  round %s %-16s read %6s IOPS  write %6s IOPS  (check: clean)\n' "$r" "$t" "${MIXR[$t]##* }" "${MIXW[$t]##* }"
        done
    done
    for t in vdiskfs-classic vdiskfs-uring; do
        # shellcheck disable=SC2086
        MIXR[$t]=$(tb_median ${MIXR[$t]}) MIXW[$t]=$(tb_median ${MIXW[$t]})
    done

    say "transport results (median of $REPEAT; ratio to vdiskfs-classic; tar/find: seconds, lower is better)"
    printf '| %-16s | %-16s | %-16s | %-16s | %-14s | %-14s | %-22s |\n' target "seq MiB/s" "4K QD1 IOPS" "4K 4 jobs IOPS" "guest tar s" "find+stat s" "70/30 mixed r/w IOPS"
    printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------------------ ------------------ ------------------ ------------------ ---------------- ---------------- ------------------------
    for t in "${TT[@]}"; do
        local mix="-"
        [ -n "${MIXR[$t]:-}" ] && mix="${MIXR[$t]} / ${MIXW[$t]}"
        printf '| %-16s | %-16s | %-16s | %-16s | %-14s | %-14s | %-22s |\n' "$t" \
            "${SEQ[$t]} ($(tb_ratio "${SEQ[$t]}" "${SEQ[vdiskfs-classic]}"))" \
            "${RQ1[$t]} ($(tb_ratio "${RQ1[$t]}" "${RQ1[vdiskfs-classic]}"))" \
            "${RQ4[$t]} ($(tb_ratio "${RQ4[$t]}" "${RQ4[vdiskfs-classic]}"))" \
            "${TAR[$t]} ($(tb_ratio "${TAR[$t]}" "${TAR[vdiskfs-classic]}"))" \
            "${FIND[$t]} ($(tb_ratio "${FIND[$t]}" "${FIND[vdiskfs-classic]}"))" "$mix"
    done
    say "issue 18 goals"
    for t in vdiskfs-classic vdiskfs-uring vdiskfs-uring-dio; do
        printf '  %-40s %s x the raw-loop ceiling (goal <= 1.25)\n' "guest tar, $t:" "$(awk -v a="${TAR[$t]}" -v b="${TAR[raw]}" 'BEGIN { printf "%.2f", a / b }')"
        tb_goal "seq read, $t / vhdimount" "${SEQ[$t]}" "${SEQ[vhdimount]}" 1.5
        tb_goal "4K QD1, $t / vhdimount" "${RQ1[$t]}" "${RQ1[vhdimount]}" 1.3
    done
    echo "  load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
}
# <<< transport section
# >>> merge section -----------------------------------------------------------------------
# BENCH_ONLY=merge (only then): `vdiskfs merge` of a child holding 1 GiB of random data into
# an empty dynamic VHDX base, against `cp` of a 1 GiB file (+ sync) on the same disk, in the
# same run. Both start with the page cache dropped; both end durable (merge fdatasyncs).
# Each round merges fresh copies of the same pristine pair (merge deletes the child).
merge_bench() {
    local mw r t0 t1 ms cs mrates=() crates=() ratios=()
    for t in cargo fusermount3; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (run scripts/setup.sh)"
    done
    say "build: cargo build --release"
    cargo build --release
    mkdir -p "$BASEDIR"
    mw=$(mktemp -d "$BASEDIR/vdiskfs-bench-merge.XXXXXX")
    # Keeps the script's own exit status: under set -e a failing command in the trap (the
    # mount point is usually not mounted any more) would turn a finished run into exit 1.
    # shellcheck disable=SC2064
    trap "rc=\$?; fusermount3 -u -z '$mw/mnt' 2>/dev/null || true; rm -rf '$mw'; exit \$rc" EXIT
    trap 'exit 130' INT TERM
    say "merge: machine"
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpus:    $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "disk:    $(df --output=fstype,source "$mw" | tail -n 1)"
    mkdir -p "$mw/pristine" "$mw/run" "$mw/mnt"
    head -c $((1024 * MIB)) /dev/urandom >"$mw/pat"
    "$VD" create --size 4G "$mw/pristine/base.vhdx" >/dev/null
    "$VD" create --parent "$mw/pristine/base.vhdx" "$mw/pristine/child.avhdx" >/dev/null
    "$VD" mount "$mw/pristine/child.avhdx" "$mw/mnt"
    dd if="$mw/pat" of="$mw/mnt/disk.raw" bs=4M seek=$((512 * MIB)) oflag=seek_bytes conv=notrunc,fsync status=none
    "$VD" umount "$mw/mnt"
    flock -x -w 60 "$mw/pristine/child.avhdx" true || die "daemon still holds the child"
    for r in $(seq "$REPEAT"); do
        rm -f "$mw/run/"* "$mw/copy"
        cp --sparse=always "$mw/pristine/base.vhdx" "$mw/pristine/child.avhdx" "$mw/run/"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t0=$(date +%s.%N)
        "$VD" merge -q "$mw/run/child.avhdx"
        t1=$(date +%s.%N)
        ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", 1024 / (b - a) }')
        sync
        echo 3 >/proc/sys/vm/drop_caches
        t0=$(date +%s.%N)
        cp "$mw/pat" "$mw/copy"
        sync "$mw/copy"
        t1=$(date +%s.%N)
        cs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", 1024 / (b - a) }')
        echo "  round $r: merge $ms MiB/s, cp $cs MiB/s (load $(cut -d' ' -f1 /proc/loadavg))"
        mrates+=("$ms")
        crates+=("$cs")
        ratios+=("$(awk -v m="$ms" -v c="$cs" 'BEGIN { printf "%.2f", m / c }')")
    done
    cmp -s -n $((1024 * MIB)) -i $((512 * MIB)):0 <("$VD" cat "$mw/run/base.vhdx") "$mw/pat" ||
        die "the merged base does not hold the child's data"
    ms=$(printf '%s\n' "${mrates[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    cs=$(printf '%s\n' "${crates[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    r=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    # The ratio of each round (merge and cp measured a moment apart) is steadier on a shared
    # machine than the ratio of the two medians.
    awk -v m="$ms" -v c="$cs" -v r="$r" 'BEGIN { printf "  median: merge %s MiB/s, cp %s MiB/s; median of the rounds'"'"' ratios %.2fx of cp (target >= 0.5x): %s\n", m, c, r, (r >= 0.5 ? "met" : "NOT met") }'
}
# <<< merge section
# >>> compact section ---------------------------------------------------------------------
# BENCH_ONLY=compact (needs root, fusermount3, qemu-img, mkfs.ext4, filefrag): the WSL case.
# A 4 GiB dynamic VHDX with 1 MiB blocks (as WSL's ext4.vhdx) and ext4 on the whole disk,
# made through a writable vdiskfs mount: BENCH_COMPACT_KEEP_MIB (512) of random files kept,
# BENCH_COMPACT_MIB (1024) of random files written, deleted, and their extents zeroed
# through disk.raw (what fstrim will do once discard reaches the mount). Then, on copies
# of that file, BENCH_REPEAT rounds: `vdiskfs compact` in place against the usual
# workaround, `qemu-img convert -O vhdx` of the same file (qemu's default block size,
# 16 MiB for 4 GiB, and -o block_size=1M). Sizes: the file length and the allocated
# bytes; goal: compacted length <= qemu-img's + 1%. Every output's content is checked.
cpb_now() { date +%s.%N; }
cpb_median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
cpb_time() { # cpb_time CMD...: CPB_REAL = wall seconds
    local t0
    t0=$(cpb_now)
    "$@" >/dev/null || die "$* failed"
    CPB_REAL=$(awk -v a="$t0" -v b="$(cpb_now)" 'BEGIN { printf "%.2f", b - a }')
}
CPB_WORK=""
compact_cleanup() {
    local m
    for m in "$CPB_WORK/guest" "$CPB_WORK/mnt"; do
        if [ -n "$CPB_WORK" ] && grep -qF " $m " /proc/self/mountinfo; then
            umount "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"
        fi
    done
    if [ -n "$CPB_WORK" ]; then
        if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept $CPB_WORK"; else rm -rf "$CPB_WORK"; fi
    fi
    return 0
}

compact_bench() {
    local w keep_mib del_mib i r ext f
    for t in cargo qemu-img fusermount3 mkfs.ext4 filefrag; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found (run scripts/setup.sh)"
    done
    keep_mib=${BENCH_COMPACT_KEEP_MIB:-512}
    del_mib=${BENCH_COMPACT_MIB:-1024}
    say "build: cargo build --release"
    cargo build --release
    mkdir -p "$BASEDIR"
    w=$(mktemp -d "$BASEDIR/vdiskfs-bench-compact.XXXXXX")
    CPB_WORK=$w
    trap 'rc=$?; compact_cleanup; exit $rc' EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$w/mnt" "$w/guest" "$w/out"

    say "compact: machine"
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpus:    $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "disk:    $(df --output=fstype "$w" | tail -n 1) ($w)"

    say "compact: ext4.vhdx, 4 GiB, 1 MiB blocks: $keep_mib MiB kept, $del_mib MiB written, deleted, zeroed"
    "$VD" create --size 4G --block-size 1M "$w/ext4.vhdx" >/dev/null
    "$VD" mount "$w/ext4.vhdx" "$w/mnt"
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$w/mnt/disk.raw"
    mount -o loop "$w/mnt/disk.raw" "$w/guest"
    for i in 1 2 3 4; do
        head -c $((keep_mib / 4 * MIB)) /dev/urandom >"$w/guest/keep$i.bin"
    done
    for i in $(seq 1 8); do
        head -c $((del_mib / 8 * MIB)) /dev/urandom >"$w/guest/gone$i.bin"
    done
    sync
    for i in $(seq 1 8); do
        filefrag -v -b4096 "$w/guest/gone$i.bin" |
            awk -F: '$1 ~ /^ *[0-9]+$/ { split($3, p, "\\.\\."); print p[1] + 0, $4 + 0 }'
    done >"$w/extents"
    rm "$w"/guest/gone*.bin
    sync
    umount "$w/guest"
    while read -r off len; do
        dd if=/dev/zero of="$w/mnt/disk.raw" bs=4096 seek="$off" count="$len" conv=notrunc status=none
    done <"$w/extents"
    sync "$w/mnt/disk.raw"
    "$VD" umount "$w/mnt"
    flock -x -w 60 "$w/ext4.vhdx" true || die "daemon still holds ext4.vhdx"
    local want len0
    want=$("$VD" cat "$w/ext4.vhdx" | sha256sum | cut -d' ' -f1)
    len0=$(stat -c %s "$w/ext4.vhdx")
    echo "  before: $len0 bytes ($(du -B1 "$w/ext4.vhdx" | cut -f1) allocated)"
    "$VD" compact --dry-run "$w/ext4.vhdx"

    local t_vd=() t_q=() t_q1=()
    for r in $(seq 1 "$REPEAT"); do
        rm -f "$w/out/"*
        cp --sparse=always "$w/ext4.vhdx" "$w/out/vd.vhdx"
        sync
        echo 3 >/proc/sys/vm/drop_caches
        cpb_time "$VD" compact -q "$w/out/vd.vhdx"
        t_vd+=("$CPB_REAL")
        echo 3 >/proc/sys/vm/drop_caches
        cpb_time qemu-img convert -f vhdx -O vhdx "$w/ext4.vhdx" "$w/out/q.vhdx"
        t_q+=("$CPB_REAL")
        echo 3 >/proc/sys/vm/drop_caches
        cpb_time qemu-img convert -f vhdx -O vhdx -o block_size=1M "$w/ext4.vhdx" "$w/out/q1.vhdx"
        t_q1+=("$CPB_REAL")
        echo "  round $r: compact ${t_vd[-1]} s, qemu-img convert ${t_q[-1]} s, with 1 MiB blocks ${t_q1[-1]} s"
    done
    for f in vd q q1; do
        [ "$("$VD" cat "$w/out/$f.vhdx" | sha256sum | cut -d' ' -f1)" = "$want" ] ||
            die "$f.vhdx does not read as the original"
    done
    "$VD" check "$w/out/vd.vhdx" >/dev/null || die "check of the compacted file failed"
    qemu-img check -f vhdx "$w/out/vd.vhdx" >/dev/null || die "qemu-img check of the compacted file failed"

    say "compact results (median of $REPEAT; times include reading the 4 GiB disk's data; vdiskfs's include its fdatasyncs, qemu-img's default cache=unsafe flushes nothing)"
    local lv lq lq1
    lv=$(stat -c %s "$w/out/vd.vhdx")
    lq=$(stat -c %s "$w/out/q.vhdx")
    lq1=$(stat -c %s "$w/out/q1.vhdx")
    printf '  %-44s %14s %14s %8s\n' "" "length" "allocated" "time s"
    printf '  %-44s %14s %14s %8s\n' "before" "$len0" "$(du -B1 "$w/ext4.vhdx" | cut -f1)" "-"
    printf '  %-44s %14s %14s %8s\n' "vdiskfs compact (in place)" "$lv" "$(du -B1 "$w/out/vd.vhdx" | cut -f1)" "$(cpb_median "${t_vd[@]}")"
    printf '  %-44s %14s %14s %8s\n' "qemu-img convert -O vhdx" "$lq" "$(du -B1 "$w/out/q.vhdx" | cut -f1)" "$(cpb_median "${t_q[@]}")"
    printf '  %-44s %14s %14s %8s\n' "qemu-img convert -O vhdx -o block_size=1M" "$lq1" "$(du -B1 "$w/out/q1.vhdx" | cut -f1)" "$(cpb_median "${t_q1[@]}")"
    for pair in "qemu-img convert:$lq" "qemu-img convert, 1 MiB blocks:$lq1"; do
        if awk -v v="$lv" -v q="${pair##*:}" 'BEGIN { exit !(v <= q * 1.01) }'; then
            echo "  compacted length <= ${pair%%:*} + 1%: met ($(awk -v v="$lv" -v q="${pair##*:}" 'BEGIN { printf "%.3f", v / q }')x)"
        else
            echo "  compacted length <= ${pair%%:*} + 1%: NOT met ($(awk -v v="$lv" -v q="${pair##*:}" 'BEGIN { printf "%.3f", v / q }')x)"
        fi
    done
}
# <<< compact section
