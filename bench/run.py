#!/usr/bin/env python3
"""Weir load benchmark.

Runs wrk against the demo origin directly, Weir and nginx (same reverse-proxy job, upstream
keep-alive), one after the other in a single run. wrk is pinned to one core, the origin and the
proxy under test share the other, so proxy CPU is what limits throughput; each proxy's own CPU
time per request is read from /proc/PID/stat over the measured window.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / TICK


def nginx_workers(pid):
    """nginx worker PIDs (not the cache loader/manager, which come and go)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if b"worker process" in Path(f"/proc/{p}/cmdline").read_bytes()]


def parse_latency(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        raise SystemExit(f"cannot parse wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url, seconds, conns, core, headers=(), script=None):
    threads = len(str(core).split(","))
    cmd = ["taskset", "-c", str(core), "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", str(script)]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = parse_latency(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_latency(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "requests": total, "p50_ms": p50, "p99_ms": p99,
            "non2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(1) if sock else ""}


def measure(name, url, pids, args, headers=(), script=None):
    wrk(url, 2, args.connections, args.client_core, headers, script)  # warm-up: pools, caches
    before = cpu_seconds(pids) if pids else 0
    r = wrk(url, args.seconds, args.connections, args.client_core, headers, script)
    after = cpu_seconds(pids) if pids else 0
    r["name"] = name
    r["cpu_us_per_req"] = (after - before) / max(r["requests"], 1) * 1e6 if pids else None
    print(f"  {name:<28} {r['rps']:>10.0f} rps  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
          + (f"  cpu {r['cpu_us_per_req']:.1f} us/req" if pids else ""), flush=True)
    return r


class Servers:
    """Servers pinned to the server core, logging into the run's temp folder, stopped together."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self.procs = args, tmp, []

    def spawn(self, cmd, core=None, **kw):
        log = open(self.tmp / f"{Path(cmd[0]).name}.log", "w")
        p = subprocess.Popen(["taskset", "-c", str(self.args.server_core if core is None else core)] + cmd,
                             stdout=subprocess.DEVNULL, stderr=log, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def rounds(targets, args):
    """Measures every target `args.repeat` times, interleaved (a burst of machine noise hits all
    targets alike), and returns per-target medians."""
    import statistics
    runs = {name: [] for name, *_ in targets}
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}", flush=True)
        for name, url, pids, script in targets:
            runs[name].append(measure(name, url, pids, args, script=script))
    out = []
    for name, *_ in targets:
        rs = runs[name]
        med = {"name": name, "rounds": rs}
        for k in ["rps", "p50_ms", "p99_ms", "requests", "non2xx"]:
            med[k] = statistics.median(r[k] for r in rs)
        cpus = [r["cpu_us_per_req"] for r in rs if r["cpu_us_per_req"] is not None]
        med["cpu_us_per_req"] = statistics.median(cpus) if cpus else None
        med["socket_errors"] = "; ".join(r["socket_errors"] for r in rs if r["socket_errors"])
        out.append(med)
    return out


def weir_config(tmp, port, origin_port, admin_port, cache=False, redis=None, l1="256MiB", name="weir", limit="",
                tls=None, top="", access_log="off"):
    cfg = tmp / f"{name}.yaml"
    tls_block = f"    tls:\n      certs:\n        - {{ cert: {tls[0]}, key: {tls[1]} }}\n" if tls else ""
    cache_block = ("    cache: {}\n" if cache else "") + limit
    redis_block = f"redis:\n  url: redis://127.0.0.1:{redis}/0\n" if redis else ""
    # nginx runs with `access_log off`: Weir too, unless a target measures the access log.
    cfg.write_text(f"""listen:
  - addr: 127.0.0.1:{port}
{tls_block}admin:
  addr: 127.0.0.1:{admin_port}
log:
  access: {{ format: {access_log}, to: {tmp / (name + '-access.log')} }}
cache:
  l1_max_bytes: {l1}
{redis_block}{top}routes:
  - name: bench
    upstream: http://127.0.0.1:{origin_port}
{cache_block}""")
    return cfg


HOT_SET = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/hot/" .. (counter % 100))
end
"""


def warm(port):
    import urllib.request
    for i in range(100):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/hot/{i}").read()


# nginx worker processes: one per server core (`--server-core`).
SERVER_WORKERS = 1


def nginx_config(tmp, port, origin_port, cache=False, tls=None, http2=False):
    cfg = tmp / "nginx.conf"
    cache_dir = Path("/dev/shm") / f"weir-bench-nginx-{os.getpid()}"
    zone = (f"proxy_cache_path {cache_dir} levels=1:2 keys_zone=hot:10m max_size=256m inactive=10m use_temp_path=off;"
            if cache else "")
    location_cache = ("proxy_cache hot; proxy_cache_lock on; proxy_cache_valid 200 10m; "
                      "add_header X-Cache-Status $upstream_cache_status;" if cache else "")
    for d in ["body", "proxy", "fastcgi", "uwsgi", "scgi"]:
        (tmp / d).mkdir(exist_ok=True)
    # The same resumption Weir offers: TLS 1.3 tickets and a session cache.
    tls_directives = (f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; ssl_protocols TLSv1.2 TLSv1.3; "
                      "ssl_session_cache shared:SSL:10m; ssl_session_tickets on;") if tls else ""
    cfg.write_text(f"""daemon off;
master_process on;
worker_processes {SERVER_WORKERS};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # A connection is not closed after 1,000 requests (nginx's default; Weir has no such cap, and
  # h2load does not open a new connection when one is closed under it).
  keepalive_requests 1000000;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  {zone}
  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port}{" ssl" if tls else ""}{" http2" if http2 else ""};
    {tls_directives}
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering on;
      {location_cache}
    }}
  }}
}}
""")
    return cfg


def main():
    global SERVER_WORKERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-dir", default="target/release")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    # A core, or a list ("0,1"): Weir and the bare servers run one worker per core they may use,
    # nginx as many worker processes, wrk as many threads (the multi-core runs).
    ap.add_argument("--server-core", default="0")
    ap.add_argument("--client-core", default="1")
    ap.add_argument("--redis-core", default=None,
                    help="core for Redis (default: the server core, sharing it with Weir and the origin)")
    ap.add_argument("--path", default="/bytes?n=1024", help="origin path requested")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--scenario", choices=["proxy", "cache", "shared", "propagation", "plugin", "ratelimit", "tls",
                                           "budget", "h2"],
                    default="proxy",
                    help="proxy: plain reverse proxying; cache: 100 hot cached URLs")
    ap.add_argument("--bytes", type=int, default=1024, help="cache scenario: body size")
    ap.add_argument("--h2-clients", type=int, default=4,
                    help="h2 scenario: connections; --connections streams in all, spread over them")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per target; medians are reported")
    args = ap.parse_args()
    SERVER_WORKERS = len(str(args.server_core).split(","))
    if args.scenario == "cache":
        return cache_scenario(args)
    if args.scenario == "shared":
        return shared_scenario(args)
    if args.scenario == "propagation":
        return propagation_scenario(args)
    if args.scenario == "plugin":
        return plugin_scenario(args)
    if args.scenario == "ratelimit":
        return ratelimit_scenario(args)
    if args.scenario == "tls":
        return tls_scenario(args)
    if args.scenario == "budget":
        return budget_scenario(args)
    if args.scenario == "h2":
        return h2_scenario(args)

    for tool in ["wrk", "nginx", "taskset"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run `make bench` (it installs it)")

    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    servers = Servers(args, tmp)
    spawn = servers.spawn

    results = []
    try:
        origin_port, weir_port, admin_port, nginx_port, forward_port = (free_port() for _ in range(5))
        origin = spawn([str(target / "weir-demo-origin"), "--addr", f"127.0.0.1:{origin_port}"])
        wait_port(origin_port)
        weir = spawn([str(target / "weir"), "run", "--config", str(weir_config(tmp, weir_port, origin_port, admin_port))],
                     env={**os.environ, "WEIR_LOG": "warn"})
        wait_port(weir_port)
        nginx = spawn(["nginx", "-c", str(nginx_config(tmp, nginx_port, origin_port)), "-p", str(tmp)])
        wait_port(nginx_port)
        workers = nginx_workers(nginx.pid)
        forward = spawn([str(target / "weir-bench-forward"), "--addr", f"127.0.0.1:{forward_port}",
                         "--upstream", f"127.0.0.1:{origin_port}"])
        wait_port(forward_port)

        print(f"wrk -c{args.connections} -d{args.seconds}s {args.path}; client on core {args.client_core}, "
              f"origin + proxy on core {args.server_core}", flush=True)
        results = rounds([
            ("origin direct", f"http://127.0.0.1:{origin_port}{args.path}", [], None),
            ("weir (proxy)", f"http://127.0.0.1:{weir_port}{args.path}", [weir.pid], None),
            ("nginx (proxy, keepalive)", f"http://127.0.0.1:{nginx_port}{args.path}", workers, None),
            ("minimal hyper forwarder", f"http://127.0.0.1:{forward_port}{args.path}", [forward.pid], None),
        ], args)
    finally:
        servers.stop()

    w, n, f = results[1], results[2], results[3]
    print()
    print(f"medians of {args.repeat} interleaved rounds")
    print("| target | rps | p50 ms | p99 ms | proxy CPU µs/req |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        cpu = f"{r['cpu_us_per_req']:.1f}" if r["cpu_us_per_req"] is not None else "–"
        print(f"| {r['name']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {cpu} |")
    print()
    print(f"weir/nginx: rps {w['rps'] / n['rps']:.2f}x, p99 {w['p99_ms'] / n['p99_ms']:.2f}x, "
          f"CPU per request {w['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}x; weir/minimal forwarder: CPU per request "
          f"{w['cpu_us_per_req'] / f['cpu_us_per_req']:.2f}x, rps {w['rps'] / f['rps']:.2f}x")
    bad = [r["name"] for r in results if r["non2xx"] or r["socket_errors"]]
    if bad:
        print(f"warning: errors during {bad}: " + "; ".join(f"{r['non2xx']} non-2xx {r['socket_errors']}" for r in results))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (Path(args.out) / f"proxy-{stamp}.json").write_text(json.dumps(results, indent=2))


def print_table(results, title, cpu_label):
    print()
    print(title)
    print(f"| target | rps | p50 ms | p99 ms | {cpu_label} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['name']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['cpu_us_per_req']:.1f} |")


def hit_servers(servers, args, tmp, origin_port, bare_port, weir_port, admin_port, nginx_port, http2=False):
    """The three targets of a hit benchmark, started: the bare hyper server, Weir caching the
    origin, nginx's proxy_cache. Returns the bare server's and Weir's processes and nginx's workers."""
    target = Path(args.target_dir)
    bare = servers.spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{bare_port}",
                          "--bytes", str(args.bytes)])
    wait_port(bare_port)
    weir = servers.spawn([str(target / "weir"), "run", "--config",
                          str(weir_config(tmp, weir_port, origin_port, admin_port, cache=True))],
                         env={**os.environ, "WEIR_LOG": "warn"})
    wait_port(weir_port)
    nginx = servers.spawn(["nginx", "-c", str(nginx_config(tmp, nginx_port, origin_port, cache=True, http2=http2)),
                           "-p", str(tmp)])
    wait_port(nginx_port)
    return bare, weir, nginx_workers(nginx.pid)


def cache_scenario(args):
    """Hot set of 100 cached URLs: Weir (L1 hits), nginx proxy_cache (tmpfs, cache lock) and a
    bare hyper server answering the same bytes from memory, in one run."""
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    script = tmp / "hot.lua"
    script.write_text(HOT_SET)
    servers = Servers(args, tmp)
    spawn = servers.spawn

    results = []
    try:
        origin_port, weir_port, admin_port, nginx_port, bare_port, log_port, log_admin = (free_port() for _ in range(7))
        spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        # The same Weir writing a JSON access-log line per request (to a file on the run's tmp dir).
        logged = spawn([str(target / "weir"), "run", "--config",
                        str(weir_config(tmp, log_port, origin_port, log_admin, cache=True, name="logged",
                                        access_log="json"))],
                       env={**os.environ, "WEIR_LOG": "warn"})
        wait_port(log_port)
        warm(log_port)
        bare, weir, workers = hit_servers(servers, args, tmp, origin_port, bare_port, weir_port, admin_port, nginx_port)
        warm(weir_port)
        warm(nginx_port)
        print(f"hot set 100 x {args.bytes} B, wrk -c{args.connections} -d{args.seconds}s; client on core "
              f"{args.client_core}, server on core {args.server_core}", flush=True)
        results = rounds([
            ("bare hyper (memory)", f"http://127.0.0.1:{bare_port}", [bare.pid], script),
            ("weir (L1 hit)", f"http://127.0.0.1:{weir_port}", [weir.pid], script),
            ("nginx proxy_cache (tmpfs)", f"http://127.0.0.1:{nginx_port}", workers, script),
            ("weir (L1 hit, JSON access log)", f"http://127.0.0.1:{log_port}", [logged.pid], script),
        ], args)
    finally:
        servers.stop()
        shutil.rmtree(Path("/dev/shm") / f"weir-bench-nginx-{os.getpid()}", ignore_errors=True)

    bare_r, w, n, logged_r = results
    print(f"access log on/off: rps {logged_r['rps'] / w['rps']:.3f}x, "
          f"CPU/req {logged_r['cpu_us_per_req'] / w['cpu_us_per_req']:.2f}x")
    print_table(results, f"medians of {args.repeat} interleaved rounds", "server CPU µs/req")
    print()
    print(f"weir/nginx: rps {w['rps'] / n['rps']:.2f}x, p99 {w['p99_ms'] / n['p99_ms']:.2f}x, "
          f"CPU/req {w['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}x; weir/bare hyper: rps {w['rps'] / bare_r['rps']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"cache-{args.bytes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))


def h2load(port, seconds, args, log=None):
    """h2load over cleartext HTTP/2 (prior knowledge) on the hot set: `--h2-clients` connections,
    `--connections` streams in flight in all. p50 / p99 from its per-request log."""
    import statistics
    streams = max(1, args.connections // args.h2_clients)
    threads = len(str(args.client_core).split(","))
    uris = [f"http://127.0.0.1:{port}/hot/{i}" for i in range(100)]
    cmd = ["taskset", "-c", str(args.client_core), "h2load", "-t", str(threads), "-c", str(args.h2_clients),
           "-m", str(streams), "-D", str(seconds)]
    if log:
        cmd += ["--log-file", str(log)]
    out = subprocess.run(cmd + uris, capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m:
        raise SystemExit(f"cannot read h2load's output:\n{out}")
    done, ok = int(m.group(2)), int(m.group(3))
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    status = re.search(r"status codes: (\d+) 2xx", out)
    r = {"rps": rps, "requests": done, "non2xx": max(0, ok - int(status.group(1))) if status else 0,
         "socket_errors": "" if int(m.group(4)) + int(m.group(5)) == 0 else f"{m.group(4)} failed {m.group(5)} errored"}
    lat = sorted(int(line.split("\t")[2]) for line in Path(log).read_text().splitlines()) if log else []
    r["p50_ms"] = lat[len(lat) // 2] / 1000 if lat else 0.0
    r["p99_ms"] = lat[min(len(lat) - 1, len(lat) * 99 // 100)] / 1000 if lat else 0.0
    r["max_ms"] = lat[-1] / 1000 if lat else 0.0
    return r


def h2_scenario(args):
    """HTTP/2 downstream (cleartext, prior knowledge) hits of the hot set: Weir's L1, nginx's
    proxy_cache (`listen ... http2`), and the bare hyper server, with h2load."""
    import statistics
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: run `make bench` (it installs nghttp2-client)")
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    servers = Servers(args, tmp)
    spawn = servers.spawn
    runs = {}
    try:
        origin_port, weir_port, admin_port, nginx_port, bare_port = (free_port() for _ in range(5))
        spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        bare, weir, workers = hit_servers(servers, args, tmp, origin_port, bare_port, weir_port, admin_port, nginx_port,
                                          http2=True)
        warm(weir_port)  # nginx's h2c listener speaks only HTTP/2: the first warm-up round fills it
        targets = [("bare hyper (memory, h2c)", bare_port, [bare.pid]),
                   ("weir (L1 hit, h2c)", weir_port, [weir.pid]),
                   ("nginx proxy_cache (h2c)", nginx_port, workers)]
        print(f"hot set 100 x {args.bytes} B over HTTP/2 (h2c), h2load -c{args.h2_clients} "
              f"-m{max(1, args.connections // args.h2_clients)} -D{args.seconds}; client on core {args.client_core}, "
              f"server on core {args.server_core}", flush=True)
        for i in range(args.repeat):
            print(f"round {i + 1}/{args.repeat}", flush=True)
            for name, port, pids in targets:
                h2load(port, 2, args)  # warm-up
                before = cpu_seconds(pids)
                log = tmp / f"h2load-{port}-{i}.log"
                r = h2load(port, args.seconds, args, log=log)
                log.unlink()
                r["cpu_us_per_req"] = (cpu_seconds(pids) - before) / max(r["requests"], 1) * 1e6
                r["name"] = name
                print(f"  {name:<28} {r['rps']:>10.0f} rps  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                      f"max {r['max_ms']:.1f} ms  cpu {r['cpu_us_per_req']:.1f} us/req"
                      + (f"  ERRORS {r['non2xx']} non-2xx {r['socket_errors']}" if r["non2xx"] or r["socket_errors"]
                         else ""), flush=True)
                runs.setdefault(name, []).append(r)
    finally:
        servers.stop()
        shutil.rmtree(Path("/dev/shm") / f"weir-bench-nginx-{os.getpid()}", ignore_errors=True)
    results = []
    for name, rs in runs.items():
        med = {"name": name, "rounds": rs}
        for k in ["rps", "p50_ms", "p99_ms", "max_ms", "requests", "non2xx", "cpu_us_per_req"]:
            med[k] = statistics.median(r[k] for r in rs)
        results.append(med)
    bare_r, w, n = results
    print_table(results, f"medians of {args.repeat} interleaved rounds", "server CPU µs/req")
    print()
    print(f"weir/nginx over h2: rps {w['rps'] / n['rps']:.2f}x, p99 {w['p99_ms'] / n['p99_ms']:.2f}x, "
          f"CPU/req {w['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}x; weir/bare hyper: rps {w['rps'] / bare_r['rps']:.2f}x, "
          f"CPU/req {w['cpu_us_per_req'] / bare_r['cpu_us_per_req']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"h2-{args.bytes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))


def cores(args):
    """Where the servers and Redis run, for the run's header line."""
    redis = args.server_core if args.redis_core is None else args.redis_core
    return f"servers on core {args.server_core}, Redis on core {redis}"


def start_redis(servers, tmp, port):
    servers.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(tmp)], core=servers.args.redis_core)
    wait_port(port)


def start_weirs(servers, target, tmp, origin_port, env, specs):
    """One Weir process per (name, port, admin port, weir_config options; cached unless the options
    say `cache: False`), each waited for; returns name -> process."""
    procs = {}
    for name, port, admin, opts in specs:
        cfg = weir_config(tmp, port, origin_port, admin, name=name, **{"cache": True, **opts})
        procs[name] = servers.spawn([str(target / "weir"), "run", "--config", str(cfg)], env=env)
        wait_port(port)
    return procs


def shared_scenario(args):
    """The Redis tier's cost, hot set of 100 URLs in one run: Weir L1-only (no Redis), Weir tiered
    (Redis configured; hits come from L1), Weir L2-only (`l1_max_bytes: 0`: every hit is a Redis
    GET) and nginx proxy_cache (tmpfs). Redis runs on the server core with the rest."""
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    script = tmp / "hot.lua"
    script.write_text(HOT_SET)
    servers = Servers(args, tmp)
    spawn = servers.spawn
    env = {**os.environ, "WEIR_LOG": "warn"}
    try:
        ports = [free_port() for _ in range(9)]
        origin_port, redis_port, l1_port, tiered_port, l2_port, nginx_port = ports[:6]
        spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        start_redis(servers, tmp, redis_port)
        procs = start_weirs(servers, target, tmp, origin_port, env, [
            ("l1", l1_port, ports[6], {"l1": "256MiB"}),
            ("tiered", tiered_port, ports[7], {"redis": redis_port, "l1": "256MiB"}),
            ("l2", l2_port, ports[8], {"redis": redis_port, "l1": "0"}),
        ])
        nginx = spawn(["nginx", "-c", str(nginx_config(tmp, nginx_port, origin_port, cache=True)), "-p", str(tmp)])
        wait_port(nginx_port)
        workers = nginx_workers(nginx.pid)
        for p in [l1_port, tiered_port, l2_port, nginx_port]:
            warm(p)
        print(f"hot set 100 x {args.bytes} B, wrk -c{args.connections} -d{args.seconds}s; client on core "
              f"{args.client_core}, {cores(args)}", flush=True)
        results = rounds([
            ("weir L1 only (no Redis)", f"http://127.0.0.1:{l1_port}", [procs["l1"].pid], script),
            ("weir tiered (L1 hit)", f"http://127.0.0.1:{tiered_port}", [procs["tiered"].pid], script),
            ("weir L2 hit (L1 off)", f"http://127.0.0.1:{l2_port}", [procs["l2"].pid], script),
            ("nginx proxy_cache (tmpfs)", f"http://127.0.0.1:{nginx_port}", workers, script),
        ], args)
    finally:
        servers.stop()
        shutil.rmtree(Path("/dev/shm") / f"weir-bench-nginx-{os.getpid()}", ignore_errors=True)
    l1, tiered, l2, n = results
    print_table(results, f"medians of {args.repeat} interleaved rounds (CPU: the weir process only; Redis not counted)",
                "CPU µs/req")
    print()
    print(f"tiered/L1-only rps {tiered['rps'] / l1['rps']:.3f}x; L2-hit/nginx rps {l2['rps'] / n['rps']:.2f}x, "
          f"p99 {l2['p99_ms'] / n['p99_ms']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"shared-{args.bytes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(results, indent=2))


def propagation_scenario(args, purges=300):
    """Invalidation propagation between two instances on one Redis: B holds a key in L1; purge it
    through A's admin API; from A's answer to the first response of B that is not an L1 hit.
    Polling B over a kept-alive connection bounds the resolution (one request, ~0.1-0.3 ms)."""
    import http.client
    import statistics
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    servers = Servers(args, tmp)
    env = {**os.environ, "WEIR_LOG": "warn"}
    times = []
    try:
        origin_port, redis_port, a_port, a_admin, b_port, b_admin = (free_port() for _ in range(6))
        servers.spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", "1024"])
        wait_port(origin_port)
        start_redis(servers, tmp, redis_port)
        for name, port, admin in [("a", a_port, a_admin), ("b", b_port, b_admin)]:
            cfg = weir_config(tmp, port, origin_port, admin, cache=True, redis=redis_port, name=name)
            servers.spawn([str(target / "weir"), "run", "--config", str(cfg)], env=env)
            wait_port(port)
        time.sleep(1)  # subscriptions
        b = http.client.HTTPConnection("127.0.0.1", b_port)
        a = http.client.HTTPConnection("127.0.0.1", a_admin)

        def get_b(path):
            b.request("GET", path, headers={"Host": "bench"})
            r = b.getresponse()
            r.read()
            return r.getheader("cache-status", "")

        for i in range(purges):
            path = f"/p/{i}"
            get_b(path)
            assert get_b(path) == "weir; hit; detail=l1"
            body = json.dumps({"keys": [path]})
            a.request("POST", "/cache/purge", body=body, headers={"Content-Type": "application/json"})
            a.getresponse().read()
            t0 = time.perf_counter()
            while get_b(path) == "weir; hit; detail=l1":
                if time.perf_counter() - t0 > 2:
                    raise SystemExit(f"purge {i} did not reach B within 2 s")
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        servers.stop()
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(f"invalidation propagation A -> B over {purges} purges: p50 {statistics.median(times):.3f} ms, "
          f"p90 {p(0.9):.3f} ms, p99 {p(0.99):.3f} ms, max {times[-1]:.3f} ms")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"propagation-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(times))


def jwt(secret, claims):
    import base64
    import hashlib
    import hmac
    e = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    signing = e(b'{"alg":"HS256","typ":"JWT"}') + "." + e(json.dumps(claims).encode())
    return signing + "." + e(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())


def plugin_scenario(args):
    """L1 hits on a hot set of 100 URLs, every request with a bearer JWT: the key from the
    `tenant-key` plugin (HS256 verified per request, in Wasm) vs the policy's default key, two
    Weir processes in one run (both routes `share_private: true`)."""
    target = Path(args.target_dir)
    wasm = Path("plugins/tenant-key.wasm").resolve()
    if not wasm.is_file():
        raise SystemExit("plugins/tenant-key.wasm missing: run `make plugins`")
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    script = tmp / "hot.lua"
    script.write_text(HOT_SET)
    servers = Servers(args, tmp)
    env = {**os.environ, "WEIR_LOG": "warn"}
    token = "Bearer " + jwt("bench-secret", {"tenant": "acme", "sub": "u1"})
    try:
        origin_port, d_port, d_admin, p_port, p_admin = (free_port() for _ in range(5))
        servers.spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        procs = {}
        for name, port, admin, plugin in [("default", d_port, d_admin, ""),
                                          ("plugin", p_port, p_admin,
                                           f"    plugin:\n      path: {wasm}\n      config: {{jwt_secret: bench-secret}}\n")]:
            cfg = tmp / f"{name}.yaml"
            cfg.write_text(f"""listen:
  - addr: 127.0.0.1:{port}
{tls_block}admin:
  addr: 127.0.0.1:{admin}
log:
  access: {{ format: off }}
routes:
  - name: bench
    upstream: http://127.0.0.1:{origin_port}
{plugin}    cache: {{share_private: true}}
""")
            procs[name] = servers.spawn([str(target / "weir"), "run", "--config", str(cfg)], env=env)
            wait_port(port)
        import urllib.request
        for port in (d_port, p_port):
            for i in range(100):
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/hot/{i}",
                                                              headers={"Authorization": token})).read()
            r = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/hot/1",
                                                              headers={"Authorization": token}))
            assert r.headers["cache-status"] == "weir; hit; detail=l1", r.headers["cache-status"]
        print(f"hot set 100 x {args.bytes} B with a bearer JWT, wrk -c{args.connections} -d{args.seconds}s", flush=True)
        import statistics
        runs = {"default": [], "plugin": []}
        for i in range(args.repeat):
            print(f"round {i + 1}/{args.repeat}", flush=True)
            for name, port in [("default", d_port), ("plugin", p_port)]:
                label = "weir default key (L1 hit)" if name == "default" else "weir tenant-key plugin (L1 hit)"
                pid = procs[name].pid
                wrk(f"http://127.0.0.1:{port}", 2, args.connections, args.client_core, [f"Authorization: {token}"], script)
                before = cpu_seconds([pid])
                r = wrk(f"http://127.0.0.1:{port}", args.seconds, args.connections, args.client_core,
                        [f"Authorization: {token}"], script)
                r["cpu_us_per_req"] = (cpu_seconds([pid]) - before) / max(r["requests"], 1) * 1e6
                print(f"  {label:<34} {r['rps']:>10.0f} rps  p99 {r['p99_ms']:.3f} ms  cpu {r['cpu_us_per_req']:.1f} us/req",
                      flush=True)
                runs[name].append(r)
    finally:
        servers.stop()
    d, p = runs["default"], runs["plugin"]
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    ratios = [b["rps"] / a["rps"] for a, b in zip(d, p)]
    print()
    print(f"medians of {args.repeat} interleaved rounds")
    print("| target | rps | p99 ms | CPU µs/req |")
    print("| --- | ---: | ---: | ---: |")
    for name, rs in [("weir default key", d), ("weir tenant-key plugin", p)]:
        print(f"| {name} | {med(rs, 'rps'):.0f} | {med(rs, 'p99_ms'):.3f} | {med(rs, 'cpu_us_per_req'):.1f} |")
    print(f"\nplugin/default rps: median of per-round ratios {statistics.median(ratios):.3f}x "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}); CPU/req "
          f"{med(p, 'cpu_us_per_req') - med(d, 'cpu_us_per_req'):+.1f} us")




