#!/usr/bin/env bash
# Install vdiskfs from this checkout without a package manager, with its man pages and
# shell completions:
#
#   sudo scripts/install.sh                  # into /usr/local
#   scripts/install.sh --prefix ~/.local     # into your home (no root needed)
#   scripts/install.sh --bin PATH ...        # install PATH instead of building
#
# Puts PREFIX/bin/vdiskfs (`cargo install --locked --path . --root PREFIX`), the man
# pages in PREFIX/share/man/man1, and completions where bash-completion, zsh and fish
# look under PREFIX/share. With the default prefix, /usr/local/bin is on the PATH that
# mount(8) gives mount.fuse3, so `mount -t fuse.vdiskfs` and fstab entries work too.
# `mount -t vdiskfs` also needs the link /sbin/mount.vdiskfs (mount(8) looks for
# helpers only in /sbin): pass --mount-helper to make it (root only).
#
# Undo: scripts/install.sh --uninstall [--prefix PREFIX]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PREFIX=/usr/local
BIN=
HELPER=0
UNINSTALL=0
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --bin) BIN=${2:?--bin needs a file}; shift 2 ;;
    --mount-helper) HELPER=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: error: unknown argument: $1 (try --help)" >&2; exit 1 ;;
    esac
done

MAN="$PREFIX/share/man/man1"
BASH_DIR="$PREFIX/share/bash-completion/completions"
ZSH_DIR="$PREFIX/share/zsh/site-functions"
FISH_DIR="$PREFIX/share/fish/vendor_completions.d"

if [ "$UNINSTALL" = 1 ]; then
    rm -fv "$PREFIX/bin/vdiskfs" "$MAN"/vdiskfs.1 "$MAN"/vdiskfs-*.1 \
        "$BASH_DIR/vdiskfs" "$ZSH_DIR/_vdiskfs" "$FISH_DIR/vdiskfs.fish"
    if [ -L /sbin/mount.vdiskfs ] && [ "$(readlink /sbin/mount.vdiskfs)" = "$PREFIX/bin/vdiskfs" ]; then
        rm -fv /sbin/mount.vdiskfs
    fi
    exit 0
fi

if [ -z "$BIN" ]; then
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    cargo install --locked --path . --root "$PREFIX"
else
    install -D -m 755 "$BIN" "$PREFIX/bin/vdiskfs"
fi
vd="$PREFIX/bin/vdiskfs"

mkdir -p "$MAN" "$BASH_DIR" "$ZSH_DIR" "$FISH_DIR"
"$vd" generate man "$MAN" >/dev/null
"$vd" generate completions bash >"$BASH_DIR/vdiskfs"
"$vd" generate completions zsh >"$ZSH_DIR/_vdiskfs"
"$vd" generate completions fish >"$FISH_DIR/vdiskfs.fish"
if [ "$HELPER" = 1 ]; then
    ln -sfn "$vd" /sbin/mount.vdiskfs
fi
echo "installed: $vd, man pages in $MAN, completions for bash, zsh and fish"
