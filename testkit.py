"""Test kit shared by the test modules: fake clock and timers, the in-process server.

Fixtures live in conftest.py; this module holds plain classes and functions.
"""

import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import smsp
from fakes import FakeMailgun, FakeSendGrid


MG_DOMAIN = "mg.example.com"
MG_KEY = "key-MAILGUN-SECRET-1234"
SG_KEY = "SG.SENDGRID-SECRET-5678"
PM_TOKEN = "pm-POSTMARK-SECRET-4321"
RS_KEY = "re_RESEND-SECRET-8765"
SES_REGION = "eu-west-1"
SES_ACCESS_KEY = "AKIDSMSPTEST"
SES_SECRET_KEY = "ses-SECRET-ACCESS-KEY-0000"
SMTP_USER = "relay-user"  # smtp_server.USERNAME and PASSWORD
SMTP_PASSWORD = "relay-SECRET-pass"
API_KEY = "client-API-SECRET-9abc"
POLL = "poll@smsp.example.com"
EMAIL = {"fromaddress": "Alice <alice@example.com>", "toaddress": "bob@example.org",
         "subject": "Hello", "plaintextbody": "line 1\nline 2 é"}


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTimer:
    """One scheduled call; ``fire()`` runs it as the real timer thread would."""

    def __init__(self, delay: float, function: Callable[[], None]) -> None:
        self.delay = delay
        self.function = function
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled, "a cancelled timer must not fire"
        self.function()


