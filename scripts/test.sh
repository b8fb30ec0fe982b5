#!/usr/bin/env bash
# The one test command: formatting, lints, then every unit and integration test.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh --test fixtures # extra arguments go to `cargo test`
#
# Stops at the first failing step with a non-zero exit. Integration tests that need
# FUSE, loop devices or a tool from scripts/setup.sh skip with a message unless
# VDISKFS_REQUIRE_FUSE=1 is set (as .ci/run does), in which case they fail.
#
# Tests run in the dev profile on purpose: overflow checks and debug assertions are
# on, which is what we want while feeding parsers damaged images; the integration
# tests' images are small enough (tens of MiB, one sparse 4 GiB) for that.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "test: error: cargo not found; run scripts/setup.sh first" >&2
    exit 1
}

start=$(date +%s)
step() {
    printf '\n==> %s\n' "$*"
    "$@"
}

step cargo fmt --all -- --check
step cargo clippy --all-targets -- -D warnings
step cargo test "$@"

# Issue 18: the mount, write, crash (50 kill cycles per format unless
# VDISKFS_CRASH_CYCLES says otherwise) and guest tests once more with every mount on FUSE
# over io_uring (VDISKFS_TRANSPORT=uring: a mount that cannot have it fails). Needs root
# and a kernel with CONFIG_FUSE_IO_URING; enable_uring is turned on for the pass and put
# back as it was found. Only on a full run (no arguments); VDISKFS_URING_PASS=0 skips
# it; VDISKFS_REQUIRE_URING=1 (CI) makes a missing kernel feature a failure.
uring_switch=/sys/module/fuse/parameters/enable_uring
if [ $# -eq 0 ] && [ "${VDISKFS_URING_PASS:-1}" != 0 ]; then
    if [ -w "$uring_switch" ]; then
        uring_was=$(cat "$uring_switch")
        trap 'echo "$uring_was" > "$uring_switch"' EXIT
        echo Y > "$uring_switch"
        VDISKFS_TRANSPORT=uring VDISKFS_CRASH_CYCLES=${VDISKFS_CRASH_CYCLES:-50} \
            step cargo test --test mount --test write --test crash --test guests
        echo "$uring_was" > "$uring_switch"
        trap - EXIT
    elif [ "${VDISKFS_REQUIRE_URING:-0}" = 1 ]; then
        echo "test: error: $uring_switch not writable (root and CONFIG_FUSE_IO_URING needed) and VDISKFS_REQUIRE_URING=1" >&2
        exit 1
    else
        printf '\n==> SKIPPED the io_uring pass: %s not writable (root and a kernel with CONFIG_FUSE_IO_URING needed)\n' "$uring_switch"
    fi
fi

printf '\n==> all checks passed in %ss\n' "$(($(date +%s) - start))"
