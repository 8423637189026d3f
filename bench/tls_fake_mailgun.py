"""Local TLS fake of the Mailgun send API, for bench/run.py scenario 2.

A ``ThreadingHTTPServer`` wrapped in TLS (HTTP/1.1 keep-alive) that answers
``POST /v3/<domain>/messages`` like Mailgun does::

    200 {"id": "<n@domain>", "message": "Queued. Thank you."}

It checks HTTP Basic auth (``api:<key>``, when ``--api-key`` is given) and that
``from``, ``to``, ``subject`` and ``text`` or ``html`` are present (urlencoded or
multipart form), answering 401/400 otherwise. Accepted sends are counted;
``GET /count`` returns ``{"accepted": N, "by_to": {...}, "handshakes": H,
"rejected": R}`` so the harness can read how many sends reached the provider
and how many TLS handshakes that took.

The certificate is a throwaway self-signed one made with the ``openssl``
command (CN 127.0.0.1, SAN IP:127.0.0.1 and DNS:localhost); clients trust it
through ``SSL_CERT_FILE=<cert.pem>``. Run it by hand::

    python bench/tls_fake_mailgun.py --port 18443 --cert-dir /tmp/fakemg
    curl --cacert /tmp/fakemg/cert.pem https://127.0.0.1:18443/count

``--cert-dir`` receives cert.pem and key.pem if they are not there yet.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

_MESSAGES_PATH = re.compile(r"^/v3/([^/]+)/messages/?$")


def generate_cert(cert_dir: Path) -> tuple[Path, Path]:
    """Create (or reuse) a self-signed cert/key pair in cert_dir with the openssl command."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    cert, key = cert_dir / "cert.pem", cert_dir / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )
    return cert, key


class Counters:
    """Thread-safe tallies read through GET /count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0
        self.handshakes = 0
        self.by_to: dict[str, int] = {}

    def accept(self, to: str) -> int:
        with self.lock:
            self.accepted += 1
            self.by_to[to] = self.by_to.get(to, 0) + 1
            return self.accepted

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "handshakes": self.handshakes,
                "by_to": dict(self.by_to),
            }


_PART_NAME = re.compile(rb'name="([^"]*)"')


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    """First value of each text field of a multipart/form-data body, file parts skipped.

    A plain split on the boundary rather than the email package, which costs some 40 ms
    for a 1 MiB attachment: the fake must not be what a rich-message benchmark measures.
    """
    boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
    fields: dict[str, str] = {}
    for part in body.split(b"--" + boundary.encode())[1:-1]:
        head, _, payload = part[2:].partition(b"\r\n\r\n")
        found = _PART_NAME.search(head)
        if found is None or b"filename=" in head:
            continue
        name = found.group(1).decode("utf-8", "replace")
        fields.setdefault(name, payload[:-2].decode("utf-8", "replace"))
    return fields


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """First value of each field of an urlencoded or multipart/form-data body."""
    if content_type.startswith("multipart/form-data"):
        return _multipart_fields(content_type, body)
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


class FakeMailgunHandler(BaseHTTPRequestHandler):
    """Mailgun-shaped responses over TLS; the handshake runs in the handler thread."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: FakeMailgunServer

    def setup(self) -> None:
        sock = self.request
        sock.settimeout(30)
        if isinstance(sock, ssl.SSLSocket):
            sock.do_handshake()
            with self.server.counters.lock:
                self.server.counters.handshakes += 1
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        """No access log: it would cost CPU the benchmark wants for the proxy."""

    def _send(self, status: int, payload: dict[str, object]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        reason = self.responses.get(status, ("",))[0]
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        ).encode("ascii")
        self.wfile.write(head + body)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def do_GET(self) -> None:
        if self.path == "/count":
            self._send(200, self.server.counters.snapshot())
        elif self.path == "/healthcheck":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"message": "not found"})

    def do_POST(self) -> None:
        body = self._read_body()
        match = _MESSAGES_PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._send(404, {"message": "not found"})
            return
        counters = self.server.counters
        if self.server.api_key is not None:
            expected = "Basic " + base64.b64encode(f"api:{self.server.api_key}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                with counters.lock:
                    counters.rejected += 1
                self._send(401, {"message": "Forbidden"})
                return
        fields = _form_fields(self.headers.get("Content-Type") or "", body)
        missing = [f for f in ("from", "to", "subject") if not fields.get(f)]
        if not (fields.get("text") or fields.get("html")):
            missing.append("text")
        if missing:
            with counters.lock:
                counters.rejected += 1
            self._send(400, {"message": f"missing parameter(s): {', '.join(missing)}"})
            return
        n = counters.accept(fields["to"])
        domain = match.group(1)
        self._send(200, {"id": f"<{n}@{domain}>", "message": "Queued. Thank you."})


class FakeMailgunServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose accepted sockets are TLS (handshake deferred to the thread)."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        api_key: str | None,
    ) -> None:
        super().__init__(address, FakeMailgunHandler)
        self.context = context
        self.api_key = api_key
        self.counters = Counters()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, addr = self.socket.accept()
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, addr

    def handle_error(self, request: object, client_address: object) -> None:
        """Handshake failures and resets are the client's business; stay quiet."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18443)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--api-key", default=None, help="expected Mailgun API key (Basic api:KEY)")
    args = parser.parse_args(argv)
    cert, key = generate_cert(args.cert_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with FakeMailgunServer((args.host, args.port), context, args.api_key) as server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
