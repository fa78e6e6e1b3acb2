#!/usr/bin/env bash
# `make run`: the demo origin on :3000 and Weir on :8080 with policies/demo.yaml. Ctrl-C stops both.
# WEIR_DEMO_ORIGIN (address) and WEIR_DEMO_CONFIG (policy) override the defaults; the addresses
# printed are the ones Weir bound, once it is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug"
origin_addr="${WEIR_DEMO_ORIGIN:-127.0.0.1:3000}"
config="${WEIR_DEMO_CONFIG:-policies/demo.yaml}"

ports="${origin_addr##*:}"
if [ -z "${WEIR_DEMO_CONFIG:-}" ]; then ports="$ports 8080 9901"; fi
for port in $ports; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use (another Weir or demo origin still running?): stop it first" >&2
    exit 1
  fi
done

ready="$(mktemp -d)/ready.json"
"$bin/weir-demo-origin" --addr "$origin_addr" &
origin=$!
"$bin/weir" run --config "$config" --ready-file "$ready" &
weir=$!
stop() {
  kill -TERM "$weir" "$origin" 2>/dev/null || true
  wait "$weir" "$origin" 2>/dev/null || true
  rm -rf "$(dirname "$ready")"
}
trap stop INT TERM EXIT
# Weir writes the ready file once every listener is bound and serving: say where only then.
for _ in $(seq 600); do
  [ -s "$ready" ] && break
  if ! kill -0 "$weir" 2>/dev/null; then
    echo "weir exited before it was ready (see its log above)" >&2
    exit 1
  fi
  sleep 0.1
done
if [ ! -s "$ready" ]; then
  echo "weir was not ready after 60 s" >&2
  exit 1
fi
listen="$(sed -e 's/.*"listen":\["\([^"]*\)".*/\1/' "$ready")"
admin="$(sed -e 's/.*"admin":"\([^"]*\)".*/\1/' "$ready")"
echo "Weir on http://$listen (admin http://$admin) — try: curl -i $listen/products/1"
wait -n "$weir" "$origin"
