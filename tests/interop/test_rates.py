"""The official openai client against a key with requests_per_minute.

keygate (keygate-rates.toml: 6 requests per minute) runs in front of origin.py. Over its
rate, the key gets 429 rate_limit_exceeded with Retry-After and OpenAI's x-ratelimit-*
headers, which the openai client turns into a RateLimitError; left to retry on its own, the
client waits Retry-After and its retry succeeds. Each test gets a keygate of its own, so a
fresh bucket.
"""

import contextlib
import secrets
import time

import httpx
import openai
import pytest

from test_interop import MODEL, REPO_ROOT, clean_env, free_ports, keygate_bin, launch, start_origin, stop, wait_healthy

CONFIG = "tests/interop/keygate-rates.toml"
RPM = 6
REFILL_S = 60 / RPM
# Loose: the client's own sleep, plus a loaded machine's worth of slack.
SLACK_S = 30


@contextlib.contextmanager
def running_gate(logs):
    key, secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    origin_port, keygate_port = free_ports(2)
    env = clean_env()
    with contextlib.ExitStack() as cleanup:
        start_origin(cleanup, env, secret, origin_port, logs / "origin.log")
        log = logs / "keygate.log"
        keygate = launch(
            [
                keygate_bin(),
                "--config", CONFIG,
                "--listen", f"127.0.0.1:{keygate_port}",
                "--upstream", f"http://127.0.0.1:{origin_port}",
            ],
            REPO_ROOT,
            {**env, "API_KEY": key, "SHARED_SECRET": secret},
            log,
        )  # fmt: skip
        cleanup.callback(stop, keygate)
        url = f"http://127.0.0.1:{keygate_port}"
        wait_healthy(f"{url}/health", keygate, log)
        yield url, key


@pytest.fixture
def gate(tmp_path):
    with running_gate(tmp_path) as g:
        yield g


def client(gate, max_retries: int, seen: list) -> openai.OpenAI:
    """An openai client that records the status and headers of every response it gets."""
    url, key = gate
    hooks = {"response": [lambda r: seen.append((r.status_code, r.headers))]}
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key=key,
        max_retries=max_retries,
        timeout=30,
        http_client=httpx.Client(event_hooks=hooks),
    )


def test_over_the_rate_the_client_gets_a_rate_limit_error_with_openais_headers(gate):
    seen = []
    with client(gate, 0, seen) as c:
        for _ in range(RPM):
            assert [m.id for m in c.models.list()] == [MODEL]
        with pytest.raises(openai.RateLimitError) as refused:
            c.models.list()
    assert refused.value.status_code == 429
    assert refused.value.code == "rate_limit_exceeded"
    assert refused.value.type == "rate_limit_error"
    remaining = [h["x-ratelimit-remaining-requests"] for _, h in seen]
    assert remaining == [str(n) for n in range(RPM - 1, -1, -1)] + ["0"]
    assert all(h["x-ratelimit-limit-requests"] == str(RPM) for _, h in seen)
    retry_after = int(seen[-1][1]["retry-after"])
    assert 1 <= retry_after <= REFILL_S


def test_the_openai_client_retries_a_429_after_retry_after_and_succeeds(gate):
    burst = []
    with client(gate, 0, burst) as c:
        for _ in range(RPM):
            c.models.list()
    assert [status for status, _ in burst] == [200] * RPM
    seen = []
    with client(gate, 2, seen) as c:
        started = time.monotonic()
        models = c.models.list()
        took = time.monotonic() - started
    assert [m.id for m in models] == [MODEL]
    assert [status for status, _ in seen] == [429, 200], seen
    retry_after = int(seen[0][1]["retry-after"])
    assert 1 <= retry_after <= REFILL_S
    assert took >= retry_after - 1, f"retried after {took:.1f} s, Retry-After was {retry_after}"
    assert took < retry_after + SLACK_S
    assert seen[1][1]["x-ratelimit-remaining-requests"] == "0"
