#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), one after the other, one process
# each (the machine has 2 cores shared with other work). Exits non-zero on the first
# crash, leak of the RSS limit, or timeout; the reproducer is in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh 60                 # what CI would run
#   scripts/fuzz.sh 600 vhdx_open      # one target, ten minutes
#
# Installs cargo-fuzz when missing. The machine has only the stable toolchain; cargo-fuzz
# needs nightly-only rustc flags (-Zsanitizer=address ...), which RUSTC_BOOTSTRAP=1
# unlocks on stable. Builds with debug assertions (overflow checks) on, as the tests do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(vhdx_open vhd_open read_anywhere write_model partitions)

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1

# Seeds (fuzz/corpus is gitignored and built by a script).
for t in "${targets[@]}"; do
    if [ -z "$(ls -A "fuzz/corpus/$t" 2>/dev/null)" ]; then
        fuzz/make_corpus.sh
        break
    fi
done

# This run's own scratch directory (the targets write their images there): a cleanup
# never touches another run's files.
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
export VDISKFS_FUZZ_SCRATCH="$shm/vdiskfs-fuzz-run-$$"
mkdir -p "$VDISKFS_FUZZ_SCRATCH"
trap 'rm -rf "$VDISKFS_FUZZ_SCRATCH"' EXIT

build_flags=(--debug-assertions --sanitizer address)
(cd fuzz && cargo fuzz build "${build_flags[@]}")

status=0
for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    if (cd fuzz && cargo fuzz run "${build_flags[@]}" "$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -max_len=262144 -print_final_stats=1) >"$log" 2>&1; then
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^Done ' "$log" | sed "s/^/  $t: /" || true
    else
        echo "fuzz: $t FAILED; see $log and fuzz/artifacts/$t/" >&2
        tail -40 "$log" >&2
        status=1
    fi
    # libFuzzer exits with _exit: remove the target's tmpfs scratch dirs.
    rm -rf "${VDISKFS_FUZZ_SCRATCH:?}"/* 2>/dev/null || true
done
exit $status
