#!/usr/bin/env bash
# Build the Debian package: target/debian/vdiskfs_VERSION-1_ARCH.deb
#
#   scripts/deb.sh        # prints the path of the .deb on its last line
#
# Builds the release binary, has it write its man pages and shell completions into
# target/generated (they are made from the command-line definitions, not kept in the
# repository), gzips the man pages, then runs `cargo deb` (installed by
# scripts/setup.sh) on what was built. Install with `sudo dpkg -i` (or `apt install
# ./target/debian/vdiskfs_*.deb`, which also pulls in fuse3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo-deb >/dev/null 2>&1 || {
    echo "deb: error: cargo-deb not found; run scripts/setup.sh (or: cargo install --locked cargo-deb)" >&2
    exit 1
}

cargo build --release --locked >&2
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target/release/vdiskfs"
gen=target/generated # where Cargo.toml's [package.metadata.deb] assets point
rm -rf "$gen"
"$bin" generate man "$gen/man" >/dev/null
gzip -9n "$gen"/man/*.1
for shell in bash zsh fish; do
    "$bin" generate completions "$shell" --dir "$gen/completions" >/dev/null
done

# --no-build: package exactly the binary built above; --strip: the release profile keeps
# line tables for backtraces, the package does not need them.
cargo deb --no-build --strip "$@" | tail -n 1
