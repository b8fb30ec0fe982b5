#!/usr/bin/env bash
# Build the seed corpora under fuzz/corpus/<target>/ (gitignored; nothing large is
# committed). Seeds: the shared VHD fixtures, qemu-made VHDX/VHD files of a few shapes
# (4-16 MiB virtual), and VHDX/VHD bases and children made with the library (with data,
# and a VHDX with a pending log), all in the sparse input encoding of fuzz/src/sparse.rs.
#
#   fuzz/make_corpus.sh            # idempotent; keeps what the fuzzers added
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

work=$(mktemp -d "${TMPDIR:-/tmp}/vdiskfs-corpus.XXXXXX")
trap 'rm -rf "$work"' EXIT

imgs=()
fixtures=${VDISKFS_FIXTURES:-../../shared/fixtures}
[ -d "$fixtures" ] || fixtures=/work/shared/fixtures
for f in "$fixtures"/*.vhd; do
    [ -f "$f" ] && imgs+=("$f")
done

if command -v qemu-img >/dev/null 2>&1; then
    # A raw pattern: data in some sectors, zeros elsewhere.
    mk_raw() { # name size_mib
        local raw="$work/$1.raw"
        truncate -s "$2M" "$raw"
        printf 'vdiskfs seed %s' "$1" | dd of="$raw" bs=512 seek=0 conv=notrunc status=none
        head -c 20000 /dev/urandom | dd of="$raw" bs=4096 seek=300 conv=notrunc status=none
        printf 'end' | dd of="$raw" bs=1 seek=$(($2 * 1048576 - 3)) conv=notrunc status=none
        echo "$raw"
    }
    r4=$(mk_raw r4 4)
    r16=$(mk_raw r16 16)
    qemu-img convert -q -f raw -O vhdx -o subformat=dynamic,block_size=1M "$r4" "$work/q-dyn-1m.vhdx"
    qemu-img convert -q -f raw -O vhdx -o subformat=dynamic,block_size=8M "$r16" "$work/q-dyn-8m.vhdx"
    qemu-img create -q -f vhdx -o subformat=dynamic,block_size=32M,log_size=1M "$work/q-empty.vhdx" 16M
    qemu-img convert -q -f raw -O vhdx -o subformat=fixed "$r4" "$work/q-fixed.vhdx"
    qemu-img convert -q -f raw -O vpc -o subformat=dynamic "$r4" "$work/q-dyn.vhd"
    qemu-img convert -q -f raw -O vpc -o subformat=fixed "$r4" "$work/q-fixed.vhd"
    qemu-img create -q -f vpc -o subformat=dynamic "$work/q-empty.vhd" 16M
    imgs+=("$work"/q-*.vhdx "$work"/q-*.vhd)
else
    echo "make_corpus: qemu-img not found; qemu-made seeds skipped" >&2
fi

# Partitioned disks for the partitions target (sparse: only tables and file-system
# headers hold data): Windows' GPT layout made by sgdisk, with a FAT ESP and the boot
# sector and first MFT records of an NTFS C: (its $LogFile would not fit a seed).
if command -v sgdisk >/dev/null 2>&1 && command -v mkfs.vfat >/dev/null 2>&1 &&
    command -v mkntfs >/dev/null 2>&1; then
    raw="$work/gpt-windows-real.raw"
    truncate -s 8M "$raw"
    sgdisk -n1:2048:+2M -t1:EF00 -c1:"EFI system partition" -n2:0:+1M -t2:0C01 \
        -n3:0:+3M -t3:0700 -c3:"Basic data partition" -n4:0:0 -t4:2700 "$raw" >/dev/null
    truncate -s 2M "$work/esp.img"
    mkfs.vfat -n SYSTEM "$work/esp.img" >/dev/null
    dd if="$work/esp.img" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
    truncate -s 3M "$work/c.img"
    mkntfs -q -F -f -L Windows "$work/c.img" 2>/dev/null
    c_off=$((4 << 20))
    dd if="$work/c.img" of="$raw" bs=512 count=1 seek=$((c_off / 512)) conv=notrunc status=none
    mft=$(($(od -An -t u8 -j 48 -N 8 "$work/c.img") * $(od -An -t u1 -j 13 -N 1 "$work/c.img") * $(od -An -t u2 -j 11 -N 2 "$work/c.img")))
    dd if="$work/c.img" of="$raw" bs=4096 iflag=skip_bytes,count_bytes oflag=seek_bytes \
        skip="$mft" count=16384 seek=$((c_off + mft)) conv=notrunc status=none
    imgs+=("$raw")
else
    echo "make_corpus: sgdisk, mkfs.vfat or mkntfs not found; the real partitioned seed is skipped" >&2
fi

cargo run -q --example seedgen -- corpus "$work/gen" "${imgs[@]}"
for t in corpus/*/; do
    echo "make_corpus: $t $(find "$t" -type f | wc -l) files, $(du -sh "$t" | cut -f1)"
done
