#!/usr/bin/env python3
"""Soak: two identical rounds of mixed traffic through keygate; sockets and RSS after each.

Each round runs --seconds (20) of traffic from --workers (48) concurrent clients, each
looping over the same mix:

  keyed       10 keyed `GET /v1/models` on one keep-alive connection (200)
  wrong key   5 `GET /v1/models` with a wrong key on one connection (401)
  stream      a keyed streamed chat completion: read the first SSE event, hang up
  slow head   half a request head, one more header line a second later, then nothing:
              keygate closes it at header_read_timeout (2 s here)
  cut upload  a keyed `POST /v1/audio/transcriptions` declaring 1 MB: send 64 KiB, hang up
  upload      the same with its whole 256 KiB body, answered 200
  slow origin a keyed `GET /slow` the origin answers after 1 s; the client hangs up after
              100 ms, before the response headers

After each round the script waits --settle (10) seconds and reports keygate's RSS and its open
sockets, split into idle pooled connections to the origin (the origin's count of open
connections; the pool keeps them for 90 s, as many as the round's last moments needed) and
the rest (listener and client side). A leak shows as growth from round 1 to round 2 in RSS or
in the rest; the script prints both rounds and the difference.

Run from the repository root after `cargo build --release --locked`:

    python3 benches/soak.py [--keygate target/release/keygate] [--seconds 20] [--settle 10]

The origin runs in this process (asyncio, HTTP/1.1 keep-alive, chunked SSE). Every loop is
bounded in count and time; the script stops only the keygate it started, by PID. Python
3.11+, standard library only; procs.py beside it starts, measures and stops keygate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import procs

HOST = procs.HOST
OP_TIMEOUT_S = 15.0
SSE_EVENTS = 20
SSE_EVERY_S = 0.05
UPLOAD = 256 * 1024
CUT_DECLARED = 1_000_000
CUT_SENT = 64 * 1024


# --------------------------------------------------------------------------------------
# Origin
# --------------------------------------------------------------------------------------


class Origin:
    def __init__(self) -> None:
        self.requests = 0
        self.open = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, HOST, 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if target.startswith("/v1/chat/completions"):
                    await self.sse(writer)
                elif target.startswith("/slow"):
                    await asyncio.sleep(1.0)
                    respond(writer, b'{"slow":true}')
                else:
                    respond(writer, b'{"object":"list","data":[]}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            # The script is ending: connections still open are dropped quietly.
            pass
        finally:
            self.open -= 1
            writer.close()

    async def sse(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for i in range(SSE_EVENTS):
            event = f'data: {{"token":{i}}}\n\n'.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(SSE_EVERY_S)
        writer.write(b"0\r\n\r\n")


def respond(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(body), body)
    )


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


class Load:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.counts: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def count(self, what: str, table: dict[str, int] | None = None) -> None:
        table = self.counts if table is None else table
        table[what] = table.get(what, 0) + 1

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(HOST, self.port)

    async def keyed(self, key: str, expect: int, what: str, n: int) -> None:
        reader, writer = await self.connect()
        try:
            for _ in range(n):
                writer.write(
                    f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
                )
                if await read_response(reader) != expect:
                    raise RuntimeError(f"{what}: not {expect}")
                self.count(what)
        finally:
            writer.close()

    async def stream(self) -> None:
        reader, writer = await self.connect()
        body = b'{"model":"m","stream":true,"messages":[]}'
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\n\n")
        writer.close()
        self.count("stream hung up")

    async def slow_head(self) -> None:
        reader, writer = await self.connect()
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(1.0)
        writer.write(b"X-Slow: 1\r\n")
        # keygate closes at header_read_timeout; nothing more is sent.
        await reader.read()
        writer.close()
        self.count("slow head cut")

    async def upload(self, cut: bool) -> None:
        reader, writer = await self.connect()
        declared = CUT_DECLARED if cut else UPLOAD
        writer.write(
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n".encode()
        )
        writer.write(b"u" * (CUT_SENT if cut else UPLOAD))
        await writer.drain()
        if cut:
            writer.close()
            self.count("upload cut short")
            return
        try:
            if await read_response(reader) != 200:
                raise RuntimeError("upload: not 200")
            self.count("upload")
        finally:
            writer.close()

    async def slow_origin(self) -> None:
        reader, writer = await self.connect()
        writer.write(f"GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.key}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        self.count("hung up before headers")

    async def worker(self, until: float) -> None:
        wrong = "kg-" + secrets.token_urlsafe(24)
        mix = [
            ("keyed", lambda: self.keyed(self.key, 200, "keyed", 10)),
            ("wrong key", lambda: self.keyed(wrong, 401, "wrong key", 5)),
            ("stream", self.stream),
            ("slow head", self.slow_head),
            ("cut upload", lambda: self.upload(True)),
            ("upload", lambda: self.upload(False)),
            ("slow origin", self.slow_origin),
        ]
        while time.monotonic() < until:
            for name, op in mix:
                if time.monotonic() >= until:
                    return
                try:
                    await asyncio.wait_for(op(), OP_TIMEOUT_S)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError, ValueError):
                    self.count(name, self.failures)


# --------------------------------------------------------------------------------------
# keygate and what it holds
# --------------------------------------------------------------------------------------


def start_keygate(binary: str, tmp: Path, origin: int, key: str) -> tuple[subprocess.Popen, int]:
    config = (
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'header_read_timeout = "2s"\n'
        "[upstream]\n"
        'url = "http://127.0.0.1:8000"\n'
        "[auth]\n"
        'keys = [{ name = "soak", env = "API_KEY" }]\n'
        "[log]\n"
        'level = "warn"\n'
    )
    proc, port, _ = procs.start_keygate(binary, tmp, config, origin, {"API_KEY": key})
    return proc, port


def rss_kib(pid: int) -> int:
    return procs.rss_kib([pid])


def sockets(pid: int) -> int:
    return procs.socket_count([pid])


async def run(args) -> dict:
    key = "kg-" + secrets.token_urlsafe(24)
    origin = Origin()
    await origin.start()
    with tempfile.TemporaryDirectory(prefix="keygate-soak-") as tmpdir:
        proc, port = start_keygate(args.keygate, Path(tmpdir), origin.port, key)
        try:
            await asyncio.to_thread(procs.wait_listening, port, proc)
            await asyncio.sleep(0.5)
            report = {"idle": {"sockets": sockets(proc.pid), "rss_mib": round(rss_kib(proc.pid) / 1024, 1)}}
            print(f"idle     sockets {report['idle']['sockets']:>4} | RSS {report['idle']['rss_mib']:>5.1f} MiB", flush=True)
            rounds = []
            for n in (1, 2):
                load = Load(port, key)
                until = time.monotonic() + args.seconds
                await asyncio.gather(*(load.worker(until) for _ in range(args.workers)))
                peak_during = rss_kib(proc.pid)
                await asyncio.sleep(args.settle)
                held = sockets(proc.pid)
                r = {
                    "round": n,
                    "counts": load.counts,
                    "failures": load.failures,
                    "rss_end_mib": round(peak_during / 1024, 1),
                    "sockets": held,
                    "pooled": origin.open,
                    "other_sockets": held - origin.open,
                    "rss_mib": round(rss_kib(proc.pid) / 1024, 1),
                    "origin_requests": origin.requests,
                }
                rounds.append(r)
                total = sum(load.counts.values())
                print(
                    f"round {n}  sockets {r['sockets']:>4} ({r['pooled']} pooled to the origin, {r['other_sockets']} other)"
                    f" | RSS {r['rss_mib']:>5.1f} MiB {args.settle:.0f} s after (at the end {r['rss_end_mib']:.1f})"
                    f" | {total} operations {load.counts} failures {load.failures}",
                    flush=True,
                )
            report["rounds"] = rounds
            report["growth"] = {
                "other_sockets": rounds[1]["other_sockets"] - rounds[0]["other_sockets"],
                "rss_mib": round(rounds[1]["rss_mib"] - rounds[0]["rss_mib"], 1),
            }
            print(
                f"growth   sockets other than pooled {report['growth']['other_sockets']:+d}"
                f" | RSS {report['growth']['rss_mib']:+.1f} MiB",
                flush=True,
            )
            return report
        finally:
            procs.stop_process(proc)
            if origin.server is not None:
                origin.server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keygate", default="target/release/keygate")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=48)
    args = parser.parse_args()
    args.seconds = min(args.seconds, 120.0)
    args.settle = min(args.settle, 60.0)
    args.workers = max(1, min(args.workers, 512))
    report = asyncio.run(run(args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
