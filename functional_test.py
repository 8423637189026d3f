"""Black-box functional tests of smsp over HTTP or HTTPS, like the original Go service's.

Only the standard library talks to the server (http.client, ssl, socket), so the same
tests run against a remote deployment.  The server must be in mock mode
(SMSP_MOCK_EMAIL_SERVICE=true): the tests that send mail skip themselves otherwise,
so no real mail is ever sent.

Against a running deployment::

    SMSP_HOST_PORT=host:port SMSP_PROTOCOL=https SMSP_API_KEY=... \\
        python -m pytest functional_test.py

SMSP_PROTOCOL is ``http`` (the default) or ``https``; over https the certificate is
verified with the default trust store (``SSL_CERT_FILE`` points it elsewhere).  A
remote server's SMSP_POLL_INTERVAL is unknown, so waiting for an open circuit to
close is bounded by SMSP_FUNCTIONAL_WAIT seconds (default 70).  Aim at one node:
circuits are per node (and per worker), so a load balancer in front of several would
make the circuit sequence meaningless.

Without SMSP_HOST_PORT the tests start ``python smsp.py`` themselves in mock mode on
a free port of 127.0.0.1 (poll interval and provider timeout of 1 s), and for
SMSP_PROTOCOL=https with a throwaway self-signed certificate made by ``openssl``
(skipped, with that reason, where no openssl command exists).  At the end the server
gets SIGTERM and must exit 0 within 15 s::

    python -m pytest -q functional_test.py
    SMSP_PROTOCOL=https python -m pytest -q functional_test.py

The circuit tests run in file order: a normal send succeeds; subject ``timeout``
fails and opens the circuit; the next send fails because every circuit is open
(503); after the poll interval the circuit is closed again and sends succeed.
"""

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest

HERE = Path(__file__).resolve().parent
SMSP = HERE / "smsp.py"
PROTOCOL = os.environ.get("SMSP_PROTOCOL", "http").strip().lower() or "http"
HOST_PORT = os.environ.get("SMSP_HOST_PORT", "").strip()

LOCAL_POLL_INTERVAL = 1.0  # SMSP_POLL_INTERVAL and SMSP_TIMEOUT of a server started here
LOCAL_WAIT = 10.0  # seconds: readiness, and an open circuit closing, when started here
REMOTE_WAIT = float(os.environ.get("SMSP_FUNCTIONAL_WAIT", "70"))
STOP_WAIT = 15.0  # seconds a server started here gets to exit after SIGTERM
CLIENT_TIMEOUT = 60.0  # socket timeout of each request; a remote SMSP_TIMEOUT is unknown

EMAIL = {"fromaddress": "Functional Test <functional@example.com>",
         "toaddress": "recipient@example.org", "subject": "functional test",
         "plaintextbody": "sent by smsp's functional_test.py"}


class Server(NamedTuple):
    """The server under test."""

    base_url: str
    api_key: str
    started_here: bool


