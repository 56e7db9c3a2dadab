#!/usr/bin/env python3
"""Operational figures for keygate: throughput, memory, cancellation and probe latency.

What it measures (everything on 127.0.0.1, ephemeral ports):

  1. upload    1 GiB (--quick: 256 MiB) POST /upload through keygate, Content-Length,
               written in 256 KiB chunks: seconds, MiB/s, keygate RSS idle / peak / delta.
  2. download  1 GiB (--quick: 256 MiB) GET /download through keygate, discarded: same.
  3. sse       256 concurrent SSE streams of 30 events (one per 100 ms, 3 s): keygate RSS
               idle, peak while all 256 are open, (peak - idle) / 256 in KiB per stream;
               every client must get all 30 events and `data: [DONE]`.
  4. hangup    20 times: open a long stream, read its first event, close the client socket,
               and time how long until the origin sees keygate's upstream connection close
               (median and max ms).
  5. probe     latency of 200 sequential `GET /health` on fresh connections (p50/p99/max ms),
               once with nothing else open and once while 1,000 connections each hold a
               half-sent request head (`GET /v1/models HTTP/1.1\\r\\nHost: x\\r\\n`, then
               nothing), well inside header_read_timeout (10 s).
  6. idle      10,000 keep-alive connections, each answered once (GET /v1/models with the
               key) and then held: keygate RSS before and 25 s after the last answer (keygate
               parks connections idle for a second; its allocator returns the freed pages
               over 10 to 20 s), in bytes per connection; keygate runs with a 120 s
               header_read_timeout for this figure, so that none is closed meanwhile.
  With --compare-nginx, figures 1, 2, 5 and 6 are repeated through nginx (1 worker, request
  and response buffering off, the same key check and injected header; RSS = master + worker;
  figure 6 with 3,000 connections, inside its 4,096 per worker).
  The harness ceiling (the same upload/download straight to the origin, no proxy) is printed
  too: the Python ends, not the proxy, may be the bottleneck of figures 1-2.

The origin is in-process (a minimal asyncio HTTP/1.1 server with keep-alive); it records,
per connection, the monotonic time at which its peer closed it (EOF or reset). keygate RSS
is VmRSS from /proc/PID/status sampled every 20 ms in a background thread.

Run (from the repository root, after `cargo build --release`):

    python3 benches/figures.py [--keygate target/release/keygate] [--quick] [--compare-nginx] [--keep-tmp]

The temp dir (configs, keygate.log, nginx error.log) is deleted at the end unless --keep-tmp;
keygate's log lines (level warn) are printed in the report either way.

Python 3.11+, standard library only (procs.py beside it starts, measures and stops the
processes). Every loop is bounded in count and time; the script
starts keygate (and nginx) itself and stops only the processes it started, by PID (SIGTERM,
then SIGKILL after 5 s). Output: one line per figure, then the whole report as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import procs

MiB = 1 << 20
GiB = 1 << 30
HOST = procs.HOST
OVERALL_DEADLINE_S = 900  # the whole run, hard bound

# --------------------------------------------------------------------------------------
# In-process origin
# --------------------------------------------------------------------------------------

DOWNLOAD_CHUNK = b"x" * 65536
SSE_INTERVAL_S = 0.1


class OriginStats:
    def __init__(self) -> None:
        self.conn_serial = 0
        self.open_conns = 0
        # request id (from ?id=N) -> {"closed_at": float|None, "how": str|None, "events": int}
        self.by_id: dict[str, dict] = {}
        self.requests = 0
        self.upload_bytes: list[int] = []
        self.errors: list[str] = []


def parse_query(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    params = {}
    for part in query.split("&"):
        if part:
            k, _, v = part.partition("=")
            params[k] = v
    return path, params


class OriginProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive. One request at a time per connection (no pipelining needed:
    a proxy sends the next request only after the previous response)."""

    HEAD, BODY_CL, BODY_CHUNKED, BUSY = range(4)

    def __init__(self, stats: OriginStats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.state = self.HEAD
        self.remaining = 0
        self.body_count = 0
        self.chunk_state = "size"  # size | data | data_crlf | trailer
        self.req: dict = {}
        self.current_id: str | None = None
        self.closed_at: float | None = None
        self.close_how: str | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.task: asyncio.Task | None = None
        self.keep_alive = True

    # ---- connection events -----------------------------------------------------------
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        self.stats.conn_serial += 1
        self.stats.open_conns += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _mark_closed(self, how: str) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self.close_how = how
            if self.current_id is not None:
                rec = self.stats.by_id.get(self.current_id)
                if rec is not None and rec["closed_at"] is None:
                    rec["closed_at"] = self.closed_at
                    rec["how"] = how

    def eof_received(self):  # type: ignore[override]
        self._mark_closed("eof")
        return False  # close our side too

    def connection_lost(self, exc):  # type: ignore[override]
        self._mark_closed("reset" if exc is not None else "closed")
        self.stats.open_conns -= 1
        self.can_write.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self):  # type: ignore[override]
        self.can_write.clear()

    def resume_writing(self):  # type: ignore[override]
        self.can_write.set()

    # ---- parsing --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        if self.state == self.BODY_CL and not self.inbuf:
            # fast path: count the body straight from the received bytes
            take = min(self.remaining, len(data))
            self.body_count += take
            self.remaining -= take
            if take < len(data):
                self.inbuf += memoryview(data)[take:]
            if self.remaining == 0:
                self._request_complete()
            return
        self.inbuf += data
        self._process()

    def _process(self) -> None:
        while self.state != self.BUSY and self.inbuf:
            if self.state == self.HEAD:
                end = self.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.inbuf) > 65536:
                        self._simple(431, b"head too large\n", close=True)
                    return
                head = bytes(self.inbuf[:end]).decode("latin-1")
                del self.inbuf[: end + 4]
                lines = head.split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    self._simple(400, b"bad request line\n", close=True)
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                path, params = parse_query(target)
                self.req = {"method": method, "path": path, "params": params, "headers": headers}
                self.keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
                self.current_id = params.get("id")
                self.stats.requests += 1
                self.body_count = 0
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self.state = self.BODY_CHUNKED
                    self.chunk_state = "size"
                elif int(headers.get("content-length", "0") or 0) > 0:
                    self.state = self.BODY_CL
                    self.remaining = int(headers["content-length"])
                else:
                    self._request_complete()
            elif self.state == self.BODY_CL:
                take = min(self.remaining, len(self.inbuf))
                self.body_count += take
                self.remaining -= take
                del self.inbuf[:take]
                if self.remaining == 0:
                    self._request_complete()
            elif self.state == self.BODY_CHUNKED:
                if not self._chunked_step():
                    return

    def _chunked_step(self) -> bool:
        """Consume some chunked framing/data from inbuf; False when more input is needed."""
        if self.chunk_state == "size":
            i = self.inbuf.find(b"\r\n")
            if i < 0:
                return False
            size = int(bytes(self.inbuf[:i]).split(b";")[0].strip() or b"0", 16)
            del self.inbuf[: i + 2]
            if size == 0:
                self.chunk_state = "trailer"
            else:
                self.remaining = size
                self.chunk_state = "data"
            return True
        if self.chunk_state == "data":
            take = min(self.remaining, len(self.inbuf))
            self.body_count += take
            self.remaining -= take
            del self.inbuf[:take]
            if self.remaining == 0:
                self.chunk_state = "data_crlf"
            return True
        if self.chunk_state == "data_crlf":
            if len(self.inbuf) < 2:
                return False
            del self.inbuf[:2]
            self.chunk_state = "size"
            return True
        # trailer: lines until an empty one
        i = self.inbuf.find(b"\r\n")
        if i < 0:
            return False
        line = bytes(self.inbuf[:i])
        del self.inbuf[: i + 2]
        if line == b"":
            self._request_complete()
        return True

    # ---- responses ------------------------------------------------------------------
    def _simple(self, status: int, body: bytes, close: bool = False, ctype: str = "text/plain") -> None:
        assert self.transport is not None
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 431: "Too Large"}.get(status, "X")
        conn = "close" if close or not self.keep_alive else "keep-alive"
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {conn}\r\n\r\n".encode() + body
        )
        if close or not self.keep_alive:
            self.state = self.BUSY
            self.transport.close()

    def _request_complete(self) -> None:
        self.state = self.BUSY
        r = self.req
        method, path, params = r["method"], r["path"], r["params"]
        if path == "/upload" and method == "POST":
            self.stats.upload_bytes.append(self.body_count)
            self._simple(200, f"{self.body_count}\n".encode())
            self._next()
        elif path == "/health" and method in ("GET", "HEAD"):
            self._simple(200, b"ok\n")
            self._next()
        elif path == "/download" and method == "GET":
            self.task = asyncio.get_running_loop().create_task(self._download(int(params.get("bytes", "0"))))
        elif path == "/v1/chat/completions" and method == "POST":
            self.task = asyncio.get_running_loop().create_task(
                self._sse(int(params.get("events", "30")), params.get("id"))
            )
        else:
            self._simple(404, b"not found\n")
            self._next()

    def _next(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.state = self.HEAD
        self.req = {}
        if self.inbuf:
            self._process()

    async def _download(self, n: int) -> None:
        t = self.transport
        assert t is not None
        t.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n".encode()
        )
        sent = 0
        try:
            while sent < n:
                if t.is_closing():
                    return
                await self.can_write.wait()
                c = min(65536, n - sent)
                t.write(DOWNLOAD_CHUNK if c == 65536 else DOWNLOAD_CHUNK[:c])
                sent += c
        except asyncio.CancelledError:
            return
        self._next()

    async def _sse(self, events: int, rid: str | None) -> None:
        t = self.transport
        assert t is not None
        rec = None
        if rid is not None:
            rec = {"closed_at": None, "how": None, "events": 0, "started": time.monotonic()}
            self.stats.by_id[rid] = rec
        t.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def chunk(payload: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(payload), payload)

        try:
            start = time.monotonic()
            for i in range(events):
                if i:
                    # fixed schedule, no drift
                    await asyncio.sleep(max(0.0, start + i * SSE_INTERVAL_S - time.monotonic()))
                if t.is_closing():
                    return
                ev = json.dumps(
                    {"id": rid, "object": "chat.completion.chunk", "seq": i,
                     "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]},
                    separators=(",", ":"),
                )
                t.write(chunk(b"data: " + ev.encode() + b"\n\n"))
                if rec is not None:
                    rec["events"] = i + 1
            await asyncio.sleep(max(0.0, start + events * SSE_INTERVAL_S - time.monotonic()))
            if t.is_closing():
                return
            t.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        except asyncio.CancelledError:
            return
        self._next()


# --------------------------------------------------------------------------------------
# Client helpers (non-blocking sockets driven by the event loop)
# --------------------------------------------------------------------------------------


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int) -> "Conn":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, 262144)
        if not data:
            raise EOFError("connection closed by peer")
        self.buf += data

    async def head(self) -> tuple[int, dict[str, str]]:
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > 65536:
                raise ValueError("response head too large")
            await self._fill()
        lines = bytes(self.buf[:i]).decode("latin-1").split("\r\n")
        del self.buf[: i + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            await self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return out

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def discard(self, n: int, scratch: bytearray) -> int:
        """Read and drop exactly n bytes, using recv_into on a reused buffer."""
        got = min(n, len(self.buf))
        del self.buf[:got]
        mv = memoryview(scratch)
        while got < n:
            r = await self.loop.sock_recv_into(self.sock, mv[: min(len(scratch), n - got)])
            if r == 0:
                raise EOFError(f"connection closed after {got} of {n} body bytes")
            got += r
        return got

    async def body_pieces(self, headers: dict[str, str]):
        """Yield the de-chunked body (chunked or Content-Length)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.line()).split(b";")[0].strip(), 16)
                if size == 0:
                    while await self.line() != b"":
                        pass
                    return
                data = await self.exactly(size)
                await self.exactly(2)
                yield data
        else:
            n = int(headers.get("content-length", "0"))
            if n:
                yield await self.exactly(n)

    async def body(self, headers: dict[str, str]) -> bytes:
        out = bytearray()
        async for piece in self.body_pieces(headers):
            out += piece
        return bytes(out)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------------------
# RSS sampling
# --------------------------------------------------------------------------------------


class RssWatch:
    """Samples summed VmRSS of pids every 20 ms in a thread; samples are (monotonic, KiB)."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic(), procs.rss_kib(self.pids)))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.samples.append((time.monotonic(), procs.rss_kib(self.pids)))

    def peak(self, t0: float | None = None, t1: float | None = None) -> int:
        vals = [v for t, v in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return max(vals) if vals else 0


async def idle_rss(pids: list[int], settle: float = 0.5) -> int:
    """RSS at rest: wait a moment, then the max of a few samples over 100 ms."""
    await asyncio.sleep(settle)
    vals = []
    for _ in range(5):
        vals.append(procs.rss_kib(pids))
        await asyncio.sleep(0.02)
    return max(vals)


def mib(kib: int) -> float:
    return round(kib / 1024.0, 1)


# --------------------------------------------------------------------------------------
# The proxies under test (procs.py starts and stops them)
# --------------------------------------------------------------------------------------


async def http_get_status(port: int, path: str, timeout: float = 1.0) -> int:
    c = await asyncio.wait_for(Conn.open(port), timeout)
    try:
        await c.send(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, headers = await asyncio.wait_for(c.head(), timeout)
        await asyncio.wait_for(c.body(headers), timeout)
        return status
    finally:
        c.close()


async def wait_health(port: int, proc: subprocess.Popen, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it became healthy")
        try:
            if await http_get_status(port, "/health") == 200:
                return
        except (OSError, EOFError, asyncio.TimeoutError, ValueError) as e:
            last = e
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no 200 on GET /health within {deadline_s} s (last error: {last!r})")


class Proxy:
    """What a figure needs to know about the proxy under test."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen | None, pids_fn) -> None:
        self.name = name
        self.port = port
        self.proc = proc
        self.pids_fn = pids_fn

    def pids(self) -> list[int]:
        return self.pids_fn()


def start_keygate(binary: str, tmp: Path, origin_port: int, api_key: str, secret: str,
                  header_read_timeout: str = "10s") -> tuple[Proxy, Path]:
    config = (
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'max_request_body = "2GiB"\n'
        f'header_read_timeout = "{header_read_timeout}"\n'
        "max_connections = 20000\n"
        "[upstream]\n"
        'url = "http://127.0.0.1:8000"\n'
        "[auth]\n"
        'keys = [{ name = "bench", env = "API_KEY" }]\n'
        "[[inject]]\n"
        'name = "x-shared-secret"\n'
        'value = "${SHARED_SECRET}"\n'
        "[log]\n"
        'level = "warn"\n'
    )
    env = {"API_KEY": api_key, "SHARED_SECRET": secret}
    proc, port, log = procs.start_keygate(binary, tmp, config, origin_port, env, "--log-format", "json")
    return Proxy("keygate", port, proc, lambda: [proc.pid]), log


def start_nginx(nginx: str, tmp: Path, origin_port: int, api_key: str, secret: str) -> tuple[Proxy, Path]:
    def config(d: Path, port: int) -> str:
        return f"""
worker_processes 1;
worker_rlimit_nofile 8192;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    client_max_body_size 2g;
    client_header_timeout 10s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Authorization "";
        proxy_set_header X-Shared-Secret "{secret}";
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 600s;
        location = /health {{ proxy_pass http://origin; }}
        location / {{
            if ($http_authorization != "Bearer {api_key}") {{ return 401; }}
            proxy_pass http://origin;
        }}
    }}
}}
"""

    proc, port, log = procs.start_nginx(nginx, tmp, config)
    return Proxy("nginx", port, proc, lambda: procs.family(proc.pid)), log


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


async def do_upload(port: int, size: int, api_key: str) -> tuple[float, int, int]:
    chunk = bytearray(256 * 1024)  # reused buffer
    mv = memoryview(chunk)
    c = await Conn.open(port)
    try:
        t0 = time.monotonic()
        await c.send(
            (f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
             f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n").encode()
        )
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            await c.send(mv[:n])
            sent += n
        status, headers = await c.head()
        body = await c.body(headers)
        dt = time.monotonic() - t0
        counted = int(body.strip() or b"-1") if status == 200 else -1
        return dt, status, counted
    finally:
        c.close()


async def do_download(port: int, size: int, api_key: str) -> tuple[float, int, int]:
    scratch = bytearray(1 << 20)
    c = await Conn.open(port)
    try:
        t0 = time.monotonic()
        await c.send(
            f"GET /download?bytes={size} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n\r\n".encode()
        )
        status, headers = await c.head()
        got = 0
        if "content-length" in headers:
            got = await c.discard(int(headers["content-length"]), scratch)
        else:
            async for piece in c.body_pieces(headers):
                got += len(piece)
        dt = time.monotonic() - t0
        return dt, status, got
    finally:
        c.close()


async def fig_transfer(kind: str, proxy: Proxy | None, port: int, size: int, api_key: str) -> dict:
    fn = do_upload if kind == "upload" else do_download
    pids = proxy.pids() if proxy else []
    idle = await idle_rss(pids) if proxy else 0
    with RssWatch(pids) as w:
        dt, status, nbytes = await asyncio.wait_for(fn(port, size, api_key), timeout=300)
    peak = w.peak()
    ok = status == 200 and nbytes == size
    r = {
        "bytes": size, "seconds": round(dt, 3), "mib_per_s": round(size / MiB / dt, 1),
        "status": status, "bytes_confirmed": nbytes, "ok": ok,
    }
    if proxy:
        r.update({"rss_idle_mib": mib(idle), "rss_peak_mib": mib(peak), "rss_delta_mib": mib(peak - idle)})
    return r


async def sse_client(port: int, api_key: str, events: int, rid: str, first_evt: asyncio.Event,
                     on_first, on_done) -> dict:
    c = await Conn.open(port)
    try:
        await c.send(
            (f"POST /v1/chat/completions?events={events}&id={rid} HTTP/1.1\r\nHost: x\r\n"
             f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
             f"Accept: text/event-stream\r\nContent-Length: 2\r\n\r\n{{}}").encode()
        )
        status, headers = await c.head()
        text = bytearray()
        got_events = 0
        done = False
        first = False
        async for piece in c.body_pieces(headers):
            text += piece
            while (i := text.find(b"\n\n")) >= 0:
                ev = bytes(text[:i])
                del text[: i + 2]
                if ev == b"data: [DONE]":
                    done = True
                    on_done()
                elif ev.startswith(b"data: "):
                    got_events += 1
                    if not first:
                        first = True
                        on_first()
        return {"status": status, "events": got_events, "done": done,
                "ctype": headers.get("content-type", "")}
    finally:
        c.close()


async def fig_sse(proxy: Proxy, api_key: str, n: int = 256, events: int = 30) -> dict:
    pids = proxy.pids()
    idle = await idle_rss(pids)
    all_first = asyncio.Event()
    marks: dict[str, float | None] = {"all_first": None, "first_done": None}
    counters = {"first": 0}

    def on_first() -> None:
        counters["first"] += 1
        if counters["first"] == n:
            marks["all_first"] = time.monotonic()
            all_first.set()

    def on_done() -> None:
        if marks["first_done"] is None:
            marks["first_done"] = time.monotonic()

    with RssWatch(pids) as w:
        t0 = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(sse_client(proxy.port, api_key, events, f"sse{i}", all_first, on_first, on_done)
                  for i in range(n)),
                return_exceptions=True,
            ),
            timeout=events * SSE_INTERVAL_S + 60,
        )
        wall = time.monotonic() - t0
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    good = [r for r in results if isinstance(r, dict)]
    complete = sum(1 for r in good if r["status"] == 200 and r["events"] == events and r["done"])
    if marks["all_first"] is not None:
        peak_open = w.peak(marks["all_first"], marks["first_done"])
    else:
        peak_open = 0
    peak_all = w.peak()
    per_stream = (peak_open - idle) / n if peak_open else float("nan")
    return {
        "streams": n, "events_each": events, "complete": complete, "errors": errors[:5],
        "n_errors": len(errors), "wall_s": round(wall, 2),
        "all_open_window_s": round((marks["first_done"] or 0) - (marks["all_first"] or 0), 2)
        if marks["all_first"] else None,
        "rss_idle_mib": mib(idle), "rss_peak_all_open_mib": mib(peak_open),
        "rss_peak_phase_mib": mib(peak_all), "kib_per_stream": round(per_stream, 1),
        "ok": complete == n,
    }


async def fig_hangup(proxy: Proxy, api_key: str, stats: OriginStats, runs: int = 20) -> dict:
    lat_ms: list[float] = []
    hows: dict[str, int] = {}
    not_closed = 0
    errors: list[str] = []
    for i in range(runs):
        rid = f"hang{i}-{secrets.token_hex(4)}"
        c = await Conn.open(proxy.port)
        try:
            await c.send(
                (f"POST /v1/chat/completions?events=600&id={rid} HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 2\r\n\r\n{{}}").encode()
            )
            status, headers = await asyncio.wait_for(c.head(), 5)
            if status != 200:
                errors.append(f"run {i}: status {status}")
                continue
            # read until the first complete event (the raw chunked bytes contain "\n\n" only
            # at an event's end)
            while b"\n\n" not in c.buf:
                await asyncio.wait_for(c._fill(), 5)
        except (OSError, EOFError, asyncio.TimeoutError, ValueError) as e:
            errors.append(f"run {i}: {e!r}")
            c.close()
            continue
        c.sock.close()  # abrupt: no more reads, the kernel sends FIN now
        t0 = time.monotonic()
        deadline = t0 + 5.0
        rec = stats.by_id.get(rid)
        while time.monotonic() < deadline and (rec is None or rec["closed_at"] is None):
            await asyncio.sleep(0.0005)
            rec = stats.by_id.get(rid)
        if rec is None or rec["closed_at"] is None:
            not_closed += 1
            continue
        lat_ms.append((rec["closed_at"] - t0) * 1000.0)
        hows[rec["how"]] = hows.get(rec["how"], 0) + 1
        await asyncio.sleep(0.05)
    return {
        "runs": runs, "measured": len(lat_ms),
        "median_ms": round(statistics.median(lat_ms), 2) if lat_ms else None,
        "max_ms": round(max(lat_ms), 2) if lat_ms else None,
        "min_ms": round(min(lat_ms), 2) if lat_ms else None,
        "origin_saw": hows, "not_closed_within_5s": not_closed, "errors": errors[:5],
        "ok": len(lat_ms) == runs,
    }


async def probe_once(port: int) -> float:
    t0 = time.monotonic()
    c = await Conn.open(port)
    try:
        await c.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers = await c.head()
        await c.body(headers)
        if status != 200:
            raise RuntimeError(f"probe status {status}")
    finally:
        c.close()
    return (time.monotonic() - t0) * 1000.0


async def probe_series(port: int, n: int = 200) -> list[float]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(probe_once(port), 5))
    return out


def summarize(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": round(percentile(lat, 50), 3),
            "p99_ms": round(percentile(lat, 99), 3), "max_ms": round(max(lat), 3) if lat else None}


async def fig_probe(proxy: Proxy, held_n: int = 1000) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = held_n * 2 + 2048  # our held sockets + the origin's and everything else
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    # warm-up, then the baseline
    await probe_series(proxy.port, 20)
    base = await probe_series(proxy.port, 200)
    pids = proxy.pids()
    idle = await idle_rss(pids, settle=0.2)

    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    partial = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"

    async def hold_one() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (HOST, proxy.port))
            await loop.sock_sendall(s, partial)
        except BaseException:
            s.close()
            raise
        held.append(s)

    t_open0 = time.monotonic()
    open_errors: list[str] = []
    try:
        with RssWatch(pids) as w:
            for b in range(0, held_n, 100):
                res = await asyncio.wait_for(
                    asyncio.gather(*(hold_one() for _ in range(min(100, held_n - b))), return_exceptions=True),
                    timeout=10,
                )
                open_errors += [repr(r) for r in res if isinstance(r, BaseException)]
            t_opened = time.monotonic()
            await asyncio.sleep(0.3)  # let the proxy accept and read every partial head
            loaded = await probe_series(proxy.port, 200)
            t_probed = time.monotonic()

        def still_open(s: socket.socket) -> bool:
            try:
                return s.recv(1, socket.MSG_PEEK) != b""  # data (e.g. a 408) counts as answered
            except BlockingIOError:
                return True
            except OSError:
                return False

        alive = sum(1 for s in held if still_open(s))
    finally:
        for s in held:
            s.close()
    return {
        "held_target": held_n, "held_opened": len(held), "held_still_open_after": alive,
        "open_errors": open_errors[:3], "open_s": round(t_opened - t_open0, 3),
        "held_for_s": round(t_probed - t_open0, 2),
        "baseline": summarize(base), "with_held": summarize(loaded),
        "rss_idle_mib": mib(idle), "rss_peak_held_mib": mib(w.peak()),
        "kib_per_held_conn": round((w.peak() - idle) / max(1, len(held)), 1),
        "ok": len(held) == held_n and alive == held_n and len(loaded) == 200,
    }


IDLE_SETTLE_S = 25


async def fig_idle(proxy: Proxy, api_key: str, n: int) -> dict:
    """n keep-alive connections, each answered once (GET /v1/models with the key; the origin
    says 404) and then held open: RSS before and after, in bytes per connection. "After" is
    IDLE_SETTLE_S after the last answer: keygate parks a connection idle for a second, and its
    allocator gives the freed pages back to the system in steps over the next 10 to 20 s. The
    proxy must keep idle connections open longer than that (keygate: header_read_timeout,
    nginx: keepalive_timeout, 75 s by default); `still_open` counts those it kept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 2048
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    pids = proxy.pids()
    idle = await idle_rss(pids, settle=0.2)
    request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n\r\n".encode()
    held: list[Conn] = []
    errors: list[str] = []

    async def answered_once() -> None:
        c = await Conn.open(proxy.port)
        try:
            await c.send(request)
            _, headers = await c.head()
            await c.body(headers)
        except BaseException:
            c.close()
            raise
        held.append(c)

    t0 = time.monotonic()
    try:
        for b in range(0, n, 100):
            res = await asyncio.wait_for(
                asyncio.gather(*(answered_once() for _ in range(min(100, n - b))), return_exceptions=True),
                timeout=10,
            )
            errors += [repr(r) for r in res if isinstance(r, BaseException)]
        opened_s = time.monotonic() - t0
        loaded = await idle_rss(pids, settle=IDLE_SETTLE_S)
        still_open = sum(1 for c in held if is_open(c.sock))
    finally:
        for c in held:
            c.close()
    return {
        "target": n, "held": len(held), "still_open": still_open, "errors": errors[:3],
        "open_s": round(opened_s, 2),
        "rss_idle_mib": mib(idle), "rss_held_mib": mib(loaded),
        "bytes_per_conn": round((loaded - idle) * 1024 / max(1, len(held))),
        "ok": len(held) == n and still_open == n,
    }


def is_open(sock: socket.socket) -> bool:
    """Whether the peer has not closed the connection (nothing to read, no end of stream)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def line_idle(label: str, r: dict) -> str:
    return (f"{label}: {r['held']}/{r['target']} keep-alive connections answered once and held,"
            f" {r['still_open']} still open at the end"
            f" (opened in {r['open_s']} s); RSS {r['rss_idle_mib']} MiB before,"
            f" {r['rss_held_mib']} MiB {IDLE_SETTLE_S} s after the last answer,"
            f" {r['bytes_per_conn']} bytes/conn; errors {r['errors']}")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def line_transfer(label: str, r: dict) -> str:
    s = (f"{label}: {r['bytes'] / MiB:.0f} MiB in {r['seconds']:.2f} s = {r['mib_per_s']:.0f} MiB/s"
         f" (status {r['status']}, {'ok' if r['ok'] else 'FAILED: ' + str(r['bytes_confirmed']) + ' bytes'})")
    if "rss_idle_mib" in r:
        s += f"; RSS idle {r['rss_idle_mib']} MiB, peak {r['rss_peak_mib']} MiB, delta {r['rss_delta_mib']} MiB"
    return s


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="keygate-figures-"))
    api_key = secrets.token_urlsafe(32)  # 43 chars
    secret = secrets.token_urlsafe(32)
    assert len(api_key) == 43 and len(secret) == 43
    size = (256 * MiB) if args.quick else GiB
    report: dict = {"mode": "quick" if args.quick else "full", "transfer_bytes": size, "cpus": os.cpu_count()}

    loop = asyncio.get_running_loop()
    stats = OriginStats()
    server = await loop.create_server(lambda: OriginProtocol(stats), HOST, 0, backlog=4096)
    origin_port = server.sockets[0].getsockname()[1]

    def out(s: str) -> None:
        print(s, flush=True)

    try:
        # harness ceiling: the same transfers straight to the origin
        up = await fig_transfer("upload", None, origin_port, size, api_key)
        down = await fig_transfer("download", None, origin_port, size, api_key)
        report["direct"] = {"upload": up, "download": down}
        out(line_transfer("0. direct to origin, no proxy (harness ceiling) upload", up))
        out(line_transfer("0. direct to origin, no proxy (harness ceiling) download", down))

        kg, kg_log = start_keygate(args.keygate, tmp, origin_port, api_key, secret)
        report["keygate_log"] = str(kg_log)
        await wait_health(kg.port, kg.proc)
        report["keygate_rss_at_start_mib"] = mib(await idle_rss(kg.pids()))
        k: dict = {}
        report["keygate"] = k

        k["upload"] = await fig_transfer("upload", kg, kg.port, size, api_key)
        out(line_transfer("1. keygate upload", k["upload"]))
        k["download"] = await fig_transfer("download", kg, kg.port, size, api_key)
        out(line_transfer("2. keygate download", k["download"]))

        r = k["sse"] = await fig_sse(kg, api_key)
        out(f"3. keygate SSE: {r['complete']}/{r['streams']} streams complete ({r['events_each']} events + [DONE]),"
            f" wall {r['wall_s']} s; RSS idle {r['rss_idle_mib']} MiB, peak with all open"
            f" {r['rss_peak_all_open_mib']} MiB (window {r['all_open_window_s']} s),"
            f" {r['kib_per_stream']} KiB/stream; errors {r['n_errors']}")

        r = k["hangup"] = await fig_hangup(kg, api_key, stats)
        out(f"4. keygate hang-up -> upstream close: {r['measured']}/{r['runs']} measured, median {r['median_ms']} ms,"
            f" max {r['max_ms']} ms, min {r['min_ms']} ms; origin saw {r['origin_saw']};"
            f" not closed within 5 s: {r['not_closed_within_5s']}; errors {r['errors']}")

        r = k["probe"] = await fig_probe(kg)
        out(f"5. keygate probe GET /health x200: idle p50 {r['baseline']['p50_ms']} / p99 {r['baseline']['p99_ms']}"
            f" / max {r['baseline']['max_ms']} ms; with {r['held_opened']} slow-header conns held"
            f" p50 {r['with_held']['p50_ms']} / p99 {r['with_held']['p99_ms']} / max {r['with_held']['max_ms']} ms"
            f" ({r['held_still_open_after']} still open after {r['held_for_s']} s);"
            f" RSS {r['rss_idle_mib']} -> {r['rss_peak_held_mib']} MiB ({r['kib_per_held_conn']} KiB/conn)")

        report["keygate_alive_at_end"] = kg.proc.poll() is None
        report["keygate_rss_at_end_mib"] = mib(await idle_rss(kg.pids(), settle=0.2))
        rc = procs.stop_process(kg.proc)
        report["keygate_exit_code"] = rc
        warn_lines = []
        try:
            for ln in kg_log.read_text(errors="replace").splitlines():
                if ln.strip():
                    warn_lines.append(ln)
        except OSError:
            pass
        report["keygate_log_lines"] = len(warn_lines)
        report["keygate_log_sample"] = warn_lines[:10]
        out(f"keygate: exit code {rc} after SIGTERM; {len(warn_lines)} log line(s) at warn+ in {kg_log}")
        for ln in warn_lines[:10]:
            out(f"  log: {ln[:300]}")

        # A fresh process, so that memory freed by the figures above does not hide the cost,
        # keeping idle connections open longer than the figure waits.
        kg, _ = start_keygate(args.keygate, tmp, origin_port, api_key, secret,
                              header_read_timeout="120s")
        await wait_health(kg.port, kg.proc)
        r = k["idle"] = await fig_idle(kg, api_key, 10_000)
        out(line_idle("6. keygate idle (fresh process)", r))
        procs.stop_process(kg.proc)

        if args.compare_nginx:
            ng, ng_log = start_nginx(args.nginx, tmp, origin_port, api_key, secret)
            report["nginx_log"] = str(ng_log)
            await wait_health(ng.port, ng.proc)
            await asyncio.sleep(0.3)
            n: dict = {"rss_at_start_mib": mib(await idle_rss(ng.pids())), "pids": ng.pids()}
            report["nginx"] = n
            n["upload"] = await fig_transfer("upload", ng, ng.port, size, api_key)
            out(line_transfer("7. nginx upload", n["upload"]))
            n["download"] = await fig_transfer("download", ng, ng.port, size, api_key)
            out(line_transfer("7. nginx download", n["download"]))
            r = n["probe"] = await fig_probe(ng)
            out(f"7. nginx probe GET /health x200: idle p50 {r['baseline']['p50_ms']} / p99 {r['baseline']['p99_ms']}"
                f" / max {r['baseline']['max_ms']} ms; with {r['held_opened']} slow-header conns held"
                f" p50 {r['with_held']['p50_ms']} / p99 {r['with_held']['p99_ms']} / max {r['with_held']['max_ms']} ms"
                f" ({r['held_still_open_after']} still open after {r['held_for_s']} s);"
                f" RSS {r['rss_idle_mib']} -> {r['rss_peak_held_mib']} MiB ({r['kib_per_held_conn']} KiB/conn)")
            n["exit_code"] = procs.stop_process(ng.proc)
            # A fresh process, as for keygate; its config allows 4096 connections per worker.
            ng, _ = start_nginx(args.nginx, tmp, origin_port, api_key, secret)
            await wait_health(ng.port, ng.proc)
            await asyncio.sleep(0.3)
            r = n["idle"] = await fig_idle(ng, api_key, 3_000)
            out(line_idle("7. nginx idle (fresh process)", r))
            procs.stop_process(ng.proc)
            try:
                n["error_log"] = ng_log.read_text(errors="replace").splitlines()[:10]
            except OSError:
                n["error_log"] = []
    finally:
        procs.stop_started()
        server.close()
        report["origin_requests"] = stats.requests
        if args.keep_tmp:
            report["tmp_dir"] = str(tmp)
        else:  # the nginx config holds this run's (random) key and secret
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def main() -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keygate", default=str(here / "target/release/keygate"))
    ap.add_argument("--quick", action="store_true", help="256 MiB transfers instead of 1 GiB")
    ap.add_argument("--compare-nginx", action="store_true", help="repeat figures 1, 2 and 5 through nginx")
    ap.add_argument("--nginx", default="nginx")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if not os.access(args.keygate, os.X_OK):
        print(f"keygate binary not found or not executable: {args.keygate}", file=sys.stderr)
        return 2

    async def bounded():
        return await asyncio.wait_for(run(args), timeout=OVERALL_DEADLINE_S)

    try:
        report = asyncio.run(bounded())
    finally:
        procs.stop_started()
    print(json.dumps(report, separators=(",", ":")), flush=True)
    ok = all(report.get("keygate", {}).get(f, {}).get("ok", False)
             for f in ("upload", "download", "sse", "hangup", "probe"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
