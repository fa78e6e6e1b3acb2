#!/usr/bin/env bash
# Installs what Weir's build, tests and demo need, only when it is missing. Safe to run often.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)   # cluster creation in tests
command -v openssl >/dev/null 2>&1 || need+=(openssl)         # test certificates (rediss://)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [[ "${WITH_BENCH_TOOLS:-0}" == 1 ]]; then
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  command -v taskset >/dev/null 2>&1 || need+=(util-linux)
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)  # HTTP/2 hits (--scenario h2)
fi
if [[ "${WITH_GATE_TOOLS:-0}" == 1 ]]; then
  command -v valgrind >/dev/null 2>&1 || need+=(valgrind)       # callgrind, callgrind_control
  command -v python3 >/dev/null 2>&1 || need+=(python3)
fi

if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
# Plugins are built for wasm32-unknown-unknown (no WASI: a plugin imports nothing).
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
