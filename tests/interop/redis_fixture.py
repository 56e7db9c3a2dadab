"""A real redis-server (the Debian package; .ci/run installs it) for tests of shared limits.

`redis_server` starts one per test on a free 127.0.0.1 port, without persistence, waits until
it answers PING and stops it by pid; `running_redis` is the same as a context manager, for a
test that kills or restarts its Redis. A port taken between choosing and binding it is retried.
Test modules import what they use from here.
"""

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_interop import POLL_INTERVAL_S, clean_env, free_ports, launch, stop

REDIS_SERVER = shutil.which("redis-server")
START_DEADLINE_S = 20
START_ATTEMPTS = 5
BIND_FAILURE = "Address already in use"


@dataclass
class Redis:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """One command over a fresh connection, and its reply if it is one line (`+OK`, `:1`, `-ERR …`)."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(request.encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply


def answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(64) == b"+PONG\r\n"
    return False


@contextlib.contextmanager
def running_redis(logs: Path):
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
    for attempt in range(START_ATTEMPTS):
        (port,) = free_ports(1)
        log = logs / f"redis-{port}.log"
        args = [
            REDIS_SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(logs),
        ]  # fmt: skip
        proc = launch(args, logs, clean_env(), log)
        deadline = time.monotonic() + START_DEADLINE_S
        try:
            while not answers_ping(port):
                if proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not answer PING within {START_DEADLINE_S} s:\n{log.read_text()}")
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            stop(proc)
            raise
        if proc.poll() is None:
            try:
                yield Redis(port, proc, log)
            finally:
                stop(proc)
            return
        text = log.read_text(errors="replace")
        if BIND_FAILURE not in text:
            pytest.fail(f"redis-server exited with {proc.returncode} while starting:\n{text}")
    pytest.fail(f"redis-server found its port taken {START_ATTEMPTS} times in a row")


@pytest.fixture
def redis_server(tmp_path):
    with running_redis(tmp_path) as redis:
        yield redis
