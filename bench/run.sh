#!/usr/bin/env bash
# Load benchmark: wrk against the origin directly, Weir and nginx, in one run. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -j2 --bins
exec python3 bench/run.py --target-dir "${CARGO_TARGET_DIR:-target}/release" "$@"
