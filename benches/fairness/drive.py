"""The load of the fairness benchmark, standard library only. A batch key keeps --batch-streams
streamed chat completions in flight (max_tokens=--batch-tokens each, a new one as soon as one
ends); an interactive key sends short streamed completions (max_tokens=--interactive-tokens)
one after another. After --warmup seconds it measures for --duration seconds: the interactive
requests' latency (request sent to `data: [DONE]`) and time to first token, and the tokens per
second each key receives. Prints one JSON line to stdout and a summary to stderr.

Percentiles are nearest-rank: with fewer than 100 interactive requests, p99 is the slowest one.

python3 benches/fairness/drive.py --url http://127.0.0.1:18301 --batch-key KEY1 --interactive-key KEY2
"""

import argparse
import asyncio
import json
import math
import sys
import time
from urllib.parse import urlsplit


class Failed(Exception):
    def __init__(self, message, unanswered=False):
        super().__init__(message)
        self.unanswered = unanswered


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def stream(self, path, key, body, on_event):
        """POSTs `body`; calls on_event(data) for each SSE `data:` line of a 200 response.
        A kept-alive connection the server closed before answering (llama-server closes one
        after every stream, without `connection: close`) is reopened and the request sent
        again, as HTTP clients such as httpx do; anything else is an error."""
        reused = self.writer is not None
        try:
            await self.send(path, key, body, on_event)
        except Failed as e:
            if not (reused and e.unanswered):
                raise
            await self.send(path, key, body, on_event)

    async def send(self, path, key, body, on_event):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                "content-type: application/json\r\naccept: text/event-stream\r\n"
                f"content-length: {len(data)}\r\n")
        if key:
            head += f"authorization: Bearer {key}\r\n"
        self.writer.write((head + "\r\n").encode() + data)
        try:
            await self.response(on_event)
        except BaseException:
            self.close()
            raise

    async def response(self, on_event):
        status_line = await self.reader.readline()
        if not status_line:
            raise Failed("connection closed", unanswered=True)
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        pending = b""
        async for piece in self.body(headers):
            if status != 200:
                continue
            pending += piece
            *events, pending = pending.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        on_event(line[5:].strip())
        if headers.get("connection") == "close":
            self.close()
        if status != 200:
            raise Failed(f"status {status}")

    async def body(self, headers):
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                piece = await self.reader.readexactly(size + 2)
                if size == 0:
                    return
                yield piece[:-2]
        elif "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
        else:
            while piece := await self.reader.read(65536):
                yield piece
            self.close()


def is_token(data):
    if data == b"[DONE]":
        return False
    choices = json.loads(data).get("choices") or []
    return any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)


class Run:
    def __init__(self, args):
        self.args = args
        url = urlsplit(args.url)
        self.host, self.port = url.hostname, url.port or 80
        now = time.monotonic()
        self.measure_from = now + args.warmup
        self.measure_to = self.measure_from + args.duration
        self.tokens = {"batch": 0, "interactive": 0}
        self.latencies, self.first_tokens = [], []
        self.errors = {}

    def measuring(self, at):
        return self.measure_from <= at <= self.measure_to

    def body(self, tokens):
        return {"model": "slot-origin", "stream": True, "max_tokens": tokens,
                "messages": [{"role": "user", "content": "Tell me something."}]}

    async def completion(self, connection, who, key, tokens):
        """One streamed completion; returns (sent, first token, done) monotonic times."""
        sent = time.monotonic()
        first = None

        def on_event(data):
            nonlocal first
            if is_token(data):
                at = time.monotonic()
                first = first or at
                if self.measuring(at):
                    self.tokens[who] += 1

        await connection.stream("/v1/chat/completions", key, self.body(tokens), on_event)
        return sent, first, time.monotonic()

    async def client(self, who, key, tokens):
        connection = Connection(self.host, self.port)
        try:
            while True:
                try:
                    sent, first, done = await self.completion(connection, who, key, tokens)
                except (Failed, OSError, ValueError, asyncio.IncompleteReadError) as e:
                    kind = f"{who}: {e}" if isinstance(e, Failed) else f"{who}: {type(e).__name__}"
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                    await asyncio.sleep(0.1)
                    continue
                if who == "interactive" and sent >= self.measure_from and done <= self.measure_to:
                    self.latencies.append(done - sent)
                    self.first_tokens.append((first or done) - sent)
        finally:
            connection.close()

    async def run(self):
        args = self.args
        clients = [asyncio.create_task(self.client("batch", args.batch_key, args.batch_tokens))
                   for _ in range(args.batch_streams)]
        clients.append(asyncio.create_task(
            self.client("interactive", args.interactive_key, args.interactive_tokens)))
        await asyncio.sleep(self.measure_to - time.monotonic())
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL: the origin or keygate")
    parser.add_argument("--setup", default="", help="a name for the report")
    parser.add_argument("--batch-key", default="")
    parser.add_argument("--interactive-key", default="")
    parser.add_argument("--batch-streams", type=int, default=40)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--interactive-tokens", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args()
    run = Run(args)
    asyncio.run(run.run())
    tokens = {who: round(n / args.duration, 1) for who, n in run.tokens.items()}
    report = {
        "setup": args.setup,
        "interactive": {
            "requests": len(run.latencies),
            "latency_p50_s": percentile(run.latencies, 0.50),
            "latency_p99_s": percentile(run.latencies, 0.99),
            "first_token_p50_s": percentile(run.first_tokens, 0.50),
            "first_token_p99_s": percentile(run.first_tokens, 0.99),
        },
        "batch_tokens_per_s": tokens["batch"],
        "interactive_tokens_per_s": tokens["interactive"],
        "total_tokens_per_s": round(tokens["batch"] + tokens["interactive"], 1),
        "errors": run.errors,
    }
    print(json.dumps(report))
    i = report["interactive"]
    print(f"{args.setup or args.url}: interactive p50 {i['latency_p50_s']} s, p99 {i['latency_p99_s']} s "
          f"({i['requests']} requests); batch {tokens['batch']} tokens/s, "
          f"all {report['total_tokens_per_s']} tokens/s; errors {run.errors or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
