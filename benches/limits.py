#!/usr/bin/env python3
"""What per-key limits cost a request, and how closely three replicas sharing them through
Redis hold a limit.

  1. latency   GET /v1/models through keygate to a static nginx origin, one connection
               (wrk -t1 -c1 --latency, 1 s warm-up, SECONDS measured) and 16 connections
               (wrk -t2 -c16, req/s), for a key without limits, a key with
               requests_per_minute, tokens_per_minute and max_concurrent kept in process, and
               the same key with [limits] redis on loopback. Limits are set far above what a
               run can use, so every request is admitted and does the whole admission:
               a concurrency slot and a rate check. The variants alternate for ROUNDS rounds;
               the figures are medians. Added latency = the variant's p50/p99 minus the
               unlimited key's.
  2. replicas  three keygate processes with one key of requests_per_minute = RPM, loaded
               together by three wrk (-t1 -c4, one per replica) for SECONDS_REPLICAS: the
               requests admitted (keygate_requests_total with status 200, summed over the
               replicas' /metrics) against what the limit allows in that time, a burst of
               RPM and RPM per minute after it. Once with [limits] redis (shared), once
               without (each replica alone).

Run (from the repository root, after `cargo build --release`; needs nginx, wrk and
redis-server on PATH):

    python3 benches/limits.py [--keygate target/release/keygate] [--rounds 3] [--seconds 5]

Everything binds 127.0.0.1 on free ports; every process is started here and stopped by its
pid (SIGTERM, then SIGKILL after 5 s). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KEY = "kg-bench-limits-key-0123456789abcdef"
SECRET = "kg-bench-limits-secret-0123456789"
START_DEADLINE_S = 20
HUGE = 4_000_000_000  # a rate no run comes near
REPLICAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args[0]} exited while starting:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port} after {START_DEADLINE_S} s:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Processes:
    """Every process this script started, stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list, log: Path, port: int, env: dict | None = None) -> subprocess.Popen:
        with log.open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        wait_port(port, proc, log)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            stop(proc)


def keygate_config(origin: int, admin: int, key: str, limits: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:{origin}"
[auth]
keys = [{key}]
[[inject]]
name = "x-shared-secret"
value = "${{SHARED_SECRET}}"
[admin]
listen = "127.0.0.1:{admin}"
{limits}
[log]
format = "json"
level = "warn"
"""


def start_keygate(ps: Processes, binary: str, tmp: Path, name: str, config: str) -> int:
    port = free_port()
    path = tmp / f"{name}.toml"
    path.write_text(config)
    env = {"PATH": os.environ.get("PATH", ""), "API_KEY": KEY, "SHARED_SECRET": SECRET}
    ps.start([binary, "--config", path, "--listen", f"127.0.0.1:{port}"], tmp / f"{name}.log", port, env)
    return port


def wrk(args: list[str], script: Path, url: str) -> str:
    return subprocess.run(["wrk", *args, "-s", str(script), url], capture_output=True, text=True, check=True, timeout=600).stdout


def millis(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def latency_run(port: int, script: Path, seconds: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/models"
    wrk(["-t1", "-c1", "-d1s"], script, url)
    out = wrk(["-t1", "-c1", f"-d{seconds}s", "--latency"], script, url)
    p50 = millis(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = millis(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    out = wrk(["-t2", "-c16", f"-d{seconds}s"], script, url)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"p50_ms": p50, "p99_ms": p99, "rps_c16": rps}


def admitted(admin: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    pattern = r'^keygate_requests_total\{key="bench",method="GET",status="200"\} (\d+)'
    match = re.search(pattern, text, re.M)
    return int(match.group(1)) if match else 0


def replicas_run(ps: Processes, binary: str, tmp: Path, origin: int, limits: str, rpm: int, seconds: int, name: str) -> dict:
    key = f'{{ name = "bench", env = "API_KEY", requests_per_minute = {rpm} }}'
    ports, admins, procs = [], [], []
    for i in range(REPLICAS):
        admin = free_port()
        before = len(ps.procs)
        ports.append(start_keygate(ps, binary, tmp, f"{name}-{i}", keygate_config(origin, admin, key, limits)))
        procs.extend(ps.procs[before:])
        admins.append(admin)
    script = tmp / "auth.lua"
    started = time.monotonic()
    loads = [
        subprocess.Popen(["wrk", "-t1", "-c4", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}/v1/models"], stdout=subprocess.DEVNULL)
        for port in ports
    ]
    for load in loads:
        load.wait(timeout=seconds + 60)
    span = time.monotonic() - started
    total = sum(admitted(a) for a in admins)
    for proc in procs:
        stop(proc)
    allowed = rpm + rpm * span / 60
    return {"admitted": total, "allowed": round(allowed, 1), "ratio": round(total / allowed, 3), "span_s": round(span, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keygate", default="target/release/keygate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--seconds-replicas", type=int, default=30)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="keygate-limits-bench."))
    ps = Processes()
    try:
        origin = free_port()
        (tmp / "origin.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/origin.pid; error_log {tmp}/origin-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{origin}; keepalive_requests 1000000;
    location / {{ default_type application/json; return 200 '{{"object":"list","data":[]}}'; }} }} }}
""")
        ps.start(["nginx", "-c", tmp / "origin.conf", "-p", tmp], tmp / "origin.log", origin)
        redis = free_port()
        ps.start(
            ["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            tmp / "redis.log",
            redis,
        )
        (tmp / "auth.lua").write_text(f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
        shared = f'[limits]\nredis = "redis://127.0.0.1:{redis}/0"\n'
        limited = f'{{ name = "bench", env = "API_KEY", requests_per_minute = {HUGE}, tokens_per_minute = {HUGE}, max_concurrent = 1000 }}'
        variants = {
            "no limits": ('{ name = "bench", env = "API_KEY" }', ""),
            "in-process": (limited, ""),
            "redis": (limited, shared),
        }
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (key, limits) in variants.items():
                before = len(ps.procs)
                port = start_keygate(ps, args.keygate, tmp, "latency", keygate_config(origin, free_port(), key, limits))
                runs[name].append(latency_run(port, tmp / "auth.lua", args.seconds))
                for proc in ps.procs[before:]:
                    stop(proc)
                print(f"round {round_ + 1} {name:>10}: {runs[name][-1]}", flush=True)
        report: dict = {"latency": {}}
        base = {m: statistics.median(r[m] for r in runs["no limits"]) for m in ("p50_ms", "p99_ms", "rps_c16")}
        for name, results in runs.items():
            median = {m: statistics.median(r[m] for r in results) for m in ("p50_ms", "p99_ms", "rps_c16")}
            median["added_p50_us"] = round((median["p50_ms"] - base["p50_ms"]) * 1000, 1)
            median["added_p99_us"] = round((median["p99_ms"] - base["p99_ms"]) * 1000, 1)
            report["latency"][name] = median
            print(f"{name:>10}: p50 {median['p50_ms']:.3f} ms (+{median['added_p50_us']} µs), p99 {median['p99_ms']:.3f} ms (+{median['added_p99_us']} µs), {median['rps_c16']:.0f} req/s at 16 connections")
        for name, limits in (("shared through redis", shared), ("each replica alone", "")):
            result = replicas_run(ps, args.keygate, tmp, origin, limits, args.rpm, args.seconds_replicas, name.split()[0])
            report[f"replicas, {name}"] = result
            print(f"three replicas, {name}: {result['admitted']} admitted, {result['allowed']} allowed ({result['ratio']}x) in {result['span_s']} s", flush=True)
        print(json.dumps(report))
    finally:
        ps.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