class Reply(NamedTuple):
    """One whole HTTP response."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        return json.loads(self.body)


class Client:
    """A small stdlib HTTP(S) client; every reply must carry an X-Request-Id."""

    def __init__(self, server: Server, context: ssl.SSLContext | None) -> None:
        url = urllib.parse.urlsplit(server.base_url)
        assert url.hostname is not None and url.port is not None, server.base_url
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port
        self.api_key = server.api_key
        self.started_here = server.started_here
        self.context = context

    def connection(self, timeout: float = CLIENT_TIMEOUT) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                 body: bytes | None = None, headers: Mapping[str, str] | None = None) -> Reply:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        reply = Reply(response.status, response.msg, response.read())
        assert reply.headers.get("X-Request-Id"), f"no X-Request-Id on {method} {path}: {reply}"
        return reply

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        conn = self.connection()
        try:
            return self.exchange(conn, method, path, body, headers)
        finally:
            conn.close()

    def post_email(self, document: Any, *, api_key: str | None = None,
                   raw: bytes | None = None, headers: Mapping[str, str] | None = None) -> Reply:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if api_key is None:
            sent["X-API-KEY"] = self.api_key
        elif api_key:
            sent["X-API-KEY"] = api_key
        body = raw if raw is not None else json.dumps(document).encode()
        return self.request("POST", "/email", body, sent)

    def health(self) -> dict[str, Any]:
        reply = self.request("GET", "/healthcheck")
        assert reply.status == 200, reply
        document: dict[str, Any] = reply.json()
        return document

    def provider_state(self, name: str) -> str:
        for provider in self.health()["providers"]:
            if provider["name"] == name:
                state: str = provider["state"]
                return state
        raise AssertionError(f"no provider {name!r} in the healthcheck")

    def wait_for_state(self, name: str, state: str) -> float:
        """Poll the healthcheck until provider ``name`` is in ``state``; the seconds taken."""
        bound = LOCAL_WAIT if self.started_here else REMOTE_WAIT
        started = time.monotonic()
        seen = ""
        while time.monotonic() - started < bound:
            seen = self.provider_state(name)
            if seen == state:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"provider {name!r} still {seen!r}, not {state!r}, after {bound:g} s")


# ------------------------------------------------------------------ fixtures ---


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("SMSP_PROTOCOL=https needs the openssl command to make a throwaway "
                    "self-signed certificate, and there is none on PATH")
    cert, key = directory / "cert.pem", directory / "key.pem"
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl could not make a certificate: {result.stderr.strip()}")
    return cert, key


def _ready(client: Client, process: subprocess.Popen[bytes]) -> bool:
    """Poll GET /healthcheck until it answers 200 (True) or the process exits (False)."""
    deadline = time.monotonic() + LOCAL_WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if client.request("GET", "/healthcheck").status == 200:
                return True
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then the exit status, or None (and SIGKILL) after STOP_WAIT seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def _server_env(api_key: str, cert: tuple[Path, Path] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSP_")}
    env.update(SMSP_MOCK_EMAIL_SERVICE="true", SMSP_API_KEY=api_key,
               SMSP_POLL_INTERVAL=str(LOCAL_POLL_INTERVAL), SMSP_TIMEOUT=str(LOCAL_POLL_INTERVAL),
               SMSP_LOG_OUTPUT_FORMAT="JSON_ONELINE", PYTHONUNBUFFERED="1")
    if cert is not None:
        env.update(SMSP_TLS_CERT=str(cert[0]), SMSP_TLS_KEY=str(cert[1]))
    return env


def _check_log(text: str, api_key: str) -> None:
    """The log of a server started here: one JSON object a line, no secret, a clean stop."""
    events = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and "event" in record, line
        events.append(record["event"])
    assert api_key not in text, "the API key appears in the log"
    assert "started" in events and events[-1] == "stopped", events


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path] | None:
    """(cert, key) of a throwaway certificate when this module starts an https server."""
    if HOST_PORT or PROTOCOL != "https":
        return None
    return _make_certificate(tmp_path_factory.mktemp("smsp-tls"))


@pytest.fixture(scope="module")
def client_context(certificate: tuple[Path, Path] | None) -> ssl.SSLContext | None:
    """The client's TLS context: trusts only the throwaway certificate when there is one."""
    if PROTOCOL != "https":
        return None
    if certificate is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture(scope="module")