def evalsha_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True).stdout
    m = re.search(r"cmdstat_evalsha:calls=(\d+)", out)
    return int(m.group(1)) if m else 0


def redis_cpu_seconds(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True).stdout
    return sum(float(m) for m in re.findall(r"used_cpu_(?:sys|user):([0-9.]+)", out))


def rounds_counting_redis(targets, args, redis_port, admin_port):
    """`rounds`, the Redis script calls per request the Weir on `admin_port` made meanwhile, and
    Redis' own CPU per such request (µs; only that Weir uses Redis during the rounds)."""
    before = (evalsha_calls(redis_port), weir_requests(admin_port), redis_cpu_seconds(redis_port))
    results = rounds(targets, args)
    calls = evalsha_calls(redis_port) - before[0]
    served = weir_requests(admin_port) - before[1]
    redis_us = (redis_cpu_seconds(redis_port) - before[2]) / max(served, 1) * 1e6
    return results, calls / max(served, 1), redis_us


def weir_requests(admin_port):
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("weir_requests_total{"))


def ratelimit_scenario(args):
    """What a rate limit costs an L1 hit, in one run: no limit, a local limit (no Redis) and a
    Redis limit (one EVALSHA per request), all on the same hot set; the limits never refuse."""
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    script = tmp / "hot.lua"
    script.write_text(HOT_SET)
    servers = Servers(args, tmp)
    spawn = servers.spawn
    env = {**os.environ, "WEIR_LOG": "warn"}
    limit = "    rate_limit: { rate: 1000000/s, burst: 1000000, key: client_ip }\n"
    try:
        ports = [free_port() for _ in range(8)]
        origin_port, redis_port, none_port, local_port, shared_port = ports[:5]
        spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        start_redis(servers, tmp, redis_port)
        procs = start_weirs(servers, target, tmp, origin_port, env, [
            ("none", none_port, ports[5], {}),
            ("local", local_port, ports[6], {"limit": limit}),
            ("redis", shared_port, ports[7], {"redis": redis_port, "limit": limit}),
        ])
        for p in [none_port, local_port, shared_port]:
            warm(p)
        print(f"hot set 100 x {args.bytes} B, wrk -c{args.connections} -d{args.seconds}s; client on core "
              f"{args.client_core}, {cores(args)}", flush=True)
        results, per_request, redis_us = rounds_counting_redis([
            ("weir L1 hit, no limit", f"http://127.0.0.1:{none_port}", [procs["none"].pid], script),
            ("weir L1 hit, local limit", f"http://127.0.0.1:{local_port}", [procs["local"].pid], script),
            ("weir L1 hit, Redis limit", f"http://127.0.0.1:{shared_port}", [procs["redis"].pid], script),
        ], args, redis_port, ports[7])
    finally:
        servers.stop()
    none, local, shared = results
    print_table(results, f"medians of {args.repeat} interleaved rounds (CPU: the weir process only; Redis not counted)",
                "CPU µs/req")
    print()
    print(f"local/no-limit rps {local['rps'] / none['rps']:.3f}x; Redis/no-limit rps {shared['rps'] / none['rps']:.3f}x; "
          f"Redis script calls (EVALSHA) per request {per_request:.3f}; Redis' own CPU per limited request "
          f"{redis_us:.1f} µs (on the server's core: Weir's + Redis' = {shared['cpu_us_per_req'] + redis_us:.1f} µs)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"ratelimit-{args.bytes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(results, indent=2))


def handshakes(target, addr_port, ca, mode, pids, args):
    """New TLS connections per second (one request each), full or resumed, with the server's CPU
    per connection."""
    cmd = ["taskset", "-c", str(args.client_core), str(target / "weir-bench-tls"), "--addr", f"127.0.0.1:{addr_port}",
           "--ca", str(ca), "--mode", mode, "--seconds", str(args.seconds), "--concurrency", "16"]
    subprocess.run(cmd[:-4] + ["--seconds", "1", "--concurrency", "16"], capture_output=True, check=True)  # warm-up
    before = cpu_seconds(pids)
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out["cpu_us_per_conn"] = (cpu_seconds(pids) - before) / max(out["connections"], 1) * 1e6
    return out


def tls_scenario(args):
    """TLS, Weir against nginx with the same ECDSA P-256 certificate in one run: new connections
    per second with full and with resumed handshakes (one request each, `weir-bench-tls`), and
    L1-hit rps over keep-alive TLS (wrk, hot set of 100 URLs; nginx proxy_cache on tmpfs)."""
    import statistics
    for tool in ["wrk", "nginx", "taskset", "openssl"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run `make bench` (it installs it)")
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    # A CA and a leaf it signs (a self-signed CA certificate is not a valid server certificate).
    cert, key, ca = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (tmp / "leaf.ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    for cmd in [["openssl", "req", "-x509", *ec, "-keyout", str(tmp / "ca.key"), "-out", str(ca), "-subj", "/CN=bench-ca",
                 "-days", "2"],
                ["openssl", "req", *ec, "-keyout", str(key), "-out", str(tmp / "leaf.csr"), "-subj", "/CN=localhost"],
                ["openssl", "x509", "-req", "-in", str(tmp / "leaf.csr"), "-CA", str(ca), "-CAkey", str(tmp / "ca.key"),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(tmp / "leaf.ext")]]:
        subprocess.run(cmd, capture_output=True, check=True)
    script = tmp / "hot.lua"
    script.write_text(HOT_SET)
    servers = Servers(args, tmp)
    spawn = servers.spawn
    env = {**os.environ, "WEIR_LOG": "warn"}
    try:
        origin_port, weir_port, admin_port, nginx_port = (free_port() for _ in range(4))
        spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        weir = spawn([str(target / "weir"), "run", "--config",
                      str(weir_config(tmp, weir_port, origin_port, admin_port, cache=True, tls=(cert, key)))], env=env)
        wait_port(weir_port)
        nginx = spawn(["nginx", "-c", str(nginx_config(tmp, nginx_port, origin_port, cache=True, tls=(cert, key))),
                       "-p", str(tmp)])
        wait_port(nginx_port)
        workers = nginx_workers(nginx.pid)
        print(f"TLS 1.3, ECDSA P-256; client on core {args.client_core}, servers on core {args.server_core}", flush=True)
        targets = [("weir", weir_port, [weir.pid]), ("nginx", nginx_port, workers)]
        hs = {(n, m): [] for n, _, _ in targets for m in ["full", "resumed"]}
        for i in range(args.repeat):
            print(f"handshakes, round {i + 1}/{args.repeat}", flush=True)
            for name, port, pids in targets:
                for mode in ["full", "resumed"]:
                    r = handshakes(target, port, ca, mode, pids, args)
                    hs[(name, mode)].append(r)
                    print(f"  {name:<6} {mode:<8} {r['per_sec']:>8.0f} conn/s  server CPU {r['cpu_us_per_conn']:.0f} us/conn"
                          f"  ({r['resumed']} resumed, {r['failed']} failed)", flush=True)
        for port in [weir_port, nginx_port]:
            subprocess.run(["curl", "-sk"] + [f"https://127.0.0.1:{port}/hot/{i}" for i in range(100)],
                           stdout=subprocess.DEVNULL, check=False)
        results = rounds([
            ("weir L1 hit over TLS", f"https://127.0.0.1:{weir_port}", [weir.pid], script),
            ("nginx proxy_cache over TLS", f"https://127.0.0.1:{nginx_port}", workers, script),
        ], args)
    finally:
        servers.stop()
    print()
    print(f"medians of {args.repeat} interleaved rounds")
    print("| target | full conn/s | server CPU µs/full | resumed conn/s | server CPU µs/resumed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    med = {}
    for name, _, _ in targets:
        row = []
        for mode in ["full", "resumed"]:
            rs = hs[(name, mode)]
            med[(name, mode)] = (statistics.median(r["per_sec"] for r in rs), statistics.median(r["cpu_us_per_conn"] for r in rs))
            row += [f"{med[(name, mode)][0]:.0f}", f"{med[(name, mode)][1]:.0f}"]
        print(f"| {name} | " + " | ".join(row) + " |")
    print_table(results, "keep-alive L1 hits over TLS", "server CPU µs/req")
    w, n = results
    print()
    for mode in ["full", "resumed"]:
        (wr, wc), (nr, nc) = med[("weir", mode)], med[("nginx", mode)]
        print(f"{mode} handshakes: weir/nginx conn/s {wr / nr:.2f}x, server CPU per connection {wc / nc:.2f}x")
    print(f"keep-alive hits: weir/nginx rps {w['rps'] / n['rps']:.2f}x, CPU per request "
          f"{w['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"tls-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"handshakes": {f"{k[0]}/{k[1]}": v for k, v in hs.items()}, "keepalive": results}, indent=2))


