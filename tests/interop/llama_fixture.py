"""Fixtures that run llama.cpp's own llama-server (C++, not a mock) with a tiny model it can serve.

- `llama_server_bin`: the binary from llama/build.sh, which builds it once per machine and
  caches it outside the clone (env LLAMA_SERVER_BIN names another one). Tests that need it
  are skipped, with the build's last lines as the reason, only when it cannot be built.
- `tiny_model`: llama/make_model.py's model (0.5 MB, random weights, ASCII gibberish that runs
  to max_tokens), written into the session's temporary directory with the `gguf` package of
  llama/requirements.txt, which is installed first when missing.
- `llama_server`: one llama-server for the session on a free 127.0.0.1 port with 4 slots of
  8192 tokens of context each, its admin routes on (--metrics --props --slots), stopped by
  pid. With --context-shift, a request whose context fills up goes on (dropping its oldest
  tokens) until max_tokens, so a long stream lasts as long as a test needs it to.

Test modules import the fixtures they use from here.
"""

import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from test_interop import POLL_INTERVAL_S, clean_env, free_ports, launch, stop

HERE = Path(__file__).resolve().parent
LLAMA_DIR = HERE / "llama"
BUILD_SCRIPT = LLAMA_DIR / "build.sh"
MODEL_SCRIPT = LLAMA_DIR / "make_model.py"
REQUIREMENTS = LLAMA_DIR / "requirements.txt"
# llama-server answers /v1/models with this id and accepts any `model` in requests.
MODEL_ID = "tiny-llama"
SLOTS = 4
# Tokens of context per slot: llama-server divides --ctx-size among the slots.
SLOT_CONTEXT = 8192
# A first build takes some 5 minutes on 2 idle cores, 30 on busy ones; a cached binary returns at once.
BUILD_TIMEOUT_S = 3600
START_DEADLINE_S = 60
START_ATTEMPTS = 5
SUBPROCESS_TIMEOUT_S = 300
BIND_FAILURE = "couldn't bind HTTP server socket"


@dataclass
class LlamaServer:
    url: str
    proc: subprocess.Popen
    log: Path
    model: str = MODEL_ID

    def slots(self) -> list[dict]:
        """GET /slots: each slot's state (`is_processing`) and its last task's counters."""
        r = httpx.get(f"{self.url}/slots", timeout=10)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    given = os.environ.get("LLAMA_SERVER_BIN")
    if given:
        return Path(given)
    # Its own process group, so that a timeout stops cmake and the compilers with it.
    build = subprocess.Popen(
        [BUILD_SCRIPT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = build.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGKILL)
        build.communicate()
        pytest.skip(f"llama-server could not be built: {BUILD_SCRIPT.name} took over {BUILD_TIMEOUT_S} s")
    if build.returncode != 0:
        tail = "\n".join(err.splitlines()[-15:])
        pytest.skip(f"llama-server could not be built ({BUILD_SCRIPT} exited {build.returncode}):\n{tail}")
    return Path(out.strip().splitlines()[-1])


def pinned_requirements_missing() -> bool:
    """Whether any `name==version` line of llama/requirements.txt is not installed as pinned."""
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, version = line.split("==", 1)
        try:
            if importlib.metadata.version(name) != version:
                return True
        except importlib.metadata.PackageNotFoundError:
            return True
    return False


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    if pinned_requirements_missing():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", REQUIREMENTS],
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    path = tmp_path_factory.mktemp("llama-model") / "tiny-llama.gguf"
    subprocess.run(
        [sys.executable, MODEL_SCRIPT, path], stdin=subprocess.DEVNULL, check=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    return path


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> bool:
    """Polls /health until llama-server answers 200 (it answers 503 while it loads the model).

    False when it exited because its port was taken meanwhile (the caller tries another).
    """
    deadline = time.monotonic() + START_DEADLINE_S
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                if BIND_FAILURE in text:
                    return False
                pytest.fail(f"llama-server exited with {proc.returncode} while starting:\n{text}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{url}/health").status_code == 200:
                    return True
            time.sleep(POLL_INTERVAL_S)
    pytest.fail(f"llama-server did not answer 200 on /health within {START_DEADLINE_S} s:\n{log.read_text()}")


@contextlib.contextmanager
def running_llama_server(binary: Path, model: Path, logs: Path, extra_args: tuple[str, ...] = ()):
    """llama-server on a free port; a port taken between choosing and binding it is retried."""
    for attempt in range(START_ATTEMPTS):
        (port,) = free_ports(1)
        log = logs / f"llama-server-{attempt}.log"
        args = [
            binary,
            "--model", model,
            "--alias", MODEL_ID,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--parallel", str(SLOTS),
            "--ctx-size", str(SLOTS * SLOT_CONTEXT),
            "--context-shift",
            "--threads", "1",
            "--threads-batch", "1",
            "--metrics",
            "--props",
            "--slots",
            "--no-webui",
            *extra_args,
        ]  # fmt: skip
        proc = launch([str(a) for a in args], logs, clean_env(), log)
        try:
            ready = wait_ready(f"http://127.0.0.1:{port}", proc, log)
        except BaseException:
            stop(proc)
            raise
        if ready:
            try:
                yield LlamaServer(f"http://127.0.0.1:{port}", proc, log)
            finally:
                stop(proc)
            return
    pytest.fail(f"llama-server found its port taken {START_ATTEMPTS} times in a row")


@pytest.fixture(scope="session")
def llama_server(llama_server_bin, tiny_model, tmp_path_factory):
    with running_llama_server(llama_server_bin, tiny_model, tmp_path_factory.mktemp("llama-server")) as server:
        yield server
        assert server.proc.poll() is None, f"llama-server died during the tests:\n{server.log.read_text()}"


def wait_slots_idle(server: LlamaServer, deadline_s: float) -> list[dict]:
    """Polls /slots until no slot is processing; the slots then, or a failure at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        slots = server.slots()
        if not any(s["is_processing"] for s in slots):
            return slots
        if time.monotonic() > deadline:
            pytest.fail(f"llama-server's slots still busy after {deadline_s} s: {slots}")
        time.sleep(POLL_INTERVAL_S)
