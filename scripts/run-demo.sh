#!/usr/bin/env bash
# `make run`: the demo origin on :3000 and Weir on :8080 with policies/demo.yaml. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-target}/debug"

for port in 3000 8080 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use (another Weir or demo origin still running?): stop it first" >&2
    exit 1
  fi
done

"$bin/weir-demo-origin" --addr 127.0.0.1:3000 &
origin=$!
"$bin/weir" run --config policies/demo.yaml &
weir=$!
stop() {
  kill -TERM "$weir" "$origin" 2>/dev/null || true
  wait "$weir" "$origin" 2>/dev/null || true
}
trap stop INT TERM EXIT
echo "Weir on http://127.0.0.1:8080 (admin http://127.0.0.1:9901) — try: curl -i localhost:8080/products/1"
wait -n "$weir" "$origin"
