#!/usr/bin/env bash
# Builds the Debian package of lienthong with cargo-deb (installed from crates.io when
# missing) and prints the path of the .deb on the last line of stdout. A release
# build: about 15 minutes on 2 cores from clean. Honours CARGO_TARGET_DIR.
# Usage: deploy/build-deb.sh [extra cargo-deb arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked >&2
fi

# cargo-deb runs `cargo build --release -p lienthong-cli`; --locked keeps Cargo.lock;
# --strip drops the line tables the release profile keeps for profiling (105 MB of
# binary become 20 MB; panics then show no file and line).
# Its progress goes to stderr; the last stdout line is the package's path.
cargo deb -p lienthong-cli --locked --strip "$@" >&2
target="${CARGO_TARGET_DIR:-target}"
deb=$(ls -t "$target"/debian/lienthong_*.deb | head -1)
echo "$deb"
