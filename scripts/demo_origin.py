"""A stand-in for an OpenAI-compatible model server, standard library only, to try keygate
against: /health, /v1/models, and /v1/chat/completions (with "stream": true as SSE).

Like a real origin behind keygate, it refuses any request without the shared secret.
Usage: SHARED_SECRET=... python3 scripts/demo_origin.py [PORT]   (default 8000, binds 127.0.0.1)
"""

import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ["SHARED_SECRET"].encode()


class Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body, content_type="application/json"):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _came_through_keygate(self):
        sent = self.headers.get("x-shared-secret", "").encode()
        if hmac.compare_digest(sent, SECRET):
            return True
        self._send(401, {"error": {"message": "not through keygate", "type": "authentication_error"}})
        return False

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            return self._send(200, {"status": "ok"})
        if not self._came_through_keygate():
            return
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "demo", "object": "model"}]})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        request = json.loads(self.rfile.read(length) or b"{}")
        if not self._came_through_keygate():
            return
        words = ["Hello", " from", " the", " demo", " origin", "."]
        if not request.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return self._send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for word in words:
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
            time.sleep(0.2)
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, text):
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    ThreadingHTTPServer(("127.0.0.1", port), Origin).serve_forever()
