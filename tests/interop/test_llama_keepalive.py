"""Keep-alive through keygate to llama-server, which closes its connection after every
stream without `connection: close`. keygate must not lose the next request in that closed
connection: a client that alternates streamed and plain completions on one keep-alive
connection, sending each as soon as the last has ended (http.client, no retries), gets 200
for every one.
"""

import http.client
import json
from urllib.parse import urlsplit

from llama_fixture import llama_server, llama_server_bin, tiny_model  # noqa: F401 (fixtures)
from test_llama import PROMPT, gate  # noqa: F401 (gate: a fixture)

REQUESTS = 300
TIMEOUT_S = 30


def test_alternating_streams_and_completions_on_one_connection_all_succeed(gate):  # noqa: F811
    url = urlsplit(gate.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    headers = {"authorization": f"Bearer {gate.key}", "content-type": "application/json"}
    statuses = []
    try:
        for i in range(REQUESTS):
            body = {"model": gate.llama.model, "messages": PROMPT, "max_tokens": 4, "stream": i % 2 == 0}
            connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    assert statuses == [200] * REQUESTS
