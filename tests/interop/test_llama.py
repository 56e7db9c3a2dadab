"""keygate in front of llama.cpp's own llama-server, with the official openai client.

llama-server (llama_fixture.py) serves a tiny random model whose every request runs to
max_tokens, so its `usage` is known in advance; keygate runs with llama/keygate-llama.toml
(preset "llamacpp") on a free port. What llama-server reports (usage, the include_usage chunk,
a slot freed when the client hangs up) is what keygate's accounting will be checked against.
"""

import secrets
import time
from dataclasses import dataclass

import openai
import pytest

from llama_fixture import (  # noqa: F401 (llama_server, llama_server_bin, tiny_model: fixtures)
    LlamaServer,
    llama_server,
    llama_server_bin,
    tiny_model,
    wait_slots_idle,
)
from test_interop import (
    POLL_INTERVAL_S,
    REPO_ROOT,
    assert_exits_cleanly,
    clean_env,
    free_ports,
    keygate_bin,
    launch,
    stop,
    terminate,
    wait_healthy,
)

CONFIG = "tests/interop/llama/keygate-llama.toml"
PROMPT = [{"role": "user", "content": "Tell me a long story."}]
MAX_TOKENS = 32
WIDE_MAX_TOKENS = 512
# With --context-shift, llama-server would take most of an hour for these: a slot idle again within
# DEADLINE_S was freed by the hang-up, not by the end of the request.
LONG_MAX_TOKENS = 1_000_000
CHUNKS_BEFORE_HANGING_UP = 3
DEADLINE_S = 30


@dataclass
class Gate:
    url: str
    key: str
    llama: LlamaServer


@pytest.fixture(scope="module")
def gate(llama_server, tmp_path_factory):  # noqa: F811
    key = secrets.token_urlsafe(32)
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("keygate-llama") / "keygate.log"
    keygate = launch(
        [keygate_bin(), "--config", CONFIG, "--listen", f"127.0.0.1:{port}", "--upstream", llama_server.url],
        REPO_ROOT,
        {**clean_env(), "API_KEY": key},
        log,
    )
    try:
        wait_healthy(f"{url}/health", keygate, log)
        yield Gate(url, key, llama_server)
        terminate(keygate)
        assert_exits_cleanly(keygate, log, {"API_KEY": key})
    finally:
        stop(keygate)


@pytest.fixture
def client(gate):
    with openai.OpenAI(base_url=f"{gate.url}/v1", api_key=gate.key, max_retries=0, timeout=DEADLINE_S) as c:
        yield c


def test_models_lists_the_served_model(client, gate):
    assert [m.id for m in client.models.list()] == [gate.llama.model]


def test_chat_completion_reports_usage_and_runs_to_max_tokens(client, gate):
    r = client.chat.completions.create(model=gate.llama.model, messages=PROMPT, max_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.isascii()
    assert r.usage.prompt_tokens > len("Tell me a long story.")
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS


def test_every_request_runs_to_max_tokens_in_ascii_whatever_the_sampler(client, gate):
    # The widest sampler llama-server has: every token keeps its chance, flattened by temperature 2.
    r = client.chat.completions.create(
        model=gate.llama.model,
        messages=PROMPT,
        max_tokens=WIDE_MAX_TOKENS,
        temperature=2.0,
        top_p=1.0,
        extra_body={"top_k": 0, "min_p": 0.0},
    )
    assert r.usage.completion_tokens == WIDE_MAX_TOKENS
    assert r.choices[0].message.content.isascii()


def test_streamed_chat_ends_with_the_include_usage_chunk(client, gate):
    chunks = list(
        client.chat.completions.create(
            model=gate.llama.model,
            messages=PROMPT,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == []
    assert last.usage.completion_tokens == MAX_TOKENS
    assert last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content if c.choices)


def test_completion_reports_usage(client, gate):
    r = client.completions.create(model=gate.llama.model, prompt="Once upon a time", max_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.prompt_tokens > 0


def busy_slot(llama: LlamaServer) -> dict:
    """The one slot processing a request, polled for until there is one."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        busy = [s for s in llama.slots() if s["is_processing"]]
        if len(busy) == 1:
            return busy[0]
        if time.monotonic() > deadline:
            pytest.fail(f"not exactly one busy slot after {DEADLINE_S} s: {busy}")
        time.sleep(POLL_INTERVAL_S)


def test_a_client_hanging_up_mid_stream_frees_the_slot(client, gate):
    wait_slots_idle(gate.llama, DEADLINE_S)
    stream = client.chat.completions.create(
        model=gate.llama.model, messages=PROMPT, max_tokens=LONG_MAX_TOKENS, stream=True
    )
    with stream:
        for _, chunk in zip(range(CHUNKS_BEFORE_HANGING_UP), stream):
            assert chunk.choices[0].finish_reason is None
        slot = busy_slot(gate.llama)
    # Leaving the block closed the connection with the stream still open.
    after = next(s for s in wait_slots_idle(gate.llama, DEADLINE_S) if s["id"] == slot["id"])
    assert after["id_task"] == slot["id_task"], "the slot took another task meanwhile"
