"""A slot-limited, OpenAI-shaped inference origin for the fairness benchmark, standard library
only. Like vLLM's or llama.cpp's scheduler it runs at most SLOTS generations at once and queues
the rest first come, first served; each running generation produces one token every TOKEN_MS
(batched decoding: a step takes the same time whether one slot or all are busy), so a request
with max_tokens=N holds its slot for N * TOKEN_MS. A client that hangs up leaves the queue, or
frees its slot, at once, as vLLM aborts a disconnected request.

Routes: GET /health, and POST /v1/chat/completions or /v1/completions with max_tokens and
stream (SSE chunks, then `data: [DONE]`; usage in the last chunk with
stream_options.include_usage). HTTP/1.1 with keep-alive; no authentication.

Usage: python3 benches/fairness/slot_origin.py --port 18300 --slots 4 --token-ms 20
"""

import argparse
import asyncio
import collections
import json
import time

MODEL = "slot-origin"


class Slots:
    """K generation slots with a FIFO queue beyond them."""

    def __init__(self, count):
        self.free = count
        self.waiting = collections.deque()

    async def acquire(self):
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a slot in the instant it was cancelled: pass it on
            else:
                self.waiting.remove(turn)
            raise

    def release(self):
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1


class HungUp(Exception):
    pass


async def read_request(reader):
    """One request: (method, path, headers, body), or None when the client closed."""
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target.split("?")[0], headers, body


def response_head(status, content_type, length=None):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
    head += f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n"
    return (head + "\r\n").encode()


def send_json(writer, status, body):
    data = json.dumps(body).encode()
    writer.write(response_head(status, "application/json", len(data)) + data)


def chunk(data):
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Origin:
    def __init__(self, slots, token_s):
        self.slots = Slots(slots)
        self.token_s = token_s

    async def connection(self, reader, writer):
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                if path == "/health" and method in ("GET", "HEAD"):
                    send_json(writer, 200, {"status": "ok"})
                elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                    try:
                        params = json.loads(body or b"{}")
                        tokens = max(1, int(params.get("max_tokens") or 16))
                    except (ValueError, TypeError, AttributeError):
                        send_json(writer, 400, {"error": {"message": "bad request body"}})
                    else:
                        await self.generate(reader, writer, path, params, tokens)
                else:
                    send_json(writer, 404, {"error": {"message": "not found"}})
                await writer.drain()
        except (HungUp, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def generate(self, reader, writer, path, params, tokens):
        stream = bool(params.get("stream"))
        chat = path.endswith("chat/completions")
        # The client sends nothing more before the response ends, so a read that returns is a
        # hang-up (or a pipelined request, which this origin does not support).
        gone = asyncio.ensure_future(reader.read(1))
        if stream:
            writer.write(response_head(200, "text/event-stream"))
        try:
            turn = asyncio.ensure_future(self.slots.acquire())
            await asyncio.wait({turn, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not turn.done():
                turn.cancel()
                await asyncio.gather(turn, return_exceptions=True)
                raise HungUp
            try:
                await self.tokens(writer, gone, stream, chat, params, tokens)
            finally:
                self.slots.release()
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)

    async def tokens(self, writer, gone, stream, chat, params, tokens):
        created = int(time.time())
        start = time.monotonic()
        for i in range(tokens):
            delay = start + (i + 1) * self.token_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if gone.done() or writer.is_closing():
                raise HungUp
            if stream:
                piece = {"content": "tok "} if chat else None
                choice = {"index": 0, "finish_reason": "length" if i == tokens - 1 else None}
                choice.update({"delta": piece} if chat else {"text": "tok "})
                event = {
                    "id": f"cmpl-{created}",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": MODEL,
                    "choices": [choice],
                }
                writer.write(chunk(f"data: {json.dumps(event)}\n\n".encode()))
                await writer.drain()
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        if not stream:
            text = "tok " * tokens
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            send_json(writer, 200, {
                "id": f"cmpl-{created}",
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": MODEL,
                "choices": [choice],
                "usage": usage,
            })
            return
        if (params.get("stream_options") or {}).get("include_usage"):
            event = {"id": f"cmpl-{created}", "object": "chat.completion.chunk", "created": created,
                     "model": MODEL, "choices": [], "usage": usage}
            writer.write(chunk(f"data: {json.dumps(event)}\n\n".encode()))
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18300)
    parser.add_argument("--slots", type=int, default=4, help="generations at once (K)")
    parser.add_argument("--token-ms", type=float, default=20.0, help="time per generated token")
    args = parser.parse_args()
    origin = Origin(args.slots, args.token_ms / 1000)
    server = await asyncio.start_server(origin.connection, "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
