"""Interop tests: real clients (openai, httpx, curl) through keygate to an OpenAI-shaped origin.

Each stack is origin.py under uvicorn plus the keygate binary (env KEYGATE_BIN, default
target/debug/keygate in the repo root) started with keygate-interop.toml, both on free
127.0.0.1 ports, with a fresh random API_KEY and SHARED_SECRET. run.sh sets everything up.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
CONFIG = "tests/interop/keygate-interop.toml"
START_DEADLINE_S = 30
STOP_DEADLINE_S = 10
POLL_INTERVAL_S = 0.05
MODEL = "test-model"
STREAM_TEXT = "Hello from the test origin."
STREAM_PIECES = 5
STREAM_PROMPT = [{"role": "user", "content": "stream please"}]
# The origin waits before the first chunk of "slow" (origin.SLOW_FIRST_TOKEN_S, 1 s) and goes
# silent after the first chunk of "stall"; keygate-interop.toml sets sse_keepalive = "200ms"
# and idle_timeout = "2s".
SLOW_PROMPT = [{"role": "user", "content": "slow"}]
STALL_PROMPT = [{"role": "user", "content": "stall"}]
WRONG_TOKEN = "wrong-" + secrets.token_urlsafe(32)
CURL = shutil.which("curl")


@dataclass
class Stack:
    url: str
    key: str
    secret: str
    keygate: subprocess.Popen
    keygate_log: Path


# Sockets that hold the ports free_ports handed out, open until the test process ends.
_HELD_PORTS: list[socket.socket] = []


def free_ports(n: int) -> list[int]:
    """n ports on 127.0.0.1 that stay reserved for the servers the tests start on them.

    Each port is held, for the whole run, by a bound socket that never listens, with
    SO_REUSEADDR and SO_REUSEPORT: a server that sets either (keygate and uvicorn set
    SO_REUSEADDR) still binds the port and listens on it, while no other socket can take it
    in between, neither as a port of the kernel's choosing nor by a bind without those
    options. A port closed before the server binds it could be taken by anything meanwhile.
    """
    ports = []
    for _ in range(n):
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        _HELD_PORTS.append(held)
        ports.append(held.getsockname()[1])
    return ports


def keygate_bin() -> Path:
    path = Path(os.environ.get("KEYGATE_BIN", "target/debug/keygate"))
    path = path if path.is_absolute() else REPO_ROOT / path
    if not os.access(path, os.X_OK):
        pytest.fail(f"no keygate binary at {path}: run `cargo build --locked` or set KEYGATE_BIN")
    return path


def launch(args: list, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, verify=True) -> None:
    """Polls `url` until it answers 200; `verify` is httpx's (e.g. an SSL context for TLS)."""
    deadline = time.monotonic() + START_DEADLINE_S
    with httpx.Client(verify=verify, timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[0]} exited with {proc.returncode} while starting:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"{url} did not answer 200 within {START_DEADLINE_S} s:\n{log.read_text()}")


def terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def wait_or_kill(proc: subprocess.Popen) -> int | None:
    """The exit code, or None when the process had to be killed after STOP_DEADLINE_S."""
    try:
        return proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def stop(proc: subprocess.Popen) -> None:
    terminate(proc)
    wait_or_kill(proc)


def clean_env() -> dict:
    """This process's environment without the variables the tests set themselves."""
    return {k: v for k, v in os.environ.items() if k not in ("API_KEY", "SHARED_SECRET", "RUST_LOG")}


def start_origin(cleanup: contextlib.ExitStack, env: dict, secret: str, port: int, log: Path) -> None:
    """Starts origin.py under uvicorn on `port`, stopped by `cleanup`, and waits until it is healthy."""
    origin = launch(
        [sys.executable, "-m", "uvicorn", "origin:app", "--port", str(port), "--host", "127.0.0.1"],
        HERE,
        {**env, "SHARED_SECRET": secret},
        log,
    )
    cleanup.callback(stop, origin)
    wait_healthy(f"http://127.0.0.1:{port}/health", origin, log)