def budget_scenario(args):
    """What a budget costs the miss path (every request proxied, no cache), in one run: no
    budget · a budget in memory (no Redis) · a budget on Redis (a reserve and a settle script per
    request; Redis on its own core unless --redis-core says otherwise); the budget never runs out."""
    import hashlib
    target = Path(args.target_dir)
    tmp = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    script = tmp / "key.lua"
    script.write_text('wrk.headers["x-api-key"] = "bench-key"\n')
    servers = Servers(args, tmp)
    env = {**os.environ, "WEIR_LOG": "warn"}
    digest = hashlib.sha256(b"bench-key").hexdigest()
    top = (f"consumers:\n  - id: bench\n    keys_sha256: [\"{digest}\"]\n"
           "budgets:\n  b: { limit: \"1000000000\", per: 1d }\n")
    route = "    consumer: { from: header:x-api-key, required: true }\n"
    budget = route + "    budget: { name: b, cost: \"0.000001\" }\n"
    try:
        ports = [free_port() for _ in range(8)]
        origin_port, redis_port, none_port, mem_port, shared_port = ports[:5]
        servers.spawn([str(target / "weir-bench-static"), "--addr", f"127.0.0.1:{origin_port}", "--bytes", str(args.bytes)])
        wait_port(origin_port)
        start_redis(servers, tmp, redis_port)
        uncached = {"top": top, "cache": False}
        procs = start_weirs(servers, target, tmp, origin_port, env, [
            ("none", none_port, ports[5], {**uncached, "limit": route}),
            ("memory", mem_port, ports[6], {**uncached, "limit": budget}),
            ("redis", shared_port, ports[7], {**uncached, "limit": budget, "redis": redis_port}),
        ])
        print(f"miss path (proxied, {args.bytes} B), wrk -c{args.connections} -d{args.seconds}s; client on core "
              f"{args.client_core}, {cores(args)}", flush=True)
        results, per_request, redis_us = rounds_counting_redis([
            ("weir miss, no budget", f"http://127.0.0.1:{none_port}/x", [procs["none"].pid], script),
            ("weir miss, budget in memory", f"http://127.0.0.1:{mem_port}/x", [procs["memory"].pid], script),
            ("weir miss, budget on Redis", f"http://127.0.0.1:{shared_port}/x", [procs["redis"].pid], script),
        ], args, redis_port, ports[7])
    finally:
        servers.stop()
    none, mem, shared = results
    print_table(results, f"medians of {args.repeat} interleaved rounds (CPU: the weir process only; Redis not counted)",
                "CPU µs/req")
    print()
    print(f"memory/no-budget rps {mem['rps'] / none['rps']:.3f}x; Redis/no-budget rps {shared['rps'] / none['rps']:.3f}x; "
          f"Redis script calls per request {per_request:.3f}; settles per second on Redis "
          f"{shared['rps']:.0f} (each with its reserve); Redis' own CPU per budgeted request {redis_us:.1f} µs "
          f"(Weir's + Redis' = {shared['cpu_us_per_req'] + redis_us:.1f} µs)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"budget-{args.bytes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
