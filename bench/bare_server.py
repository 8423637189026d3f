"""Bare stdlib JSON server: the baseline that bench/run.py compares smsp against.

It is the least a stdlib HTTP/1.1 server can do for ``POST /email``: a
``http.server.ThreadingHTTPServer`` with a ``BaseHTTPRequestHandler`` speaking
HTTP/1.1 keep-alive with TCP_NODELAY, that reads ``Content-Length`` bytes,
``json.loads`` them and answers 200 with a small JSON body, written as status
line + headers + body in one ``write``. No logging.

Run it by hand::

    python bench/bare_server.py --host 127.0.0.1 --port 18090

``GET /healthcheck`` answers 200 so the harness can wait for readiness.
"""

from __future__ import annotations

import argparse
import itertools
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_COUNTER = itertools.count(1)


def _response(status: str, body: bytes) -> bytes:
    """Build a complete HTTP/1.1 response (status line, headers, body) as one buffer."""
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


_HEALTH = _response("200 OK", b'{"status":"ok"}')
_NOT_FOUND = _response("404 Not Found", b'{"error":"not found"}')
_BAD_REQUEST = _response("400 Bad Request", b'{"error":"bad request"}')


class BareHandler(BaseHTTPRequestHandler):
    """Minimal JSON handler: one write per response, no access log."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log."""

    def do_GET(self) -> None:
        self.wfile.write(_HEALTH if self.path == "/healthcheck" else _NOT_FOUND)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        if self.path != "/email":
            self.wfile.write(_NOT_FOUND)
            return
        try:
            payload = json.loads(raw)
        except ValueError:
            self.wfile.write(_BAD_REQUEST)
            return
        if not isinstance(payload, dict):
            self.wfile.write(_BAD_REQUEST)
            return
        body = json.dumps(
            {"status": "sent", "provider": "mock", "message_id": f"mock-{next(_COUNTER)}"},
            separators=(",", ":"),
        ).encode()
        self.wfile.write(_response("200 OK", body))


class BareServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog large enough for the benchmark."""

    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """wrk resets its connections when it stops; that is not worth a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18090)
    args = parser.parse_args(argv)
    with BareServer((args.host, args.port), BareHandler) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
