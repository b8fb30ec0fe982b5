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

printf '\n==> all checks passed in %ss\n' "$(($(date +%s) - start))"
