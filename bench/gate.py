#!/usr/bin/env python3
"""Weir's instruction-count gate (`make bench-gate`).

Runs the release binary under `valgrind --tool=callgrind` for five request paths on routes
without plugins — an L1 hit, pure proxying, a miss that is stored, an L1 hit on a route with a
rate limit kept in the process, the same with the limit kept in Redis (a `redis-server` of its own; one request at a time, so every check is
one script call: the unbatched cost) — and counts the instructions
Weir executes per request, every thread included. Each scenario: start Weir under callgrind,
warm up, zero the counters (`callgrind_control -z`), send a fixed number of requests over a fixed
set of keep-alive connections, strictly one at a time (the same interleaving every run), dump
(`callgrind_control -d`) and divide. Instruction counts do not move with the machine's speed the
way wall time does; what is left (timers, the runtime's parking) is the spread the threshold
absorbs.

    bench/gate.py                     # compare with bench/baseline.json, exit 1 on a regression
    bench/gate.py --runs 3 --write    # measure the spread and write a new baseline
    bench/gate.py --scenario l1_hit --keep /tmp/cg   # then: callgrind_annotate /tmp/cg/callgrind.l1_hit.out

The threshold of each scenario is stored in the baseline: at least three times the spread
(max - min) / median measured over the runs that wrote it, and never under --min-threshold.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import free_port  # bench/run.py, beside this file

SCENARIOS = ("l1_hit", "proxy", "miss_store", "limit_local", "limit_redis")
CONNECTIONS = 4
HOT = 100


def wait_port(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on {port} after {timeout} s")


class Conn:
    """One keep-alive HTTP/1.1 connection that sends a GET and reads the whole response
    (Content-Length or chunked)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def get(self, path):
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gate.test\r\n\r\n".encode())
        status = int(self._line().split()[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            self._take(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int(self._line().split(b";")[0], 16)
                self._take(size + 2)
                if size == 0:
                    break
        return status, headers


def drive(port, paths):
    """Sends `paths` in order, round-robin over CONNECTIONS keep-alive connections, one request in
    flight at a time; every answer must be 200."""
    conns = [Conn(port) for _ in range(CONNECTIONS)]
    statuses = {}
    for i, path in enumerate(paths):
        status, _ = conns[i % CONNECTIONS].get(path)
        statuses[status] = statuses.get(status, 0) + 1
    for c in conns:
        c.sock.close()
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses {statuses}")


def config(tmp, port, admin_port, origin_port, log=True, access="off", limited=False, redis=None):
    cfg = tmp / "gate.yaml"
    # A commit from before the access log existed (53da35e, say) refuses the `log` key.
    to = f", to: {tmp / 'access.log'}" if access != "off" else ""
    log = f"log:\n  access: {{ format: {access}{to} }}\n" if log else ""
    # The limited route exists only in the limit scenarios (older commits' configs stay valid);
    # its counters live in Redis when there is one, in the process otherwise.
    limited = (f"""  - name: limited
    match: {{ path: /l/ }}
    upstream: http://127.0.0.1:{origin_port}
    cache: {{}}
    rate_limit: {{ rate: 1000000/s, burst: 1000000, key: client_ip }}
""" if limited else "")
    redis_block = f"redis:\n  url: redis://127.0.0.1:{redis}/0\n" if redis else ""
    cfg.write_text(f"""listen:
  - addr: 127.0.0.1:{port}
admin:
  addr: 127.0.0.1:{admin_port}
{log}{redis_block}cache:
  l1_max_bytes: 256MiB
routes:
  - name: cached
    match: {{ path: /c/ }}
    upstream: http://127.0.0.1:{origin_port}
    cache: {{}}
  - name: proxied
    match: {{ path: /p/ }}
    upstream: http://127.0.0.1:{origin_port}
{limited}""")
    return cfg


def workload(scenario, requests):
    """(warm-up paths, measured paths) of a scenario."""
    if scenario == "l1_hit":
        warm = [f"/c/hot/{i % HOT}" for i in range(HOT * 3)]
        return warm, [f"/c/hot/{i % HOT}" for i in range(requests)]
    if scenario in ("limit_local", "limit_redis"):
        warm = [f"/l/hot/{i % HOT}" for i in range(HOT * 3)]
        return warm, [f"/l/hot/{i % HOT}" for i in range(requests)]
    if scenario == "proxy":
        return [f"/p/{i % HOT}" for i in range(HOT * 3)], [f"/p/{i % HOT}" for i in range(requests)]
    # Every measured request a new URL: a miss, fetched and stored.
    return [f"/c/warm/{i}" for i in range(HOT * 3)], [f"/c/miss/{i}" for i in range(requests)]


def instructions(out_file):
    """Total instructions (Ir) of a callgrind dump, all threads."""
    for line in out_file.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out_file}")


def measure(args, scenario, tmp):
    target = Path(args.target_dir)
    origin_port, port, admin_port = free_port(), free_port(), free_port()
    redis, redis_port = None, None
    if scenario == "limit_redis":
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(redis_port, redis)
    cfg = config(tmp, port, admin_port, origin_port, log=not args.no_log_key, access=args.access_log,
                 limited=scenario.startswith("limit_"), redis=redis_port)
    origin = subprocess.Popen([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}",
                               "--bytes", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp / f"callgrind.{scenario}.out"
    env = dict(os.environ, TOKIO_WORKER_THREADS=str(args.workers))
    weir = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             "--collect-atstart=yes", str(target / "weir"), "run", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{scenario}.log", "w"))
    try:
        wait_port(origin_port, origin)
        wait_port(port, weir)
        warm, measured = workload(scenario, args.requests)
        drive(port, warm)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-z", str(weir.pid)], check=True, capture_output=True)
        drive(port, measured)
        subprocess.run(["callgrind_control", "-d", str(weir.pid)], check=True, capture_output=True)
        dumps = sorted(tmp.glob(f"callgrind.{scenario}.out.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise SystemExit("callgrind wrote no dump")
        total = instructions(dumps[-1])
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            dumps[-1].replace(keep / f"callgrind.{scenario}.out")
        for d in dumps:
            d.unlink(missing_ok=True)
        return total / len(measured)
    finally:
        procs = [p for p in (weir, origin, redis) if p is not None]
        for p in procs:
            p.send_signal(signal.SIGINT if p is weir else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release"))
    ap.add_argument("--baseline", default="bench/baseline.json")
    ap.add_argument("--runs", type=int, default=1, help="runs per scenario (the median is compared)")
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per scenario")
    ap.add_argument("--workers", type=int, default=2, help="tokio runtime workers (TOKIO_WORKER_THREADS)")
    ap.add_argument("--scenario", choices=SCENARIOS, action="append", help="only these (repeatable)")
    ap.add_argument("--keep", default=None, help="keep each scenario's dump in this folder (for callgrind_annotate)")
    ap.add_argument("--access-log", default="off", choices=("off", "json", "text"),
                    help="the access log's format (written to a file in the run's temp dir); the baseline is off")
    ap.add_argument("--no-log-key", action="store_true",
                    help="leave the `log` key out of the config (to measure a commit from before the access log)")
    ap.add_argument("--write", action="store_true", help="write the baseline from this run")
    ap.add_argument("--commit", default=None, help="with --write: the commit measured (default: HEAD)")
    ap.add_argument("--min-threshold", type=float, default=0.02, help="with --write: the smallest threshold")
    args = ap.parse_args()
    scenarios = args.scenario or list(SCENARIOS)

    tmp = Path(tempfile.mkdtemp(prefix="weir-gate-"))
    runs = {s: [] for s in scenarios}
    for r in range(args.runs):
        for s in scenarios:
            ir = measure(args, s, tmp)
            runs[s].append(ir)
            print(f"run {r + 1}/{args.runs} {s}: {ir:,.0f} instructions/request", flush=True)
    medians = {s: statistics.median(v) for s, v in runs.items()}

    if args.write:
        commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                               text=True).stdout.strip()
        baseline = {"commit": commit, "requests": args.requests, "workers": args.workers,
                    "connections": CONNECTIONS, "scenarios": {}}
        for s, v in runs.items():
            spread = (max(v) - min(v)) / medians[s]
            baseline["scenarios"][s] = {"instructions_per_request": round(medians[s]), "runs": [round(x) for x in v],
                                        "spread": round(spread, 4),
                                        "threshold": round(max(3 * spread, args.min_threshold), 4)}
        Path(args.baseline).write_text(json.dumps(baseline, indent=2) + "\n")
        print(f"baseline written to {args.baseline}")
        return 0

    baseline = json.loads(Path(args.baseline).read_text())
    failed = []
    print(f"\n{'scenario':<12} {'baseline':>10} {'now':>10} {'ratio':>7} {'allowed':>8}  (baseline {baseline['commit']})")
    for s in scenarios:
        b = baseline["scenarios"].get(s)
        if b is None:
            print(f"{s:<12} {'-':>10} {medians[s]:>10,.0f}  (no baseline: not compared)")
            continue
        ratio = medians[s] / b["instructions_per_request"]
        ok = ratio <= 1 + b["threshold"]
        print(f"{s:<12} {b['instructions_per_request']:>10,} {medians[s]:>10,.0f} {ratio:>7.3f} "
              f"{1 + b['threshold']:>8.3f}  {'ok' if ok else 'REGRESSION'}")
        if not ok:
            failed.append(s)
    if failed:
        print(f"bench-gate: more instructions per request than the baseline allows: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
