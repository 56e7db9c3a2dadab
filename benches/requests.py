#!/usr/bin/env python3
"""A fixed number of keep-alive GETs, then exit: the load of benches/instructions.sh.

    python3 benches/requests.py PORT COUNT [--connections 64] [--path /v1/models]

COUNT requests in all over CONNECTIONS keep-alive connections (each sends its next request
when its response is complete), with `Authorization: Bearer $API_KEY`. Prints
`requests N status-200 M` and exits 1 unless every response was 200. Every read has a
30 s timeout, so it always ends. Python 3.11+, standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

TIMEOUT_S = 30


async def connection(port: int, request: bytes, share: list[int], counts: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while share[0] > 0:
            share[0] -= 1
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT_S)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), TIMEOUT_S)
            counts["done"] += 1
            counts["ok"] += status == 200
    finally:
        writer.close()


async def run(args) -> dict:
    request = (f"GET {args.path} HTTP/1.1\r\nHost: bench\r\n"
               f"Authorization: Bearer {os.environ.get('API_KEY', '')}\r\n\r\n").encode()
    share = [args.count]
    counts = {"done": 0, "ok": 0}
    await asyncio.gather(*(connection(args.port, request, share, counts)
                           for _ in range(args.connections)))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--path", default="/v1/models")
    args = ap.parse_args()
    counts = asyncio.run(run(args))
    print(f"requests {counts['done']} status-200 {counts['ok']}", flush=True)
    return 0 if counts["ok"] == counts["done"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