@contextlib.contextmanager
def running_stack(logs: Path):
    key, secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    origin_port, keygate_port = free_ports(2)
    origin_url = f"http://127.0.0.1:{origin_port}"
    keygate_url = f"http://127.0.0.1:{keygate_port}"
    env = clean_env()
    with contextlib.ExitStack() as cleanup:
        start_origin(cleanup, env, secret, origin_port, logs / "origin.log")

        keygate_log = logs / "keygate.log"
        keygate = launch(
            [keygate_bin(), "--config", CONFIG, "--listen", f"127.0.0.1:{keygate_port}", "--upstream", origin_url],
            REPO_ROOT,
            {**env, "API_KEY": key, "SHARED_SECRET": secret},
            keygate_log,
        )
        cleanup.callback(stop, keygate)
        wait_healthy(f"{keygate_url}/health", keygate, keygate_log)
        yield Stack(keygate_url, key, secret, keygate, keygate_log)


def assert_exits_cleanly(keygate: subprocess.Popen, log_file: Path, secrets: dict[str, str]) -> None:
    """keygate, already sent SIGTERM, exits 0 and never logged `secrets` (name: value) or a
    presented token."""
    code = wait_or_kill(keygate)
    log = log_file.read_text()
    assert code == 0, f"keygate exited with {code} after SIGTERM (None: killed after {STOP_DEADLINE_S} s):\n{log}"
    for name, value in [*secrets.items(), ("a wrong token", WRONG_TOKEN)]:
        assert value not in log, f"keygate logged {name}"


def assert_clean_exit(stack: Stack) -> None:
    """The stack's keygate, already sent SIGTERM, exits 0 and never logged a secret or a presented token."""
    assert_exits_cleanly(stack.keygate, stack.keygate_log, {"API_KEY": stack.key, "SHARED_SECRET": stack.secret})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s
        terminate(s.keygate)
        assert_clean_exit(s)


def openai_client(stack: Stack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key or stack.key, max_retries=0, timeout=30)


@pytest.fixture
def client(stack):
    with openai_client(stack) as c:
        yield c


@pytest.fixture
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


def bearer(stack: Stack) -> tuple[str, str]:
    return ("Authorization", f"Bearer {stack.key}")


def origin_saw(http: httpx.Client, headers: list) -> list[tuple[str, str]]:
    """The headers that reached the origin for a GET /v1/echo-headers sent with these headers."""
    r = http.get("/v1/echo-headers", headers=headers)
    assert r.status_code == 200, r.text
    return [(name.lower(), value) for name, value in r.json()["headers"]]


def values(seen: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in seen if n == name]


# --- the official openai client ---------------------------------------------------------------


def test_openai_lists_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ping"}])
    assert r.model == MODEL
    assert r.choices[0].message.content == "echo: ping"


def test_openai_stream_arrives_chunk_by_chunk(client):
    arrivals = []
    for chunk in client.chat.completions.create(model=MODEL, messages=STREAM_PROMPT, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    ended = time.monotonic()
    assert "".join(text for _, text in arrivals) == STREAM_TEXT
    assert len(arrivals) == STREAM_PIECES
    # The origin spaces its chunks 50 ms apart: a buffering proxy would deliver them all at once.
    assert ended - arrivals[0][0] >= 0.1, f"first chunk only {ended - arrivals[0][0]:.3f} s before the end"
    assert arrivals[-1][0] - arrivals[0][0] >= 0.1, "content chunks arrived together"


def stream_lines(http: httpx.Client, stack: Stack, messages: list) -> tuple[list[str], Exception | None]:
    """The raw lines of a streamed chat completion, and the error that ended it, if any."""
    lines: list[str] = []
    body = {"model": MODEL, "messages": messages, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=[bearer(stack)]) as r:
        assert r.status_code == 200
        try:
            lines.extend(r.iter_lines())
        except httpx.HTTPError as ended:
            return lines, ended
    return lines, None


def test_keepalive_comments_arrive_while_the_origin_is_silent(http, stack):
    lines, ended = stream_lines(http, stack, SLOW_PROMPT)
    assert ended is None
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data].count(": keep-alive") >= 2, lines[: first_data + 1]
    assert lines[-2:] == ["data: [DONE]", ""]


