"""An OpenAI-shaped origin (like vLLM) that only answers requests carrying the shared secret.

The interop tests run it with uvicorn behind keygate. Every route except /health refuses a
request whose x-shared-secret header differs from the SHARED_SECRET environment variable.
/v1/echo-headers and /v1/reflect exist so the tests can see what reached the origin and
what an origin that reflects headers sends back. A streamed chat completion whose last
message is "slow" waits SLOW_FIRST_TOKEN_S before its first chunk, like a long queue in
vLLM; one whose last message is "stall" goes silent after its first chunk, like a hung
worker. (An exception in the generator would not do: uvicorn then ends the response cleanly.)
"""

import asyncio
import hmac
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

SECRET = os.environ["SHARED_SECRET"].encode()
MODEL = "test-model"
STREAM_PIECES = ["Hello", " from", " the", " test", " origin."]
CHUNK_INTERVAL_S = 0.05
SLOW_FIRST_TOKEN_S = 1.0
STALL_S = 60

app = FastAPI()


@app.middleware("http")
async def only_through_keygate(request: Request, call_next):
    sent = request.headers.get("x-shared-secret", "").encode()
    if request.url.path != "/health" and not hmac.compare_digest(sent, SECRET):
        return JSONResponse({"error": "forbidden"}, status_code=401)
    return await call_next(request)


@app.api_route("/health", methods=["GET", "HEAD"])
async def health():
    return {}


@app.get("/v1/models")
async def models():
    return {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "keygate-interop"}],
    }


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    created = int(time.time())
    prompt = body["messages"][-1]["content"]
    if body.get("stream"):
        return StreamingResponse(_stream_chunks(created, prompt), media_type="text/event-stream")
    return {
        "id": "chatcmpl-interop",
        "object": "chat.completion",
        "created": created,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo: {prompt}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def _chunk(created: int, delta: dict, finish_reason: str | None = None) -> str:
    chunk = {
        "id": "chatcmpl-interop",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n"


async def _stream_chunks(created: int, prompt: str):
    if prompt == "slow":
        await asyncio.sleep(SLOW_FIRST_TOKEN_S)
    yield _chunk(created, {"role": "assistant", "content": ""})
    if prompt == "stall":
        # Until keygate's idle_timeout gives up and closes the connection.
        await asyncio.sleep(STALL_S)
    for piece in STREAM_PIECES:
        await asyncio.sleep(CHUNK_INTERVAL_S)
        yield _chunk(created, {"content": piece})
    await asyncio.sleep(CHUNK_INTERVAL_S)
    yield _chunk(created, {}, "stop")
    yield "data: [DONE]\n\n"


@app.get("/v1/echo-headers")
async def echo_headers(request: Request):
    """Every header as received, in order and with repeats, as [name, value] pairs."""
    return {"headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw]}


@app.get("/v1/reflect")
async def reflect(request: Request):
    """Hands the received shared secret back in a response header, as a careless origin might."""
    return JSONResponse(
        {"reflected": True},
        headers={
            "x-shared-secret": request.headers.get("x-shared-secret", ""),
            "x-origin-reflect": "yes",
        },
    )
