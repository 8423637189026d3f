#!/usr/bin/env python3
"""smsp: the send-mail service proxy.

A JSON-over-HTTP service that accepts one email per request and sends it
through an email provider: Mailgun first, then SendGrid.  When a provider
fails, smsp fails over to the next one.  Each provider sits behind a circuit
breaker: real mail is never sent along an open circuit; an open circuit is
polled on a timer with a dummy message until a poll succeeds, and then it
closes.

One module, standard library only, Python 3.11 or newer::

    SMSP_MOCK_EMAIL_SERVICE=true SMSP_API_KEY=dev python smsp.py
    curl -H 'X-API-KEY: dev' -H 'Content-Type: application/json' \\
         -d '{"fromaddress":"a@example.com","toaddress":"b@example.com",
              "subject":"hi","plaintextbody":"hello"}' http://127.0.0.1:8080/email

``python smsp.py --help`` lists every environment variable with its default.

How the module reads, top to bottom (each section uses only what sits above):
constants; errors and outcomes; threads and deadlines (the watchdog: deadlines
without per-read syscalls); addresses; configuration; logging; messages and
validation; metrics; the HTTP client (a connection pool); providers (Mailgun,
SendGrid, mock); the circuit breaker; the dispatcher (failover); idempotency;
HTTP messages (the lean parser); the HTTP application (routes and responses,
no sockets); the HTTP handler and server; and finally workers and ``main()``.

Every response tells the client whether its mail was sent, not sent, or
unknown.  A message whose fate is unknown (the provider timed out after the
request was written) is never re-sent through another provider.
"""

import argparse
import atexit
import base64
import bisect
import collections
import dataclasses
import email.charset
import enum
import hashlib
import heapq
import hmac
import http.client
import http.server
import io
import itertools
import json
import math
import os
import random
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

# ---------------------------------------------------------------- constants ---

VERSION = "2.0.0"
SERVER_NAME = f"smsp/{VERSION}"

MAX_REQUEST_LINE = 65536  # the limit http.server enforces (414 past it)
MAX_HEAD = 65536  # request line and headers together, as the bytes arrive (431 past it)
MAX_HEADERS = 100  # header lines including the blank one that ends them, as http.client
MAX_ADDRESS_FIELD = 320
MAX_ADDRESS = 254
MAX_LOCAL_PART = 64
MAX_SUBJECT = 998  # RFC 5322 line length
MAX_JSON_DEPTH = 32  # arrays and objects in a request body; the API itself needs three
MAX_PROVIDER_REPLY = 1 << 20  # bytes of a provider reply we are willing to read
MAX_PROVIDER_MESSAGE = 500  # characters of a provider's error message passed to the client
ACCEPT_FANOUT = 2  # waiting connections each new connection thread takes off the listener
GIL_SWITCH_INTERVAL = 0.05  # seconds; CPython's default is 0.005 (see serve())

_UUID4_BITS = 4 << 76 | 0b10 << 62  # version 4, RFC 4122 variant
_UUID_RANDOM_BITS = ~(0xF << 76 | 0b11 << 62) & (1 << 128) - 1

POLL_SUBJECT = "poll"
POLL_BODY = "poll"

# --------------------------------------------------------- errors, outcomes ---


class Outcome(enum.Enum):
    """What one provider attempt did to the message (the metrics label too)."""

    SENT = "sent"  # a provider accepted it
    REJECTED = "rejected"  # the provider says the message itself is bad: not sent
    NOT_SENT = "not_sent"  # it certainly did not leave us: safe to try another provider
    UNKNOWN = "unknown"  # written, then no clear answer: it may have been sent


class Delivery(enum.Enum):
    """What the client is told about its mail in an error body."""

    NOT_SENT = "not_sent"
    UNKNOWN = "unknown"


class SmspError(Exception):
    """Base class of every error smsp raises on purpose."""


