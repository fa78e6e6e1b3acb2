#!/usr/bin/env bash
# Load benchmarks: release build, then (without arguments) the three scenarios of bench/README.md:
# plain proxying, 1 KiB cache hits, 64 KiB cache hits. With arguments: one run of bench/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -j2 --bins
bin="${CARGO_TARGET_DIR:-target}/release"
if (($#)); then
  exec python3 bench/run.py --target-dir "$bin" "$@"
fi
python3 bench/run.py --target-dir "$bin" --scenario proxy
python3 bench/run.py --target-dir "$bin" --scenario cache --bytes 1024
python3 bench/run.py --target-dir "$bin" --scenario cache --bytes 65536
