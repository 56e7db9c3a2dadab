"""TLS termination with real clients: curl, httpx (HTTP/2 and HTTP/1.1) and the openai client
talk to keygate's TLS listener in front of origin.py, and plain HTTP to the redirect listener
beside it is sent on to https.

The CA and the localhost certificate it signs are made for each run with the openssl CLI.
keygate runs with keygate-interop.toml, its [server] table swapped for one with tls_cert,
tls_key, redirect_http_listen and redirect_https_port; the helpers come from test_interop.py.
"""

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from test_interop import (
    CONFIG,
    CURL,
    MODEL,
    REPO_ROOT,
    STREAM_PIECES,
    STREAM_PROMPT,
    STREAM_TEXT,
    Stack,
    assert_clean_exit,
    clean_env,
    free_ports,
    keygate_bin,
    launch,
    needs_curl,
    start_origin,
    stop,
    terminate,
    wait_healthy,
)

OPENSSL = shutil.which("openssl")
HOST = "localhost"
PLAIN_SERVER_TABLE = '[server]\nlisten = "127.0.0.1:0"\n'
CURL_MAX_TIME_S = "20"
SUBPROCESS_TIMEOUT_S = 60
# OpenSSL 3 refuses TLS 1.0/1.1 client-side at its default security level; level 0 lets curl
# offer them, so that a failure is the server's refusal (checked in curl's trace as well).
OLD_TLS_CIPHERS = "DEFAULT@SECLEVEL=0"
LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""


@dataclass
class TlsStack:
    url: str
    redirect_url: str
    port: int
    key: str
    ca: Path
    stack: Stack


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, **kwargs)


