#!/usr/bin/env python3
"""Abandoned uploads against a slow origin: keygate beside nginx.

One client, for --seconds (10): open a connection, send a keyed `POST /v1/audio/transcriptions`
head with `Content-Length: 1000000` and the first --body bytes (2,048) of the body, close; again,
as fast as it can. The origin accepts slowly, as a busy inference server's HTTP front does: a
listen backlog of 16, one accept every 50 ms; it reads what it accepted and closes each
connection at EOF (a request never completes: no client sends its whole body).

For each proxy it prints (and returns as one JSON line at the end):

  peak sockets    the most socket descriptors the proxy held at once (all its processes;
                  listeners included), sampled every 20 ms
  peak RSS        the largest summed VmRSS during the burst
  RSS +10 s       VmRSS --after (10) seconds after the last request, and the idle RSS before
  requests        how many requests the client sent in --seconds
  origin          connections the origin accepted, and how many it saw closed

Run from the repository root after `cargo build --release --locked`:

    python3 benches/churn.py [--keygate target/release/keygate] [--nginx /usr/sbin/nginx]
                             [--seconds 10] [--after 10] [--body 2048] [--only keygate|nginx]

keygate runs with its default settings (the config names only the key and the upstream; log
at info, to a file). nginx (when installed) runs with 1 worker, `proxy_request_buffering off`,
the same key check and a 600 s read timeout. Every loop is bounded; the script stops only the
processes it started, by PID. Python 3.11+, standard library only; procs.py beside it starts,
measures and stops the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import procs

HOST = procs.HOST
ORIGIN_BACKLOG = 16
ORIGIN_ACCEPT_EVERY_S = 0.05
SAMPLE_EVERY_S = 0.02


# --------------------------------------------------------------------------------------
# The slow origin
# --------------------------------------------------------------------------------------


class SlowOrigin:
    """Accepts one connection per ORIGIN_ACCEPT_EVERY_S from a small backlog, reads and
    discards, answers a complete request with 200 (none is expected), closes at EOF."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(ORIGIN_BACKLOG)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns: dict[socket.socket, bytearray] = {}
        next_accept = time.monotonic()
        deadline = time.monotonic() + 900  # hard bound
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_accept:
                next_accept = now + ORIGIN_ACCEPT_EVERY_S
                try:
                    conn, _ = self.listener.accept()
                    conn.setblocking(False)
                    conns[conn] = bytearray()
                    self.accepted += 1
                except BlockingIOError:
                    pass
            wait = max(0.0, min(next_accept - time.monotonic(), 0.05))
            readable = select.select(list(conns), [], [], wait)[0] if conns else []
            if not conns:
                time.sleep(wait)
            for conn in readable:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    conn.close()
                    del conns[conn]
                    self.closed += 1
                    continue
                buf = conns[conn]
                buf += data
                if complete_request(buf):
                    buf.clear()
                    try:
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    except OSError:
                        pass
        for conn in conns:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()


def complete_request(buf: bytearray) -> bool:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in bytes(buf[:end]).decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    return len(buf) >= end + 4 + length


# --------------------------------------------------------------------------------------
# Processes and sampling
# --------------------------------------------------------------------------------------

class Sampler:
    """Every SAMPLE_EVERY_S: summed VmRSS and socket count. Sockets are counted as descriptors
    minus the descriptors that were not sockets at the start (a full readlink of 10,000
    descriptors would take longer than a sample period)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.not_sockets = procs.fd_count(pids) - procs.socket_count(pids)
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample()
            self._stop.wait(SAMPLE_EVERY_S)

    def sample(self) -> tuple[int, int]:
        rss, sockets = procs.rss_kib(self.pids), procs.fd_count(self.pids) - self.not_sockets
        self.samples.append((time.monotonic(), rss, sockets))
        return rss, sockets

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peaks(self, t0: float, t1: float) -> tuple[int, int]:
        inside = [(r, s) for t, r, s in self.samples if t0 <= t <= t1]
        return max(r for r, _ in inside), max(s for _, s in inside)


def start_keygate(binary: str, tmp: Path, origin: int, key: str) -> subprocess.Popen:
    config = (
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        "[upstream]\n"
        'url = "http://127.0.0.1:8000"\n'
        "[auth]\n"
        'keys = [{ name = "bench", env = "API_KEY" }]\n'
    )
    proc, port, _ = procs.start_keygate(binary, tmp, config, origin, {"API_KEY": key})
    proc.port = port  # type: ignore[attr-defined]
    return proc


def nginx_config(origin: int, key: str) -> Callable[[Path, int], str]:
    return lambda d, port: f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 16m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "";
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 600s;
        location / {{
            if ($http_authorization != "Bearer {key}") {{ return 401; }}
            proxy_pass http://127.0.0.1:{origin};
        }}
    }}
}}
"""