def smsp_server(tmp_path_factory: pytest.TempPathFactory,
                certificate: tuple[Path, Path] | None,
                client_context: ssl.SSLContext | None) -> Iterator[Server]:
    """The server under test: SMSP_HOST_PORT's, or ``python smsp.py`` started here."""
    if PROTOCOL not in ("http", "https"):
        pytest.fail(f"SMSP_PROTOCOL must be http or https, not {PROTOCOL!r}")
    if HOST_PORT:
        api_key = os.environ.get("SMSP_API_KEY", "")
        if not api_key:
            pytest.fail("SMSP_HOST_PORT is set, so SMSP_API_KEY must be too")
        yield Server(f"{PROTOCOL}://{HOST_PORT}", api_key, False)
        return
    api_key = secrets.token_urlsafe(24)
    env = _server_env(api_key, certificate)
    log_path = tmp_path_factory.mktemp("smsp-log") / "smsp.log"
    with log_path.open("wb") as log:
        server, process = _launch(api_key, env, log, client_context, log_path)
        try:
            yield server
        finally:
            status = _stop(process)
    text = log_path.read_text(errors="replace")
    assert status == 0, f"smsp exited {status} (None: not within {STOP_WAIT:g} s) on " \
                        f"SIGTERM:\n{text}"
    _check_log(text, api_key)


def _launch(api_key: str, env: dict[str, str], log: IO[bytes],
            client_context: ssl.SSLContext | None,
            log_path: Path) -> tuple[Server, subprocess.Popen[bytes]]:
    """Start smsp on a free port and wait until it answers; never leave it running on failure."""
    for _attempt in range(3):  # another process may take the free port before smsp does
        server = Server(f"{PROTOCOL}://127.0.0.1:{_free_port()}", api_key, True)
        process = _start(server, env, log)
        try:
            if _ready(Client(server, client_context), process):
                return server, process
        except BaseException:
            _stop(process)
            raise
        alive = process.poll() is None
        _stop(process)
        if alive:
            pytest.fail(f"smsp did not become ready within {LOCAL_WAIT:g} s:\n"
                        + log_path.read_text(errors="replace"))
    pytest.fail("smsp did not start:\n" + log_path.read_text(errors="replace"))