def openssl(*args: str, cwd: Path) -> None:
    out = run([OPENSSL, *args], cwd=cwd)
    assert out.returncode == 0, f"openssl {' '.join(args)} failed:\n{out.stderr}"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for localhost that it signs: (ca.pem, cert.pem, key.pem)."""
    if OPENSSL is None:
        pytest.fail("the openssl CLI is needed to make the test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=keygate interop CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "key.pem", "-out", "leaf.csr", "-subj", f"/CN={HOST}", cwd=folder)
    (folder / "leaf.cnf").write_text(LEAF_EXTENSIONS)
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "cert.pem", "-days", "2", "-extfile", "leaf.cnf",
        cwd=folder,
    )  # fmt: skip
    return folder / "ca.pem", folder / "cert.pem", folder / "key.pem"


def tls_config(folder: Path, cert: Path, key: Path, port: int, redirect_port: int) -> Path:
    """keygate-interop.toml with TLS on 127.0.0.1:port and the redirect listener."""
    text = (REPO_ROOT / CONFIG).read_text()
    assert PLAIN_SERVER_TABLE in text, f"{CONFIG} no longer starts [server] as this test expects"
    server = "\n".join(
        [
            "[server]",
            f'listen = "127.0.0.1:{port}"',
            f"tls_cert = {json.dumps(str(cert))}",
            f"tls_key = {json.dumps(str(key))}",
            f'redirect_http_listen = "127.0.0.1:{redirect_port}"',
            f"redirect_https_port = {port}",
            "",
        ]
    )
    path = folder / "keygate-tls.toml"
    path.write_text(text.replace(PLAIN_SERVER_TABLE, server))
    return path


def trusting(ca: Path) -> ssl.SSLContext:
    """A client context that trusts the test CA only (one per client: httpx sets its ALPN)."""
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key_file = make_certificates(folder)
    key, secret = os.urandom(32).hex(), os.urandom(32).hex()
    origin_port, port, redirect_port = free_ports(3)
    origin_url = f"http://127.0.0.1:{origin_port}"
    env = clean_env()
    with contextlib.ExitStack() as cleanup:
        start_origin(cleanup, env, secret, origin_port, folder / "origin.log")

        config = tls_config(folder, cert, key_file, port, redirect_port)
        keygate_log = folder / "keygate.log"
        keygate = launch(
            [keygate_bin(), "--config", config, "--upstream", origin_url],
            REPO_ROOT,
            {**env, "API_KEY": key, "SHARED_SECRET": secret},
            keygate_log,
        )
        cleanup.callback(stop, keygate)
        url = f"https://{HOST}:{port}"
        wait_healthy(f"{url}/health", keygate, keygate_log, verify=trusting(ca))
        stack = Stack(url, key, secret, keygate, keygate_log)
        yield TlsStack(url, f"http://{HOST}:{redirect_port}", port, key, ca, stack)
        terminate(keygate)
        assert_clean_exit(stack)


def curl(tls: TlsStack, *args: str) -> subprocess.CompletedProcess:
    """curl trusting the test CA only; stdout ends with a line `<status> <HTTP version>`."""
    written = "\n%{http_code} %{http_version}"
    return run([CURL, "-sS", "--max-time", CURL_MAX_TIME_S, "--cacert", str(tls.ca), "-w", written, *args])


def status_and_version(out: subprocess.CompletedProcess) -> tuple[str, str]:
    assert out.returncode == 0, f"curl exited with {out.returncode}: {out.stderr}"
    return tuple(out.stdout.rsplit("\n", 1)[1].split(" "))


def auth(tls: TlsStack) -> str:
    return f"Authorization: Bearer {tls.key}"


# --- curl ---------------------------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("flag, version", [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_gets_models_over_tls(tls, flag, version):
    out = curl(tls, flag, "-H", auth(tls), f"{tls.url}/v1/models")
    assert status_and_version(out) == ("200", version)
    body = json.loads(out.stdout.rsplit("\n", 1)[0])
    assert body["data"][0]["id"] == MODEL


@needs_curl
def test_curl_without_a_key_gets_401_over_tls(tls):
    out = curl(tls, "--http2", "-D", "-", f"{tls.url}/v1/models")
    assert status_and_version(out) == ("401", "2")
    assert 'www-authenticate: Bearer realm="keygate"' in out.stdout


@needs_curl
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_tls_1_0_and_1_1_are_refused_by_the_server(tls, version):
    out = curl(tls, "-v", f"--tlsv{version}", "--tls-max", version, "--ciphers", OLD_TLS_CIPHERS, f"{tls.url}/health")
    assert out.returncode == 35, f"curl exited with {out.returncode}, not 35 (TLS handshake failed):\n{out.stderr}"
    # curl did offer the old version, and the refusal is an alert that came from keygate.
    assert f"TLSv{version} (OUT), TLS handshake, Client hello" in out.stderr, out.stderr
    assert f"TLSv{version} (IN), TLS alert" in out.stderr, out.stderr


@needs_curl
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tls_1_2_and_1_3_are_accepted(tls, version):
    # The same flags as the refused versions' test: only the version differs.
    out = curl(tls, f"--tlsv{version}", "--tls-max", version, "--ciphers", OLD_TLS_CIPHERS, f"{tls.url}/health")
    assert status_and_version(out)[0] == "200"


@needs_curl
def test_plaintext_http_on_the_tls_port_gets_no_http_response(tls):
    out = curl(tls, f"http://{HOST}:{tls.port}/health")
    assert out.returncode != 0
    assert out.stdout.endswith("000 0"), out.stdout

    with socket.create_connection(("127.0.0.1", tls.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    # Nothing, or a TLS alert record (content type 21); never an HTTP status line.
    assert not reply.startswith(b"HTTP/"), reply
    assert reply == b"" or reply[0] == 21, reply


@needs_curl
def test_redirect_listener_answers_308_to_the_https_url(tls):
    target = "/v1/models?limit=1"
    out = run(
        [CURL, "-sS", "--max-time", CURL_MAX_TIME_S, "-o", os.devnull, "-w", "%{http_code} %{redirect_url}",
         "-H", auth(tls), f"{tls.redirect_url}{target}"]
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"308 https://{HOST}:{tls.port}{target}"


@needs_curl
def test_curl_follows_the_redirect_to_the_probe_over_tls(tls):
    out = run(
        [CURL, "-sS", "-L", "--max-time", CURL_MAX_TIME_S, "--cacert", str(tls.ca), "-o", os.devnull,
         "-w", "%{http_code} %{num_redirects} %{url_effective}", f"{tls.redirect_url}/health"]
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"200 1 https://{HOST}:{tls.port}/health"


# --- httpx and the openai client ----------------------------------------------------------------


@pytest.mark.parametrize("http2, version", [(True, "HTTP/2"), (False, "HTTP/1.1")])
def test_httpx_over_tls(tls, http2, version):
    with httpx.Client(base_url=tls.url, verify=trusting(tls.ca), http2=http2, timeout=30) as c:
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {tls.key}"})
        assert r.status_code == 200, r.text
        assert r.http_version == version
        assert r.json()["data"][0]["id"] == MODEL
        refused = c.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"


def test_httpx_gets_the_redirect_from_the_plain_listener(tls):
    r = httpx.get(f"{tls.redirect_url}/v1/models", headers={"Authorization": f"Bearer {tls.key}"}, timeout=30)
    assert r.status_code == 308
    assert r.headers["location"] == f"https://{HOST}:{tls.port}/v1/models"


@pytest.mark.parametrize("http2, version", [(True, "HTTP/2"), (False, "HTTP/1.1")])
def test_openai_streams_a_chat_completion_over_tls(tls, http2, version):
    http_client = httpx.Client(verify=trusting(tls.ca), http2=http2, timeout=30)
    with openai.OpenAI(base_url=f"{tls.url}/v1", api_key=tls.key, max_retries=0, http_client=http_client) as c:
        arrivals = []
        create = c.chat.completions.with_streaming_response.create
        with create(model=MODEL, messages=STREAM_PROMPT, stream=True) as response:
            assert response.http_version == version
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert "".join(text for _, text in arrivals) == STREAM_TEXT
    assert len(arrivals) == STREAM_PIECES
    # The origin spaces its chunks 50 ms apart: buffered by the TLS layer, they would arrive together.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.1, "content chunks arrived together"
