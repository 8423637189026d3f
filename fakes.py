"""Strict fake Mailgun and SendGrid servers for smsp's tests (standard library only).

Each fake is a real HTTP server on 127.0.0.1, port 0, running in background threads. It checks
requests as strictly as the real API does (the wire contracts in PROVIDERS.md, sections 1, 2, 3
and 6), records every request, and can be scripted to misbehave::

    with FakeMailgun(domain="mg.example.com", api_key="mg-secret") as mg:
        mg.script(Status(503), ResetBeforeResponse())   # first two requests fail, then normal
        ...point the code under test at mg.url...
        assert mg.wait_for_hits(3)
        assert mg.accepted[0]["to"] == ["rcpt@example.org"]

Rules callers may rely on:

- Every request that arrives in full is recorded (``requests``, ``hits``) *before* any scripted
  behaviour runs, so a ``Hang`` or a reset still counts.
- A scripted behaviour is popped per request, FIFO; with an empty script the fake answers
  normally (strict checks, then success). Requests whose framing is broken (411 for a POST with
  neither Content-Length nor chunked encoding, 400 for a bad length or chunk) are answered at
  once with an nginx HTML page and ``Connection: close``, are recorded, and do not consume the
  script.
- ``Recorded.status`` and ``accepted`` are updated *before* the response is written, so once a
  client has read a response the fake's state already reflects it. A message counts as accepted
  when the fake commits to a 2xx status line, even if the body is then dripped or cut by a reset
  (that is the "provider queued it but the answer was lost" case).
- Every response carries Content-Length and a Content-Type. With ``keep_alive=True`` connections
  are persistent (HTTP/1.1) unless the client sends ``Connection: close``; with ``keep_alive=False``
  every response says ``Connection: close`` and the socket is closed.
- The fakes never print to stderr for client disconnects. A bug inside a fake (an exception that
  is not an ``OSError``) is still printed by ``socketserver``.
- All public methods are thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import http
import http.server
import itertools
import json
import re
import secrets
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Self

__all__ = [
    "Behaviour",
    "CloseWithoutResponse",
    "Delay",
    "Drip",
    "FakeMailgun",
    "FakeSendGrid",
    "FilePart",
    "Form",
    "Hang",
    "Malformed2xx",
    "Recorded",
    "ResetBeforeResponse",
    "ResetMidBody",
    "Status",
]

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html"

# ---------------------------------------------------------------- scripted behaviours


@dataclass(frozen=True)
class Status:
    """Answer with ``code``.

    A non-2xx code is answered whatever the request looks like; with ``body=None`` the body (and
    headers such as Retry-After or X-RateLimit-*) is the provider's real one for that code. A 2xx
    code still runs the strict checks and, if they pass, gives the provider's normal success reply
    with this status code. ``body`` (str, bytes, or a dict/list sent as JSON) replaces the default
    body; ``headers`` are added to, or replace, the default headers.
    """

    code: int
    body: str | bytes | dict[str, Any] | list[Any] | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Delay:
    """Sleep ``seconds`` before the status line, then behave normally. close() cuts it short."""

    seconds: float


@dataclass(frozen=True)
class Drip:
    """Send the status line and headers at once, then ``chunk`` body bytes every ``interval`` s.

    The response is the normal one (an error if the strict checks fail). A SendGrid success is
    given a short JSON body, since its real 202 body is empty.
    """

    interval: float = 0.05
    chunk: int = 1


@dataclass(frozen=True)
class ResetBeforeResponse:
    """Send nothing and close with SO_LINGER (1, 0): the client gets a TCP RST."""


@dataclass(frozen=True)
class ResetMidBody:
    """Send the status line, headers (full Content-Length) and half the body, then a TCP RST.

    On Linux the client reads the status and headers normally (bytes received before the RST are
    still delivered) and then gets ``ConnectionResetError`` while reading the body.
    """


@dataclass(frozen=True)
class Hang:
    """Never answer; the connection is closed only when the fake is closed."""


@dataclass(frozen=True)
class CloseWithoutResponse:
    """Close the connection cleanly (FIN) without writing anything: ``RemoteDisconnected``."""


@dataclass(frozen=True)
class Malformed2xx:
    """If the strict checks pass, answer a broken success that still counts as accepted.

    Mailgun: 200 with a text/html body that is not JSON. SendGrid: 202 without X-Message-Id.
    """


Behaviour = (Status | Delay | Drip | ResetBeforeResponse | ResetMidBody | Hang
             | CloseWithoutResponse | Malformed2xx)

# ---------------------------------------------------------------- records and responses


@dataclass
class Recorded:
    """One request as the fake received it.

    ``headers`` has lower-case names (repeated headers joined with ", "). ``fields`` is the parsed
    form for Mailgun (a ``Form``: ``dict[str, list[str]]`` as ``parse_qs`` gives, plus the file
    parts in ``files``) or the parsed JSON for SendGrid, None if the body could not be parsed.
    ``status`` is the status the fake answered, None while it is still deciding or when the
    behaviour answered no status (reset, close, hang).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    fields: Any
    status: int | None = None


@dataclass(frozen=True)
class _Response:
    """A complete response the handler will write (possibly slowly or partially)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None,
                   ) -> _Response:
    return _Response(status, {"Content-Type": JSON, **(headers or {})},
                     json.dumps(payload).encode())


def _merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated with ``extra``, header names compared case-insensitively."""
    lowered = {name.lower() for name in extra}
    merged = {k: v for k, v in base.items() if k.lower() not in lowered}
    merged.update(extra)
    return merged