class FakeTimers:
    """The timer factory for breakers: records instead of starting threads."""

    def __init__(self) -> None:
        self.scheduled: list[FakeTimer] = []

    def __call__(self, delay: float, function: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(delay, function)
        self.scheduled.append(timer)
        return timer

    @property
    def pending(self) -> list[FakeTimer]:
        return [t for t in self.scheduled if not t.cancelled and not getattr(t, "fired", False)]

    def fire_next(self) -> FakeTimer:
        timer = self.pending[0]
        timer.fired = True  # type: ignore[attr-defined]
        timer.fire()
        return timer


class Lines(list):
    """Captured log lines, as one text for ``in`` checks."""

    def write(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "".join(self)

    def events(self, name: str, at_least: int = 0, timeout: float = 5.0
               ) -> list[dict[str, Any]]:
        """The events called ``name``; waits (bounded) until there are ``at_least``.

        The access line is written just after the response is sent, so a
        client can see its answer a moment before the line exists.
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [json.loads(line) for line in list(self)]
            found = [r for r in records if r["event"] == name]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0,
             interval: float = 0.01) -> Any:
    """Poll ``condition`` every ``interval`` seconds until it returns something true
    (returned), or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def env_text(value: Any) -> str:
    """A setting's value as the environment variable would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, urllib.parse.SplitResult):  # a tuple too: first
        return value.geturl()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def config_env(**overrides: Any) -> dict[str, str]:
    """The environment of a test config: mock mode on 127.0.0.1:0 unless overridden;
    keys are settings' field names."""
    values: dict[str, Any] = {"api_keys": (API_KEY,), "mock": True, "host": "127.0.0.1",
                              "port": 0, "timeout": 1.0, "client_timeout": 2.0,
                              "poll_address": POLL}
    values.update(overrides)
    rows = {row.field: row for row in smsp.all_settings()}
    return {rows[field].env: env_text(value) for field, value in values.items()}


def make_config(**overrides: Any) -> smsp.Config:
    """A Config built by the loader production uses, from ``config_env``."""
    return smsp.load_config(config_env(**overrides))


class Running:
    """The real server on port 0 in a thread, with fake clock and timers for breakers.

    Its log lines are captured in ``lines``, unless another ``log`` is given.
    """

    def __init__(self, config: smsp.Config, log: smsp.Logger | None = None) -> None:
        self.lines = Lines()
        self.clock = FakeClock()
        self.timers = FakeTimers()
        log = log or smsp.Logger("JSON_ONELINE", debug=config.log_debug, write=self.lines.write)
        self.service = smsp.build_service(config, log=log, clock=self.clock, timer=self.timers)
        self.server = smsp.make_server(self.service)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.scheme = "https" if self.server.ssl_context else "http"

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def breakers(self) -> dict[str, smsp.CircuitBreaker]:
        return self.service.breakers

    def states(self) -> dict[str, str]:
        return {name: b.state.value for name, b in self.breakers.items()}

    def connect(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def send(self, email: dict[str, Any] | None = None, **headers: str
             ) -> tuple[int, dict[str, str], dict[str, Any]]:
        all_headers = {"X-API-KEY": API_KEY, "Content-Type": "application/json"}
        all_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        status, response_headers, data = self.request(
            "POST", "/email", json.dumps(EMAIL if email is None else email).encode(),
            all_headers)
        return status, response_headers, json.loads(data) if data else {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.drain(0)
        self.service.close()


@contextmanager
def running(config: smsp.Config, log: smsp.Logger | None = None) -> Iterator[Running]:
    server = Running(config, log)
    try:
        yield server
    finally:
        server.close()


# How smsp reaches each strict fake: the settings that point a provider at it.
PEER_SETTINGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "mailgun": lambda fake: {"mg_domain": MG_DOMAIN, "mg_api_key": MG_KEY,
                             "mg_base_url": fake.url},
    "sendgrid": lambda fake: {"sg_api_key": SG_KEY, "sg_base_url": fake.url},
    "ses": lambda fake: {"ses_region": SES_REGION, "ses_access_key_id": SES_ACCESS_KEY,
                         "ses_secret_access_key": SES_SECRET_KEY, "ses_base_url": fake.url},
    "postmark": lambda fake: {"pm_server_token": PM_TOKEN, "pm_base_url": fake.url},
    "resend": lambda fake: {"resend_api_key": RS_KEY, "resend_base_url": fake.url},
    "smtp": lambda peer: {"smtp_host": peer.server.host, "smtp_port": peer.server.port,
                          "smtp_security": "none", "smtp_username": SMTP_USER,
                          "smtp_password": SMTP_PASSWORD, "smtp_helo": "smsp.test"},
}


def peers_config(fakes: Mapping[str, Any], **overrides: Any) -> smsp.Config:
    """A config whose providers are ``fakes`` (by provider name), in that order unless
    ``providers`` says otherwise."""
    values: dict[str, Any] = {"mock": False, "providers": tuple(fakes)}
    for name, fake in fakes.items():
        values.update(PEER_SETTINGS[name](fake))
    values.update(overrides)
    return make_config(**values)


def provider_config(mailgun: FakeMailgun, sendgrid: FakeSendGrid, **overrides: Any
                    ) -> smsp.Config:
    return peers_config({"mailgun": mailgun, "sendgrid": sendgrid}, **overrides)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    """The status of a raw answer; http.server answers a bad version HTTP/0.9-style,
    with no status line, so its HTML error page is read then."""
    if raw.startswith(b"HTTP/"):
        return int(raw.split(b" ", 2)[1])
    found = re.search(rb"Error code: (\d{3})", raw)
    return int(found.group(1)) if found else 0


def make_certificate(folder: Path | str) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1: (cert.pem, key.pem) paths.

    Skips the calling test when there is no openssl command.
    """
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a throwaway certificate")
    cert, key = str(Path(folder) / "cert.pem"), str(Path(folder) / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


SMSP = Path(smsp.__file__).resolve()


def free_port() -> int:
    """A port nothing listens on now (for a server that must be told its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """``python smsp.py`` in real mode on a free port; its log lines as parsed JSON."""

    def __init__(self, env: dict[str, str]) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SMSP_")}
        base.update({"SMSP_API_KEY": API_KEY, "SMSP_LOG_OUTPUT_FORMAT": "JSON_ONELINE"})
        base.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, str(SMSP), "--host", "127.0.0.1", "--port", "0"], env=base,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=SMSP.parent,
            start_new_session=True)  # its workers too are killed by close()
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = self.wait_for("started")[0]  # with SMSP_WORKERS, each worker logs one
        self.port = int(started["address"].rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            with self._cond:
                self.text.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.lines if r.get("event") == name]

    def wait_for(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._cond:
            found = self._cond.wait_for(lambda: self.events(name), timeout)
        assert found, f"no {name!r} line in {''.join(self.text)!r}"
        return self.events(name)

    def threads(self) -> list[int]:
        """The process's thread ids, the main thread (tid == pid) first."""
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{self.proc.pid}/task"))
        return sorted(tids, key=lambda tid: tid != self.proc.pid)

    def blocked_signals(self, tid: int) -> set[int]:
        with open(f"/proc/{self.proc.pid}/task/{tid}/status") as status:
            line = next(line for line in status if line.startswith("SigBlk:"))
        mask = int(line.split()[1], 16)
        return {number for number in range(1, 65) if mask >> (number - 1) & 1}

    def terminate(self, tid: int | None = None) -> float:
        """SIGTERM to the process (the kernel picks the thread that takes it), or to the
        thread ``tid`` (as the kernel may pick any thread that does not block it)."""
        if tid is None:
            self.proc.send_signal(signal.SIGTERM)
            return time.monotonic()
        tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
        if tgkill is None:
            pytest.skip("needs glibc's tgkill()")
        if tgkill(self.proc.pid, tid, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "tgkill failed")
        return time.monotonic()

    def close(self) -> None:
        try:  # the whole group: a worker left alive would hold stdout open for ever
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextmanager
def smsp_process(**env: str) -> Iterator[Process]:
    process = Process(env)
    try:
        yield process
    finally:
        process.close()


def mailgun_env(mailgun: FakeMailgun, **env: str) -> dict[str, str]:
    return {"SMSP_PROVIDERS": "mailgun", "SMSP_MG_DOMAIN": MG_DOMAIN, "SMSP_MG_API_KEY": MG_KEY,
            "SMSP_MG_BASE_URL": mailgun.url, "SMSP_POLL_MESSAGE_ADDRESS": POLL,
            "SMSP_TIMEOUT": "5", **env}


