"""Test kit shared by the test modules: fake clock and timers, the in-process server.

Fixtures live in conftest.py; this module holds plain classes and functions.
"""

import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import smsp
from fakes import FakeMailgun, FakeSendGrid


MG_DOMAIN = "mg.example.com"
MG_KEY = "key-MAILGUN-SECRET-1234"
SG_KEY = "SG.SENDGRID-SECRET-5678"
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


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def make_config(**overrides: Any) -> smsp.Config:
    values: dict[str, Any] = {"api_keys": (API_KEY,), "mock": True, "host": "127.0.0.1",
                              "port": 0, "timeout": 1.0, "client_timeout": 2.0,
                              "poll_address": POLL}
    values.update(overrides)
    return smsp.Config(**values)


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


def provider_config(mailgun: FakeMailgun, sendgrid: FakeSendGrid, **overrides: Any
                    ) -> smsp.Config:
    values: dict[str, Any] = {"mock": False, "providers": ("mailgun", "sendgrid"),
                              "mg_domain": MG_DOMAIN, "mg_api_key": MG_KEY,
                              "mg_base_url": mailgun.url, "sg_api_key": SG_KEY,
                              "sg_base_url": sendgrid.url}
    values.update(overrides)
    return make_config(**values)


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


def make_certificate(folder: str) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and its key, made by the openssl
    command in ``folder``: the paths (cert, key)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key