class ConfigError(SmspError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ValidationError(SmspError):
    """A client request is invalid: ``field`` says where and ``reason`` why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class ProviderError(SmspError):
    """One provider attempt failed.

    ``outcome`` decides failover (only NOT_SENT fails over) and the breaker
    (everything but REJECTED counts as a failure).  ``reason`` is a short
    classification that is safe on anonymous pages ("HTTP 500", "timed out",
    "connect refused"); it never holds provider text or exception messages.
    ``timed_out`` tells a 504 from a 502.  ``detail`` is the provider's own
    explanation, passed only to the authenticated client whose message it
    rejected.
    """

    def __init__(self, outcome: Outcome, reason: str, *, timed_out: bool = False,
                 detail: str | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.timed_out = timed_out
        self.detail = detail

    @property
    def trips_breaker(self) -> bool:
        return self.outcome is not Outcome.REJECTED


def classify_status(status: int) -> Outcome:
    """The failure classification of one provider HTTP status (see README)."""
    if 200 <= status < 300:
        return Outcome.SENT
    if status in (400, 413, 422):
        return Outcome.REJECTED
    return Outcome.NOT_SENT  # 401, 403, 404, 429, 5xx, 3xx and anything else


# ---------------------------------------------------- threads and deadlines ---


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def start_thread(target: Callable[..., Any], name: str, **kwargs: Any) -> threading.Thread:
    """Start a daemon thread that leaves SIGTERM and SIGINT to the main thread.

    A process-directed signal goes to any thread that does not block it, but a
    Python handler runs only in the main thread, which may then sleep on.
    Threads started from such a thread (one per connection, poll timers)
    inherit the mask.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        thread = threading.Thread(target=target, name=name, kwargs=kwargs, daemon=True)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread


class Watchdog:
    """Expires watched objects whose deadline has passed, from one daemon thread.

    A watched object has a mutable ``deadline`` (a ``clock()`` time, or None
    for "not timed right now, look again later"), a ``done`` flag and an
    ``expire()`` method.  Moving a deadline is a plain attribute write, so a
    connection re-arms its budget per request without a syscall and without a
    lock; the watchdog re-files an entry it finds early.  ``expire()`` runs
    outside the watchdog's lock and must not block.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, recheck: float = 1.0) -> None:
        self._clock = clock
        self._recheck = recheck
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._thread = start_thread(self._run, "smsp-watchdog")

    def watch(self, target: Any) -> None:
        deadline = target.deadline
        when = deadline if deadline is not None else self._clock() + self._recheck
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), target))
            if self._heap[0][2] is target:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            due = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    _, _, target = heapq.heappop(self._heap)
                    if target.done:
                        continue
                    deadline = target.deadline
                    if deadline is None or deadline > now:
                        later = deadline if deadline is not None else now + self._recheck
                        heapq.heappush(self._heap, (later, next(self._seq), target))
                    else:
                        due.append(target)
                if not due:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(wait)
                    continue
            for target in due:
                try:
                    target.expire()
                except Exception:  # a dying watchdog would unbound every deadline
                    pass


def _shutdown_socket(sock: socket.socket | None, how: int) -> None:
    """Shut a socket down from another thread, waking any blocked recv.

    On an SSLSocket the base class method is used: SSLSocket.shutdown also
    drops the TLS state, which would make a later write go out in clear.
    """
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


class Deadline:
    """A watchdog target: shuts a socket down if its deadline passes before it is done.

    The socket is read from ``owner.<attribute>`` when the deadline passes, so
    it may still be None (not connected yet) or be replaced (a TLS wrap).
    ``how`` is SHUT_RDWR for a provider exchange; a client connection moves
    between SHUT_RD and SHUT_RDWR (see _Connection).
    """

    __slots__ = ("_attribute", "_how", "_owner", "deadline", "done", "expired")

    def __init__(self, deadline: float | None, owner: Any, attribute: str = "sock",
                 how: int = socket.SHUT_RDWR) -> None:
        self.deadline = deadline
        self.done = False
        self.expired = False
        self._owner = owner
        self._attribute = attribute
        self._how = how

    def finish(self) -> None:
        """Done: expire() does nothing from now on, and the owner is let go (the
        watchdog keeps a target until its deadline, and a Handler refers back)."""
        self.done = True
        self._owner = None

    def interrupt(self) -> None:
        """Wake whoever is blocked reading the socket, now."""
        _shutdown_socket(getattr(self._owner, self._attribute, None), self._how)

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            self.interrupt()


# ---------------------------------------------------------------- addresses ---

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDR_SHAPE = (rf"{_ATEXT}+(?:\.{_ATEXT}+)*@"
               r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
               r"(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})")
# The RFC 5321 limits as negative lookaheads, which Python and ECMA-262 (the dialect
# of OpenAPI patterns) read alike: a local part of at most MAX_LOCAL_PART and an
# address of at most MAX_ADDRESS characters.
_ADDR = rf"(?![^@]{{{MAX_LOCAL_PART + 1}}}){_ADDR_SHAPE}"
_NAME = r'[^\x00-\x1f\x7f-\x9f\u2028\u2029<>",;\\]*'
# The OpenAPI document publishes this very pattern, so the fuzzer and we agree.
ADDRESS_PATTERN = (rf"^(?:(?!.{{{MAX_ADDRESS + 1}}}){_ADDR}"
                   rf"|{_NAME}<(?![^>]{{{MAX_ADDRESS + 1}}}){_ADDR}>)$")
_ADDRESS_RE = re.compile(ADDRESS_PATTERN)
_ADDRESS_SHAPE_RE = re.compile(rf"^(?:{_ADDR_SHAPE}|{_NAME}<{_ADDR_SHAPE}>)$")  # no limits
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


_PLAIN_NAME_RE = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")  # atoms: no quoting needed
_UTF8 = email.charset.Charset("utf-8")  # header_encode: an RFC 2047 word, B or Q, the shorter


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """An email address with an optional display name.

    ``str()`` is the RFC 5322 header form, which reads back as exactly this
    one address with this name: a name of plain atoms as it is, any other
    ASCII name as a quoted-string (``c@evil.example <b@example.com>`` would
    otherwise read as two addresses), a non-ASCII one as an RFC 2047
    encoded-word.
    """

    email: str
    name: str = ""

    def __str__(self) -> str:
        name = self.name
        if not name:
            return self.email
        if "=?" in name or not name.isascii():  # readers decode "=?" even in quotes
            return f"{_UTF8.header_encode(name)} <{self.email}>"
        if _PLAIN_NAME_RE.fullmatch(name):
            return f"{name} <{self.email}>"
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{self.email}>'


def _check_text(field: str, value: str) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "contains an unpaired surrogate escape") from None


def parse_address(field: str, value: Any) -> Address:
    """Validate ``user@domain`` or ``Name <user@domain>``; raise ValidationError."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_ADDRESS_FIELD:
        raise ValidationError(field, f"must be at most {MAX_ADDRESS_FIELD} characters")
    if not (value.isascii() and value.isprintable()):  # the C fast path for the usual case
        if _CONTROL_RE.search(value):
            raise ValidationError(field, "must not contain CR, LF or other control characters")
        _check_text(field, value)
    if not _ADDRESS_RE.match(value):
        if _ADDRESS_SHAPE_RE.match(value):
            raise ValidationError(field, f"address must be at most {MAX_ADDRESS} characters "
                                         f"with a local part of at most {MAX_LOCAL_PART}")
        raise ValidationError(field, "must be an address like user@example.com "
                                     "or Name <user@example.com>")
    if value.endswith(">"):
        name, _, email = value[:-1].partition("<")
        return Address(email, name.strip())
    return Address(value)


# ------------------------------------------------------------ configuration ---

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
LOG_FORMATS = ("DEBUG", "JSON_ONELINE", "JSON_ONLINE", "JSON_PRETTY")
KNOWN_PROVIDERS = ("mailgun", "sendgrid")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be true or false")


def _number(kind: type, low: float | None = None, *, above: bool = False
            ) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if low is not None and (value <= low if above else value < low):
            raise ValueError(f"must be {'greater than' if above else 'at least'} {low:g}")
        return value
    return parse


def _parse_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise ValueError("must hold at least one key")
    return keys


def _parse_providers(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider {unknown[0]!r}; known: {', '.join(KNOWN_PROVIDERS)}")
    if not names:
        raise ValueError("must name at least one provider")
    if len(set(names)) != len(names):
        raise ValueError("names a provider twice")
    return names


def _parse_base_url(text: str) -> str:
    url = urllib.parse.urlsplit(text.strip())
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
        raise ValueError("must be an http:// or https:// URL without query")
    try:
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return text.strip().rstrip("/")


def _parse_log_format(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return "JSON_ONELINE" if value == "JSON_ONLINE" else value


def _parse_text(text: str) -> str:
    return text.strip()


@dataclasses.dataclass(frozen=True)
class Setting:
    """One environment variable: its parser, default and help."""

    env: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("SMSP_API_KEY", "api_keys", _parse_keys, None,
            "client API key(s), comma-separated for rotation (required)", secret=True),
    Setting("SMSP_MOCK_EMAIL_SERVICE", "mock", _parse_bool, False,
            "true: the mock provider is the only provider (subject 'timeout'/'fail')"),
    Setting("SMSP_PROVIDERS", "providers", _parse_providers, ("mailgun", "sendgrid"),
            "provider order, comma-separated"),
    Setting("SMSP_MG_DOMAIN", "mg_domain", _parse_text, "", "Mailgun sending domain"),
    Setting("SMSP_MG_API_KEY", "mg_api_key", _parse_text, "", "Mailgun API key", secret=True),
    Setting("SMSP_MG_BASE_URL", "mg_base_url", _parse_base_url, "https://api.mailgun.net",
            "Mailgun API base (EU: https://api.eu.mailgun.net)"),
    Setting("SMSP_SG_API_KEY", "sg_api_key", _parse_text, "", "SendGrid API key", secret=True),
    Setting("SMSP_SG_BASE_URL", "sg_base_url", _parse_base_url, "https://api.sendgrid.com",
            "SendGrid API base"),
    Setting("SMSP_POLL_MESSAGE_ADDRESS", "poll_address", _parse_text, "",
            "from/to address of poll messages (required unless mock)"),
    Setting("SMSP_TIMEOUT", "timeout", _number(float, 0, above=True), 2.0,
            "seconds for one provider attempt, in total"),
    Setting("SMSP_POLL_INTERVAL", "poll_interval", _number(float, 0, above=True), 5.0,
            "seconds before the first poll of an open circuit"),
    Setting("SMSP_POLL_INTERVAL_MAX", "poll_interval_max", _number(float, 0, above=True), 60.0,
            "cap of the doubling poll interval"),
    Setting("SMSP_FAILURE_THRESHOLD", "failure_threshold", _number(int, 1), 1,
            "consecutive failures that open a circuit"),
    Setting("SMSP_MAX_BODY_BYTES", "max_body_bytes", _number(int, 1), 1 << 20,
            "largest request body accepted"),
    Setting("SMSP_MAX_INFLIGHT_BODY_BYTES", "max_inflight_body_bytes", _number(int, 1), 1 << 20,
            "request body bytes being received and sent at once; one more gets 503"),
    Setting("SMSP_HOST", "host", _parse_text, "0.0.0.0", "listen address (--host)"),
    Setting("SMSP_PORT", "port", _number(int, 0), 8080, "listen port (--port)"),
    Setting("SMSP_LOG_OUTPUT_FORMAT", "log_format", _parse_log_format, "DEBUG",
            "DEBUG (readable), JSON_ONELINE (alias JSON_ONLINE) or JSON_PRETTY"),
    Setting("SMSP_LOG_OUTPUT_DEBUG", "log_debug", _parse_bool, False,
            "true adds debug events (provider attempts, addresses)"),
    Setting("SMSP_MAX_CONNECTIONS", "max_connections", _number(int, 1), 1024,
            "client connections served at once; one more gets 503"),
    Setting("SMSP_CLIENT_TIMEOUT", "client_timeout", _number(float, 0, above=True), 10.0,
            "seconds a client has to send a whole request, idle wait included"),
    Setting("SMSP_SHUTDOWN_GRACE", "shutdown_grace", _number(float, 0), 10.0,
            "seconds in-flight requests get to finish on SIGTERM"),
    Setting("SMSP_IDEMPOTENCY_TTL", "idempotency_ttl", _number(float, 0, above=True), 86400.0,
            "seconds an Idempotency-Key response is kept"),
    Setting("SMSP_IDEMPOTENCY_MAX", "idempotency_max", _number(int, 1), 10000,
            "Idempotency-Key responses kept (least recently used evicted)"),
    Setting("SMSP_TLS_CERT", "tls_cert", _parse_text, "", "PEM certificate: serve HTTPS only"),
    Setting("SMSP_TLS_KEY", "tls_key", _parse_text, "", "PEM private key for SMSP_TLS_CERT"),
    Setting("SMSP_POOL_SIZE", "pool_size", _number(int, 0), 16,
            "persistent connections kept per provider (0: a fresh one per send)"),
    Setting("SMSP_POOL_IDLE", "pool_idle", _number(float, 0, above=True), 15.0,
            "seconds an idle provider connection is kept"),
    Setting("SMSP_WORKERS", "workers", _number(int, 1), 1,
            "worker processes sharing the port (each has its own breakers)"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration, parsed once; see SETTINGS for defaults and meaning."""

    api_keys: tuple[str, ...]
    mock: bool = False
    providers: tuple[str, ...] = ("mailgun", "sendgrid")
    mg_domain: str = ""
    mg_api_key: str = ""
    mg_base_url: str = "https://api.mailgun.net"
    sg_api_key: str = ""
    sg_base_url: str = "https://api.sendgrid.com"
    poll_address: str = ""
    timeout: float = 2.0
    poll_interval: float = 5.0
    poll_interval_max: float = 60.0
    failure_threshold: int = 1
    max_body_bytes: int = 1 << 20
    max_inflight_body_bytes: int = 1 << 20
    host: str = "0.0.0.0"
    port: int = 8080
    log_format: str = "DEBUG"
    log_debug: bool = False
    max_connections: int = 1024
    client_timeout: float = 10.0
    shutdown_grace: float = 10.0
    idempotency_ttl: float = 86400.0
    idempotency_max: int = 10000
    tls_cert: str = ""
    tls_key: str = ""
    pool_size: int = 16
    pool_idle: float = 15.0
    workers: int = 1

    @property
    def active_providers(self) -> tuple[str, ...]:
        return ("mock",) if self.mock else self.providers

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> "Config":
        """Parse ``env``; raise ConfigError naming every problem at once.

        ``overrides`` (from the command line) win over the environment; a
        value of None means "not given".
        """
        values: dict[str, Any] = {}
        problems: list[str] = []
        for setting in SETTINGS:
            raw = env.get(setting.env, "")
            if overrides.get(setting.field) is not None:
                raw = str(overrides[setting.field])
            if raw.strip() == "":
                if setting.default is None:
                    problems.append(f"{setting.env} is required")
                else:
                    values[setting.field] = setting.default
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as exc:
                problems.append(f"{setting.env} {exc}")
        problems += cls._cross_check(values)
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    @staticmethod
    def _cross_check(v: dict[str, Any]) -> list[str]:
        problems = []
        if v.get("poll_interval_max", 60.0) < v.get("poll_interval", 5.0):
            problems.append("SMSP_POLL_INTERVAL_MAX must be at least SMSP_POLL_INTERVAL")
        if bool(v.get("tls_cert")) != bool(v.get("tls_key")):
            problems.append("SMSP_TLS_CERT and SMSP_TLS_KEY must be set together")
        for name in ("tls_cert", "tls_key"):
            if v.get(name) and not os.path.isfile(v[name]):
                problems.append(f"SMSP_{name.upper()} is not a readable file: {v[name]}")
        if v.get("mock"):
            return problems
        needs = {"mailgun": ("SMSP_MG_DOMAIN", "SMSP_MG_API_KEY"), "sendgrid": ("SMSP_SG_API_KEY",)}
        for provider in v.get("providers", ()):
            for env_name in needs[provider]:
                field = next(s.field for s in SETTINGS if s.env == env_name)
                if not v.get(field):
                    problems.append(f"{env_name} is required for provider {provider}")
        if not v.get("poll_address"):
            problems.append("SMSP_POLL_MESSAGE_ADDRESS is required")
        else:
            try:
                parse_address("SMSP_POLL_MESSAGE_ADDRESS", v["poll_address"])
            except ValidationError as exc:
                problems.append(f"SMSP_POLL_MESSAGE_ADDRESS {exc.reason}")
        return problems

    def describe(self) -> list[str]:
        """The effective configuration, one ``NAME=value`` line each, secrets masked."""
        lines = []
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if isinstance(value, tuple):
                shown = ",".join(value)
            elif isinstance(value, bool):
                shown = str(value).lower()
            else:
                shown = str(value)
            if setting.secret and value:
                shown = ",".join("****" for _ in value) if isinstance(value, tuple) else "****"
            lines.append(f"{setting.env}={shown}")
        return lines


# ------------------------------------------------------------------ logging ---


class Level(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


_LEVEL_NAMES = {level: level.name.lower() for level in Level}


PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is not interleaved
LOG_QUEUE_LINES = 8192  # lines waiting for stdout at most (about 4 MB); more are dropped


def _dropped_notice(count: int) -> str:
    return f'{{"level":"warning","event":"log_lines_dropped","dropped":{count}}}\n'


class LineWriter:
    """Writes log lines to a file descriptor in batches, from one daemon thread.

    ``write(line)`` only queues the line (a deque append: no lock, no syscall,
    so a request thread keeps the GIL and never waits for stdout).  At most
    ``max_lines`` wait: past that a line is dropped and counted in
    ``dropped``, and once stdout takes lines again one line made by
    ``notice(count)`` says how many were lost.  Every ``interval`` seconds the
    flusher writes what is queued, whole lines in writes of at most PIPE_BUF
    bytes, so lines of several worker processes sharing one pipe never
    interleave.  ``close()`` (also run at exit) lets the flusher write what
    is left, waiting at most ``grace`` seconds: a reader of stdout that
    stalls holds neither an answer nor the shutdown.  A process killed with
    SIGKILL loses at most the last interval's lines.
    """

    def __init__(self, fd: int = 1, interval: float = 0.05, *,
                 max_lines: int = LOG_QUEUE_LINES, grace: float = 10.0,
                 notice: Callable[[int], str] = _dropped_notice) -> None:
        self._fd = fd
        self._interval = interval
        self._max_lines = max_lines
        self._grace = grace
        self.notice = notice
        self.dropped = 0
        self._told = 0  # of the dropped lines, how many a notice line has counted
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()  # guards the dropped count and the thread's start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        atexit.register(self.close)

    def write(self, line: str) -> None:
        if len(self._queue) >= self._max_lines:  # threads racing past it add a line each
            with self._lock:
                self.dropped += 1
            return
        self._queue.append(line)
        if self._thread is None:
            self._start()

    def _start(self) -> None:  # on first use, so a process can fork before it logs
        with self._lock:
            if self._thread is None:
                self._thread = start_thread(self._run, "smsp-log")

    def _run(self) -> None:  # the only writer of the file descriptor: lines stay in order
        while not self._stop.wait(self._interval):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        batch: list[bytes] = []
        size = 0
        for _ in range(len(self._queue)):  # what is queued now: a notice need not wait for a lull
            data = self._queue.popleft().encode("utf-8", "replace")
            if batch and size + len(data) > PIPE_BUF:
                self._write_all(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            self._write_all(b"".join(batch))
        dropped = self.dropped
        if dropped > self._told:
            self._write_all(self.notice(dropped - self._told).encode("utf-8", "replace"))
            self._told = dropped

    def _write_all(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass  # stdout is gone: nothing better to do with a log line

    def close(self, grace: float | None = None) -> None:
        """Write out what is queued, waiting at most ``grace`` seconds (default: the
        constructor's); a second call returns at once."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(self._grace if grace is None else grace)


def _json_text(value: str) -> str:
    """A JSON string literal, without the json module in the common plain case."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


_DEBUG_QUOTE_RE = re.compile(r'[\s"=\\]')


def _debug_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or not text.isprintable() or _DEBUG_QUOTE_RE.search(text):
        return json.dumps(text)
    return text


class Logger:
    """Writes one structured line per event.

    Thread-safe: every line is one call of ``write`` (by default a
    LineWriter on stdout, or the ``writer`` given; its close waits at most
    ``grace`` seconds for stdout).  Lines are formatted by hand, which costs a few
    microseconds; an access line is written for every request.  Callers must
    never pass secrets or message bodies; addresses go to debug events only.
    The format is DEBUG (``time LEVEL event key=value ...``), JSON_ONELINE
    or JSON_PRETTY.
    """

    def __init__(self, fmt: str = "DEBUG", *, debug: bool = False,
                 write: Callable[[str], None] | None = None, host: str | None = None,
                 worker: int | None = None, wallclock: Callable[[], float] = time.time,
                 writer: LineWriter | None = None, grace: float = 10.0) -> None:
        self.debug_enabled = debug
        self._min = Level.DEBUG if debug else Level.INFO
        if writer is None and write is None:
            writer = LineWriter(grace=grace)
        self._writer = writer
        if writer is not None:
            writer.notice = lambda count: self._line(Level.WARNING, "log_lines_dropped",
                                                     {"dropped": count})
        self._write = writer.write if writer is not None else write
        self._fmt = fmt
        self._host = host or socket.gethostname()
        self._worker = worker
        worker_field = "" if worker is None else f',"worker":{worker}'
        self._json_tail = f',"host":{_json_text(self._host)}{worker_field}'
        self._wallclock = wallclock
        self._second = -1
        self._stamp = ""

    def _time(self) -> str:
        now = self._wallclock()
        second = int(now)
        if second != self._second:  # a benign race: both threads compute the same text
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def log(self, level: Level, event: str, **fields: Any) -> None:
        if level >= self._min:
            self._write(self._line(level, event, fields))

    def _line(self, level: Level, event: str, fields: dict[str, Any]) -> str:
        stamp = self._time()
        if self._fmt == "JSON_ONELINE":  # by hand: this runs for every request
            out = [f'{{"time":"{stamp}","level":"{_LEVEL_NAMES[level]}","event":"{event}"'
                   f'{self._json_tail}']
            for key, value in fields.items():
                kind = type(value)
                if kind is str:
                    out.append(f',"{key}":{_json_text(value)}')
                elif kind is int or (kind is float and math.isfinite(value)):
                    out.append(f',"{key}":{value!r}')
                elif value is not None:
                    out.append(f',"{key}":{json.dumps(value, default=str)}')
            out.append("}\n")
            line = "".join(out)
        elif self._fmt == "DEBUG":
            out = [stamp, _LEVEL_NAMES[level].upper(), event]
            for key, value in fields.items():
                if value is not None:
                    out.append(f"{key}={_debug_value(value)}")
            line = " ".join(out) + "\n"
        else:
            record = {"time": stamp, "level": _LEVEL_NAMES[level], "event": event,
                      "host": self._host}
            if self._worker is not None:
                record["worker"] = self._worker
            record.update((k, v) for k, v in fields.items() if v is not None)
            line = json.dumps(record, indent=2, default=str) + "\n"
        return line

    @property
    def dropped(self) -> int:
        """Lines dropped because stdout did not take them (0 with a custom ``write``)."""
        return self._writer.dropped if self._writer is not None else 0

    def close(self, grace: float | None = None) -> None:
        """Write out what is queued, waiting at most ``grace`` seconds for stdout."""
        if self._writer is not None:
            self._writer.close(grace)

    def debug(self, event: str, **fields: Any) -> None:
        if self.debug_enabled:
            self.log(Level.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log(Level.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log(Level.WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log(Level.ERROR, event, **fields)


class IdGenerator:
    """Unique ids in UUID4 form that an observer cannot predict from earlier ones.

    Each id is 122 bits of a Mersenne Twister seeded from os.urandom when the
    generator is made (each process, and each forked worker, makes its own).
    Not cryptographic, but no id tells the next one or how many came between:
    ids reach anonymous pages, and a counter there would count the traffic.
    ``getrandbits`` runs in C under the GIL, so calls from threads are safe.
    """

    def __init__(self) -> None:
        self._bits = random.Random(os.urandom(32)).getrandbits

    def __call__(self) -> str:
        h = f"{self._bits(128) & _UUID_RANDOM_BITS | _UUID4_BITS:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -------------------------------------------------- messages and validation ---


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """One attached file, decoded; with ``content_id`` it is an inline part (``cid:``)."""

    filename: str
    content_type: str
    content: bytes
    content_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One email, already validated.  Empty means absent for every optional field."""

    sender: Address
    to: tuple[Address, ...]
    subject: str = ""
    text: str = ""
    html: str = ""
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: Address | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Everyone the message goes to: to, cc and bcc."""
        return self.to + self.cc + self.bcc


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")
_TOO_DEEP = f"malformed JSON: nested too deeply (at most {MAX_JSON_DEPTH} levels)"


def _json_too_deep(raw: bytes) -> bool:
    """Whether valid JSON ``raw`` nests arrays and objects deeper than MAX_JSON_DEPTH.

    With no more brackets than that (a usual body), it cannot.  Otherwise the
    strings are cut out (brackets in them do not nest), and each round
    removes the innermost pairs: a valid document is gone after as many
    rounds as it is deep.  Invalid JSON may come out either way; the decoder
    refuses it then.  All of it runs in C.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    brackets = _JSON_STRING_RE.sub(b"", raw).translate(_AS_SQUARE, _NOT_BRACKET)
    for _ in range(MAX_JSON_DEPTH):
        shorter = brackets.replace(b"[]", b"")
        if shorter == brackets:
            return False  # unbalanced: not JSON, and the decoder will say why
        brackets = shorter
    return brackets != brackets.replace(b"[]", b"")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body: strict UTF-8 JSON object, no duplicate keys.

    Arrays and objects nest at most MAX_JSON_DEPTH deep, so that nothing
    that walks the document later (re-encoding it for an Idempotency-Key)
    can run out of stack.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("", f"body is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise ValidationError("", "body starts with a byte-order mark; send UTF-8 JSON without it")
    if _json_too_deep(raw):
        raise ValidationError("", _TOO_DEEP)
    try:
        document = _DECODER.decode(text)
    except RecursionError:
        raise ValidationError("", _TOO_DEEP) from None
    except ValueError as exc:
        raise ValidationError("", f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ValidationError("", "body must be a JSON object")
    return document


def parse_message(document: Mapping[str, Any]) -> Message:
    """Validate a decoded POST /email body; unknown fields are ignored."""
    for field in ("fromaddress", "toaddress"):
        if field not in document:
            raise ValidationError(field, "is required")
    sender = parse_address("fromaddress", document["fromaddress"])
    recipient = parse_address("toaddress", document["toaddress"])
    subject = document.get("subject", "")
    body = document.get("plaintextbody", "")
    if not isinstance(subject, str):
        raise ValidationError("subject", "must be a string")
    if len(subject) > MAX_SUBJECT:
        raise ValidationError("subject", f"must be at most {MAX_SUBJECT} characters")
    if not (subject.isascii() and subject.isprintable()):
        if _CONTROL_RE.search(subject):
            raise ValidationError("subject", "must not contain CR, LF or other control characters")
        _check_text("subject", subject)
    if not isinstance(body, str):
        raise ValidationError("plaintextbody", "must be a string")
    if "\x00" in body:
        raise ValidationError("plaintextbody", "must not contain NUL characters")
    _check_text("plaintextbody", body)
    return Message(sender, (recipient,), subject, body)


# ------------------------------------------------------------------ metrics ---

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                     "CONNECT"})


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    kind: str
    help: str
    labels: tuple[str, ...]


FAMILIES = (
    Family("smsp_http_requests_total", "counter", "HTTP requests answered.",
           ("method", "route", "status")),
    Family("smsp_http_request_duration_seconds", "histogram", "HTTP request duration.",
           ("route",)),
    Family("smsp_provider_attempts_total", "counter", "Provider attempts by outcome.",
           ("provider", "outcome")),
    Family("smsp_provider_attempt_duration_seconds", "histogram", "Provider attempt duration.",
           ("provider",)),
    Family("smsp_circuit_open", "gauge", "1 while the provider's circuit is open.",
           ("provider",)),
    Family("smsp_circuit_transitions_total", "counter", "Circuit state changes.",
           ("provider", "to")),
    Family("smsp_circuit_polls_total", "counter", "Polls of open circuits.",
           ("provider", "result")),
    Family("smsp_inflight_requests", "gauge", "Requests being served now.", ()),
    Family("smsp_log_lines_dropped_total", "counter",
           "Log lines dropped because stdout did not take them.", ()),
    Family("smsp_build_info", "gauge", "Build information.", ("version",)),
    Family("process_start_time_seconds", "gauge", "Start time of the process since the epoch.",
           ()),
)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters and histograms, written in the Prometheus text format 0.0.4.

    Thread-safe; the lock guards only the dictionaries.  Gauges, and counters
    kept by another object, are read at scrape time from the objects that own
    them (``render(gauges)``).  With
    ``worker`` set, every series carries a ``worker`` label.
    """

    def __init__(self, *, worker: int | None = None, start_time: float | None = None) -> None:
        self._families = {f.name: f for f in FAMILIES}
        self._worker = worker
        self._start = time.time() if start_time is None else start_time
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[str, ...]], float] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], list[Any]] = {}

    def inc(self, name: str, *labels: str, amount: float = 1) -> None:
        key = (name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name: str, value: float, *labels: str) -> None:
        self.count_and_observe(None, (), name, labels, value)

    def count_and_observe(self, counter: str | None, counter_labels: tuple[str, ...],
                          histogram: str, histogram_labels: tuple[str, ...],
                          value: float) -> None:
        """Increment a counter and observe a histogram under one lock (once per request)."""
        slot = bisect.bisect_left(DURATION_BUCKETS, value)  # len(DURATION_BUCKETS): +Inf only
        key = (histogram, histogram_labels)
        with self._lock:
            if counter is not None:
                counted = (counter, counter_labels)
                self._counters[counted] = self._counters.get(counted, 0) + 1
            entry = self._histograms.get(key)
            if entry is None:
                entry = self._histograms[key] = [[0] * (len(DURATION_BUCKETS) + 1), 0.0, 0]
            entry[0][slot] += 1
            entry[1] += value
            entry[2] += 1

    def _labels(self, family: Family, values: Iterable[str], extra: str = "") -> str:
        pairs = [f'{k}="{_label_value(v)}"' for k, v in zip(family.labels, values)]
        if self._worker is not None:
            pairs.append(f'worker="{self._worker}"')
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def render(self, gauges: Mapping[str, Iterable[tuple[tuple[str, ...], float]]]) -> str:
        with self._lock:
            counters = dict(self._counters)
            histograms = {k: [list(v[0]), v[1], v[2]] for k, v in self._histograms.items()}
        gauges = dict(gauges)
        gauges["smsp_build_info"] = [((VERSION,), 1)]
        gauges["process_start_time_seconds"] = [((), self._start)]
        lines = []
        for family in FAMILIES:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if family.kind == "histogram":
                for (name, labels), (buckets, total, count) in sorted(histograms.items()):
                    if name != family.name:
                        continue
                    cumulative = 0
                    for bound, n in zip(DURATION_BUCKETS, buckets):
                        cumulative += n
                        le = self._labels(family, labels, f'le="{bound:g}"')
                        lines.append(f"{name}_bucket{le} {cumulative}")
                    inf = self._labels(family, labels, 'le="+Inf"')
                    lines.append(f"{name}_bucket{inf} {count}")
                    lines.append(f"{name}_sum{self._labels(family, labels)} {total:.6f}")
                    lines.append(f"{name}_count{self._labels(family, labels)} {count}")
                continue
            if family.kind == "gauge" or family.name in gauges:
                series = sorted(gauges.get(family.name, ()))
            else:
                series = sorted((labels, v) for (n, labels), v in counters.items()
                                if n == family.name)
            for labels, value in series:
                lines.append(f"{family.name}{self._labels(family, labels)} {value:.17g}")
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------- HTTP client ---


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A provider's HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class HTTPClient:
    """POSTs to one provider over a small pool of persistent connections.

    Thread-safe.  ``post`` bounds the whole exchange by ``deadline`` (the
    watchdog shuts the socket when it passes, so a reply dripped byte by byte
    cannot stretch it) and classifies transport failures: before the request
    was written, NOT_SENT; after, UNKNOWN.  A reused connection is checked
    without blocking first (readable means the provider closed it), and
    nothing is retried: reuse never changes the classification.  Redirects
    are not followed.
    """

    def __init__(self, base_url: str, *, watchdog: Watchdog, pool_size: int = 16,
                 pool_idle: float = 15.0, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        url = urllib.parse.urlsplit(base_url)
        self._https = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._context = (ssl_context or ssl.create_default_context()) if self._https else None
        self._watchdog = watchdog
        self._size = pool_size
        self._idle_limit = pool_idle
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self.connections_made = 0  # for tests and the benchmark

    def _acquire(self) -> http.client.HTTPConnection:
        now = self._clock()
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            if now - since <= self._idle_limit and self._still_open(conn):
                return conn
            conn.close()
        self.connections_made += 1
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, context=self._context)
        return http.client.HTTPConnection(self._host, self._port)

    @staticmethod
    def _still_open(conn: http.client.HTTPConnection) -> bool:
        sock = conn.sock
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False  # unread bytes from a finished exchange: not a clean state
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)  # readable on an idle connection means EOF or junk

    def _release(self, conn: http.client.HTTPConnection) -> None:
        now = self._clock()
        stale = []
        with self._lock:
            while self._idle and now - self._idle[0][1] > self._idle_limit:
                stale.append(self._idle.pop(0)[0])  # the oldest sit at the bottom
            if len(self._idle) < self._size:
                self._idle.append((conn, now))
            else:
                stale.append(conn)  # the pool is full
        for old in stale:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    @staticmethod
    def _read_body(response: http.client.HTTPResponse) -> bytes:
        """The whole reply body; IncompleteRead when it was cut short.

        ``read()`` raises IncompleteRead on a short Content-Length body but
        ``read(amt)`` does not, so the size bound is checked on the declared
        length instead; a chunked body is read with the bound (a cut chunk
        raises).  An over-long reply is not read and its connection not reused.
        """
        if response.length is not None:
            if response.length <= MAX_PROVIDER_REPLY:
                return response.read()
            data = b""
        else:
            data = response.read(MAX_PROVIDER_REPLY)
        if not response.isclosed():
            response.close()
            response.will_close = True
        return data

    def post(self, path: str, headers: Mapping[str, str], body: bytes, deadline: float) -> Reply:
        conn = self._acquire()
        attempt = Deadline(deadline, conn)
        written = False
        self._watchdog.watch(attempt)  # before connecting: it bounds the TLS handshake too
        try:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise TimeoutError("no time left for the attempt")
            if conn.sock is None:
                conn.timeout = remaining  # per operation; the watchdog bounds the total
                conn.connect()
            else:
                conn.sock.settimeout(remaining)
            conn.request("POST", self._prefix + path, body, dict(headers))
            written = True
            response = conn.getresponse()
            data = self._read_body(response)
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            attempt.finish()
            conn.close()
            timed_out = isinstance(exc, TimeoutError) or attempt.expired or \
                self._clock() >= deadline
            reason = "timed out" if timed_out else f"{type(exc).__name__}: {exc}"[:200]
            if not written:
                raise ProviderError(Outcome.NOT_SENT, f"request not sent: {reason}") from None
            raise ProviderError(Outcome.UNKNOWN, f"no complete answer: {reason}",
                                timed_out=timed_out) from None
        attempt.finish()
        if response.will_close or attempt.expired:
            conn.close()
        else:
            self._release(conn)
        return reply


# ---------------------------------------------------------------- providers ---


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """A provider accepted the message.  ``warning`` notes a malformed success reply."""

    provider: str
    message_id: str | None
    warning: str | None = None


def _error_text(reply: Reply) -> str:
    """The provider's own error message: Mailgun's ``message`` or SendGrid's ``errors``."""
    text = reply.body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        if isinstance(document.get("errors"), list):
            parts = []
            for item in document["errors"]:
                if isinstance(item, dict):
                    field = f" ({item['field']})" if item.get("field") else ""
                    parts.append(f"{item.get('message', '')}{field}")
            text = "; ".join(parts)
        elif isinstance(document.get("message"), str):
            text = document["message"]
    text = " ".join(text.split())
    return text[:MAX_PROVIDER_MESSAGE]


class Provider:
    """An email provider.  Subclasses set ``name`` and implement ``send``.

    ``send(message, deadline)`` returns a Receipt or raises ProviderError; it
    never outlives ``deadline`` (a ``clock()`` time) by more than a moment.
    Implementations are thread-safe.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config: Config, *, watchdog: Watchdog, clock: Callable[[], float],
                    stop: threading.Event) -> "Provider":
        raise NotImplementedError

    def send(self, message: Message, deadline: float) -> Receipt:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; called at shutdown."""


class HTTPProvider(Provider):
    """A provider reached over HTTP: subclasses encode requests and read receipts."""

    path: ClassVar[str] = ""

    base_url_field: ClassVar[str] = ""

    def __init__(self, client: HTTPClient) -> None:
        self.client = client

    @classmethod
    def client_for(cls, config: Config, *, watchdog: Watchdog, clock: Callable[[], float]
                   ) -> HTTPClient:
        return HTTPClient(getattr(config, cls.base_url_field), watchdog=watchdog,
                          pool_size=config.pool_size, pool_idle=config.pool_idle, clock=clock,
                          ssl_context=ssl.create_default_context())

    def encode(self, message: Message) -> tuple[dict[str, str], bytes]:
        raise NotImplementedError

    def receipt(self, reply: Reply) -> Receipt:
        raise NotImplementedError

    def send(self, message: Message, deadline: float) -> Receipt:
        headers, body = self.encode(message)
        headers["User-Agent"] = SERVER_NAME
        reply = self.client.post(self.path, headers, body, deadline)
        outcome = classify_status(reply.status)
        if outcome is Outcome.SENT:
            return self.receipt(reply)
        detail = _error_text(reply)
        raise ProviderError(outcome, f"HTTP {reply.status}: {detail}"[:MAX_PROVIDER_MESSAGE],
                            detail=detail)

    def close(self) -> None:
        self.client.close()


class MailgunProvider(HTTPProvider):
    """``POST /v3/{domain}/messages``, form-encoded, HTTP Basic ``api:key``."""

    name = "mailgun"
    base_url_field = "mg_base_url"

    @classmethod
    def from_config(cls, config: Config, *, watchdog: Watchdog, clock: Callable[[], float],
                    stop: threading.Event) -> "MailgunProvider":
        client = cls.client_for(config, watchdog=watchdog, clock=clock)
        return cls(client, config.mg_domain, config.mg_api_key)

    def __init__(self, client: HTTPClient, domain: str, api_key: str) -> None:
        super().__init__(client)
        self.path = f"/v3/{urllib.parse.quote(domain, safe='')}/messages"
        token = base64.b64encode(f"api:{api_key}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"

    def encode(self, message: Message) -> tuple[dict[str, str], bytes]:
        fields = {"from": str(message.sender), "to": str(message.to[0]),
                  "subject": message.subject, "text": message.text or " "}
        return ({"Authorization": self._authorization, "Accept": "application/json",
                 "Content-Type": "application/x-www-form-urlencoded"},
                urllib.parse.urlencode(fields).encode("ascii"))

    def receipt(self, reply: Reply) -> Receipt:
        try:
            document = json.loads(reply.body)
            message_id = document["id"]
            if not isinstance(message_id, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            return Receipt(self.name, None, f"HTTP {reply.status} without a JSON id")
        return Receipt(self.name, message_id)


class SendGridProvider(HTTPProvider):
    """``POST /v3/mail/send``, JSON, ``Bearer`` key; 202 with ``X-Message-Id``."""

    name = "sendgrid"
    path = "/v3/mail/send"
    base_url_field = "sg_base_url"

    @classmethod
    def from_config(cls, config: Config, *, watchdog: Watchdog, clock: Callable[[], float],
                    stop: threading.Event) -> "SendGridProvider":
        return cls(cls.client_for(config, watchdog=watchdog, clock=clock), config.sg_api_key)

    def __init__(self, client: HTTPClient, api_key: str) -> None:
        super().__init__(client)
        self._authorization = f"Bearer {api_key}"

    @staticmethod
    def _party(address: Address) -> dict[str, str]:
        return {"email": address.email, "name": address.name} if address.name \
            else {"email": address.email}

    def encode(self, message: Message) -> tuple[dict[str, str], bytes]:
        document = {  # SendGrid rejects an empty subject or content value: send one space
            "personalizations": [{"to": [self._party(message.to[0])]}],
            "from": self._party(message.sender),
            "subject": message.subject or " ",
            "content": [{"type": "text/plain", "value": message.text or " "}],
        }
        return ({"Authorization": self._authorization, "Accept": "application/json",
                 "Content-Type": "application/json"},
                json.dumps(document, separators=(",", ":")).encode("utf-8"))

    def receipt(self, reply: Reply) -> Receipt:
        message_id = reply.headers.get("x-message-id")
        if not message_id:
            return Receipt(self.name, None, f"HTTP {reply.status} without X-Message-Id")
        return Receipt(self.name, message_id)


class MockProvider(Provider):
    """The demo and functional-test provider, keyed on the subject.

    ``timeout`` blocks until the deadline and then times out (it wakes early
    only when ``stop`` is set); ``fail`` fails as a provider 500 would;
    anything else is sent with message id ``mock-<uuid>``.
    """

    name = "mock"

    @classmethod
    def from_config(cls, config: Config, *, watchdog: Watchdog, clock: Callable[[], float],
                    stop: threading.Event) -> "MockProvider":
        return cls(clock=clock, stop=stop)

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 stop: threading.Event | None = None, ids: Callable[[], str] | None = None
                 ) -> None:
        self._clock = clock
        self._stop = stop or threading.Event()
        self._ids = ids or IdGenerator()

    def send(self, message: Message, deadline: float) -> Receipt:
        if message.subject == "timeout":
            self._stop.wait(max(0.0, deadline - self._clock()))
            raise ProviderError(Outcome.UNKNOWN, "no complete answer: timed out", timed_out=True)
        if message.subject == "fail":
            raise ProviderError(Outcome.NOT_SENT, "HTTP 500: mock provider failure")
        return Receipt(self.name, f"mock-{self._ids()}")


PROVIDERS: dict[str, type[Provider]] = {
    "mailgun": MailgunProvider, "sendgrid": SendGridProvider, "mock": MockProvider,
}


def build_providers(config: Config, *, watchdog: Watchdog, clock: Callable[[], float],
                    stop: threading.Event) -> list[Provider]:
    """The configured providers, in order; one SSLContext per provider, made now."""
    providers: list[Provider] = []
    for name in config.active_providers:
        providers.append(PROVIDERS[name].from_config(config, watchdog=watchdog, clock=clock,
                                                     stop=stop))
    return providers


# ---------------------------------------------------------- circuit breaker ---


class State(enum.Enum):
    """A circuit's state: closed carries real mail, open carries only polls."""

    CLOSED = "closed"
    OPEN = "open"


@dataclasses.dataclass(frozen=True, slots=True)
class StateChange:
    """One transition, handed to ``on_change`` after the breaker's lock is released."""

    breaker: str
    old: State
    new: State
    reason: str


def start_timer(delay: float, function: Callable[[], None]) -> threading.Timer:
    """The default timer factory: a daemon ``threading.Timer``, already started."""
    timer = threading.Timer(delay, function)
    timer.daemon = True
    timer.start()
    return timer


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class CircuitBreaker:
    """A circuit breaker in front of one provider (modelled on gobreaker).

    Callers: ``acquire()`` returns a generation while the circuit is closed
    (None when open: send no real mail), then report the attempt with
    ``on_success(generation)`` or ``on_failure(generation, reason)``.  A
    report from an older generation is ignored, so a slow failure that
    started before the last state change cannot reopen a fresh circuit.

    After ``threshold`` consecutive failures the circuit opens and a timer
    calls ``probe()`` (which returns None when healthy, else a reason) after
    ``interval`` seconds; each failed poll doubles the interval up to
    ``interval_max``; a successful poll closes the circuit.  Thread-safe: the
    lock guards only this bookkeeping, never a provider call, a timer start,
    a callback or a log line.  ``clock`` and ``timer`` are injectable.
    """

    def __init__(self, name: str, probe: Callable[[], str | None], *, threshold: int = 1,
                 interval: float = 5.0, interval_max: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[float, Callable[[], None]], Any] = start_timer,
                 on_change: Callable[[StateChange], None] | None = None,
                 on_poll: Callable[[str, bool], None] | None = None,
                 epoch: float | None = None) -> None:
        self.name = name
        self._probe = probe
        self._threshold = threshold
        self._base_interval = interval
        self._max_interval = interval_max
        self._clock = clock
        self._timer_factory = timer
        self._on_change = on_change
        self._on_poll = on_poll
        self._epoch = time.time() - time.monotonic() if epoch is None else epoch
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._generation = 0
        self._failures = 0
        self._interval = interval
        self._opened_at: float | None = None
        self._next_poll_at: float | None = None
        self._last_error: str | None = None
        self._timer: Any = None
        self._stopped = False

    @property
    def state(self) -> State:
        return self._state

    def acquire(self) -> int | None:
        with self._lock:
            return self._generation if self._state is State.CLOSED else None

    def on_success(self, generation: int) -> None:
        if not self._failures:  # the usual case; a failure racing in counts as if after us
            return
        with self._lock:
            if generation == self._generation:
                self._failures = 0

    def on_failure(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation or self._state is not State.CLOSED:
                return
            self._failures += 1
            self._last_error = reason
            if self._failures < self._threshold:
                return
            self._state = State.OPEN
            self._generation += 1
            self._opened_at = self._clock()
            self._interval = self._base_interval
            self._next_poll_at = self._opened_at + self._interval
            poll = (self._interval, self._generation)
            change = StateChange(self.name, State.CLOSED, State.OPEN, reason)
        self._schedule(*poll)
        self._notify(change)

    def retry_after(self) -> float | None:
        """Seconds until the next poll of an open circuit; None when closed."""
        with self._lock:
            if self._state is State.CLOSED or self._next_poll_at is None:
                return None
            return max(0.0, self._next_poll_at - self._clock())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            wall = self._epoch
            return {
                "name": self.name,
                "state": self._state.value,
                "consecutive_failures": self._failures,
                "opened_at": _iso(None if self._opened_at is None else wall + self._opened_at),
                "next_poll_at": _iso(None if self._next_poll_at is None
                                     else wall + self._next_poll_at),
                "last_error": self._last_error,
            }

    def stop(self) -> None:
        """Cancel the pending poll; the breaker polls no more."""
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _schedule(self, delay: float, generation: int) -> None:
        timer = self._timer_factory(delay, lambda: self._poll(generation))
        with self._lock:
            current = not self._stopped and generation == self._generation
            if current:
                self._timer = timer
        if not current:
            timer.cancel()

    def _poll(self, generation: int) -> None:
        with self._lock:
            if self._stopped or generation != self._generation:
                return
        try:
            error = self._probe()
        except Exception as exc:  # a broken probe is a failed poll
            error = f"probe raised {type(exc).__name__}"
        change = None
        with self._lock:
            if self._stopped or generation != self._generation:
                return
            if error is None:
                change = StateChange(self.name, State.OPEN, State.CLOSED, "poll succeeded")
                self._state = State.CLOSED
                self._generation += 1
                self._failures = 0
                self._interval = self._base_interval
                self._opened_at = self._next_poll_at = None
            else:
                self._last_error = error
                self._interval = min(self._interval * 2, self._max_interval)
                self._next_poll_at = self._clock() + self._interval
                delay = self._interval
        if self._on_poll is not None:
            self._on_poll(self.name, error is None)
        if change is not None:
            self._notify(change)
        else:
            self._schedule(delay, generation)

    def _notify(self, change: StateChange) -> None:
        if self._on_change is not None:
            self._on_change(change)


def make_probe(provider: Provider, poll: Message, timeout: float,
               clock: Callable[[], float] = time.monotonic) -> Callable[[], str | None]:
    """A breaker probe that sends the poll message; a rejection still proves health."""
    def probe() -> str | None:
        try:
            provider.send(poll, clock() + timeout)
        except ProviderError as exc:
            return None if exc.outcome is Outcome.REJECTED else exc.reason
        return None
    return probe


# --------------------------------------------------------------- dispatcher ---


class DeliveryFailed(SmspError):
    """No provider accepted the message; carries the HTTP answer for the client."""

    def __init__(self, status: int, delivery: Delivery, message: str, *,
                 provider: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.delivery = delivery
        self.message = message
        self.provider = provider
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Route:
    """A provider and the breaker in front of it."""

    provider: Provider
    breaker: CircuitBreaker


class Dispatcher:
    """Sends a message through the first provider whose circuit is closed.

    Fails over only when the message certainly was not sent (Outcome.NOT_SENT);
    a rejection (422) or an unknown fate (502/504 unknown) is final, so
    nothing is sent twice by our doing.  Thread-safe; holds no lock itself.
    """

    def __init__(self, routes: list[Route], *, timeout: float, log: Logger,
                 metrics: "Metrics", clock: Callable[[], float] = time.monotonic) -> None:
        self.routes = routes
        self._timeout = timeout
        self._log = log
        self._metrics = metrics
        self._clock = clock

    def send(self, message: Message, request_id: str | None = None) -> Receipt:
        last: tuple[str, ProviderError] | None = None
        for route in self.routes:
            generation = route.breaker.acquire()
            if generation is None:
                continue
            name = route.provider.name
            started = self._clock()
            try:
                receipt = route.provider.send(message, started + self._timeout)
            except ProviderError as exc:
                error = exc
            except Exception as exc:  # a bug may have sent it: treat the fate as unknown
                error = ProviderError(Outcome.UNKNOWN, f"internal error {type(exc).__name__}")
            else:
                route.breaker.on_success(generation)
                self._attempted(name, "sent", started, request_id, message)
                if receipt.warning:
                    self._log.warning("provider_reply_malformed", request_id=request_id,
                                      provider=name, detail=receipt.warning)
                return receipt
            if error.trips_breaker:
                route.breaker.on_failure(generation, error.reason)
            else:
                route.breaker.on_success(generation)
            self._attempted(name, error.outcome.value, started, request_id, message, error.reason)
            if error.outcome is not Outcome.NOT_SENT:
                raise self._failed(name, error)
            last = (name, error)
        if last is None:
            waits = [w for w in (r.breaker.retry_after() for r in self.routes) if w is not None]
            raise DeliveryFailed(503, Delivery.NOT_SENT,
                                 "no provider available: every circuit is open; retry later",
                                 retry_after=max(1, math.ceil(min(waits, default=1.0))))
        raise self._failed(*last)

    def _attempted(self, name: str, outcome: str, started: float, request_id: str | None,
                   message: Message, reason: str | None = None) -> None:
        elapsed = self._clock() - started
        self._metrics.count_and_observe("smsp_provider_attempts_total", (name, outcome),
                                        "smsp_provider_attempt_duration_seconds", (name,),
                                        elapsed)
        if self._log.debug_enabled:
            self._log.debug("provider_attempt", request_id=request_id, provider=name,
                            outcome=outcome, duration_ms=round(elapsed * 1000, 2),
                            reason=reason, fromaddress=message.sender.email,
                            toaddress=message.to[0].email)

    def _failed(self, name: str, error: ProviderError) -> DeliveryFailed:
        if error.outcome is Outcome.REJECTED:
            return DeliveryFailed(422, Delivery.NOT_SENT,
                                  f"{name} rejected the message: {error.detail}",
                                  provider=name)
        if error.outcome is Outcome.UNKNOWN and error.timed_out:
            return DeliveryFailed(504, Delivery.UNKNOWN,
                                  f"{name} did not answer within {self._timeout:g} s; the "
                                  "message may have been sent, so it was not tried elsewhere",
                                  provider=name)
        if error.outcome is Outcome.UNKNOWN:
            return DeliveryFailed(502, Delivery.UNKNOWN,
                                  f"{name} failed after the request was sent ({error.reason}); "
                                  "the message may have been sent", provider=name)
        return DeliveryFailed(502, Delivery.NOT_SENT,
                              f"{name} failed ({error.reason}) and no other provider could "
                              "take the message", provider=name)


# -------------------------------------------------------------- idempotency ---


class Claim(enum.Enum):
    """What ``IdempotencyStore.claim`` found for a key."""

    NEW = "new"  # go ahead; call complete() or release() afterwards
    REPLAY = "replay"  # a final response is stored: send it again, send no mail
    IN_FLIGHT = "in_flight"  # the first request with this key is still running
    MISMATCH = "mismatch"  # the key was used with a different body


@dataclasses.dataclass(slots=True)
class _Stored:
    fingerprint: str
    response: Any = None
    expires: float = math.inf


class IdempotencyStore:
    """Final responses by (scope, Idempotency-Key), per process, bounded.

    At most ``max_entries`` keys are kept, least recently used evicted first
    (never one still in flight); each completed entry lives ``ttl`` seconds.
    Thread-safe; the lock guards only the dictionary.
    """

    def __init__(self, *, ttl: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[Any, str], _Stored] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: tuple[Any, str], fingerprint: str) -> tuple[Claim, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= self._clock():
                del self._entries[key]
                entry = None
            if entry is None:
                self._entries[key] = _Stored(fingerprint)
                self._evict()
                return Claim.NEW, None
            self._entries.move_to_end(key)
            if entry.fingerprint != fingerprint:
                return Claim.MISMATCH, None
            if entry.response is None:
                return Claim.IN_FLIGHT, None
            return Claim.REPLAY, entry.response

    def complete(self, key: tuple[Any, str], response: Any) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.response = response
                entry.expires = self._clock() + self._ttl

    def release(self, key: tuple[Any, str]) -> None:
        """Forget an in-flight key whose request ended with nothing worth replaying."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.response is None:
                del self._entries[key]

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            victim = next((k for k, e in self._entries.items() if e.response is not None), None)
            if victim is None:
                return  # every entry is in flight; they are bounded by the connection limit
            del self._entries[victim]


# --------------------------------------- HTTP messages: parsing and writing ---

_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_UNIQUE_HEADERS = frozenset({"content-length", "transfer-encoding", "content-type", "host",
                             "x-api-key", "idempotency-key"})
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class HTTPError(SmspError):
    """A request the parser refuses, with the status http.server would give it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(SmspError):
    """The client closed the connection or ran out of time mid-request."""


_COMMON_VERSIONS = {b"HTTP/1.1": (1, 1), b"HTTP/1.0": (1, 0)}
_VERSION_RE = re.compile(rb"HTTP/[0-9]{1,10}\.[0-9]{1,10}")  # the length limit is http.server's
_TARGET_BYTES = bytes(range(0x21, 0x7F))  # visible ASCII: a URI has no space or control
_REQUEST_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/1\.[01])\r?\n")
_FIELD_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # every control but HTAB


def _parse_version(word: bytes) -> tuple[int, int]:
    """HTTP/1.1 or HTTP/1.0; 505 for any other ``HTTP/x.y``, 400 when malformed."""
    version = _COMMON_VERSIONS.get(word)
    if version is not None:
        return version
    text = word.decode("iso-8859-1")
    if _VERSION_RE.fullmatch(word):
        raise HTTPError(505, f"Invalid HTTP version ({text[5:]}); HTTP/1.1 and 1.0 are served")
    raise HTTPError(400, f"Bad request version ({text[:100]!r})")


def parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    """Method, target and version of ``method SP target SP version CRLF`` (RFC 9112 §3).

    Raises HTTPError: 400 unless exactly one space separates three parts (a
    tab, VT, NEL or NBSP there included), the method is a token and the
    target visible ASCII; 400 for HTTP/0.9's two parts or a malformed
    version, 505 for a version other than HTTP/1.1 and HTTP/1.0.
    """
    usual = _REQUEST_LINE_RE.fullmatch(line)  # one C call for a well-formed line
    if usual is not None:
        return usual[1].decode("ascii"), usual[2].decode("ascii"), _COMMON_VERSIONS[usual[3]]
    parts = line[:-2 if line.endswith(b"\r\n") else -1].split(b" ")
    if len(parts) == 2 and not parts[1].startswith(b"HTTP/"):
        raise HTTPError(400, "HTTP/0.9 requests are not supported")
    if len(parts) != 3:
        raise HTTPError(400, f"Bad request syntax ({line[:100].decode('iso-8859-1')!r})")
    method, target, word = parts
    version = _parse_version(word)
    if not method or method.translate(None, _TOKEN_BYTES) or not target \
            or target.translate(None, _TARGET_BYTES):
        raise HTTPError(400, f"Bad request syntax ({line[:100].decode('iso-8859-1')!r})")
    return method.decode("ascii"), target.decode("ascii"), version


def read_headers(rfile: Any, limit: int = MAX_HEAD) -> dict[str, str]:
    """Read header lines up to the blank line, at most ``limit`` bytes in all.

    Past ``limit`` (checked as the bytes arrive) or past 100 lines: 431.  A
    line without a colon, with space before it, or with a control character
    other than HTAB in its value: 400.  Repeated headers are joined with ", ",
    except those that must be unique (400).  Raises ClientGone when the
    stream ends first.
    """
    headers: dict[str, str] = {}
    lines = 0
    while True:
        line = rfile.readline(limit + 1)
        limit -= len(line)
        if limit < 0:
            raise HTTPError(431, f"request line and headers over {MAX_HEAD} bytes")
        lines += 1
        if lines > MAX_HEADERS:
            raise HTTPError(431, "Too many headers")
        if line in (b"\r\n", b"\n"):
            return headers
        if not line.endswith(b"\n"):
            raise ClientGone("headers incomplete")
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_BYTES):
            raise HTTPError(400, "Bad header line")
        key = name.lower().decode("ascii")
        # A bare CR at either end goes with the white space (RFC 9112 §2.2 lets it be read
        # as SP); anywhere else it is a control character, refused with the others.
        text = value.strip(b" \t\r\n").decode("iso-8859-1")
        if not text.isprintable() and _FIELD_CONTROL_RE.search(text):  # the C test first
            raise HTTPError(400, f"control character in the {key[:64]} header value")
        if key in headers:
            if key in _UNIQUE_HEADERS:
                raise HTTPError(400, f"Repeated {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text


def target_path(target: str) -> str:
    """The path of a request target, without its query.

    The absolute form (``http://host/path``) is served as its path, as RFC
    9112 §3.2.2 asks of a server; a leading ``//`` is collapsed to ``/``.
    """
    if not target.startswith("/"):
        try:
            url = urllib.parse.urlsplit(target)
        except ValueError:  # e.g. an unclosed [IPv6] host: no such path, then
            return target
        if url.scheme in ("http", "https") and url.netloc:
            target = url.path or "/"
    path = target.split("?", 1)[0]
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


JSON_TYPE = "application/json"


@dataclasses.dataclass(slots=True)
class Request:
    """One parsed request, as the application sees it: no sockets.

    ``headers`` has lower-case names.  ``read_body(n)`` reads exactly ``n``
    body bytes; the application calls it only once every header check passed.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    request_id: str
    read_body: Callable[[int], bytes] = lambda n: b""


@dataclasses.dataclass(slots=True)
class Response:
    """An answer: ``provider`` and ``delivery`` feed the access line."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    provider: str | None = None
    delivery: str | None = None


def json_response(status: int, document: Any, **fields: Any) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode(), **fields)


def error_response(status: int, message: str, request_id: str, *,
                   delivery: Delivery | None = None, **fields: Any) -> Response:
    document = {"message": message, "request_id": request_id}
    if delivery is not None:
        document["delivery"] = delivery.value
    return json_response(status, document,
                         delivery=None if delivery is None else delivery.value, **fields)


# --------------------------------------------------------- HTTP application ---

ROUTES: dict[str, tuple[str, ...]] = {
    "/email": ("POST",),
    "/healthcheck": ("GET", "HEAD"),
    "/swagger.json": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CORS_ALLOW_HEADERS = "Content-Type, X-API-KEY, X-Request-Id, Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_POLL_ADDRESS = "poll@example.com"  # mock mode only: the mock ignores addresses


def _is_json_type(value: str) -> bool:
    if value == JSON_TYPE:
        return True
    media, _, params = value.partition(";")
    if media.strip().lower() != JSON_TYPE:
        return False
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and \
                charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class ByteBudget:
    """A process-wide allowance of bytes held at once, e.g. request bodies being read.

    ``take(n)`` holds ``n`` bytes and says True while the total stays within
    ``limit``, else holds nothing and says False; ``give_back(n)`` returns
    them.  Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n


class Application:
    """Decides every answer: routing, auth, checks, sending, health, metrics, docs.

    A plain object that tests call with ``handle(Request(...))``; it holds no
    socket.  Checks run in this order: route (404, 405), API key (401),
    Content-Length (411), size (413), Content-Type (415), Idempotency-Key
    (400), room in the body budget (503 overloaded, before the body is read),
    then the body (400).  Thread-safe: its collaborators are.
    """

    def __init__(self, config: Config, *, dispatcher: Dispatcher,
                 idempotency: IdempotencyStore, metrics: Metrics, log: Logger) -> None:
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in config.api_keys)
        self._max_body = config.max_body_bytes
        self._max_body_digits = len(str(config.max_body_bytes))
        self.bodies = ByteBudget(config.max_inflight_body_bytes)
        self.dispatcher = dispatcher
        self.idempotency = idempotency
        self.metrics = metrics
        self.inflight: Callable[[], int] = lambda: 0  # the server sets this
        self._log = log
        self._swagger = json.dumps(openapi_document(config), indent=2).encode()
        self._handlers: dict[str, Callable[[Request], Response]] = {
            "/email": self.email, "/healthcheck": self.health,
            "/swagger.json": self.swagger, "/metrics": self.metrics_page,
        }

    def handle(self, request: Request) -> Response:
        allowed = ROUTES.get(request.path)
        if request.method == "OPTIONS":
            methods = ", ".join((allowed or ("GET", "HEAD", "POST")) + ("OPTIONS",))
            return Response(204, content_type=None, headers=(
                ("Allow", methods), ("Access-Control-Allow-Methods", methods),
                ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                ("Access-Control-Max-Age", "600")))
        if allowed is None:
            return error_response(404, "no such path; the API is described at /swagger.json",
                                  request.request_id)
        if request.method not in allowed:
            methods = ", ".join(allowed + ("OPTIONS",))
            return error_response(405, f"method not allowed; use {methods}",
                                  request.request_id, headers=(("Allow", methods),))
        return self._handlers[request.path](request)

    def finished(self, method: str, path: str, response: Response, seconds: float,
                 request_id: str) -> None:
        """Account for an answered request: metrics and the access line."""
        route = path if path in ROUTES else "other"
        self.metrics.count_and_observe(
            "smsp_http_requests_total", (method if method in METHODS else "other", route,
                                         str(response.status)),
            "smsp_http_request_duration_seconds", (route,), seconds)
        self._log.info("access", request_id=request_id, method=method[:16], path=path[:200],
                       status=response.status, duration_ms=round(seconds * 1000, 3),
                       provider=response.provider, delivery=response.delivery)

    # -- POST /email

    def _authenticate(self, presented: str | None) -> int | None:
        """The index of the matching API key, compared in constant time."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("latin-1")).digest()
        found = None
        for index, key in enumerate(self._key_digests):  # no early exit
            if hmac.compare_digest(digest, key):
                found = index
        return found

    def email(self, request: Request) -> Response:
        rid = request.request_id
        headers = request.headers
        scope = self._authenticate(headers.get("x-api-key"))
        if scope is None:
            return error_response(401, "Unauthorised", rid)
        if "content-length" not in headers or "transfer-encoding" in headers:
            return error_response(411, "Content-Length required (chunked bodies are not "
                                       "accepted)", rid)
        length = headers["content-length"]
        if not (length.isascii() and length.isdigit()):
            return error_response(400, "Content-Length must be a decimal number", rid)
        digits = length.lstrip("0") or "0"  # int() refuses more than 4,300 digits: look first
        size = int(digits) if len(digits) <= self._max_body_digits else self._max_body + 1
        if size > self._max_body:
            return error_response(413, f"body larger than {self._max_body} bytes", rid)
        content_type = headers.get("content-type")
        if content_type is not None and not _is_json_type(content_type):
            return error_response(415, "Content-Type must be application/json (with curl, add "
                                       "-H 'Content-Type: application/json')", rid)
        key = headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY_RE.match(key):
            return error_response(400, "Idempotency-Key must be 1-255 visible ASCII characters",
                                  rid)
        if not self.bodies.take(size):
            return error_response(503, "overloaded", rid, delivery=Delivery.NOT_SENT,
                                  headers=(("Retry-After", "1"),))
        try:  # the bytes count until the answer: the body, its document and the message
            return self._receive(request, size, None if key is None else (scope, key))
        finally:
            self.bodies.give_back(size)

    def _receive(self, request: Request, size: int, key: tuple[int, str] | None) -> Response:
        rid = request.request_id
        raw = request.read_body(size)
        try:
            document = parse_json_object(raw)
            message = parse_message(document)
        except ValidationError as exc:
            return error_response(400, str(exc), rid)
        if key is None:
            return self._send(message, rid)
        return self._send_once(key, document, message, rid)

    def _send_once(self, key: tuple[int, str], document: Mapping[str, Any], message: Message,
                   rid: str) -> Response:
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        claim, stored = self.idempotency.claim(key, hashlib.sha256(canonical.encode()).hexdigest())
        if claim is Claim.REPLAY:
            return dataclasses.replace(stored, headers=stored.headers +
                                       (("Idempotent-Replayed", "true"),))
        if claim is Claim.IN_FLIGHT:
            return error_response(409, "a request with this Idempotency-Key is still in "
                                       "progress; retry later", rid)
        if claim is Claim.MISMATCH:
            return error_response(422, "this Idempotency-Key was already used with a different "
                                       "request body", rid, delivery=Delivery.NOT_SENT)
        response = None
        try:
            response = self._send(message, rid)
        finally:
            if response is None or response.status == 503:
                self.idempotency.release(key)  # nothing was attempted: come back later
            else:
                self.idempotency.complete(key, response)
        return response

    def _send(self, message: Message, rid: str) -> Response:
        try:
            receipt = self.dispatcher.send(message, rid)
        except DeliveryFailed as failure:
            headers = () if failure.retry_after is None else \
                (("Retry-After", str(failure.retry_after)),)
            return error_response(failure.status, failure.message, rid, delivery=failure.delivery,
                                  headers=headers, provider=failure.provider)
        message_id = "null" if receipt.message_id is None else _json_text(receipt.message_id)
        body = (f'{{"status":"sent","provider":{_json_text(receipt.provider)},'
                f'"message_id":{message_id}}}')
        return Response(200, body.encode(), provider=receipt.provider, delivery="sent")

    # -- the other routes

    def health(self, request: Request) -> Response:
        return json_response(200, {
            "status": "ok", "version": VERSION,
            "providers": [route.breaker.snapshot() for route in self.dispatcher.routes]})

    def swagger(self, request: Request) -> Response:
        return Response(200, self._swagger)

    def metrics_page(self, request: Request) -> Response:
        routes = self.dispatcher.routes
        text = self.metrics.render({
            "smsp_circuit_open": [((r.provider.name,), int(r.breaker.state is State.OPEN))
                                  for r in routes],
            "smsp_inflight_requests": [((), self.inflight())],
            "smsp_log_lines_dropped_total": [((), self._log.dropped)],
        })
        return Response(200, text.encode(), content_type=METRICS_TYPE)


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3 description of every route; it states exactly what is accepted."""
    def answer(description: str, schema: str | None = "Error",
               headers: tuple[str, ...] = ()) -> dict[str, Any]:
        result: dict[str, Any] = {"description": description, "headers": {
            name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id",) + headers}}
        if schema is not None:
            result["content"] = {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        return result

    no_control = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
    address = {"type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_FIELD,
               "pattern": ADDRESS_PATTERN,
               "description": f"user@domain or Name <user@domain>; the address itself at most "
                              f"{MAX_ADDRESS} characters, its local part at most "
                              f"{MAX_LOCAL_PART}", "example": "someone@example.com"}
    text_plain = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "smsp: send-mail service proxy", "version": VERSION,
                 "description": "Sends one plain-text email through Mailgun or SendGrid with "
                                "failover behind circuit breakers. Error bodies on 422, 502, 503 "
                                "and 504 say whether the mail was not sent or its fate is "
                                "unknown (do not retry blindly: use Idempotency-Key). Any route "
                                "may also answer a malformed HTTP request with 400, 414, 431 or "
                                "505, as http.server does."},
        "paths": {
            "/email": {"post": {
                "summary": "Send one email",
                "operationId": "sendEmail",
                "security": [{"apiKey": []}],
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                                "description": "replays the first final answer for 24 h"}],
                "requestBody": {"required": True, "content": {JSON_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Email"}}}},
                "responses": {
                    "200": answer("sent by a provider", "Sent", ("Idempotent-Replayed",)),
                    "400": answer("invalid request: the message says which field and why"),
                    "401": answer("missing or wrong X-API-KEY"),
                    "408": answer("the request did not arrive within the client timeout"),
                    "409": answer("the first request with this Idempotency-Key is in progress"),
                    "411": answer("Content-Length required"),
                    "413": answer(f"body larger than {config.max_body_bytes} bytes"),
                    "415": answer("Content-Type is not application/json"),
                    "422": answer("a provider rejected the message, or the Idempotency-Key was "
                                  "used with another body; not sent", "DeliveryError",
                                  ("Idempotent-Replayed",)),
                    "502": answer("the provider failed; see delivery", "DeliveryError",
                                  ("Idempotent-Replayed",)),
                    "503": answer("every circuit is open (Retry-After says until when), or the "
                                  "server is overloaded or shutting down; not sent",
                                  "DeliveryError", ("Retry-After",)),
                    "504": answer("the provider did not answer in time; delivery unknown",
                                  "DeliveryError", ("Idempotent-Replayed",)),
                }}},
            "/healthcheck": {
                "get": {"summary": "Liveness and circuit states", "operationId": "health",
                        "responses": {"200": answer("serving", "Health")}},
                "head": {"summary": "Liveness", "operationId": "healthHead",
                         "responses": {"200": answer("serving", None)}}},
            "/swagger.json": {
                "get": {"summary": "This document", "operationId": "openapi",
                        "responses": {"200": {"description": "OpenAPI document", "content": {
                            JSON_TYPE: {"schema": {"type": "object"}}}}}},
                "head": {"summary": "This document's headers", "operationId": "openapiHead",
                         "responses": {"200": {"description": "OpenAPI document headers"}}}},
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "operationId": "metrics",
                        "responses": {"200": {"description": "text exposition format 0.0.4",
                                              "content": text_plain}}},
                "head": {"summary": "Prometheus metrics headers", "operationId": "metricsHead",
                         "responses": {"200": {"description": "metrics headers"}}}},
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}},
            "headers": {
                "X-Request-Id": {"schema": {"type": "string"},
                                 "description": "the caller's X-Request-Id or a new UUID"},
                "Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                "description": "seconds until the earliest next poll"},
                "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
            },
            "schemas": {
                "Email": {"type": "object", "required": ["fromaddress", "toaddress"],
                          "properties": {
                              "fromaddress": address, "toaddress": address,
                              "subject": {"type": "string", "maxLength": MAX_SUBJECT,
                                          "pattern": no_control, "default": ""},
                              "plaintextbody": {"type": "string", "pattern": r"^[^\x00]*$",
                                                "default": ""}}},
                "Sent": {"type": "object", "required": ["status", "provider", "message_id"],
                         "properties": {"status": {"type": "string", "enum": ["sent"]},
                                        "provider": {"type": "string"},
                                        "message_id": {"type": "string", "nullable": True}}},
                "Error": {"type": "object", "required": ["message", "request_id"],
                          "properties": {"message": {"type": "string"},
                                         "request_id": {"type": "string"}}},
                "DeliveryError": {"type": "object",
                                  "required": ["message", "request_id", "delivery"],
                                  "properties": {"message": {"type": "string"},
                                                 "request_id": {"type": "string"},
                                                 "delivery": {"type": "string",
                                                              "enum": ["not_sent", "unknown"]}}},
                "Health": {"type": "object", "required": ["status", "providers"], "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "version": {"type": "string"},
                    "providers": {"type": "array", "items": {
                        "type": "object",
                        "required": ["name", "state", "consecutive_failures", "opened_at",
                                     "next_poll_at", "last_error"],
                        "properties": {
                            "name": {"type": "string"},
                            "state": {"type": "string", "enum": ["closed", "open"]},
                            "consecutive_failures": {"type": "integer", "minimum": 0},
                            "opened_at": {"type": "string", "format": "date-time",
                                          "nullable": True},
                            "next_poll_at": {"type": "string", "format": "date-time",
                                             "nullable": True},
                            "last_error": {"type": "string", "nullable": True}}}}}},
            },
        },
    }


# -------------------------------------------------- HTTP handler and server ---


class _Connection(Deadline):
    """A client connection's budget, and what the drain needs to know of it.

    While a request is read the watchdog shuts the read side at the deadline,
    which wakes the reader and leaves the write side open for the 408; while
    an answer is written it shuts both sides, as a read shutdown does not
    wake a blocked send().  A TLS connection times its own reads with a
    socket timeout (``self_timed``): a read shutdown would end the TLS stream
    (OpenSSL 3 reads it as an unexpected EOF) and the 408 could not follow.
    Its handshake has nothing to answer, so the watchdog shuts both sides then.
    """

    __slots__ = ("idle", "self_timed", "tls")

    def __init__(self, deadline: float, handler: "Handler", *, tls: bool) -> None:
        super().__init__(deadline, handler, "request", socket.SHUT_RDWR)
        self.idle = True
        self.tls = tls
        self.self_timed = False
        if not tls:
            self.reading(deadline)

    def reading(self, deadline: float | None) -> None:
        self._how = socket.SHUT_RD
        self.self_timed = self.tls
        self.deadline = deadline

    def writing(self, deadline: float) -> None:
        self._how = socket.SHUT_RDWR
        self.self_timed = False
        self.deadline = deadline

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            if not self.self_timed:
                self.interrupt()

    def input_waiting(self) -> bool:
        """Whether the client has sent something not yet read (or closed): never blocks."""
        sock = getattr(self._owner, self._attribute, None)
        fd = -1 if sock is None else sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))


class _TLSReader(io.RawIOBase):
    """The raw stream under a TLS connection's rfile: no read waits past the deadline.

    Each read gets what is left of the request budget as its socket timeout,
    so a client dripping bytes is cut off in time.  At the deadline it reads
    as the end of the stream, as a plain connection does after the watchdog's
    read shutdown, and the TLS stream stays whole for the 408 (see
    _Connection).
    """

    def __init__(self, sock: ssl.SSLSocket, conn: _Connection, clock: Callable[[], float],
                 budget: float) -> None:
        super().__init__()
        self._tls = sock
        self._conn = conn
        self._clock = clock
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        deadline = self._conn.deadline
        left = self._budget if deadline is None else deadline - self._clock()
        if left > 0:
            self._tls.settimeout(left)
            try:
                return self._tls.recv_into(buffer)
            except TimeoutError:
                pass
        self._conn.expired = True
        return 0


class Handler(http.server.BaseHTTPRequestHandler):
    """The thin HTTP layer: parse a request, ask the application, write the answer.

    It keeps http.server's limits with a lean header parser (the email
    package costs more than the rest of a request), writes every response in
    one send, and bounds the TLS handshake, each request and each answer by
    the client budget through the server's watchdog instead of a socket
    timeout (which would add a poll() to every read; TLS connections pay it,
    see _Connection).  Shared state is reached through ``self.server``.
    """

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    disable_nagle_algorithm = True
    server: "Server"

    def setup(self) -> None:
        server = self.server
        context = server.ssl_context
        self.conn = _Connection(server.clock() + server.client_timeout, self,
                                tls=context is not None)
        server.watchdog.watch(self.conn)
        server.track(self.conn)
        self.tls_failed = context is not None and not self._handshake(context)
        super().setup()
        if context is not None and not self.tls_failed:
            self.rfile.close()
            self.rfile = io.BufferedReader(_TLSReader(self.request, self.conn, server.clock,
                                                      server.client_timeout))

    def _handshake(self, context: ssl.SSLContext) -> bool:
        """The TLS handshake, in the connection's thread and within its budget.

        wrap_socket detaches the socket it is given, so the handler holds the
        TLS socket before the handshake starts: that is the one the watchdog
        must shut down (a shutdown of the detached one missed, and a silent
        client held its slot for good).  A socket timeout bounds it too.
        """
        conn = self.conn
        try:
            self.request = context.wrap_socket(self.request, server_side=True,
                                               do_handshake_on_connect=False)
            self.request.settimeout(max(0.001, (conn.deadline or 0) - self.server.clock()))
            self.request.do_handshake()
        except (OSError, ValueError):
            return False
        conn.reading(conn.deadline)
        return True

    def handle(self) -> None:
        self.close_connection = self.tls_failed
        while not self.close_connection:
            self.handle_one_request()

    def finish(self) -> None:
        self.conn.finish()
        self.server.untrack(self.conn)
        try:
            super().finish()
        except OSError:
            pass
        if isinstance(self.request, ssl.SSLSocket):  # socketserver closes the detached one
            _shutdown_socket(self.request, socket.SHUT_WR)
            self.request.close()

    def handle_one_request(self) -> None:
        server = self.server
        conn = self.conn
        conn.reading(server.clock() + server.client_timeout)
        conn.idle = True  # before the draining check: see Server.drain
        self.close_connection = True
        if server.draining and not self._request_waiting():
            return  # accepted as the drain began, and nothing sent: close
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            while line in (b"\r\n", b"\n"):  # RFC 9112 §2.2: ignored before a request line
                line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except OSError:
            return
        if not line:
            return  # an idle connection closed, timed out or was drained: no answer owed
        server.begin_request(conn)  # it arrived: served even if the drain has begun
        try:
            self._serve(line)
        finally:
            server.end_request()

    def _request_waiting(self) -> bool:
        sock = self.request
        return self.conn.input_waiting() or (isinstance(sock, ssl.SSLSocket) and
                                             sock.pending() > 0)

    def _serve(self, line: bytes) -> None:
        server = self.server
        started = server.clock()
        rid = ""
        method = path = "-"
        try:
            method, path, version, headers = self._read_head(line)
            given = headers.get("x-request-id")
            rid = given if given and _REQUEST_ID_RE.fullmatch(given) else server.ids()
            connection = headers.get("connection")
            keep_alive = version >= (1, 1)
            if connection is not None:
                tokens = {t.strip() for t in connection.lower().split(",")}
                keep_alive = "close" not in tokens if keep_alive else "keep-alive" in tokens
            body = _BodyReader(self, headers, version)
            try:
                response = server.app.handle(Request(method, path, headers, rid, body.read))
            except (ClientGone, OSError):
                raise
            except Exception as exc:  # the one catch-all at the request boundary
                server.log.error("internal_error", request_id=rid, error=type(exc).__name__,
                                 where=_traceback_summary(exc))
                response = error_response(500, "internal error", rid, close=True)
        except HTTPError as exc:
            rid = rid or server.ids()
            self._answer(error_response(exc.status, exc.message, rid), rid, method, path, started)
            return
        except (ClientGone, OSError):
            if self.conn.expired:  # out of time mid-request: say so, then close
                rid = rid or server.ids()
                self._answer(error_response(408, "request not received in time", rid), rid,
                             method, path, started)
            return
        keep_alive = keep_alive and not response.close and not body.pending \
            and not server.draining
        self._answer(response, rid, method, path, started, keep_alive=keep_alive,
                     head_only=method == "HEAD", http10=version < (1, 1))

    def _read_head(self, line: bytes) -> tuple[str, str, tuple[int, int], dict[str, str]]:
        """Method, path (no query), version and headers.

        Raises HTTPError for what RFC 9112 (or http.server's limits) refuse,
        ClientGone when the stream ends first.
        """
        if not line.endswith(b"\n"):
            if len(line) > MAX_REQUEST_LINE:
                raise HTTPError(414, "Request-URI Too Long")
            raise ClientGone("request line incomplete")
        method, target, version = parse_request_line(line)
        headers = read_headers(self.rfile, MAX_HEAD - len(line))
        if version >= (1, 1) and "host" not in headers:
            raise HTTPError(400, "an HTTP/1.1 request must have a Host header")
        return method, target_path(target), version, headers

    def send_within_budget(self, data: bytes, deadline: float) -> None:
        """Send ``data``, or be cut off at ``deadline`` if the client does not read."""
        conn = self.conn
        conn.writing(deadline)
        if conn.expired:  # the watchdog let go of it when the read budget ran out
            self.server.watchdog.watch(conn)
        if conn.tls:
            self.request.settimeout(max(0.001, deadline - self.server.clock()))
        self.wfile.write(data)

    def _answer(self, response: Response, rid: str, method: str = "-", path: str = "-",
                started: float | None = None, *, keep_alive: bool = False,
                head_only: bool = False, http10: bool = False) -> None:
        """Write the whole response in one send, then account for it."""
        server = self.server
        parts = [f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, 'Unknown')}\r\n"
                 f"Server: {SERVER_NAME}\r\nDate: {server.date()}\r\n"
                 f"X-Request-Id: {rid}\r\nAccess-Control-Allow-Origin: *\r\n"]
        if response.content_type is not None:
            parts.append(f"Content-Type: {response.content_type}\r\n"
                         f"Content-Length: {len(response.body)}\r\n")
        parts.extend(f"{name}: {value}\r\n" for name, value in response.headers)
        if not keep_alive:
            parts.append("Connection: close\r\n")
        elif http10:
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        self.close_connection = not keep_alive
        data = "".join(parts).encode("latin-1")
        try:
            self.send_within_budget(data if head_only else data + response.body,
                                    server.clock() + server.client_timeout)
        except OSError:
            self.close_connection = True
        if started is not None:
            server.app.finished(method, path, response, server.clock() - started, rid)


class _BodyReader:
    """Reads a request body on the application's demand, once its checks passed."""

    def __init__(self, handler: Handler, headers: Mapping[str, str],
                 version: tuple[int, int]) -> None:
        self._handler = handler
        self.pending = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        self._expect = version >= (1, 1) and headers.get("expect", "").lower() == "100-continue"
        if not self.pending:
            handler.conn.deadline = None  # the request is all in: the budget stops here

    def read(self, size: int) -> bytes:
        handler = self._handler
        conn = handler.conn
        if self._expect and size and conn.deadline is not None:
            deadline = conn.deadline  # the interim answer spends the request's budget
            handler.send_within_budget(b"HTTP/1.1 100 Continue\r\n\r\n", deadline)
            conn.reading(deadline)
        data = handler.rfile.read(size) if size else b""
        if len(data) < size:
            raise ClientGone("body incomplete")
        self.pending = False
        conn.deadline = None  # the budget covers receiving, not our provider calls
        return data


def _traceback_summary(exc: BaseException) -> str:
    """Where an exception came from, without its message (which may hold user data)."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                      for f in reversed(frames))


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, a client budget, TLS and a drain.

    Methods for the caller: ``serve_forever()``, ``shutdown()``,
    ``server_close()`` (the listener closes: new connections are refused),
    then ``drain(grace)``.  At most ``max_connections`` connections are served
    at once; one more gets a fast 503 and is closed without a thread.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Application, *, log: Logger,
                 watchdog: Watchdog, ids: Callable[[], str], max_connections: int = 1024,
                 client_timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 sock: socket.socket | None = None) -> None:
        self.app = app
        self.log = log
        self.watchdog = watchdog
        self.ids = ids
        self.clock = time.monotonic
        self.max_connections = max_connections
        self.client_timeout = client_timeout
        self.ssl_context = ssl_context
        self.draining = False
        self._lock = threading.Lock()  # guards the counts and the connection set
        self._quiet = threading.Event()  # set when the drain may find nothing in flight
        self._active = 0
        self._inflight = 0
        self._connections: set[_Connection] = set()
        self._date_second = -1
        self._date = ""
        app.inflight = lambda: self._inflight
        if sock is None:
            super().__init__(address, Handler)
        else:  # a listening socket shared by worker processes
            super().__init__(address, Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        # Non-blocking accept: when workers share the socket, another may take the
        # connection the selector announced, and a blocking accept() would then hang
        # the accept loop (and shutdown() with it) until the next connection.
        self.socket.setblocking(False)

    def server_bind(self) -> None:
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)  # skip HTTPServer's getfqdn(): a DNS lookup at start
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def port(self) -> int:
        return self.server_address[1]

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_second:
            t = time.gmtime(now)
            self._date = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} "
                          f"{t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
            self._date_second = now
        return self._date

    # -- connection accounting

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.accept_waiting()
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:  # the socket is closed by now: the slot is free
                self._active -= 1
                quiet = self._active == 0
            if quiet and self.draining:
                self._quiet.set()

    def accept_waiting(self) -> None:
        """Take up to ACCEPT_FANOUT connections waiting on the listener, each in its own thread.

        Every new connection thread calls this before serving its own.  Under
        load the accept loop waits its turn for the GIL behind every busy
        connection thread: with 1,000 connections opened at once it took about
        20 a second, and most clients waited longer than any client timeout.
        With each new thread taking two more, a burst is drained in a number of
        rounds that grows with its logarithm.  When nothing waits, this costs
        one accept() that fails at once (the listener does not block).
        """
        for _ in range(ACCEPT_FANOUT):
            try:
                request, client_address = self.get_request()
            except OSError:  # nothing waiting, another worker took it, or the listener closed
                return
            try:
                self.process_request(request, client_address)
            except Exception:  # as socketserver's accept loop: no thread could be started
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def _refuse(self, request: socket.socket) -> None:
        rid = self.ids()
        if self.ssl_context is None:  # no TLS handshake in the accept loop: just close
            body = json.dumps({"message": "overloaded", "request_id": rid,
                               "delivery": Delivery.NOT_SENT.value}).encode()
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON_TYPE}\r\n"
                    f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nX-Request-Id: {rid}\r\n"
                    "Connection: close\r\n\r\n").encode()
            try:
                request.setblocking(False)
                request.send(head + body)
            except OSError:
                pass
        self.shutdown_request(request)
        self.app.metrics.inc("smsp_http_requests_total", "other", "other", "503")
        self.log.warning("overloaded", request_id=rid, connections=self.max_connections)

    def track(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.add(conn)

    def untrack(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def begin_request(self, conn: _Connection) -> None:
        """Count a request in flight: its connection is no longer idle for the drain."""
        with self._lock:
            conn.idle = False
            self._inflight += 1

    def end_request(self) -> None:
        with self._lock:
            self._inflight -= 1
            quiet = self._inflight == 0
        if quiet and self.draining:
            self._quiet.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def active_connections(self) -> int:
        return self._active

    def drain(self, grace: float) -> int:
        """Wake idle connections to close, let the others finish; how many requests did not.

        A connection is idle when no request of it is in flight and nothing
        waits to be read on it.  A request that has arrived is served like
        one in flight: the drain leaves a connection alone if bytes wait on
        it, and a handler serves whatever request line it reads (it checks
        again for a connection accepted just before).  The drain waits, at
        most ``grace`` seconds, until every connection has closed.
        """
        deadline = self.clock() + grace
        with self._lock:
            self.draining = True
            idle = [c for c in self._connections if c.idle]
        for conn in idle:
            if not conn.input_waiting():  # a poll, outside the lock
                conn.interrupt()
        while (self._inflight or self._active) and (left := deadline - self.clock()) > 0:
            self._quiet.clear()
            if self._inflight or self._active:  # one that ended between the test and clear()
                self._quiet.wait(min(left, 0.1))
        return self._inflight

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # a client that went away is not an error of ours
        self.log.error("connection_error", error=type(exc).__name__,
                       where=_traceback_summary(exc) if exc else None)


# --------------------------------------------------------- workers and main ---


@dataclasses.dataclass
class Service:
    """Everything one server process runs, built from a Config; tests build their own."""

    config: Config
    log: Logger
    metrics: Metrics
    watchdog: Watchdog
    dispatcher: Dispatcher
    app: Application
    ids: IdGenerator
    stop_event: threading.Event

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        return {route.provider.name: route.breaker for route in self.dispatcher.routes}

    def close(self) -> None:
        """Cancel the poll timers, wake mock timeouts, drop provider connections."""
        self.stop_event.set()
        for route in self.dispatcher.routes:
            route.breaker.stop()
            route.provider.close()
        self.watchdog.stop()


def build_service(config: Config, *, log: Logger | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  timer: Callable[[float, Callable[[], None]], Any] = start_timer,
                  worker: int | None = None) -> Service:
    """Wire the objects.  ``clock`` and ``timer`` drive the breakers and the idempotency
    store (tests pass fakes); deadlines on sockets always use the real monotonic clock."""
    log = log or Logger(config.log_format, debug=config.log_debug, worker=worker,
                        grace=config.shutdown_grace)
    metrics = Metrics(worker=worker)
    watchdog = Watchdog(recheck=min(1.0, config.client_timeout))
    stop = threading.Event()
    address = Address(config.poll_address or DEFAULT_POLL_ADDRESS)
    poll = Message(address, (address,), POLL_SUBJECT, POLL_BODY)

    def on_change(change: StateChange) -> None:
        metrics.inc("smsp_circuit_transitions_total", change.breaker, change.new.value)
        log.log(Level.WARNING if change.new is State.OPEN else Level.INFO, "circuit_state_change",
                provider=change.breaker, **{"from": change.old.value}, to=change.new.value,
                reason=change.reason)

    def on_poll(name: str, ok: bool) -> None:
        metrics.inc("smsp_circuit_polls_total", name, "success" if ok else "failure")

    routes = []
    for provider in build_providers(config, watchdog=watchdog, clock=time.monotonic, stop=stop):
        breaker = CircuitBreaker(provider.name, make_probe(provider, poll, config.timeout),
                                 threshold=config.failure_threshold,
                                 interval=config.poll_interval,
                                 interval_max=config.poll_interval_max, clock=clock, timer=timer,
                                 on_change=on_change, on_poll=on_poll)
        routes.append(Route(provider, breaker))
    dispatcher = Dispatcher(routes, timeout=config.timeout, log=log, metrics=metrics)
    idempotency = IdempotencyStore(ttl=config.idempotency_ttl, max_entries=config.idempotency_max,
                                   clock=clock)
    app = Application(config, dispatcher=dispatcher, idempotency=idempotency, metrics=metrics,
                      log=log)
    return Service(config, log, metrics, watchdog, dispatcher, app, IdGenerator(), stop)


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """HTTPS only, TLS 1.2 or newer, when SMSP_TLS_CERT and SMSP_TLS_KEY are set."""
    if not config.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def make_server(service: Service, *, sock: socket.socket | None = None) -> Server:
    config = service.config
    return Server((config.host, config.port), service.app, log=service.log,
                  watchdog=service.watchdog, ids=service.ids,
                  max_connections=config.max_connections, client_timeout=config.client_timeout,
                  ssl_context=server_tls_context(config), sock=sock)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` from now on.

    A worker starts with both blocked (see run_workers): one that came
    while it was starting up was held back, and is handled now.
    """
    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def serve(config: Config, *, sock: socket.socket | None = None, worker: int | None = None,
          log: Logger | None = None) -> int:
    """Run one server until SIGTERM or SIGINT, then drain; the process exit status.

    Every thread smsp starts blocks both signals (see start_thread), so the
    kernel hands them to the main thread; it also wakes twice a second in
    case a thread started by someone else took one.
    """
    stop = threading.Event()
    service = build_service(config, log=log, worker=worker)
    log = service.log
    try:
        try:
            server = make_server(service, sock=sock)
        except (OSError, ssl.SSLError) as exc:
            log.error("start_failed", error=f"{type(exc).__name__}: {exc}")
            service.close()
            return 2
        _stop_on_signals(stop)
        # A thread waiting for the GIL wakes every switch interval to ask for it.
        # With 1,000 busy connections that is up to 200,000 wake-ups a second at the
        # default 5 ms; at 50 ms the bench's 1,000 connections got 15,000
        # requests/s instead of 8,000, and p99 0.4 s instead of 0.9 s. smsp's
        # threads give the GIL up at every socket call, so the interval only
        # bounds a CPU-bound stretch (a large JSON body).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        start_thread(server.serve_forever, "smsp-accept", poll_interval=0.1)
        scheme = "https" if server.ssl_context else "http"
        log.info("started", version=VERSION, address=f"{scheme}://{config.host}:{server.port}",
                 providers=",".join(config.active_providers), pid=os.getpid())
        while not stop.wait(0.5):
            pass
        log.info("stopping", inflight=server.inflight, grace_s=config.shutdown_grace)
        server.shutdown()
        server.server_close()  # new connections are refused from here on
        left = server.drain(config.shutdown_grace)
        service.close()
        if left:
            log.error("shutdown_grace_exceeded", inflight=left)
            return 1
        log.info("stopped")
        return 0
    finally:
        log.close()  # a worker leaves with os._exit: write out its last lines now (or give up)


def run_workers(config: Config, log: Logger | None = None) -> int:
    """Fork ``config.workers`` servers sharing one listening socket and keep them running.

    A worker that dies is replaced; SIGTERM or SIGINT is forwarded to every
    worker, which drains as a single server does.  Each worker has its own
    breakers, as separate nodes have.  Returns the worst worker exit status.
    """
    log = log or Logger(config.log_format, debug=config.log_debug, grace=config.shutdown_grace)
    sock = socket.create_server((config.host, config.port), backlog=1024)
    children: dict[int, int] = {}
    stopping = False
    restarts: collections.deque[float] = collections.deque(maxlen=10)

    def spawn(index: int) -> None:
        # Signals wait until the child has dropped the parent's handler (which would
        # otherwise run in the child, signal its siblings and leave it serving), and
        # then until serve() has its own: a SIGTERM while a worker starts is drained.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                code = serve(config, sock=sock, worker=index)  # unblocks the signals
            finally:
                os._exit(code)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        sock.close()  # with every worker's copy closed too, new connections are refused
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(config.workers):
        spawn(index)
    log.info("workers_started", workers=config.workers, port=sock.getsockname()[1],
             pid=os.getpid())
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code >= 0 else 1)
            continue
        log.warning("worker_died", worker=index, pid=pid, exit_code=code)
        restarts.append(time.monotonic())
        if len(restarts) == restarts.maxlen and restarts[-1] - restarts[0] < 10:
            log.error("workers_crashing", restarts=len(restarts))
            on_signal(signal.SIGTERM, None)
            worst = 1
            continue
        spawn(index)
    sock.close()
    log.info("workers_stopped", exit_code=worst)
    log.close()
    return worst


def build_parser() -> argparse.ArgumentParser:
    lines = ["environment variables (defaults in brackets):"]
    for s in SETTINGS:
        default = "required" if s.default is None else (
            ",".join(s.default) if isinstance(s.default, tuple) else
            str(s.default).lower() if isinstance(s.default, bool) else
            repr(s.default) if s.default == "" else str(s.default))
        lines.append(f"  {s.env:<26} {s.help} [{default}]")
    parser = argparse.ArgumentParser(
        prog="smsp.py", description="smsp: the send-mail service proxy.",
        epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="listen address (overrides SMSP_HOST)")
    parser.add_argument("--port", type=int, help="listen port (overrides SMSP_PORT)")
    parser.add_argument("--check-config", action="store_true",
                        help="print the effective configuration (secrets masked) and exit")
    parser.add_argument("--version", action="version", version=f"smsp {VERSION}")
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = Config.from_env(os.environ if environ is None else environ,
                                 host=args.host, port=args.port)
    except ConfigError as exc:
        print("smsp: invalid configuration:\n" + "".join(f"  - {p}\n" for p in exc.problems)
              + "For a demo without real providers set SMSP_MOCK_EMAIL_SERVICE=true "
                "(and SMSP_API_KEY).", file=sys.stderr)
        return 2
    if args.check_config:
        print("\n".join(config.describe()))
        print("configuration OK")
        return 0
    if config.workers > 1:
        return run_workers(config)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
