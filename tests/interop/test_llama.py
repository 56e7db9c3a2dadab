"""keygate in front of llama.cpp's own llama-server, with the official openai client.

llama-server (llama_fixture.py) serves a tiny random model whose every request runs to
max_tokens, so its `usage` is known in advance; keygate runs with llama/keygate-llama.toml
(preset "llamacpp") on a free port, with an admin listener for its metrics. What llama-server
reports (usage, the include_usage chunk, a slot freed when the client hangs up) is what
keygate's accounting is checked against: keygate_tokens_total must equal llama-server's own
usage, also for a stream whose client did not ask for it and never sees it.
"""

import secrets
import time
from dataclasses import dataclass

import httpx
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
    admin: str
    # The key of "tiny-only", whose models are ["tiny-llama"].
    models_key: str

    def tokens(self, key: str, model: str) -> tuple[float, float]:
        """keygate_tokens_total for `key` and `model`: (prompt, completion)."""
        text = httpx.get(f"{self.admin}/metrics", timeout=10).text
        found = {}
        for kind in ("prompt", "completion"):
            series = f'keygate_tokens_total{{key="{key}",model="{model}",kind="{kind}"}} '
            found[kind] = next((float(line[len(series) :]) for line in text.splitlines() if line.startswith(series)), 0.0)
        return found["prompt"], found["completion"]

    def wait_for_tokens(self, key: str, model: str, expected: tuple[float, float]) -> None:
        """Polls the metrics until `key`'s tokens for `model` are `expected` (counted when the
        response ends, which the client may see first)."""
        deadline = time.monotonic() + DEADLINE_S
        while (found := self.tokens(key, model)) != expected:
            if time.monotonic() > deadline:
                pytest.fail(f"keygate_tokens_total for {key}, {model}: {found}, expected {expected}")
            time.sleep(POLL_INTERVAL_S)


@pytest.fixture(scope="module")
def gate(llama_server, tmp_path_factory):  # noqa: F811
    key, models_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    port, admin_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("keygate-llama")
    log = logs / "keygate.log"
    config = logs / "keygate-llama.toml"
    admin = f'\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
    config.write_text((REPO_ROOT / CONFIG).read_text() + admin)
    keygate = launch(
        [keygate_bin(), "--config", config, "--listen", f"127.0.0.1:{port}", "--upstream", llama_server.url],
        REPO_ROOT,
        {**clean_env(), "API_KEY": key, "MODELS_KEY": models_key},
        log,
    )
    try:
        wait_healthy(f"{url}/health", keygate, log)
        yield Gate(url, key, llama_server, f"http://127.0.0.1:{admin_port}", models_key)
        terminate(keygate)
        assert_exits_cleanly(keygate, log, {"API_KEY": key, "MODELS_KEY": models_key})
    finally:
        stop(keygate)


def openai_client(gate: Gate, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gate.url}/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


@pytest.fixture
def client(gate):
    with openai_client(gate, gate.key) as c:
        yield c


@pytest.fixture
def models_client(gate):
    with openai_client(gate, gate.models_key) as c:
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


def llama_prompt_tokens(llama: LlamaServer) -> float:
    """llama-server's own count of the prompt tokens it was sent (its /metrics)."""
    text = httpx.get(f"{llama.url}/metrics", timeout=10).text
    series = "llamacpp:prompt_tokens_total "
    return next(float(line[len(series) :]) for line in text.splitlines() if line.startswith(series))


def test_a_key_with_models_reaches_its_model_and_no_other(models_client, gate):
    r = models_client.chat.completions.create(model=gate.llama.model, messages=PROMPT, max_tokens=MAX_TOKENS)
    assert r.usage.completion_tokens == MAX_TOKENS
    assert [m.id for m in models_client.models.list()] == [gate.llama.model]
    before = llama_prompt_tokens(gate.llama)
    # llama-server would answer any of these names with its one model.
    for model in ["other-model", "TINY-LLAMA", "tiny-llama "]:
        with pytest.raises(openai.NotFoundError) as refused:
            models_client.chat.completions.create(model=model, messages=PROMPT, max_tokens=MAX_TOKENS)
        assert refused.value.code == "model_not_found"
        assert refused.value.body["message"] == f"The model `{model}` does not exist or you do not have access to it."
    # Spelled as a duplicate key with an escape, which llama-server would read as "other-model".
    headers = {"Authorization": f"Bearer {gate.models_key}", "Content-Type": "application/json"}
    body = b'{"model":"tiny-llama","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"mod\\u0065l":"other-model"}'
    r = httpx.post(f"{gate.url}/v1/chat/completions", content=body, headers=headers, timeout=DEADLINE_S)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "model_undecidable"
    # None of them reached llama-server.
    assert llama_prompt_tokens(gate.llama) == before


def test_a_stream_that_did_not_ask_for_usage_is_counted_and_its_client_sees_no_usage(client, gate):
    baseline = client.chat.completions.create(model=gate.llama.model, messages=PROMPT, max_tokens=MAX_TOKENS)
    before = gate.tokens("app", gate.llama.model)
    chunks = list(
        client.chat.completions.create(model=gate.llama.model, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "a chunk without choices: the usage chunk reached the client"
    assert chunks[-1].choices[0].finish_reason == "length"
    expected = (before[0] + baseline.usage.prompt_tokens, before[1] + MAX_TOKENS)
    gate.wait_for_tokens("app", gate.llama.model, expected)


def test_the_raw_stream_is_what_the_client_asked_for(gate):
    """No usage chunk in the bytes either: every event has choices, and [DONE] ends it."""
    body = {"model": gate.llama.model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    headers = {"Authorization": f"Bearer {gate.key}"}
    with httpx.stream("POST", f"{gate.url}/v1/chat/completions", json=body, headers=headers, timeout=DEADLINE_S) as r:
        assert r.status_code == 200
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all('"choices":[{' in e for e in events[:-1]), text
    assert all('"usage"' not in e for e in events), text


def test_tokens_metric_equals_llama_servers_usage(client, models_client, gate):
    for key, c in (("app", client), ("tiny-only", models_client)):
        before = gate.tokens(key, gate.llama.model)
        chat = c.chat.completions.create(model=gate.llama.model, messages=PROMPT, max_tokens=MAX_TOKENS)
        completion = c.completions.create(model=gate.llama.model, prompt="Once upon a time", max_tokens=MAX_TOKENS)
        asked = list(
            c.chat.completions.create(
                model=gate.llama.model,
                messages=PROMPT,
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usages = [chat.usage, completion.usage, asked[-1].usage]
        expected = (
            before[0] + sum(u.prompt_tokens for u in usages),
            before[1] + sum(u.completion_tokens for u in usages),
        )
        gate.wait_for_tokens(key, gate.llama.model, expected)