def _start(server: Server, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    port = urllib.parse.urlsplit(server.base_url).port
    return subprocess.Popen([sys.executable, str(SMSP), "--host", "127.0.0.1", "--port",
                             str(port)], cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def client(smsp_server: Server, client_context: ssl.SSLContext | None) -> Client:
    return Client(smsp_server, client_context)


@pytest.fixture(scope="module")
def mock_client(client: Client) -> Client:
    """The client, once the server is known to be in mock mode: no real mail is sent."""
    names = [p["name"] for p in client.health()["providers"]]
    if names != ["mock"]:
        pytest.skip(f"the server's providers are {names}, not the mock alone "
                    "(SMSP_MOCK_EMAIL_SERVICE=true); not sending real mail")
    return client


# --------------------------------------------------------------------- tests ---


def _assert_sent(reply: Reply) -> None:
    assert reply.status == 200, reply
    document = reply.json()
    assert document["status"] == "sent" and document["provider"] == "mock", document
    assert isinstance(document["message_id"], str), document
    assert document["message_id"].startswith("mock-") and len(document["message_id"]) > 5


def test_01_send_succeeds(mock_client: Client) -> None:
    mock_client.wait_for_state("mock", "closed")  # a rerun against a remote server
    _assert_sent(mock_client.post_email(EMAIL))


def test_02_timeout_opens_circuit_then_poll_closes_it(mock_client: Client) -> None:
    client = mock_client
    client.wait_for_state("mock", "closed")

    # subject "timeout": the mock never answers, so the fate is unknown and the circuit opens
    timed_out = client.post_email({**EMAIL, "subject": "timeout"})
    opened = time.monotonic()
    assert timed_out.status == 504, timed_out
    document = timed_out.json()
    assert document["delivery"] == "unknown", document
    assert document["request_id"] == timed_out.headers["X-Request-Id"], document

    # the next send finds every circuit open: not sent, come back after the poll
    refused = client.post_email(EMAIL)
    assert refused.status == 503, refused
    document = refused.json()
    assert document["delivery"] == "not_sent", document
    assert "circuit" in document["message"], document
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after >= 1, refused.headers
    if client.started_here:
        assert retry_after <= LOCAL_POLL_INTERVAL, refused.headers
        state = client.health()["providers"][0]
        assert state["state"] == "open" and state["next_poll_at"], state

    # after the poll interval the poll succeeds, the circuit closes, and mail flows again
    client.wait_for_state("mock", "closed")
    if client.started_here:
        assert time.monotonic() - opened >= LOCAL_POLL_INTERVAL / 2, "closed before the poll"
    _assert_sent(client.post_email(EMAIL))
    _assert_sent(client.post_email(EMAIL))


def test_healthcheck(client: Client) -> None:
    reply = client.request("GET", "/healthcheck")
    assert reply.status == 200, reply
    document = reply.json()
    assert document["status"] == "ok", document
    assert isinstance(document["providers"], list) and document["providers"], document
    for provider in document["providers"]:
        assert isinstance(provider["name"], str) and provider["name"], provider
        assert provider["state"] in ("closed", "open"), provider
    if client.started_here:
        assert [p["name"] for p in document["providers"]] == ["mock"], document


@pytest.mark.parametrize("api_key", ["", "wrong-key"], ids=["missing", "wrong"])
def test_unauthorised(client: Client, api_key: str) -> None:
    reply = client.post_email(EMAIL, api_key=api_key)
    assert reply.status == 401, reply
    document = reply.json()
    assert document == {"message": "Unauthorised",
                        "request_id": reply.headers["X-Request-Id"]}, document


def test_malformed_json_is_400(client: Client) -> None:
    reply = client.post_email(None, raw=b'{"fromaddress": "a@example.com",')
    assert reply.status == 400, reply
    document = reply.json()
    assert "malformed JSON" in document["message"], document
    assert document["request_id"] == reply.headers["X-Request-Id"], document


@pytest.mark.parametrize("subject", ["two\r\nlines", "Bcc: x@example.com\nsneaky", "cr\ronly"],
                         ids=["crlf", "lf", "cr"])
def test_line_break_in_subject_is_400(client: Client, subject: str) -> None:
    reply = client.post_email({**EMAIL, "subject": subject})
    assert reply.status == 400, reply
    document = reply.json()
    assert document["message"].startswith("subject"), document
    assert "CR" in document["message"] and "LF" in document["message"], document


def test_unknown_path_is_404(client: Client) -> None:
    reply = client.request("GET", "/no-such-path")
    assert reply.status == 404, reply
    assert reply.json()["request_id"] == reply.headers["X-Request-Id"]


def test_request_id_is_echoed(client: Client) -> None:
    rid = f"functional-{secrets.token_hex(8)}"
    health = client.request("GET", "/healthcheck", headers={"X-Request-Id": rid})
    assert health.headers["X-Request-Id"] == rid, health.headers
    refused = client.post_email(EMAIL, api_key="wrong-key", headers={"X-Request-Id": rid})
    assert refused.headers["X-Request-Id"] == rid, refused.headers
    assert refused.json()["request_id"] == rid
    fresh = [client.request("GET", "/healthcheck").headers["X-Request-Id"] for _ in range(2)]
    assert fresh[0] != fresh[1] and rid not in fresh, fresh


def test_keep_alive(client: Client) -> None:
    conn = client.connection()
    try:
        first = client.exchange(conn, "GET", "/healthcheck")
        sock = conn.sock
        assert first.status == 200 and sock is not None, first
        assert first.headers.get("Connection", "").lower() != "close", first.headers
        second = client.exchange(conn, "GET", "/no-such-path")
        assert second.status == 404, second
        assert conn.sock is sock, "the second request needed a new connection"
    finally:
        conn.close()


def test_plain_http_on_https_port_is_disconnected(client: Client) -> None:
    if not (client.started_here and client.scheme == "https"):
        pytest.skip("only for an https server started by this module")
    received = b""
    with socket.create_connection((client.host, client.port), timeout=10) as sock:
        sock.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"the server kept a plain-HTTP connection open; received {received!r}")
    assert not received.startswith(b"HTTP/"), received
    assert b"Unauthorised" not in received and b"status" not in received, received