def _custom_body(body: str | bytes | dict[str, Any] | list[Any]) -> tuple[bytes, str]:
    """Encode a ``Status.body`` and guess its Content-Type."""
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode(), JSON
    raw = body.encode() if isinstance(body, str) else body
    try:
        json.loads(raw)
    except ValueError:
        return raw, TEXT
    return raw, JSON


def _phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Error"


_NGINX_PAGE = ("<html>\r\n<head><title>{0}</title></head>\r\n<body>\r\n<center><h1>{0}</h1>"
               "</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


def _nginx(code: int) -> _Response:
    """An nginx error page, as the front proxies of both providers send."""
    title = f"{code} {'Request Entity Too Large' if code == 413 else _phrase(code)}"
    return _Response(code, {"Content-Type": HTML}, _NGINX_PAGE.format(title).encode())


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


# Addresses: `local@domain` or `Name <local@domain>`; the domain needs at least one dot.
_ATOM = r'[^\s@<>(),;:"\[\]\\]+'
_LABEL = r'[^\s@<>(),;:"\[\]\\.]+'
_BARE = rf"{_ATOM}@{_LABEL}(?:\.{_LABEL})+"
_BARE_ADDRESS = re.compile(_BARE)
_NAMED_ADDRESS = re.compile(rf'(?:{_BARE}|(?:"[^"]*"\s*|[^<>"]*)<\s*{_BARE}\s*>)')


def _split_addresses(value: str) -> list[str]:
    """Split a comma-separated address list, ignoring commas in quotes or angle brackets."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    depth = 0
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "<>":
            depth = max(0, depth + (1 if ch == "<" else -1))
        elif ch == "," and not quoted and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


# ---------------------------------------------------------------- the HTTP machinery


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that reports accepted sockets to its fake and wraps TLS per thread."""

    daemon_threads = True
    request_queue_size = 128  # tests open many connections at once
    block_on_close = True  # server_close() joins every handler thread

    def __init__(self, fake: _FakeProvider, ssl_context: ssl.SSLContext | None) -> None:
        self.fake = fake
        self.ssl_context = ssl_context
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.ssl_context is not None:
            # The handshake runs in the handler thread, so a silent client cannot stall accept().
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        self.fake._opened(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        self.fake._forget(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # resets, broken pipes, TLS failures: part of the job, not news
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads a whole request, has the fake record it, and applies the scripted behaviour."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # dripped bytes must leave one by one
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def version_string(self) -> str:
        return "nginx"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        fake = self.server.fake
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body, framing_error = self._read_body(headers)
        if body is None:
            return
        scripted = framing_error is None
        rec, generation, behaviour = fake._record(self.command, self.path, headers, body,
                                                  scripted=scripted)
        if framing_error is not None:
            self.close_connection = True
            response = fake._finish(_nginx(framing_error))  # the front proxy answers
            fake._commit(rec, generation, response)
            self._write(response)
            return
        self._apply(rec, generation, behaviour)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    def _read_body(self, headers: Mapping[str, str]) -> tuple[bytes | None, int | None]:
        """The request body and a framing error status (411/400), or (None, None) on EOF."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length = headers.get("content-length")
        if length is None:
            return b"", (411 if self.command in ("POST", "PUT", "PATCH") else None)
        if not length.strip().isdigit():
            return b"", 400
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True
            return None, None
        return body, None

    def _read_chunked(self) -> tuple[bytes | None, int | None]:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            if not line:
                self.close_connection = True
                return None, None
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return b"", 400
            if size == 0:
                break
            chunk = self.rfile.read(size + 2)  # data and its CRLF
            if len(chunk) < size + 2:
                self.close_connection = True
                return None, None
            parts.append(chunk[:size])
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts), None

    def _apply(self, rec: Recorded, generation: int, behaviour: Behaviour | None) -> None:
        fake = self.server.fake
        if isinstance(behaviour, ResetBeforeResponse):
            self._reset()
            return
        if isinstance(behaviour, CloseWithoutResponse):
            self.close_connection = True
            return
        if isinstance(behaviour, Hang):
            fake._stop.wait()
            self.close_connection = True
            return
        if isinstance(behaviour, Delay) and fake._stop.wait(behaviour.seconds):
            self.close_connection = True
            return
        response = fake._decide(rec, behaviour)
        fake._commit(rec, generation, response)
        if isinstance(behaviour, Drip):
            self._write(response, drip=behaviour)
        elif isinstance(behaviour, ResetMidBody):
            self._write(response, cut=True)
        else:
            self._write(response)

    def _write(self, response: _Response, drip: Drip | None = None, cut: bool = False) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection or not self.server.fake.keep_alive:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()
        body = b"" if self.command == "HEAD" else response.body
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self._reset()
        elif drip is not None:
            step = max(1, drip.chunk)
            for start in range(0, len(body), step):
                if self.server.fake._stop.wait(drip.interval):
                    self.close_connection = True
                    return
                self.wfile.write(body[start:start + step])
        else:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close the socket so that the kernel sends RST instead of FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket is only really closed once its makefile() reader lets go of it.
        self.rfile.close()
        self.connection.close()


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        # socket.socket.shutdown, not SSLSocket.shutdown: no TLS state is touched from here.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------- the fakes


def json_body(body: bytes) -> Any:
    """A request body as JSON, None when it is not UTF-8 JSON (the JSON fakes' _parse)."""
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        return None


class _FakeProvider:
    """Shared state and lifecycle of a fake provider; subclasses supply the HTTP contract.

    Subclasses implement ``_parse`` (body to ``Recorded.fields``), ``_strict`` (normal answer),
    ``_canned`` (real answer for a status code), ``_malformed`` (broken success) and may override
    ``_with_body`` (success body used when dripping or cutting) and ``_extra_headers``.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None, keep_alive: bool,
                 max_body: int) -> None:
        self.keep_alive = keep_alive
        self.max_body = max_body
        self._lock = threading.Lock()
        self._hit = threading.Condition(self._lock)
        self._requests: list[Recorded] = []
        self._accepted: list[Any] = []
        self._script: deque[Behaviour] = deque()
        self._connections = 0
        self._generation = 0  # bumped by reset(), so late answers to older requests are dropped
        self._open: set[socket.socket] = set()
        self._closed = False
        self._stop = threading.Event()
        self._server = _Server(self, ssl_context)
        port = self._server.server_address[1]
        self.url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02},
                                        name=f"{type(self).__name__}:{port}", daemon=True)
        self._thread.start()

    # -- public API

    @property
    def requests(self) -> list[Recorded]:
        """Snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def accepted(self) -> list[Any]:
        """Snapshot of the parsed messages answered with a 2xx, in order."""
        with self._lock:
            return list(self._accepted)

    @property
    def hits(self) -> int:
        """Number of requests received so far."""
        with self._lock:
            return len(self._requests)

    @property
    def connections(self) -> int:
        """Number of TCP connections accepted so far."""
        with self._lock:
            return self._connections

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each incoming request pops one (FIFO)."""
        with self._lock:
            self._script.extend(behaviours)

    def reset(self) -> None:
        """Forget requests, accepted messages, the script and the connection count."""
        with self._lock:
            self._requests.clear()
            self._accepted.clear()
            self._script.clear()
            self._connections = 0
            self._generation += 1

    def wait_for_hits(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests have been received; False on timeout."""
        with self._hit:
            return self._hit.wait_for(lambda: len(self._requests) >= n, timeout)

    def refuse(self) -> None:
        """Stop listening, as if the process died: new connections get ECONNREFUSED.

        Open connections are shut down too (a pooled client must not keep being served). A
        pending ``Hang`` still lasts until close(). ``url`` keeps its port number.
        """
        with self._lock:
            if self._closed:
                return
            sockets = list(self._open)
        self._server.shutdown()
        self._server.socket.close()
        for sock in sockets:
            _shutdown_quietly(sock)

    def close(self) -> None:
        """Stop the server, release every Hang/Delay/Drip and join all threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sockets = list(self._open)
        self._stop.set()
        self._server.shutdown()
        for sock in sockets:
            _shutdown_quietly(sock)
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} hits={self.hits}>"

    # -- bookkeeping used by the server and handler

    def _opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            self._open.add(sock)
            closing = self._closed
        if closing:  # accepted while close() was running: do not let it block the join
            _shutdown_quietly(sock)

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes, *,
                scripted: bool) -> tuple[Recorded, int, Behaviour | None]:
        rec = Recorded(method, path, headers, body, self._parse(headers, body))
        with self._hit:
            self._requests.append(rec)
            behaviour = self._script.popleft() if scripted and self._script else None
            generation = self._generation
            self._hit.notify_all()
        return rec, generation, behaviour

    def _commit(self, rec: Recorded, generation: int, response: _Response) -> None:
        with self._lock:
            rec.status = response.status
            if response.ok and generation == self._generation:
                self._accepted.append(rec.fields)

    def _decide(self, rec: Recorded, behaviour: Behaviour | None) -> _Response:
        """The response for a recorded request under a (non-socket) behaviour."""
        if isinstance(behaviour, Status) and not 200 <= behaviour.code < 300:
            response = self._canned(behaviour.code)
        else:
            response = self._strict(rec)
            if not response.ok:
                return self._finish(response)
            if isinstance(behaviour, Status):
                response = replace(response, status=behaviour.code)
            elif isinstance(behaviour, Malformed2xx):
                response = self._malformed()
            elif isinstance(behaviour, (Drip, ResetMidBody)):
                response = self._with_body(response)
        if isinstance(behaviour, Status):
            if behaviour.body is not None:
                body, content_type = _custom_body(behaviour.body)
                headers = _merge_headers(response.headers, {"Content-Type": content_type})
                response = replace(response, headers=headers, body=body)
            if behaviour.headers:
                response = replace(response,
                                   headers=_merge_headers(response.headers, behaviour.headers))
            if behaviour.code in (204, 304):
                response = replace(response, body=b"")
        return self._finish(response)

    def _finish(self, response: _Response) -> _Response:
        headers = _merge_headers(self._extra_headers(response.status), response.headers)
        return replace(response, headers=headers)

    # -- provider contract (overridden)

    def _parse(self, headers: Mapping[str, str], body: bytes) -> Any:
        raise NotImplementedError

    def _strict(self, rec: Recorded) -> _Response:
        raise NotImplementedError

    def _canned(self, code: int) -> _Response:
        raise NotImplementedError

    def _malformed(self) -> _Response:
        raise NotImplementedError

    def _with_body(self, response: _Response) -> _Response:
        return response

    def _extra_headers(self, status: int) -> dict[str, str]:
        return {}


# ---------------------------------------------------------------- Mailgun

_MG_PATH = re.compile(r"/v3/([^/]+)/messages")
_MG_BODY_FIELDS = ("text", "html", "amp-html", "template")
_MG_NEED_BODY = "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified"


def _mg_message(code: int, message: str, headers: Mapping[str, str] | None = None) -> _Response:
    return _json_response(code, {"message": message}, headers)


@dataclass(frozen=True)
class FilePart:
    """One file part of a multipart form, exactly as the fake received it."""

    name: str
    filename: str
    content_type: str
    content: bytes


class Form(dict[str, list[str]]):
    """A parsed Mailgun form: field name to its values, as ``parse_qs`` gives (a file part's
    value is its filename), and ``files``, every file part in order (multipart only)."""

    def __init__(self, fields: Mapping[str, list[str]] | None = None,
                 files: list[FilePart] | None = None) -> None:
        super().__init__(fields or {})
        self.files: list[FilePart] = files or []


def _parse_form(content_type: str, body: bytes) -> Form | None:
    """Parse a urlencoded or multipart/form-data body strictly as UTF-8; None if it cannot."""
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media == "application/x-www-form-urlencoded":
            return Form(urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True,
                                              encoding="utf-8", errors="strict"))
        if media == "multipart/form-data":
            return _parse_multipart(content_type, body)
    except UnicodeDecodeError:
        return None
    return None


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 7230 tchar
_PARAMETER = re.compile(rf'\s*;\s*({_TOKEN})=(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*')
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")  # RFC 2046
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")


def _header_parameters(value: str) -> tuple[str, dict[str, str]] | None:
    """A header value's first word (lower case) and its parameters, each a token or a
    quoted-string (unescaped); None if anything is malformed or repeated."""
    first = value.split(";", 1)[0]
    parameters: dict[str, str] = {}
    at = len(first)
    while at < len(value):
        found = _PARAMETER.match(value, at)
        if found is None or found.group(1).lower() in parameters:
            return None
        quoted = found.group(2)
        parameters[found.group(1).lower()] = (found.group(3) if quoted is None
                                              else re.sub(r"\\(.)", r"\1", quoted))
        at = found.end()
    return first.strip().lower(), parameters


def _form_part(chunk: bytes) -> tuple[str, str | None, str, bytes] | None:
    """One part's (name, filename or None, Content-Type, payload); None if malformed.

    Only Content-Disposition (form-data, with a name) and Content-Type are allowed (RFC
    7578 4.7 deprecates Content-Transfer-Encoding): the payload is the raw bytes."""
    head, found, payload = chunk.partition(b"\r\n\r\n")
    if not found:
        return None
    headers: dict[str, str] = {}
    for line in head.decode("utf-8").split("\r\n"):
        name, colon, value = line.partition(":")
        key = name.lower()
        if not colon or key not in ("content-disposition", "content-type") or key in headers:
            return None
        headers[key] = value.strip()
    disposition = _header_parameters(headers.get("content-disposition", ""))
    if disposition is None or disposition[0] != "form-data" or "name" not in disposition[1]:
        return None
    parameters = disposition[1]
    return parameters["name"], parameters.get("filename"), headers.get("content-type", ""), \
        payload


def _parse_multipart(content_type: str, body: bytes) -> Form | None:
    """A multipart/form-data body (RFC 7578): no preamble, CRLF line ends, a closing
    delimiter; text parts strict UTF-8, file parts kept byte for byte."""
    parsed = _header_parameters(content_type)
    boundary = parsed[1].get("boundary", "") if parsed is not None else ""
    if not _BOUNDARY.fullmatch(boundary):
        return None
    delimiter = b"--" + boundary.encode("ascii")
    end = body.find(b"\r\n" + delimiter + b"--")
    if not body.startswith(delimiter + b"\r\n") or end < 0 or \
            body[end + len(delimiter) + 4:] not in (b"", b"\r\n"):
        return None
    form = Form()
    for chunk in body[len(delimiter) + 2:end].split(b"\r\n" + delimiter + b"\r\n"):
        part = _form_part(chunk)
        if part is None:
            return None
        name, filename, media, payload = part
        if filename is None:
            form.setdefault(name, []).append(payload.decode("utf-8"))
        else:
            form.setdefault(name, []).append(filename)
            form.files.append(FilePart(name, filename, media, payload))
    return form


_MG_FILE_FIELDS = ("attachment", "inline")
_MG_OPTIONS_LIMIT = 16 * 1024  # bytes of o:, h:, v: and t: parameters, names included [M1]
_MG_OPTIONS = "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"
_MG_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext


def _mailgun_file_problem(form: Mapping[str, list[str]]) -> str | None:
    """Files only as multipart file parts named attachment or inline (mailgun.js's
    fileKeys), each with a file name and a type/subtype (wording assumed)."""
    files: list[FilePart] = getattr(form, "files", [])
    for name in _MG_FILE_FIELDS:
        if len(form.get(name, [])) != sum(part.name == name for part in files):
            return f"'{name}' parameter must be a file: send it as multipart/form-data"
    for part in files:
        if part.name not in _MG_FILE_FIELDS:
            return f"'{part.name}' parameter is not a file parameter"
        if not part.filename or not _MEDIA_TYPE.fullmatch(part.content_type):
            return f"'{part.name}' file needs a file name and a Content-Type"
    return None


def _mailgun_option_problem(form: Mapping[str, list[str]]) -> str | None:
    """The documented options limits [M1]: 16 KB of options, at most 3 tags of at most 128
    ASCII characters each; h: names RFC 5322 field names, values one line (wording assumed
    but for the 16 KB one, which is the document's)."""
    size = sum(len((name + value).encode()) for name, values in form.items()
               if name[:2] in ("o:", "h:", "v:", "t:") for value in values)
    if size > _MG_OPTIONS_LIMIT:
        return _MG_OPTIONS
    tags = form.get("o:tag", [])
    if len(tags) > 3 or not all(tag.isascii() and 0 < len(tag) <= 128 for tag in tags):
        return "'o:tag' is invalid: at most 3 tags of 1-128 ASCII characters"
    for name, values in form.items():
        if name.startswith("h:") and (not _MG_FIELD_NAME.fullmatch(name[2:]) or any(
                "\r" in value or "\n" in value for value in values)):
            return f"'{name}' is not a valid header"
    return None


def _mailgun_problem(fields: Mapping[str, list[str]]) -> str | None:
    """Mailgun's 400 message for the first problem in ``fields``, in Mailgun's order."""

    def present(name: str, blank_counts: bool = False) -> bool:
        values = fields.get(name, [])
        return any(value if blank_counts else value.strip() for value in values)

    for name in ("from", "to"):
        if not present(name):
            return f"{name} parameter is missing"
    if "subject" not in fields:
        return "subject parameter is missing"
    # A body field counts when it is a non-empty string, even if it is only white space
    # (an assumption: Mailgun documents "specified", not "non-blank").
    if not any(present(name, blank_counts=True) for name in _MG_BODY_FIELDS):
        return _MG_NEED_BODY
    for name in ("from", "to", "cc", "bcc"):
        for value in fields.get(name, []):
            addresses = [value.strip()] if name == "from" else _split_addresses(value)
            if not addresses or not all(_NAMED_ADDRESS.fullmatch(a) for a in addresses):
                return f"'{name}' parameter is not a valid address. please check documentation"
    return _mailgun_file_problem(fields) or _mailgun_option_problem(fields)


class FakeMailgun(_FakeProvider):
    """Strict fake of Mailgun's ``POST /v3/<domain>/messages``.

    Checks, in order: body size (413 nginx HTML), path and method (404 nginx HTML), Authorization
    ``Basic base64("api:<api_key>")`` (401 ``Forbidden``), domain (404 "Domain not found"), a form
    body (urlencoded or multipart/form-data parsed to the byte, strict UTF-8; anything else, JSON
    included, parses to no fields and gets "from parameter is missing"), then
    from/to/subject/text|html|amp-html|template and the address syntax of from, to, cc and bcc
    (400 with Mailgun's wording), then files (only as multipart parts named ``attachment`` or
    ``inline``, each with a file name and a type) and options (16 KB in all, at most 3 ASCII
    ``o:tag`` values of at most 128 characters, ``h:`` names RFC 5322 field names with one-line
    values). Success is 200 JSON with an id
    ``<YYYYmmddHHMMSS.N@domain>``. ``accepted`` holds the parsed forms (``dict[str, list[str]]``).
    """

    def __init__(self, domain: str = "mg.example.com", api_key: str = "mg-secret",
                 ssl_context: ssl.SSLContext | None = None, keep_alive: bool = True,
                 max_body: int = 25 * 1024 * 1024) -> None:
        self.domain = domain
        self.api_key = api_key
        self._ids = itertools.count(1)
        credentials = base64.b64encode(f"api:{api_key}".encode()).decode()
        self._authorization = f"Basic {credentials}"
        super().__init__(ssl_context=ssl_context, keep_alive=keep_alive, max_body=max_body)

    def _parse(self, headers: Mapping[str, str], body: bytes) -> Any:
        return _parse_form(headers.get("content-type", ""), body)

    def _strict(self, rec: Recorded) -> _Response:
        if len(rec.body) > self.max_body:
            return _nginx(413)
        match = _MG_PATH.fullmatch(urllib.parse.urlsplit(rec.path).path)
        if rec.method != "POST" or match is None:
            return _nginx(404)
        if rec.headers.get("authorization") != self._authorization:
            return self._canned(401)
        if match.group(1) != self.domain:
            return _mg_message(404, f"Domain not found: {match.group(1)}")
        if rec.fields is None and _media_type(rec.headers) in (
                "application/x-www-form-urlencoded", "multipart/form-data"):
            return _mg_message(400, "Invalid form body: it must be UTF-8 form data")
        problem = _mailgun_problem(rec.fields or {})
        if problem is not None:
            return _mg_message(400, problem)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
        message_id = f"<{stamp}.{next(self._ids)}@{self.domain}>"
        return _json_response(200, {"id": message_id, "message": "Queued. Thank you."})

    def _canned(self, code: int) -> _Response:
        if code == 401:
            return _Response(401, {"Content-Type": TEXT,
                                   "WWW-Authenticate": 'Basic realm="MG API"'}, b"Forbidden")
        if code in (411, 413):
            return _nginx(code)
        messages = {
            400: "'to' parameter is not a valid address. please check documentation",
            403: (f"Domain {self.domain} is not allowed to send: Sandbox subdomains are for test "
                  "purposes only. Please add your own domain or add the address to authorized "
                  "recipients in Account Settings."),
            404: f"Domain not found: {self.domain}",
            429: (f"Domain {self.domain} is not allowed to send: account-requests-per-sec limit "
                  "exceeded, try again after 120 seconds"),
        }
        headers = {"Retry-After": "120"} if code == 429 else None
        return _mg_message(code, messages.get(code, _phrase(code)), headers)

    def _malformed(self) -> _Response:
        return _Response(200, {"Content-Type": HTML}, b"<html>ok</html>")


# ---------------------------------------------------------------- SendGrid

_SG_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
_SG_PERSONALIZATIONS = ("The personalizations field is required and must have at least one "
                        "personalization.")
_SG_TOO_MANY_PERSONALIZATIONS = "The personalizations field may not have more than 1000 items."
_SG_TOO_MANY_RECIPIENTS = "The total number of recipients must be no more than 1000."
_SG_TO = ("The to array is required for all personalization objects, and must have at least one "
          "email object with a valid email address.")
_SG_EMAIL_REQUIRED = "The email parameter is required for every recipient."
_SG_BAD_ADDRESS = "Does not contain a valid address."
_SG_FROM = ("The from object must be provided for every email send. It is an object that requires "
            'the email parameter, but may also contain a name parameter.  e.g. {"email" : '
            '"example@example.com"}  or {"email" : "example@example.com", "name" : "Example '
            'Recipient"}.')
_SG_FROM_ADDRESS = "The from email does not contain a valid address."
_SG_SUBJECT = ("The subject is required. You can get around this requirement if you use a "
               "template with a subject defined or if every personalization has a subject defined.")
_SG_CONTENT = ("Unless a valid template_id is provided, the content parameter is required. There "
               "must be at least one defined content block. We typically suggest both text/plain "
               "and text/html blocks are included, but only one block is required.")
_SG_CONTENT_TYPE = "The content type must be text/plain or text/html."
_SG_CONTENT_VALUE = "The content value must be a string at least one character in length."
_SG_UNVERIFIED = ("The from address does not match a verified Sender Identity. Mail cannot be sent "
                  "until this error is resolved. Visit https://sendgrid.com/docs/for-developers/"
                  "sending-email/sender-identity/ to see the Sender Identity requirements")
_SG_CANNED: dict[int, tuple[str, str | None]] = {
    400: (_SG_TO, "personalizations.0.to"),
    401: ("The provided authorization grant is invalid, expired, or revoked", None),
    403: (_SG_UNVERIFIED, "from"),
    404: ("not found", None),
    405: ("method not allowed", None),
    406: ("Missing Accept header", None),
    411: ("length required", None),
    413: ("content too large", None),
    415: ("Content-Type should be application/json.", None),
    429: ("too many requests", None),
    500: ("internal server error", None),
    503: ("The SendGrid v3 Web API is not available.", None),
}
_SG_RATE_LIMIT = 600


def _sg_error(message: str, field: str | None) -> dict[str, Any]:
    anchor = None if field is None else re.sub(r"\.\d+", "", field)
    return {"message": message, "field": field,
            "help": None if anchor is None else _SG_HELP + anchor}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
    return names.get(type(value), "null")


def _invalid_type(expected: str, value: Any, field: str) -> dict[str, Any]:
    return _sg_error(f"Invalid type. Expected: {expected}, given: {_json_type(value)}.", field)


def _nonempty_string(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _sg_recipients(people: Any, where: str, required: bool) -> list[dict[str, Any]]:
    if not isinstance(people, list) or (required and not people):
        return [_sg_error(_SG_TO, where) if required else _invalid_type("array", people, where)]
    problems = []
    for m, person in enumerate(people):
        if not isinstance(person, dict):
            problems.append(_invalid_type("object", person, f"{where}.{m}"))
        elif "email" not in person:
            problems.append(_sg_error(_SG_EMAIL_REQUIRED, f"{where}.{m}.email"))
        elif not isinstance(person["email"], str):
            problems.append(_invalid_type("string", person["email"], f"{where}.{m}.email"))
        elif not _BARE_ADDRESS.fullmatch(person["email"]):
            problems.append(_sg_error(_SG_BAD_ADDRESS, f"{where}.{m}.email"))
    return problems


# Wording from real responses [G4][G7] where there is one; the rest is marked assumed.
_SG_DUPLICATE = ("Each email address in the personalization block should be unique between to, "
                 "cc, and bcc. We found the first duplicate instance of [{0}] in the {1} field.")
_SG_CONTENT_ORDER = ("Following RFC 1341, section 7.2, if either text/html or text/plain are to be "
                     "sent in your email: text/plain needs to be first, followed by text/html, "
                     "followed by any other content.")
_SG_CONTENT_TWICE = "If present, text/plain and text/html may only be provided once."  # assumed
_SG_BASE64 = "The attachment content must be base64 encoded."
_SG_FILENAME = "The attachment filename parameter is required."  # assumed
_SG_ATTACHMENT_TYPE = "The attachment type cannot contain ';', or CRLF characters."  # assumed
_SG_DISPOSITION = "The disposition of your attachment can be either 'inline' or 'attachment'."
_SG_CONTENT_ID = "The content_id parameter is required if the disposition is 'inline'."  # assumed
_SG_REPLY_TO = "The reply_to email does not contain a valid address."  # assumed
_SG_RESERVED = "The header {0} is reserved and cannot be set."  # assumed
_SG_CATEGORIES = "The categories may hold at most 10 unique names of at most 255 characters."
_SG_CUSTOM_ARGS = "The custom_args may not exceed 10,000 bytes."  # assumed
# The document: "You may not override the following headers".
_SG_RESERVED_HEADERS = frozenset({"x-sg-id", "x-sg-eid", "received", "dkim-signature",
                                  "content-type", "content-transfer-encoding", "to", "from",
                                  "subject", "reply-to", "cc", "bcc"})


def _sg_address(party: Any, where: str, missing: str, invalid: str) -> list[dict[str, Any]]:
    """A from or reply_to object: {"email", "name"?}."""
    if not isinstance(party, dict):
        return [_sg_error(missing, where)]
    if "email" not in party:
        return [_sg_error(missing, f"{where}.email")]
    if not isinstance(party["email"], str):
        return [_invalid_type("string", party["email"], f"{where}.email")]
    if not _BARE_ADDRESS.fullmatch(party["email"]):
        return [_sg_error(invalid, f"{where}.email")]
    if "name" in party and not isinstance(party["name"], str):
        return [_invalid_type("string", party["name"], f"{where}.name")]
    return []


def _sg_custom_args(args: Any, where: str) -> list[dict[str, Any]]:
    """An object of string values, 10,000 bytes at most: what the SDKs send (the document
    types the top-level one a string, but sendgrid-nodejs and -python send an object)."""
    if not isinstance(args, dict):
        return [_invalid_type("object", args, where)]
    problems = [_invalid_type("string", value, f"{where}.{key}")
                for key, value in args.items() if not isinstance(value, str)]
    if not problems and len(json.dumps(args).encode()) > 10_000:
        problems.append(_sg_error(_SG_CUSTOM_ARGS, where))
    return problems


def _sg_personalization(personalization: Any, where: str) -> tuple[list[dict[str, Any]], int]:
    """Problems of one personalization, and how many recipients it has."""
    if not isinstance(personalization, dict):
        return [_invalid_type("object", personalization, where)], 0
    problems: list[dict[str, Any]] = []
    recipients = 0
    seen: set[str] = set()
    for kind in ("to", "cc", "bcc"):
        if kind != "to" and kind not in personalization:
            continue
        people = personalization.get(kind)
        found = _sg_recipients(people, f"{where}.{kind}", required=kind == "to")
        problems += found
        if found or not isinstance(people, list):
            continue
        recipients += len(people)
        for person in people:
            address = person["email"].lower()
            if address in seen and not problems:
                problems.append(_sg_error(_SG_DUPLICATE.format(person["email"], f"{where}.{kind}"),
                                          f"{where}.{kind}"))
            seen.add(address)
    if "custom_args" in personalization:
        problems += _sg_custom_args(personalization["custom_args"], f"{where}.custom_args")
    return problems, recipients


def _sg_personalizations(message: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Problems of the personalizations, and whether every one has a subject."""
    personalizations = message.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        return [_sg_error(_SG_PERSONALIZATIONS, "personalizations")], False
    problems: list[dict[str, Any]] = []
    if len(personalizations) > 1000:
        problems.append(_sg_error(_SG_TOO_MANY_PERSONALIZATIONS, "personalizations"))
    recipients = 0
    every_one_has_subject = True
    for n, personalization in enumerate(personalizations):
        found, count = _sg_personalization(personalization, f"personalizations.{n}")
        problems += found
        recipients += count
        every_one_has_subject &= isinstance(personalization, dict) and \
            _nonempty_string(personalization.get("subject"))
    if recipients > 1000:
        problems.append(_sg_error(_SG_TOO_MANY_RECIPIENTS, "personalizations"))
    return problems, every_one_has_subject


def _sg_content(content: Any, template: bool) -> list[dict[str, Any]]:
    if content is None or content == []:
        return [] if template else [_sg_error(_SG_CONTENT, "content")]
    if not isinstance(content, list):
        return [_invalid_type("array", content, "content")]
    problems = []
    types = []
    for k, block in enumerate(content):
        if not isinstance(block, dict):
            problems.append(_invalid_type("object", block, f"content.{k}"))
            continue
        types.append(block.get("type"))
        if block.get("type") not in ("text/plain", "text/html"):
            problems.append(_sg_error(_SG_CONTENT_TYPE, f"content.{k}.type"))
        if not _nonempty_string(block.get("value")):
            problems.append(_sg_error(_SG_CONTENT_VALUE, f"content.{k}.value"))
    if types.count("text/plain") > 1 or types.count("text/html") > 1:
        problems.append(_sg_error(_SG_CONTENT_TWICE, "content"))
    elif "text/plain" in types and "text/html" in types and types.index("text/plain") > 0:
        problems.append(_sg_error(_SG_CONTENT_ORDER, "content"))
    return problems


def _sg_attachment(attachment: Any, where: str) -> list[dict[str, Any]]:
    """The document's attachment object, plus the real API's strict base64 [G7]."""
    if not isinstance(attachment, dict):
        return [_invalid_type("object", attachment, where)]
    problems = []
    content = attachment.get("content")
    try:
        if not _nonempty_string(content):
            raise ValueError("empty")
        binascii.a2b_base64(content, strict_mode=True)
    except ValueError:
        problems.append(_sg_error(_SG_BASE64, f"{where}.content"))
    if not isinstance(attachment.get("filename"), str):
        problems.append(_sg_error(_SG_FILENAME, f"{where}.filename"))
    kind = attachment.get("type", "x/y")
    if not _nonempty_string(kind) or any(ch in kind for ch in ";\r\n"):
        problems.append(_sg_error(_SG_ATTACHMENT_TYPE, f"{where}.type"))
    disposition = attachment.get("disposition", "attachment")
    if disposition not in ("inline", "attachment"):
        problems.append(_sg_error(_SG_DISPOSITION, f"{where}.disposition"))
    content_id = attachment.get("content_id")
    if (content_id is not None and not isinstance(content_id, str)) or \
            (disposition == "inline" and not _nonempty_string(content_id)):
        problems.append(_sg_error(_SG_CONTENT_ID, f"{where}.content_id"))
    return problems


def _sg_extras(message: dict[str, Any]) -> list[dict[str, Any]]:
    """reply_to, headers, attachments, categories and custom_args, as the document has them."""
    problems: list[dict[str, Any]] = []
    if "reply_to" in message:
        problems += _sg_address(message["reply_to"], "reply_to", _SG_REPLY_TO, _SG_REPLY_TO)
    headers = message.get("headers", {})
    if not isinstance(headers, dict):
        problems.append(_invalid_type("object", headers, "headers"))
    else:
        problems += [_invalid_type("string", value, f"headers.{name}")
                     for name, value in headers.items() if not isinstance(value, str)]
        problems += [_sg_error(_SG_RESERVED.format(name), "headers")
                     for name in headers if name.lower() in _SG_RESERVED_HEADERS]
    attachments = message.get("attachments", [])
    if not isinstance(attachments, list):
        problems.append(_invalid_type("array", attachments, "attachments"))
    else:
        for n, attachment in enumerate(attachments):
            problems += _sg_attachment(attachment, f"attachments.{n}")
    categories = message.get("categories", [])
    if not isinstance(categories, list) or len(categories) > 10 or \
            not all(isinstance(c, str) and len(c) <= 255 for c in categories) or \
            len(set(categories)) != len(categories):
        problems.append(_sg_error(_SG_CATEGORIES, "categories"))
    if "custom_args" in message:
        problems += _sg_custom_args(message["custom_args"], "custom_args")
    return problems


def _sendgrid_problems(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shape problem of a mail/send body, each as a SendGrid error object."""
    template = _nonempty_string(message.get("template_id"))
    problems, every_one_has_subject = _sg_personalizations(message)
    problems += _sg_address(message.get("from"), "from", _SG_FROM, _SG_FROM_ADDRESS)
    subject = message.get("subject")
    if subject is not None and not isinstance(subject, str):
        problems.append(_invalid_type("string", subject, "subject"))
    elif not (template or _nonempty_string(subject) or every_one_has_subject):
        problems.append(_sg_error(_SG_SUBJECT, "subject"))
    problems += _sg_content(message.get("content"), template)
    return problems + _sg_extras(message)


def _accepts_json(accept: str) -> bool:
    return any(item.split(";", 1)[0].strip().lower() == JSON for item in accept.split(","))


class FakeSendGrid(_FakeProvider):
    """Strict fake of SendGrid's ``POST /v3/mail/send``.

    Checks, in order: body size (413), path (404) and method (405), Authorization
    ``Bearer <api_key>`` (401), ``Accept: application/json`` when ``require_accept`` (406),
    Content-Type ``application/json`` (415), a UTF-8 JSON object (400 "Bad Request"), every shape
    rule at once (one 400 listing each problem with its ``field``: the personalizations with their
    to, cc and bcc, no address twice among them; from and reply_to; subject; content, text/plain
    before text/html; headers, none of those SendGrid reserves; attachments with strict base64,
    a filename, a type, a disposition and a content_id when inline; categories; custom_args of
    strings), then the sender against
    ``verified_senders`` (403; None allows any sender). Success is 202 with an empty body and
    ``X-Message-Id``. Every response carries X-RateLimit-Limit/Remaining/Reset. ``accepted``
    holds the parsed JSON bodies.
    """

    def __init__(self, api_key: str = "SG.secret", ssl_context: ssl.SSLContext | None = None,
                 keep_alive: bool = True, verified_senders: set[str] | None = None,
                 require_accept: bool = True, max_body: int = 30 * 1024 * 1024) -> None:
        self.api_key = api_key
        self.require_accept = require_accept
        self.verified_senders = (None if verified_senders is None
                                 else {sender.lower() for sender in verified_senders})
        super().__init__(ssl_context=ssl_context, keep_alive=keep_alive, max_body=max_body)

    def _parse(self, headers: Mapping[str, str], body: bytes) -> Any:
        return json_body(body)

    def _strict(self, rec: Recorded) -> _Response:
        if len(rec.body) > self.max_body:
            return self._canned(413)
        if urllib.parse.urlsplit(rec.path).path != "/v3/mail/send":
            return self._canned(404)
        if rec.method != "POST":
            return self._canned(405)
        if rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._canned(401)
        if self.require_accept and not _accepts_json(rec.headers.get("accept", "")):
            return self._canned(406)
        if not rec.headers.get("content-type", "").lower().startswith(JSON):
            return self._canned(415)
        if not isinstance(rec.fields, dict):
            return _json_response(400, {"errors": [_sg_error("Bad Request", None)]})
        problems = _sendgrid_problems(rec.fields)
        if problems:
            return _json_response(400, {"errors": problems})
        sender = rec.fields["from"]["email"].lower()
        if self.verified_senders is not None and sender not in self.verified_senders:
            return self._canned(403)
        return _Response(202, {"Content-Type": TEXT, "X-Message-Id": secrets.token_urlsafe(16)})

    def _canned(self, code: int) -> _Response:
        message, field_name = _SG_CANNED.get(code, (_phrase(code).lower(), None))
        error = {"field": None, "message": message} if code == 429 else _sg_error(message,
                                                                                  field_name)
        return _json_response(code, {"errors": [error]})

    def _malformed(self) -> _Response:
        return _Response(202, {"Content-Type": TEXT})

    def _with_body(self, response: _Response) -> _Response:
        headers = _merge_headers(response.headers, {"Content-Type": JSON})
        return replace(response, headers=headers, body=b'{"message":"success"}')

    def _extra_headers(self, status: int) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(_SG_RATE_LIMIT),
            "X-RateLimit-Remaining": "0" if status == 429 else str(_SG_RATE_LIMIT - 1),
            "X-RateLimit-Reset": str(int(time.time()) + 60),
        }