def start_nginx(nginx: str, tmp: Path, origin: int, key: str) -> subprocess.Popen:
    proc, port, _ = procs.start_nginx(nginx, tmp, nginx_config(origin, key))
    proc.port = port  # type: ignore[attr-defined]
    return proc


# --------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------


def abandon(port: int, request: bytes, seconds: float) -> int:
    """Head and part of the body, then close; again until `seconds` have passed."""
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket()
        s.settimeout(1.0)
        try:
            s.connect((HOST, port))
            s.sendall(request)
            done += 1
        except OSError:
            pass
        finally:
            s.close()
    return done


def measure(name: str, proc: subprocess.Popen, key: str, args, origin: SlowOrigin) -> dict:
    procs.wait_listening(proc.port, proc)  # type: ignore[attr-defined]
    time.sleep(0.5)
    pids = procs.family(proc.pid)
    sampler = Sampler(pids)
    idle_rss, idle_sockets = sampler.sample()
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    requests = abandon(proc.port, head + b"b" * args.body, args.seconds)  # type: ignore[attr-defined]
    t1 = time.monotonic()
    time.sleep(args.after)
    after_rss, after_sockets = sampler.sample()
    sampler.stop()
    peak_rss, peak_sockets = sampler.peaks(t0, t1 + args.after)
    cpu = procs.cpu_seconds(pids)
    return {
        "proxy": name,
        "requests": requests,
        "peak_sockets": peak_sockets,
        "peak_rss_mib": round(peak_rss / 1024, 1),
        "idle_rss_mib": round(idle_rss / 1024, 1),
        "rss_after_mib": round(after_rss / 1024, 1),
        "sockets_after": after_sockets,
        "idle_sockets": idle_sockets,
        "cpu_s": round(cpu, 2),
        "cpu_us_per_request": round(cpu / max(requests, 1) * 1e6, 1),
        "origin_accepted": origin.accepted,
        "origin_saw_closed": origin.closed,
        "after_s": args.after,
    }


def line(r: dict) -> str:
    return (
        f"{r['proxy']:<8} peak sockets {r['peak_sockets']:>6} | peak RSS {r['peak_rss_mib']:>6.1f} MiB"
        f" | RSS +{r['after_s']:.0f} s {r['rss_after_mib']:>6.1f} MiB (idle {r['idle_rss_mib']:.1f})"
        f" | sockets +{r['after_s']:.0f} s {r['sockets_after']}"
        f" | requests {r['requests']:>7} | CPU {r['cpu_us_per_request']} us/request"
        f" | origin accepted {r['origin_accepted']}, saw closed {r['origin_saw_closed']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keygate", default="target/release/keygate")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--body", type=int, default=2048)
    parser.add_argument("--only", choices=["keygate", "nginx"])
    args = parser.parse_args()
    args.seconds = min(args.seconds, 60.0)
    args.after = min(args.after, 60.0)
    key = "kg-" + secrets.token_urlsafe(24)
    results = []
    with tempfile.TemporaryDirectory(prefix="keygate-churn-") as tmpdir:
        tmp = Path(tmpdir)
        runs = []
        if args.only != "nginx":
            runs.append(("keygate", lambda o: start_keygate(args.keygate, tmp, o, key)))
        if args.only != "keygate":
            if os.path.exists(args.nginx):
                runs.append(("nginx", lambda o: start_nginx(args.nginx, tmp, o, key)))
            else:
                print(f"nginx not found at {args.nginx}: keygate only", file=sys.stderr)
        try:
            for name, start in runs:
                origin = SlowOrigin()
                proc = start(origin.port)
                try:
                    result = measure(name, proc, key, args, origin)
                finally:
                    procs.stop_process(proc)
                    origin.stop()
                print(line(result), flush=True)
                results.append(result)
        finally:
            procs.stop_started()
    print(json.dumps({"body_bytes": args.body, "seconds": args.seconds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
