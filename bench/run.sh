#!/usr/bin/env bash
# Load benchmarks: release build, then (without arguments) the scenarios of bench/README.md:
# plain proxying, 1 KiB and 64 KiB cache hits, the Redis tier, invalidation propagation, plugins,
# rate limits, TLS, budgets. With arguments: one run of bench/run.py.
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
python3 bench/run.py --target-dir "$bin" --scenario shared --bytes 1024
python3 bench/run.py --target-dir "$bin" --scenario propagation
python3 bench/run.py --target-dir "$bin" --scenario plugin
python3 bench/run.py --target-dir "$bin" --scenario ratelimit
python3 bench/run.py --target-dir "$bin" --scenario tls
python3 bench/run.py --target-dir "$bin" --scenario budget