def test_openai_stream_parser_ignores_keepalive_comments(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=SLOW_PROMPT, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == STREAM_TEXT


def test_a_stalled_stream_gets_an_error_event_then_ends_abnormally(http, stack):
    lines, ended = stream_lines(http, stack, STALL_PROMPT)
    assert isinstance(ended, httpx.RemoteProtocolError), f"not an abnormal end: {ended!r} {lines}"
    assert lines[-3] == "event: error" and lines[-1] == "", lines
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_idle_timeout"
    # Keep-alives filled the silence, but the origin stayed silent: idle_timeout still applied.
    assert ": keep-alive" in lines


def test_openai_client_raises_the_error_event_of_a_stalled_stream(client):
    with pytest.raises(openai.APIError) as failed:
        for _ in client.chat.completions.create(model=MODEL, messages=STALL_PROMPT, stream=True):
            pass
    assert not isinstance(failed.value, openai.APIConnectionError), repr(failed.value)
    assert failed.value.message == "The upstream server sent nothing for longer than idle_timeout."
    assert failed.value.body["code"] == "upstream_idle_timeout"


def test_openai_wrong_key_raises_authentication_error(stack):
    with openai_client(stack, WRONG_TOKEN) as c, pytest.raises(openai.AuthenticationError) as refused:
        c.models.list()
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"


def test_sigterm_lets_an_open_stream_finish(tmp_path):
    with running_stack(tmp_path) as s:
        with openai_client(s) as c:
            pieces = []
            for chunk in c.chat.completions.create(model=MODEL, messages=STREAM_PROMPT, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 1:
                        terminate(s.keygate)
        assert "".join(pieces) == STREAM_TEXT
        assert_clean_exit(s)


# --- refusals, with httpx ---------------------------------------------------------------------


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith('Bearer realm="keygate"')
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert error["message"]


def test_no_key_is_refused_with_the_openai_error_shape(http):
    r = http.get("/v1/models")
    assert_refused(r)
    assert "invalid_token" not in r.headers["www-authenticate"]


REFUSED_CREDENTIALS = {
    "wrong bearer": lambda key: [("Authorization", f"Bearer {WRONG_TOKEN}")],
    "wrong x-api-key": lambda key: [("x-api-key", WRONG_TOKEN)],
    "bearer and x-api-key": lambda key: [("Authorization", f"Bearer {key}"), ("x-api-key", key)],
    "two authorization": lambda key: [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")],
    "basic scheme": lambda key: [("Authorization", f"Basic {key}")],
}


@pytest.mark.parametrize("case", REFUSED_CREDENTIALS)
def test_refusal_never_echoes_the_presented_token(http, stack, case):
    r = http.get("/v1/models", headers=REFUSED_CREDENTIALS[case](stack.key))
    assert_refused(r)
    if case.startswith("wrong"):
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    for token in (stack.key, WRONG_TOKEN):
        assert token not in r.text
        assert all(token not in value for value in r.headers.values())


def test_x_api_key_is_accepted(http, stack):
    r = http.get("/v1/models", headers={"x-api-key": stack.key})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"] == MODEL


def test_bearer_scheme_is_case_insensitive(http, stack):
    assert http.get("/v1/models", headers={"Authorization": f"bearer {stack.key}"}).status_code == 200


def test_trace_is_refused_before_authentication(http, stack):
    assert http.request("TRACE", "/health").status_code == 405
    assert http.request("TRACE", "/v1/models", headers=[bearer(stack)]).status_code == 405


# --- the probe path ---------------------------------------------------------------------------


def test_probe_needs_no_key(http):
    assert http.get("/health").status_code == 200
    assert http.head("/health").status_code == 200
    assert http.get("/health", params={"ready": "1"}).status_code == 200


@pytest.mark.parametrize(
    "method, target",
    [
        ("GET", b"/health/"),
        ("GET", b"//health"),
        ("GET", b"/HEALTH"),
        ("POST", b"/health"),
        ("GET", b"/healthz"),
        ("GET", b"/health;x"),
        ("GET", b"/health%2F.."),
        ("GET", b"/health/../v1/models"),
    ],
)
def test_paths_near_the_probe_need_a_key(http, method, target):
    # The target is sent byte for byte: httpx would otherwise normalise dot segments.
    assert_refused(http.request(method, "/", extensions={"target": target}))


# --- what reaches the origin, and what comes back ----------------------------------------------


def test_origin_gets_secret_and_identity_but_not_the_clients_authorization(http, stack):
    seen = origin_saw(http, [bearer(stack)])
    assert values(seen, "x-shared-secret") == [stack.secret]
    assert values(seen, "x-keygate-key") == ["interop"]
    assert values(seen, "authorization") == []


def test_x_api_key_does_not_reach_the_origin(http, stack):
    seen = origin_saw(http, [("x-api-key", stack.key)])
    assert values(seen, "x-api-key") == []
    assert values(seen, "x-keygate-key") == ["interop"]
    assert all(stack.key not in value for _, value in seen)


def test_client_cannot_forge_the_secret_or_the_identity(http, stack):
    seen = origin_saw(
        http,
        [bearer(stack), ("x-shared-secret", "evil"), ("X-Shared-Secret", "evil2"), ("x-keygate-key", "admin")],
    )
    assert values(seen, "x-shared-secret") == [stack.secret]
    assert values(seen, "x-keygate-key") == ["interop"]


def test_underscore_aliases_do_not_reach_the_origin(http, stack):
    seen = origin_saw(http, [bearer(stack), ("x_shared_secret", "evil"), ("x_keygate_key", "admin")])
    assert not {"x_shared_secret", "x_keygate_key"} & {name for name, _ in seen}
    assert values(seen, "x-shared-secret") == [stack.secret]
    assert values(seen, "x-keygate-key") == ["interop"]


def test_client_forwarding_headers_are_replaced(http, stack):
    seen = origin_saw(
        http,
        [
            bearer(stack),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=203.0.113.9"),
        ],
    )
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert all("203.0.113.9" not in value for _, value in seen)


def request_ids(r: httpx.Response) -> tuple[str, list[str]]:
    """The X-Request-Id keygate returned, and those that reached the origin (echo-headers)."""
    assert r.status_code == 200, r.text
    at_origin = [value for name, value in r.json()["headers"] if name.lower() == "x-request-id"]
    return r.headers["x-request-id"], at_origin


def test_request_id_is_kept_and_returned(http, stack):
    sent = str(uuid.uuid4())
    r = http.get("/v1/echo-headers", headers=[bearer(stack), ("X-Request-Id", sent)])
    assert request_ids(r) == (sent, [sent])


def test_request_id_is_generated_and_returned(http, stack):
    returned, at_origin = request_ids(http.get("/v1/echo-headers", headers=[bearer(stack)]))
    assert returned
    assert at_origin == [returned]


def test_origin_cannot_reflect_the_secret_to_the_client(http, stack):
    r = http.get("/v1/reflect", headers=[bearer(stack)])
    assert r.status_code == 200, r.text
    assert r.headers["x-origin-reflect"] == "yes"
    assert "x-shared-secret" not in r.headers
    assert all(stack.secret not in value for value in r.headers.values())


# --- curl -------------------------------------------------------------------------------------

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@needs_curl
def test_curl_streams_server_sent_events(stack):
    body = json.dumps({"model": MODEL, "messages": STREAM_PROMPT, "stream": True})
    out = subprocess.run(
        [
            CURL,
            "-sS",
            "-N",
            "--max-time",
            "30",
            "-H",
            f"Authorization: Bearer {stack.key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            f"{stack.url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Blank lines end events; lines starting with ":" are comments (keygate's keep-alives).
    events = [line for line in out.stdout.splitlines() if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in events), out.stdout
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == STREAM_TEXT


@needs_curl
def test_curl_without_a_key_gets_401(stack):
    out = subprocess.run(
        [CURL, "-sS", "-o", os.devnull, "-w", "%{http_code}", "--max-time", "30", f"{stack.url}/v1/models"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == "401"
