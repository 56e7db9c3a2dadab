"""The processes of the Python benches (churn.py, figures.py, soak.py).

keygate and nginx start on a free 127.0.0.1 port with a config written into the bench's
temporary directory, their output in a log file beside it; what a process and its children
hold (RSS, descriptors, sockets, CPU time) is read from /proc; and a bench stops only the
processes it started, by PID: SIGTERM, then SIGKILL after 5 s. Standard library only; the
benches import it from their own folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
STOP_DEADLINE_S = 5

# Every process started here, for a bench's last `stop_started()`.
STARTED: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_keygate(
    binary: str, tmp: Path, config: str, origin: int, env: dict[str, str], *args: str
) -> tuple[subprocess.Popen, int, Path]:
    """keygate with `config` (TOML) in front of the origin on port `origin`, on a free port;
    `env` on top of this process's environment, `args` after the listen and upstream flags.
    The process, its port and its log."""
    cfg = tmp / "keygate.toml"
    cfg.write_text(config)
    port = free_port()
    log = tmp / "keygate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--config", str(cfg), "--listen", f"{HOST}:{port}",
             "--upstream", f"http://{HOST}:{origin}", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, **env),
        )
    STARTED.append(proc)
    return proc, port, log


def start_nginx(nginx: str, tmp: Path, config: Callable[[Path, int], str]) -> tuple[subprocess.Popen, int, Path]:
    """nginx (master and one worker) on a free port, in tmp/nginx with its temp folders;
    `config(folder, port)` is its nginx.conf. The master, its port and its error log."""
    d = tmp / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(config(d, port))
    conf.chmod(0o600)
    # Run as root, the worker runs as nobody: let it reach its temp folders.
    tmp.chmod(0o711)
    d.chmod(0o711)
    log = d / "error.log"
    with open(d / "stdout.log", "wb") as out:
        proc = subprocess.Popen(
            [nginx, "-p", str(d), "-c", str(conf), "-e", str(log)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    STARTED.append(proc)
    return proc, port, log


def wait_listening(port: int, proc: subprocess.Popen, deadline_s: float = 10.0) -> None:
    """Polls until something accepts on `port`; fails when `proc` exits first or at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} within {deadline_s} s")


def stop_process(p: subprocess.Popen) -> int | None:
    """SIGTERM by PID, SIGKILL after STOP_DEADLINE_S; the exit code. Only for processes
    started here."""
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=STOP_DEADLINE_S)
    return p.returncode


def stop_started() -> None:
    for p in STARTED:
        stop_process(p)


def family(pid: int) -> list[int]:
    """`pid` and its children (nginx's workers)."""
    out = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def rss_kib(pids: list[int]) -> int:
    """Summed VmRSS; a process that has gone counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def socket_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        total += 1
                except OSError:
                    pass
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick
