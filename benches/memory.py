#!/usr/bin/env python3
"""Memory per idle keep-alive connection and per concurrent SSE stream, keygate beside nginx.

Two figures, each on a fresh process of each proxy (so memory freed by an earlier figure does
not hide the cost of the next):

  idle  N keep-alive connections (default 5,000; nginx 3,000, inside its 4,096 per worker),
        each answered once (GET /v1/models with the key) and then held: (RSS held - RSS
        before) / N, in bytes (KB = 1,000 bytes in the table of docs/performance.md), read
        25 s after the last answer: keygate parks a connection idle for a second, and jemalloc
        gives the freed pages back to the system in steps over the next 10 to 20 s.
  sse   256 concurrent SSE streams of 30 events 100 ms apart: (peak RSS while all are open -
        RSS before) / 256, in KiB per stream (client and upstream socket both counted).

RSS is VmRSS from /proc/PID/status (nginx: master and worker). Memory does not depend on CPU
contention, so these figures hold on a busy machine. The origin, the clients, the proxy
configs and the RSS sampling are those of `benches/figures.py` (figures 3 and 6 there); this
script only runs those two figures, for keygate and for nginx (1 worker, request and response
buffering off, the same key check and injected header).

Run from the repository root after `cargo build --release`:

    python3 benches/memory.py [--keygate target/release/keygate] [--idle 5000] [--no-nginx]

Every loop is bounded in count and time (the whole run at most 300 s); the script stops only
the processes it started, by PID. Output: one line per figure, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figures  # noqa: E402  (the sibling script: origin, clients, proxies, RSS sampling)
import procs  # noqa: E402  (the process helpers: stop by PID, the processes started)

DEADLINE_S = 300
NGINX_IDLE = 3_000


async def measure(start, label: str, idle_n: int) -> dict:
    """Both figures for one proxy, each on a fresh process."""
    proxy, _ = start()
    await figures.wait_health(proxy.port, proxy.proc)
    await asyncio.sleep(0.3)
    idle = await figures.fig_idle(proxy, KEY, idle_n)
    procs.stop_process(proxy.proc)
    print(figures.line_idle(f"{label} idle", idle), flush=True)
    proxy, _ = start()
    await figures.wait_health(proxy.port, proxy.proc)
    await asyncio.sleep(0.3)
    sse = await figures.fig_sse(proxy, KEY)
    procs.stop_process(proxy.proc)
    print(f"{label} sse: {sse['complete']}/{sse['streams']} streams complete; RSS idle"
          f" {sse['rss_idle_mib']} MiB, peak with all open {sse['rss_peak_all_open_mib']} MiB,"
          f" {sse['kib_per_stream']} KiB/stream; errors {sse['n_errors']}", flush=True)
    return {"idle": idle, "sse": sse}


KEY = secrets.token_urlsafe(32)
SECRET = secrets.token_urlsafe(32)


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="keygate-memory-"))
    loop = asyncio.get_running_loop()
    stats = figures.OriginStats()
    server = await loop.create_server(lambda: figures.OriginProtocol(stats), figures.HOST, 0,
                                      backlog=4096)
    origin = server.sockets[0].getsockname()[1]
    report: dict = {}
    try:
        # The idle connections must outlive the 25 s the figure waits.
        report["keygate"] = await measure(
            lambda: figures.start_keygate(args.keygate, tmp, origin, KEY, SECRET,
                                          header_read_timeout="120s"),
            "keygate", args.idle)
        if not args.no_nginx:
            report["nginx"] = await measure(
                lambda: figures.start_nginx(args.nginx, tmp, origin, KEY, SECRET),
                "nginx", min(args.idle, NGINX_IDLE))
    finally:
        for p in procs.STARTED:
            procs.stop_process(p)
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the nginx config holds the key
    return report


def main() -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keygate", default=str(here / "target/release/keygate"))
    ap.add_argument("--nginx", default="nginx")
    ap.add_argument("--idle", type=int, default=5_000, help="idle connections held (keygate)")
    ap.add_argument("--no-nginx", action="store_true", help="keygate only")
    args = ap.parse_args()
    if not os.access(args.keygate, os.X_OK):
        print(f"keygate binary not found or not executable: {args.keygate}", file=sys.stderr)
        return 2
    if not args.no_nginx and shutil.which(args.nginx) is None:
        print(f"nginx not found: {args.nginx} (or pass --no-nginx)", file=sys.stderr)
        return 2

    async def bounded():
        return await asyncio.wait_for(run(args), timeout=DEADLINE_S)

    try:
        report = asyncio.run(bounded())
    finally:
        for p in procs.STARTED:
            procs.stop_process(p)
    print(json.dumps(report, separators=(",", ":")), flush=True)
    ok = all(r[f]["ok"] for r in report.values() for f in ("idle", "sse"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
