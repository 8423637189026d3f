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
SendGrid, mock); the circuit breaker; the dispatcher (failover); idempotency
(the store interface and the in-memory store); the shared idempotency store
(a small RESP2 client and the Redis or Valkey store every replica shares);
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
import enum
import hashlib
import heapq
import hmac
import http.client
import http.server
import itertools
import json
import math
import os
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

MAX_REQUEST_LINE = 65536  # the limits http.server enforces; the lean parser keeps them
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100  # header lines including the blank one that ends them, as http.client
MAX_ADDRESS_FIELD = 320
MAX_ADDRESS = 254
MAX_LOCAL_PART = 64
MAX_SUBJECT = 998  # RFC 5322 line length
MAX_PROVIDER_REPLY = 1 << 20  # bytes of a provider reply we are willing to read
MAX_PROVIDER_MESSAGE = 500  # characters of a provider's error message passed to the client
ACCEPT_FANOUT = 2  # waiting connections each new connection thread takes off the listener
GIL_SWITCH_INTERVAL = 0.05  # seconds; CPython's default is 0.005 (see serve())

POLL_SUBJECT = "poll"
POLL_BODY = "poll"
IDEMPOTENCY_MARGIN = 5.0  # seconds a key's lease outlives the longest send it covers
IDEMPOTENCY_LEASE = 5.0  # seconds a shared-store claim holds a key before its first send

# --------------------------------------------------------- errors, outcomes ---


class Outcome(enum.Enum):
    """What one provider attempt did to the message (the metrics label too)."""

    SENT = "sent"  # a provider accepted it
    REJECTED = "rejected"  # the provider says the message itself is bad: not sent
    NOT_SENT = "not_sent"  # it certainly did not leave us: safe to try another provider
    UNKNOWN = "unknown"  # written, then no clear answer: it may have been sent


class Delivery(enum.Enum):
    """What the client is told about its mail."""

    SENT = "sent"
    NOT_SENT = "not_sent"
    UNKNOWN = "unknown"


class SmspError(Exception):
    """Base class of every error smsp raises on purpose."""


class Redactor:
    """Masks secrets in text that is passed on or logged.

    Each configured secret is replaced by ``****``, and so is the credential of
    any HTTP Basic or Bearer form, whatever it encodes.  Immutable, so
    thread-safe.
    """

    _CREDENTIAL_RE = re.compile(r"\b(Basic|Bearer)\s+[A-Za-z0-9+/=._~-]+", re.IGNORECASE)

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "****")
        return self._CREDENTIAL_RE.sub(r"\1 ****", text)


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
    ``how`` is SHUT_RDWR for a provider exchange and SHUT_RD for a client
    connection, whose write side stays open for a 408.
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


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """An email address with an optional display name."""

    email: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email


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


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be true or false")


def _number(kind: type, low: float | None = None, high: float | None = None, *,
            above: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if low is not None and (value <= low if above else value < low):
            raise ValueError(f"must be {'greater than' if above else 'at least'} {low:g}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {high:g}")
        return value
    return parse


def _parse_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys:
        raise ValueError("must hold at least one key")
    return keys


def _parse_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("must name at least one provider")
    if len(set(names)) != len(names):
        raise ValueError("names a provider twice")
    return names


def _parse_base_url(text: str) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(text.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"must be scheme and host only, like {url.scheme}://{url.netloc} "
                         "(smsp adds the API path itself)")
    try:
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return url._replace(path="")


def _parse_log_format(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return "JSON_ONELINE" if value == "JSON_ONLINE" else value


def _parse_text(text: str) -> str:
    return text.strip()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


@dataclasses.dataclass(frozen=True)
class StoreAddress:
    """Where the shared idempotency store listens (SMSP_IDEMPOTENCY_URL, parsed).

    An empty ``username`` with a ``password`` is a password-only AUTH.  The
    password is left out of ``repr`` and masked by ``shown``.
    """

    tls: bool
    host: str
    port: int = 6379
    db: int = 0
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)

    def shown(self) -> str:
        """The URL with the password masked, as --check-config prints it."""
        auth = f"{urllib.parse.quote(self.username, safe='')}:****@" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def _parse_store_url(text: str) -> StoreAddress:
    # No message may quote the URL: it holds the password.
    url = urllib.parse.urlsplit(text.strip())
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ValueError("must be a redis:// or rediss:// URL with a host")
    if url.query or url.fragment:
        raise ValueError("must not have a query or a fragment")
    try:
        port = url.port or 6379
    except ValueError:
        raise ValueError("has an invalid port") from None
    db = url.path[1:] if url.path.startswith("/") else url.path
    if db and not (db.isascii() and db.isdigit() and len(db) <= 5):
        raise ValueError("must name the database as a number, like /0")
    username = urllib.parse.unquote(url.username or "")
    password = urllib.parse.unquote(url.password or "")
    if username and not password:
        raise ValueError("names a user without a password (a password alone is "
                         "redis://:password@host)")
    return StoreAddress(url.scheme == "rediss", url.hostname, port, int(db or 0), username,
                        password)


def _parse_poll_address(text: str) -> Address:
    try:
        return parse_address("SMSP_POLL_MESSAGE_ADDRESS", text.strip())
    except ValidationError as exc:
        raise ValueError(exc.reason) from None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One environment variable: its parser, its default (the only one) and its help.

    ``required`` means it must be set (for a provider's row: when that
    provider is in use).  ``secret`` values are masked wherever shown;
    ``show`` gives a value its own shown form (a URL with its password masked).
    """

    env: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False
    required: bool = False
    show: Callable[[Any], str] | None = None

    def shown(self, value: Any) -> str:
        """The value as --check-config and --help print it."""
        if self.show is not None and value:
            return self.show(value)
        if self.secret and value:
            return ",".join("****" for _ in value) if isinstance(value, tuple) else "****"
        if isinstance(value, urllib.parse.SplitResult):
            return value.geturl()
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)


SETTINGS: tuple[Setting, ...] = (
    Setting("SMSP_API_KEY", "api_keys", _parse_keys, (),
            "client API key(s), comma-separated for rotation", secret=True, required=True),
    Setting("SMSP_MOCK_EMAIL_SERVICE", "mock", _parse_bool, False,
            "true: the mock provider is the only provider (subject 'timeout'/'fail')"),
    Setting("SMSP_PROVIDERS", "providers", _parse_names, ("mailgun", "sendgrid"),
            "provider order, comma-separated"),
    Setting("SMSP_POLL_MESSAGE_ADDRESS", "poll_address", _parse_poll_address, None,
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
    Setting("SMSP_HOST", "host", _parse_text, "0.0.0.0", "listen address (--host)"),
    Setting("SMSP_PORT", "port", _number(int, 0, 65535), 8080, "listen port (--port)"),
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
            "Idempotency-Key responses kept in memory (least recently used evicted)"),
    Setting("SMSP_IDEMPOTENCY_URL", "idempotency_url", _parse_store_url, None,
            "redis[s]://[user[:password]@]host[:port][/db]: one Idempotency-Key store shared "
            "by every replica and worker (Redis 7.0+ or Valkey 7.2+; unset: per process)",
            secret=True, show=StoreAddress.shown),
    Setting("SMSP_IDEMPOTENCY_TIMEOUT", "idempotency_timeout", _number(float, 0, 60, above=True),
            0.5, "seconds for one shared-store command; a new connection's connect, TLS, AUTH "
                 "and SELECT share one such bound"),
    Setting("SMSP_IDEMPOTENCY_CA", "idempotency_ca", _parse_text, "",
            "PEM CA bundle a rediss:// store is verified against (unset: the system CAs)"),
    Setting("SMSP_IDEMPOTENCY_ON_ERROR", "idempotency_on_error", _choice("closed", "open"),
            "closed", "closed: a keyed request gets 503 while the shared store fails; open: it "
                      "is sent without deduplication, with a warning logged"),
    Setting("SMSP_TLS_CERT", "tls_cert", _parse_text, "", "PEM certificate: serve HTTPS only"),
    Setting("SMSP_TLS_KEY", "tls_key", _parse_text, "", "PEM private key for SMSP_TLS_CERT"),
    Setting("SMSP_POOL_SIZE", "pool_size", _number(int, 0), 16,
            "persistent connections kept per provider (0: a fresh one per send)"),
    Setting("SMSP_POOL_IDLE", "pool_idle", _number(float, 0, above=True), 15.0,
            "seconds an idle provider connection is kept"),
    Setting("SMSP_WORKERS", "workers", _number(int, 1), 1,
            "worker processes sharing the port (each has its own breakers)"),
)


def parse_settings(rows: Iterable[Setting], env: Mapping[str, str],
                   problems: list[str]) -> dict[str, Any]:
    """Each row's value from ``env`` (its default when unset); problems are appended."""
    values: dict[str, Any] = {}
    for row in rows:
        raw = env.get(row.env, "")
        if raw.strip() == "":
            values[row.field] = row.default
            continue
        try:
            values[row.field] = row.parse(raw)
        except ValueError as exc:
            problems.append(f"{row.env} {exc}")
            values[row.field] = row.default
    return values


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration, parsed once and typed; SETTINGS holds every default.

    ``provider_settings`` holds each known provider's own rows' values, keyed
    by provider name and then field.  Build one with ``load_config`` (below
    the provider registry), which reports every problem at once.
    """

    api_keys: tuple[str, ...]
    mock: bool
    providers: tuple[str, ...]
    poll_address: Address | None
    timeout: float
    poll_interval: float
    poll_interval_max: float
    failure_threshold: int
    max_body_bytes: int
    host: str
    port: int
    log_format: str
    log_debug: bool
    max_connections: int
    client_timeout: float
    shutdown_grace: float
    idempotency_ttl: float
    idempotency_max: int
    idempotency_url: StoreAddress | None
    idempotency_timeout: float
    idempotency_ca: str
    idempotency_on_error: str
    tls_cert: str
    tls_key: str
    pool_size: int
    pool_idle: float
    workers: int
    provider_settings: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def active_providers(self) -> tuple[str, ...]:
        return ("mock",) if self.mock else self.providers

    def value(self, field: str) -> Any:
        """A setting's value by its field name, a core one or a provider's."""
        if field in CONFIG_FIELDS:
            return getattr(self, field)
        for values in self.provider_settings.values():
            if field in values:
                return values[field]
        raise KeyError(field)

    def problems(self) -> list[str]:
        """What is wrong across settings (each setting alone parsed fine)."""
        problems = []
        if self.poll_interval_max < self.poll_interval:
            problems.append("SMSP_POLL_INTERVAL_MAX must be at least SMSP_POLL_INTERVAL")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("SMSP_TLS_CERT and SMSP_TLS_KEY must be set together")
        for env, path in (("SMSP_TLS_CERT", self.tls_cert), ("SMSP_TLS_KEY", self.tls_key),
                          ("SMSP_IDEMPOTENCY_CA", self.idempotency_ca)):
            if path and not os.path.isfile(path):
                problems.append(f"{env} is not a readable file: {path}")
        if self.idempotency_ca and not (self.idempotency_url and self.idempotency_url.tls):
            problems.append("SMSP_IDEMPOTENCY_CA needs a rediss:// SMSP_IDEMPOTENCY_URL")
        elif self.idempotency_ca and os.path.isfile(self.idempotency_ca):
            try:
                ssl.create_default_context(cafile=self.idempotency_ca)
            except (OSError, ssl.SSLError):
                problems.append("SMSP_IDEMPOTENCY_CA holds no usable PEM certificate")
        return problems


CONFIG_FIELDS = frozenset(row.field for row in SETTINGS)


# ------------------------------------------------------------------ logging ---


class Level(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


_LEVEL_NAMES = {level: level.name.lower() for level in Level}


PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is not interleaved


class LineWriter:
    """Writes log lines to a file descriptor in batches, from one daemon thread.

    ``write(line)`` only queues the line (a deque append: thread-safe, no lock,
    no syscall, so a request thread keeps the GIL); every ``interval`` seconds
    the flusher writes what is queued, whole lines in writes of at most
    PIPE_BUF bytes, so lines of several worker processes sharing one pipe never
    interleave.  ``close()`` (also run at exit) writes what is left.  A process
    killed with SIGKILL loses at most the last interval's lines.
    """

    def __init__(self, fd: int = 1, interval: float = 0.05) -> None:
        self._fd = fd
        self._interval = interval
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()  # one flush at a time keeps the lines in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def write(self, line: str) -> None:
        self._queue.append(line)
        if self._thread is None:
            self._start()

    def _start(self) -> None:  # on first use, so a process can fork before it logs
        with self._lock:
            if self._thread is None:
                self._thread = start_thread(self._run, "smsp-log")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch: list[bytes] = []
            size = 0
            while self._queue:
                data = self._queue.popleft().encode("utf-8", "replace")
                if batch and size + len(data) > PIPE_BUF:
                    self._write_all(b"".join(batch))
                    batch, size = [], 0
                batch.append(data)
                size += len(data)
            if batch:
                self._write_all(b"".join(batch))

    def _write_all(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass  # stdout is gone: nothing better to do with a log line

    def close(self) -> None:
        self._stop.set()
        self.flush()


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
    LineWriter on stdout).  Lines are formatted by hand, which costs a few
    microseconds; an access line is written for every request.  Callers must
    never pass secrets or message bodies; addresses go to debug events only.
    The format is DEBUG (``time LEVEL event key=value ...``), JSON_ONELINE
    or JSON_PRETTY.
    """

    def __init__(self, fmt: str = "DEBUG", *, debug: bool = False,
                 write: Callable[[str], None] | None = None, host: str | None = None,
                 worker: int | None = None, wallclock: Callable[[], float] = time.time) -> None:
        self.debug_enabled = debug
        self._min = Level.DEBUG if debug else Level.INFO
        self._writer = LineWriter() if write is None else None
        self._write = self._writer.write if self._writer is not None else write
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
        if level < self._min:
            return
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
        self._write(line)

    def close(self) -> None:
        """Write out what is queued (a no-op with a custom ``write``)."""
        if self._writer is not None:
            self._writer.close()

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
    """Cheap unique ids in UUID4 form: a random per-process prefix and a counter.

    Unique, not secret: each process (and each forked worker, which makes its
    own) draws 80 random bits once; the counter makes the rest.
    """

    def __init__(self) -> None:
        r = os.urandom(9).hex()
        variant = "89ab"[int(r[17], 16) & 3]
        self._prefix = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{variant}{r[15:18]}-"
        self._counter = itertools.count()  # next() is atomic under the GIL

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


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


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body: strict UTF-8 JSON object, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("", f"body is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise ValidationError("", "body starts with a byte-order mark; send UTF-8 JSON without it")
    try:
        document = _DECODER.decode(text)
    except RecursionError:
        raise ValidationError("", "malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValidationError("", f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ValidationError("", "body must be a JSON object")
    return document


def _parse_subject(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > MAX_SUBJECT:
        raise ValidationError(field, f"must be at most {MAX_SUBJECT} characters")
    if not (value.isascii() and value.isprintable()):
        if _CONTROL_RE.search(value):
            raise ValidationError(field, "must not contain CR, LF or other control characters")
        _check_text(field, value)
    return value


def _parse_body(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    _check_text(field, value)
    return value


def _parse_recipient(field: str, value: Any) -> tuple[Address, ...]:
    return (parse_address(field, value),)


_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
ADDRESS_SCHEMA: Mapping[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_FIELD,
    "pattern": ADDRESS_PATTERN, "example": "someone@example.com",
    "description": f"user@domain or Name <user@domain>; the address itself at most "
                   f"{MAX_ADDRESS} characters, its local part at most {MAX_LOCAL_PART}"}


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of the POST /email body: how it is parsed and how it is documented.

    ``attribute`` is the Message attribute it fills; a missing optional field
    leaves the Message's own default.
    """

    name: str
    attribute: str
    parse: Callable[[str, Any], Any]
    schema: Mapping[str, Any]
    required: bool = False


FIELDS: tuple[Field, ...] = (
    Field("fromaddress", "sender", parse_address, ADDRESS_SCHEMA, required=True),
    Field("toaddress", "to", _parse_recipient, ADDRESS_SCHEMA, required=True),
    Field("subject", "subject", _parse_subject,
          {"type": "string", "maxLength": MAX_SUBJECT, "pattern": _NO_CONTROL, "default": ""}),
    Field("plaintextbody", "text", _parse_body,
          {"type": "string", "pattern": r"^[^\x00]*$", "default": ""}),
)


def parse_message(document: Mapping[str, Any]) -> Message:
    """Validate a decoded POST /email body by FIELDS; unknown fields are ignored."""
    values: dict[str, Any] = {}
    for field in FIELDS:
        if field.name in document:
            values[field.attribute] = field.parse(field.name, document[field.name])
        elif field.required:
            raise ValidationError(field.name, "is required")
    return Message(**values)


def message_schema() -> dict[str, Any]:
    """The OpenAPI schema of the POST /email body, made from FIELDS."""
    return {"type": "object", "required": [f.name for f in FIELDS if f.required],
            "properties": {f.name: dict(f.schema) for f in FIELDS}}


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
    Family("smsp_deliveries_total", "counter",
           "Answers to clients by delivery: sent, not_sent or unknown.", ("delivery",)),
    Family("smsp_provider_attempts_total", "counter", "Provider attempts by outcome.",
           ("provider", "outcome")),
    Family("smsp_provider_attempt_duration_seconds", "histogram", "Provider attempt duration.",
           ("provider",)),
    Family("smsp_failovers_total", "counter",
           "Messages passed on to a later provider because an earlier one failed.",
           ("from", "to")),
    Family("smsp_circuit_open", "gauge", "1 while the provider's circuit is open.",
           ("provider",)),
    Family("smsp_circuit_transitions_total", "counter", "Circuit state changes.",
           ("provider", "to")),
    Family("smsp_circuit_polls_total", "counter", "Polls of open circuits.",
           ("provider", "result")),
    Family("smsp_idempotency_store_operations_total", "counter",
           "Idempotency store operations by result: ok or error.", ("operation", "result")),
    Family("smsp_idempotency_store_duration_seconds", "histogram",
           "Idempotency store operation duration.", ("operation",)),
    Family("smsp_inflight_requests", "gauge", "Requests being served now.", ()),
    Family("smsp_build_info", "gauge", "Build information.", ("version",)),
    Family("process_start_time_seconds", "gauge", "Start time of the process since the epoch.",
           ()),
)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters and histograms, written in the Prometheus text format 0.0.4.

    Thread-safe; the lock guards only the dictionaries.  Gauges are read at
    scrape time from the objects that own them (``render(gauges)``).  With
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
            if family.kind == "gauge":
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


_TRANSPORT_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connect refused"),
    (ConnectionResetError, "connection reset"),
    (socket.gaierror, "DNS lookup failed"),
    (ssl.SSLError, "TLS handshake failed"),
    (http.client.RemoteDisconnected, "closed without an answer"),
    (http.client.IncompleteRead, "answer cut short"),
    (http.client.HTTPException, "malformed answer"),
    (TimeoutError, "timed out"),
)


def transport_reason(exc: BaseException) -> str:
    """A short classification of a transport failure, free of any peer's text."""
    for kind, reason in _TRANSPORT_REASONS:
        if isinstance(exc, kind):
            return reason
    return "connection failed" if isinstance(exc, OSError) else "malformed answer"


def idle_socket_open(sock: socket.socket | None) -> bool:
    """Whether an idle pooled connection is still fit for a request, checked without blocking."""
    if sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False  # unread bytes from a finished exchange: not a clean state
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)  # readable on an idle connection means EOF or junk


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

    def __init__(self, base_url: urllib.parse.SplitResult, *, watchdog: Watchdog,
                 pool_size: int = 16, pool_idle: float = 15.0,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._https = base_url.scheme == "https"
        self._host = base_url.hostname or ""
        self._port = base_url.port or (443 if self._https else 80)
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
            if now - since <= self._idle_limit and idle_socket_open(conn.sock):
                return conn
            conn.close()
        self.connections_made += 1
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, context=self._context)
        return http.client.HTTPConnection(self._host, self._port)

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
            conn.request("POST", path, body, dict(headers))
            written = True
            response = conn.getresponse()
            data = self._read_body(response)
            reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            attempt.finish()
            conn.close()
            timed_out = isinstance(exc, TimeoutError) or attempt.expired or \
                self._clock() >= deadline
            reason = "timed out" if timed_out else transport_reason(exc)
            if not written:
                raise ProviderError(Outcome.NOT_SENT, f"{reason}, request not sent") from None
            raise ProviderError(Outcome.UNKNOWN, f"{reason} after the request was sent",
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


@dataclasses.dataclass(frozen=True)
class ProviderContext:
    """What every provider is built with besides its own settings: shared services.

    ``redact`` masks every configured secret (and any Basic or Bearer
    credential) in text a provider passes on.
    """

    watchdog: Watchdog
    clock: Callable[[], float] = time.monotonic
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    redact: Callable[[str], str] = str
    pool_size: int = 16
    pool_idle: float = 15.0

    def http_client(self, base_url: urllib.parse.SplitResult) -> HTTPClient:
        """A pooled client with its own SSLContext, made now (not on the first send)."""
        return HTTPClient(base_url, watchdog=self.watchdog, pool_size=self.pool_size,
                          pool_idle=self.pool_idle, clock=self.clock,
                          ssl_context=ssl.create_default_context())


class Provider:
    """An email provider: one class holds everything smsp knows about it.

    Subclasses set ``name`` and ``settings`` (their environment variables),
    build themselves in ``from_settings`` and implement ``send(message,
    deadline)``, which returns a Receipt or raises ProviderError and never
    outlives ``deadline`` (a ``clock()`` time) by more than a moment.
    ``cannot_carry`` names why this provider cannot take a message (it is
    then skipped for it).  Implementations are thread-safe.
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext) -> "Provider":
        raise NotImplementedError

    def send(self, message: Message, deadline: float) -> Receipt:
        raise NotImplementedError

    def cannot_carry(self, message: Message) -> str | None:
        """Why this provider cannot carry ``message``, or None when it can."""
        return None

    def poll_message(self, address: Address) -> Message:
        """The dummy message that polls an open circuit; valid for this provider."""
        return Message(address, (address,), POLL_SUBJECT, POLL_BODY)

    def close(self) -> None:
        """Release connections; called at shutdown."""


@dataclasses.dataclass(slots=True)
class Outgoing:
    """An HTTP request a provider is building: encoded, then signed, then posted."""

    path: str
    headers: dict[str, str]
    body: bytes


HTTP_STATUSES: Mapping[int, Outcome] = {400: Outcome.REJECTED, 413: Outcome.REJECTED,
                                        422: Outcome.REJECTED}


def classify_reply(status: int, code: str | None, statuses: Mapping[int, Outcome],
                   codes: Mapping[str, Outcome]) -> Outcome:
    """A provider's answer as an Outcome: its error code's row first, then its status's.

    Any status without a row (401, 403, 404, 429, 5xx, 3xx) is NOT_SENT: the
    provider answered, so it did not take the message.
    """
    if 200 <= status < 300:
        return Outcome.SENT
    if code is not None and code in codes:
        return codes[code]
    return statuses.get(status, Outcome.NOT_SENT)


def json_document(reply: Reply) -> Any:
    """The reply body as JSON, or None when it is not JSON."""
    try:
        return json.loads(reply.body)
    except ValueError:
        return None


class HTTPProvider(Provider):
    """A provider reached over HTTP: ``send`` is a template over small hooks.

    ``encode`` builds the request, ``sign`` may add headers over the final
    request (User-Agent included), then the request is posted and the reply
    classified by ``classify_reply`` with the class's ``statuses`` and
    ``codes`` tables and the ``error_code`` hook; ``receipt`` reads a
    success and ``error_text`` the provider's own explanation of a failure.
    """

    statuses: ClassVar[Mapping[int, Outcome]] = HTTP_STATUSES
    codes: ClassVar[Mapping[str, Outcome]] = {}

    def __init__(self, client: HTTPClient, redact: Callable[[str], str] = str) -> None:
        self.client = client
        self._redact = redact

    def encode(self, message: Message) -> Outgoing:
        raise NotImplementedError

    def sign(self, request: Outgoing) -> None:
        """Add headers computed over the final request; most providers need none."""

    def error_code(self, reply: Reply) -> str | None:
        """The provider's own error code in a failed reply, if it has one."""
        return None

    def error_text(self, reply: Reply) -> str:
        return reply.body.decode("utf-8", "replace")

    def receipt(self, reply: Reply) -> Receipt:
        raise NotImplementedError

    def send(self, message: Message, deadline: float) -> Receipt:
        request = self.encode(message)
        request.headers["User-Agent"] = SERVER_NAME
        self.sign(request)
        reply = self.client.post(request.path, request.headers, request.body, deadline)
        return self.answer(reply)

    def answer(self, reply: Reply) -> Receipt:
        """The receipt of a reply, or the ProviderError it means."""
        outcome = classify_reply(reply.status, self.error_code(reply), self.statuses, self.codes)
        if outcome is Outcome.SENT:
            return self.receipt(reply)
        detail = " ".join(self._redact(self.error_text(reply)).split())
        raise ProviderError(outcome, f"HTTP {reply.status}", detail=detail[:MAX_PROVIDER_MESSAGE])

    def close(self) -> None:
        self.client.close()


class MailgunProvider(HTTPProvider):
    """``POST /v3/{domain}/messages``, form-encoded, HTTP Basic ``api:key``."""

    name = "mailgun"
    settings = (
        Setting("SMSP_MG_DOMAIN", "mg_domain", _parse_text, "", "Mailgun sending domain",
                required=True),
        Setting("SMSP_MG_API_KEY", "mg_api_key", _parse_text, "", "Mailgun API key",
                secret=True, required=True),
        Setting("SMSP_MG_BASE_URL", "mg_base_url", _parse_base_url,
                _parse_base_url("https://api.mailgun.net"),
                "Mailgun API base (EU: https://api.eu.mailgun.net)"),
    )

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "MailgunProvider":
        return cls(context.http_client(values["mg_base_url"]), values["mg_domain"],
                   values["mg_api_key"], context.redact)

    def __init__(self, client: HTTPClient, domain: str, api_key: str,
                 redact: Callable[[str], str] = str) -> None:
        super().__init__(client, redact)
        self.path = f"/v3/{urllib.parse.quote(domain, safe='')}/messages"
        token = base64.b64encode(f"api:{api_key}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"

    def encode(self, message: Message) -> Outgoing:
        fields = {"from": str(message.sender), "to": str(message.to[0]),
                  "subject": message.subject, "text": message.text or " "}
        return Outgoing(self.path, {"Authorization": self._authorization,
                                    "Accept": "application/json",
                                    "Content-Type": "application/x-www-form-urlencoded"},
                        urllib.parse.urlencode(fields).encode("ascii"))

    def error_text(self, reply: Reply) -> str:
        document = json_document(reply)
        if isinstance(document, dict) and isinstance(document.get("message"), str):
            return document["message"]
        return super().error_text(reply)

    def receipt(self, reply: Reply) -> Receipt:
        document = json_document(reply)
        message_id = document.get("id") if isinstance(document, dict) else None
        if not isinstance(message_id, str):
            return Receipt(self.name, None, f"HTTP {reply.status} without a JSON id")
        return Receipt(self.name, message_id)


class SendGridProvider(HTTPProvider):
    """``POST /v3/mail/send``, JSON, ``Bearer`` key; 202 with ``X-Message-Id``."""

    name = "sendgrid"
    path = "/v3/mail/send"
    settings = (
        Setting("SMSP_SG_API_KEY", "sg_api_key", _parse_text, "", "SendGrid API key",
                secret=True, required=True),
        Setting("SMSP_SG_BASE_URL", "sg_base_url", _parse_base_url,
                _parse_base_url("https://api.sendgrid.com"),
                "SendGrid API base (EU: https://api.eu.sendgrid.com)"),
    )

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "SendGridProvider":
        return cls(context.http_client(values["sg_base_url"]), values["sg_api_key"],
                   context.redact)

    def __init__(self, client: HTTPClient, api_key: str,
                 redact: Callable[[str], str] = str) -> None:
        super().__init__(client, redact)
        self._authorization = f"Bearer {api_key}"

    @staticmethod
    def _party(address: Address) -> dict[str, str]:
        return {"email": address.email, "name": address.name} if address.name \
            else {"email": address.email}

    def encode(self, message: Message) -> Outgoing:
        document = {  # SendGrid rejects an empty subject or content value: send one space
            "personalizations": [{"to": [self._party(message.to[0])]}],
            "from": self._party(message.sender),
            "subject": message.subject or " ",
            "content": [{"type": "text/plain", "value": message.text or " "}],
        }
        return Outgoing(self.path, {"Authorization": self._authorization,
                                    "Accept": "application/json",
                                    "Content-Type": "application/json"},
                        json.dumps(document, separators=(",", ":")).encode("utf-8"))

    def error_text(self, reply: Reply) -> str:
        document = json_document(reply)
        if isinstance(document, dict) and isinstance(document.get("errors"), list):
            return "; ".join(f"{item.get('message', '')}"
                             f"{' (' + str(item['field']) + ')' if item.get('field') else ''}"
                             for item in document["errors"] if isinstance(item, dict))
        return super().error_text(reply)

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
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "MockProvider":
        return cls(clock=context.clock, stop=context.stop)

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 stop: threading.Event | None = None, ids: Callable[[], str] | None = None
                 ) -> None:
        self._clock = clock
        self._stop = stop or threading.Event()
        self._ids = ids or IdGenerator()

    def send(self, message: Message, deadline: float) -> Receipt:
        if message.subject == "timeout":
            self._stop.wait(max(0.0, deadline - self._clock()))
            raise ProviderError(Outcome.UNKNOWN, "timed out after the request was sent",
                                timed_out=True)
        if message.subject == "fail":
            raise ProviderError(Outcome.NOT_SENT, "HTTP 500", detail="mock provider failure")
        return Receipt(self.name, f"mock-{self._ids()}")


PROVIDERS: Mapping[str, type[Provider]] = {
    "mailgun": MailgunProvider, "sendgrid": SendGridProvider,
}


def load_config(env: Mapping[str, str]) -> Config:
    """Parse ``env`` with SETTINGS and every registered provider's rows; raise
    ConfigError naming every problem at once.  Provider rows are checked only
    for the providers in use (none in mock mode)."""
    problems: list[str] = []
    values = parse_settings(SETTINGS, env, problems)
    problems += [f"{row.env} is required" for row in SETTINGS
                 if row.required and not env.get(row.env, "").strip()]
    in_use = () if values["mock"] else values["providers"]
    if not values["mock"] and not env.get("SMSP_POLL_MESSAGE_ADDRESS", "").strip():
        problems.append("SMSP_POLL_MESSAGE_ADDRESS is required")
    problems += [f"SMSP_PROVIDERS names unknown provider {name!r}; known: "
                 f"{', '.join(PROVIDERS)}" for name in in_use if name not in PROVIDERS]
    provider_settings = {}
    for name, cls in PROVIDERS.items():
        if name not in in_use:  # an unused provider's rows are not read at all
            provider_settings[name] = {row.field: row.default for row in cls.settings}
            continue
        own = provider_settings[name] = parse_settings(cls.settings, env, problems)
        problems += [f"{row.env} is required for provider {name}" for row in cls.settings
                     if row.required and not own[row.field]]
    config = Config(**values, provider_settings=provider_settings)
    problems += config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def all_settings() -> tuple[Setting, ...]:
    """Every environment variable smsp reads: the core rows, then each provider's."""
    return SETTINGS + tuple(row for cls in PROVIDERS.values() for row in cls.settings)


def build_providers(config: Config, context: ProviderContext) -> list[Provider]:
    """The configured providers, in order (the mock alone in mock mode)."""
    if config.mock:
        return [MockProvider.from_settings({}, context)]
    return [PROVIDERS[name].from_settings(config.provider_settings[name], context)
            for name in config.providers]


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
            change = self._transition(State.OPEN, reason)
            poll = (self._interval, self._generation)
        self._schedule(*poll)
        self._notify(change)

    def _transition(self, new: State, reason: str) -> StateChange:
        """The one place the state changes; called with the lock held."""
        change = StateChange(self.name, self._state, new, reason)
        self._state = new
        self._generation += 1
        self._failures = 0 if new is State.CLOSED else self._failures
        self._interval = self._base_interval
        if new is State.OPEN:
            self._opened_at = self._clock()
            self._next_poll_at = self._opened_at + self._interval
        else:
            self._opened_at = self._next_poll_at = None
        return change

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
                change = self._transition(State.CLOSED, "poll succeeded")
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


def make_probe(provider: Provider, address: Address, timeout: float,
               clock: Callable[[], float] = time.monotonic) -> Callable[[], str | None]:
    """A breaker probe that sends the provider's poll message, from and to ``address``,
    built as a client's message is; a rejection still proves health."""
    poll = provider.poll_message(address)

    def probe() -> str | None:
        try:
            provider.send(poll, clock() + timeout)
        except ProviderError as exc:
            return None if exc.outcome is Outcome.REJECTED else exc.reason
        return None
    return probe


# --------------------------------------------------------------- dispatcher ---


class Failure(enum.Enum):
    """Why no provider took a message: a stable code for answers, logs and alerts."""

    REJECTED = "provider_rejected"  # a provider refused the message itself
    TIMED_OUT = "provider_timeout"  # written, then no answer in time: fate unknown
    UNKNOWN = "provider_unknown"  # written, then a broken answer: fate unknown
    FAILED = "provider_failed"  # every provider tried failed before taking it
    ALL_CIRCUITS_OPEN = "all_circuits_open"
    UNCARRIABLE = "no_provider_can_carry"  # every provider was skipped for this message
    LEASE_LOST = "lease_lost"  # the Idempotency-Key claim expired before dispatch
    STORE_FAILED = "idempotency_store_failed"  # the store failed before dispatch
    HOLDER_LOST = "holder_lost"  # an earlier holder of the key died after dispatching


class DeliveryFailed(SmspError):
    """No provider accepted the message.  Domain-only: the Application decides the answer.

    ``outcome`` is what happened to the message (REJECTED and NOT_SENT: not
    sent; UNKNOWN: it may have been sent).  ``detail`` is the provider's own
    text (for the authenticated client) or the skip reasons.
    """

    def __init__(self, failure: Failure, outcome: Outcome, *, provider: str | None = None,
                 detail: str = "", timed_out: bool = False,
                 retry_after: int | None = None) -> None:
        super().__init__(failure.value)
        self.failure = failure
        self.outcome = outcome
        self.provider = provider
        self.detail = detail
        self.timed_out = timed_out
        self.retry_after = retry_after


_ERROR_FAILURES = {Outcome.REJECTED: Failure.REJECTED, Outcome.NOT_SENT: Failure.FAILED}


def failure_of(provider: str, error: ProviderError) -> DeliveryFailed:
    """The delivery failure that a final provider error means."""
    failure = _ERROR_FAILURES.get(error.outcome) or \
        (Failure.TIMED_OUT if error.timed_out else Failure.UNKNOWN)
    return DeliveryFailed(failure, error.outcome, provider=provider,
                          detail=error.detail or error.reason, timed_out=error.timed_out)


@dataclasses.dataclass(frozen=True)
class Lane:
    """A provider and the breaker in front of it."""

    provider: Provider
    breaker: CircuitBreaker


class Dispatcher:
    """Sends a message through the first provider whose circuit is closed.

    Fails over only when the message certainly was not sent (Outcome.NOT_SENT);
    a rejection or an unknown fate is final, so nothing is sent twice by our
    doing.  A provider that cannot carry the message is skipped, with the
    reason.  ``before_attempt(provider)`` runs before any provider may see the
    message and returns False when the request lost the right to send.
    Thread-safe; holds no lock itself.
    """

    def __init__(self, lanes: list[Lane], *, timeout: float, log: Logger, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lanes = lanes
        self._timeout = timeout
        self._log = log
        self._metrics = metrics
        self._clock = clock

    def send(self, message: Message, request_id: str | None = None, *,
             before_attempt: Callable[[str], bool] | None = None,
             only: str | None = None) -> Receipt:
        failed: str | None = None
        skipped: list[str] = []
        for lane in self.lanes:
            name = lane.provider.name
            if only is not None and name != only:
                continue
            cannot = lane.provider.cannot_carry(message)
            if cannot is not None:
                skipped.append(f"{name}: {cannot}")
                self._skipped(name, cannot, request_id)
                continue
            generation = lane.breaker.acquire()
            if generation is None:
                continue
            if before_attempt is not None and not before_attempt(name):
                raise DeliveryFailed(Failure.LEASE_LOST, Outcome.NOT_SENT)
            if failed is not None:
                self._failover(failed, name, request_id)
            error = self._attempt(lane, generation, message, request_id)
            if isinstance(error, Receipt):
                return error
            if error.outcome is not Outcome.NOT_SENT:
                raise failure_of(name, error)
            failed, last = name, error
        if failed is not None:
            raise failure_of(failed, last)
        raise self._nothing_tried(skipped)

    def _attempt(self, lane: Lane, generation: int, message: Message,
                 request_id: str | None) -> Receipt | ProviderError:
        name = lane.provider.name
        started = self._clock()
        try:
            receipt = lane.provider.send(message, started + self._timeout)
        except ProviderError as exc:
            error = exc
        except Exception as exc:  # a bug may have sent it: treat the fate as unknown
            error = ProviderError(Outcome.UNKNOWN, f"internal error {type(exc).__name__}")
        else:
            lane.breaker.on_success(generation)
            self._attempted(name, Outcome.SENT, started, request_id, message)
            if receipt.warning:
                self._log.warning("provider_reply_malformed", request_id=request_id,
                                  provider=name, detail=receipt.warning)
            return receipt
        if error.trips_breaker:
            lane.breaker.on_failure(generation, error.reason)
        else:
            lane.breaker.on_success(generation)
        self._attempted(name, error.outcome, started, request_id, message, error.reason)
        return error

    def _nothing_tried(self, skipped: list[str]) -> DeliveryFailed:
        carriers = [lane for lane in self.lanes if not any(
            s.startswith(f"{lane.provider.name}: ") for s in skipped)]
        if skipped and not carriers:
            return DeliveryFailed(Failure.UNCARRIABLE, Outcome.REJECTED,
                                  detail="; ".join(skipped))
        waits = [w for w in (lane.breaker.retry_after() for lane in carriers) if w is not None]
        return DeliveryFailed(Failure.ALL_CIRCUITS_OPEN, Outcome.NOT_SENT,
                              retry_after=max(1, math.ceil(min(waits, default=1.0))))

    def _attempted(self, name: str, outcome: Outcome, started: float, request_id: str | None,
                   message: Message, reason: str | None = None) -> None:
        elapsed = self._clock() - started
        self._metrics.count_and_observe("smsp_provider_attempts_total", (name, outcome.value),
                                        "smsp_provider_attempt_duration_seconds", (name,),
                                        elapsed)
        if self._log.debug_enabled:
            self._log.debug("provider_attempt", request_id=request_id, provider=name,
                            outcome=outcome.value, duration_ms=round(elapsed * 1000, 2),
                            reason=reason, fromaddress=message.sender.email,
                            toaddress=",".join(a.email for a in message.to))

    def _skipped(self, name: str, reason: str, request_id: str | None) -> None:
        self._metrics.inc("smsp_provider_attempts_total", name, "skipped")
        self._log.info("provider_skipped", request_id=request_id, provider=name, reason=reason)

    def _failover(self, failed: str, name: str, request_id: str | None) -> None:
        self._metrics.inc("smsp_failovers_total", failed, name)
        self._log.warning("failover", request_id=request_id, **{"from": failed}, to=name)


# -------------------------------------------------------------- idempotency ---


class Claim(enum.Enum):
    """What ``claim`` found for a key."""

    NEW = "new"  # ours: mark dispatching() before sending, then complete() or release()
    REPLAY = "replay"  # a final answer is stored: send it again, send no mail
    IN_FLIGHT = "in_flight"  # claimed, or dispatching within its liveness deadline
    MISMATCH = "mismatch"  # the key was used with a different request
    HOLDER_LOST = "holder_lost"  # dispatching past its liveness deadline: the fate is unknown


@dataclasses.dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A final answer kept for replay: plain data that survives a JSON round trip."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    provider: str | None = None
    delivery: str | None = None  # a Delivery value, or "sent"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "headers": [list(h) for h in self.headers],
                "body": self.body.decode("utf-8"), "provider": self.provider,
                "delivery": self.delivery}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "StoredAnswer":
        return cls(int(document["status"]),
                   tuple((str(n), str(v)) for n, v in document["headers"]),
                   str(document["body"]).encode("utf-8"), document.get("provider"),
                   document.get("delivery"))


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimResult:
    """``claim``'s answer: ``token`` is ours when NEW, else the holder's;
    ``provider`` is the provider the holder was trying (for HOLDER_LOST)."""

    claim: Claim
    token: str = ""
    answer: StoredAnswer | None = None
    provider: str | None = None


class StoreError(SmspError):
    """The idempotency store failed or did not answer in time.

    ``reason`` is a short classification that is safe on anonymous pages
    ("timed out", "authentication failed"), never the server's text.  A command
    that timed out may still take effect later: a frozen server runs what it
    had buffered when it wakes.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordState(enum.Enum):
    """Where a key's record is in its life (the shared store writes these strings)."""

    CLAIMED = "claimed"  # taken, nothing sent: its short lease may simply expire
    DISPATCHING = "dispatching"  # a provider may have the message: the holder must stay live
    DONE = "done"  # the final answer is stored


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One key's record as every store keeps it: plain data with a JSON form.

    ``live_until`` (while dispatching) is the holder's liveness deadline in
    seconds on the store's own clock.  The message body is never part of it.
    In JSON the answer is held as JSON text, so that a store-side script can
    rewrite the record without re-encoding the answer.
    """

    token: str
    state: RecordState
    fingerprint: str
    provider: str | None = None
    live_until: float | None = None
    answer: StoredAnswer | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"v": 1, "owner": self.token, "state": self.state.value,
                                    "fp": self.fingerprint}
        if self.provider is not None:
            document["provider"] = self.provider
        if self.live_until is not None:
            document["live_until"] = round(self.live_until * 1000)  # milliseconds
        if self.answer is not None:
            document["answer"] = json.dumps(self.answer.to_json(), separators=(",", ":"))
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> "Record":
        live_until = document.get("live_until")
        answer = document.get("answer")
        return cls(str(document["owner"]), RecordState(document["state"]), str(document["fp"]),
                   document.get("provider"), None if live_until is None else live_until / 1000,
                   None if answer is None else StoredAnswer.from_json(json.loads(answer)))


def claim_found(record: Record, fingerprint: str, now: float) -> ClaimResult:
    """What a claim answers when ``record`` already holds the key and the store's
    clock reads ``now`` (shared by every store, so that they decide alike)."""
    if record.fingerprint != fingerprint:
        claim = Claim.MISMATCH
    elif record.state is RecordState.DONE and record.answer is not None:
        claim = Claim.REPLAY
    elif record.state is RecordState.DISPATCHING and record.live_until is not None \
            and record.live_until <= now:
        claim = Claim.HOLDER_LOST
    else:
        claim = Claim.IN_FLIGHT
    return ClaimResult(claim, record.token, record.answer, record.provider)


class IdempotencyStore:
    """Answers by key, so that a retried request is replayed instead of sent again.

    ``key`` is a hex digest of the client's scope and its Idempotency-Key.
    The life of a key (a Record): ``claim`` (CLAIMED, a short lease; nothing
    has been sent), then ``dispatching(provider)`` just before a provider may
    see the message (DISPATCHING: the holder must be alive again by
    ``liveness`` seconds; pushed forward before each failover), then
    ``complete`` with the answer (DONE), or ``release`` when nothing was sent.
    Every call but ``claim`` is owner-checked with the token ``claim``
    returned.  ``takeover`` hands a HOLDER_LOST or stored key to a new owner
    atomically.  Implementations raise StoreError when they cannot answer;
    all are thread-safe.
    """

    def claim(self, key: str, fingerprint: str) -> ClaimResult:
        raise NotImplementedError

    def dispatching(self, key: str, token: str, provider: str) -> bool:
        """Mark that a provider may now see the message; False if the lease was lost."""
        raise NotImplementedError

    def complete(self, key: str, token: str, answer: StoredAnswer) -> None:
        raise NotImplementedError

    def release(self, key: str, token: str) -> None:
        """Forget a claim that ended with nothing sent, so a retry can send."""
        raise NotImplementedError

    def takeover(self, key: str, seen: str, provider: str) -> str | None:
        """Own a key whose holder token is ``seen``, dispatching to ``provider``;
        the new token, or None when someone else changed it first."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """The store's last known state, for /healthcheck; never waits on the store."""
        return {"kind": "memory", "state": "ok"}

    def check(self) -> str | None:
        """Ask the store now (this may wait up to its timeout): why it failed, or None."""
        return None

    def close(self) -> None:
        """Release connections; called at shutdown."""


@dataclasses.dataclass(slots=True)
class _Entry:
    record: Record
    expires: float  # the record's end


class MemoryIdempotencyStore(IdempotencyStore):
    """The per-process store: at most ``max_entries`` keys, least recently used
    evicted first (never one in flight).  A claim lives ``lease`` seconds, a
    dispatching mark ``liveness`` seconds, an answer ``ttl`` seconds.  The lock
    guards only the dictionary."""

    def __init__(self, *, ttl: float, max_entries: int, lease: float, liveness: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._lease = lease
        self._liveness = liveness
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str, fingerprint: str) -> ClaimResult:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                del self._entries[key]
                entry = None
            if entry is None:
                token = os.urandom(16).hex()
                record = Record(token, RecordState.CLAIMED, fingerprint)
                self._entries[key] = _Entry(record, now + self._lease)
                self._evict()
                return ClaimResult(Claim.NEW, token)
            self._entries.move_to_end(key)
            return claim_found(entry.record, fingerprint, now)

    def dispatching(self, key: str, token: str, provider: str) -> bool:
        with self._lock:
            entry = self._owned(key, token)
            if entry is None or entry.record.state is RecordState.DONE:
                return False
            self._dispatch(entry, token, provider)
            return True

    def complete(self, key: str, token: str, answer: StoredAnswer) -> None:
        with self._lock:
            entry = self._owned(key, token)
            if entry is not None:
                entry.record = dataclasses.replace(entry.record, state=RecordState.DONE,
                                                   live_until=None, answer=answer)
                entry.expires = self._clock() + self._ttl

    def release(self, key: str, token: str) -> None:
        with self._lock:
            entry = self._owned(key, token)
            if entry is not None and entry.record.state is not RecordState.DONE:
                del self._entries[key]

    def takeover(self, key: str, seen: str, provider: str) -> str | None:
        with self._lock:
            entry = self._owned(key, seen)
            if entry is None:
                return None
            token = os.urandom(16).hex()
            self._dispatch(entry, token, provider)
            return token

    def _dispatch(self, entry: _Entry, token: str, provider: str) -> None:
        now = self._clock()
        entry.record = Record(token, RecordState.DISPATCHING, entry.record.fingerprint,
                              provider, now + self._liveness)
        entry.expires = now + self._ttl

    def _owned(self, key: str, token: str) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.record.token == token else None

    def _evict(self) -> None:
        while len(self._entries) > self._max:
            victim = next((k for k, e in self._entries.items()
                           if e.record.state is RecordState.DONE), None)
            if victim is None:
                return  # every entry is in flight; they are bounded by the connection limit
            del self._entries[victim]


# ----------------------------------------- shared idempotency store (Redis) ---

REDIS_POOL_SIZE = 8  # idle connections kept; more may be open at a busy moment, then closed
MAX_STORE_REPLY = 1 << 20  # bytes of one bulk reply we are willing to read
MAX_STORE_LINE = 1 << 16  # bytes of one reply line (a status, an error) we are willing to read
_REPLY_REASONS = {"WRONGPASS": "authentication failed", "NOAUTH": "authentication required",
                  "NOPERM": "permission denied", "READONLY": "read-only replica",
                  "OOM": "out of memory", "LOADING": "loading its data", "BUSY": "busy"}


class RedisReplyError(StoreError):
    """The server answered a command with an error reply.  ``code`` is its first
    word (NOSCRIPT, WRONGPASS, READONLY...), the only part of its text kept."""

    def __init__(self, text: bytes) -> None:
        word = text.split(b" ", 1)[0].decode("ascii", "replace")
        self.code = word if word.isascii() and word.isalpha() and word.isupper() else "ERR"
        super().__init__(_REPLY_REASONS.get(self.code, f"server error {self.code}"))


def resp_command(*args: str | bytes | int) -> bytes:
    """One command as RESP2 writes it: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _RedisConnection:
    """One socket to the server and the bytes read past the last reply.

    Used by one thread at a time; ``sock`` is None once closed (or before the
    connect), which is also what a Deadline reads to shut it.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self._buffer = bytearray()

    def exchange(self, payload: bytes, count: int) -> list[Any]:
        """Write ``payload`` and read ``count`` replies; an error reply is returned
        as a RedisReplyError in its place.  EOFError when the server closed."""
        assert self.sock is not None
        if payload:
            self.sock.sendall(payload)
        return [self._reply(0) for _ in range(count)]

    def fit_for_reuse(self) -> bool:
        return not self._buffer and idle_socket_open(self.sock)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _reply(self, depth: int) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RedisReplyError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$" and int(rest) <= MAX_STORE_REPLY:
            size = int(rest)
            return None if size < 0 else self._exact(size + 2)[:-2]
        if kind == b"*" and depth < 2:  # smsp's commands answer one level at most
            size = int(rest)
            return None if size < 0 else [self._reply(depth + 1) for _ in range(size)]
        raise ValueError("malformed reply")

    def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 2]
                return line
            if len(self._buffer) > MAX_STORE_LINE:
                raise ValueError("reply line too long")
            self._fill()

    def _exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("closed by the server")
        self._buffer += chunk


class RedisScript:
    """A Lua script and the SHA-1 that EVALSHA names it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()


class RedisClient:
    """RESP2 commands to one Redis or Valkey server over a few pooled connections.

    Thread-safe.  ``execute(*commands)`` writes the commands in one send and
    reads their replies, an error reply as a RedisReplyError in its place;
    ``call`` sends one and raises its error reply; ``script`` runs a Lua
    script by EVALSHA, and by EVAL when the server does not know it
    (NOSCRIPT).  Each exchange is bounded by ``timeout`` through the watchdog,
    and so is a new connection's connect, TLS handshake, AUTH and SELECT,
    together.  A transport failure raises StoreError with a short reason and
    drops the connection, which is never reused; nothing is retried.
    """

    def __init__(self, address: StoreAddress, *, watchdog: Watchdog, timeout: float,
                 ssl_context: ssl.SSLContext | None = None, pool_size: int = REDIS_POOL_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._address = address
        self._watchdog = watchdog
        self._timeout = timeout
        self._context = (ssl_context or ssl.create_default_context()) if address.tls else None
        self._size = pool_size
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[_RedisConnection] = []
        self.connections_made = 0  # for tests

    def execute(self, *commands: tuple[str | bytes | int, ...]) -> list[Any]:
        conn = self._acquire()
        payload = b"".join(resp_command(*command) for command in commands)
        replies = self._exchange(conn, payload, len(commands), self._clock() + self._timeout)
        self._release(conn)
        return replies

    def call(self, *args: str | bytes | int) -> Any:
        [reply] = self.execute(args)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def script(self, script: RedisScript, keys: tuple[str, ...],
               args: tuple[str | bytes | int, ...]) -> Any:
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        return self.call("EVAL", script.source, len(keys), *keys, *args)  # loads it too

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _acquire(self) -> _RedisConnection:
        while True:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if conn.fit_for_reuse():
                return conn
            conn.close()  # the server closed it (a restart, its idle timeout)
        return self._connect()

    def _release(self, conn: _RedisConnection) -> None:
        if conn.sock is None:
            return
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(conn)
                return
        conn.close()

    def _handshake(self) -> list[tuple[str | bytes | int, ...]]:
        address = self._address
        commands: list[tuple[str | bytes | int, ...]] = []
        if address.password:
            commands.append(("AUTH", address.username, address.password) if address.username
                            else ("AUTH", address.password))
        if address.db:
            commands.append(("SELECT", address.db))
        return commands

    def _connect(self) -> _RedisConnection:
        """A new connection, authenticated and on its database, within one timeout."""
        conn = _RedisConnection()
        handshake = self._handshake()
        payload = b"".join(resp_command(*command) for command in handshake)
        replies = self._exchange(conn, payload, len(handshake), self._clock() + self._timeout)
        for command, reply in zip(handshake, replies):
            if isinstance(reply, RedisReplyError):
                conn.close()
                raise StoreError("authentication failed" if command[0] == "AUTH"
                                 else "SELECT failed")
        self.connections_made += 1
        return conn

    def _open(self, conn: _RedisConnection, remaining: float) -> None:
        address = self._address
        sock = socket.create_connection((address.host, address.port), timeout=remaining)
        conn.sock = sock  # from here the deadline can shut it, the TLS handshake included
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._context is not None:
            conn.sock = self._context.wrap_socket(sock, server_hostname=address.host)

    def _exchange(self, conn: _RedisConnection, payload: bytes, count: int,
                  deadline: float) -> list[Any]:
        attempt = Deadline(deadline, conn)
        self._watchdog.watch(attempt)
        try:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise TimeoutError("no time left")
            if conn.sock is None:
                self._open(conn, remaining)
            else:
                conn.sock.settimeout(remaining)  # per operation; the watchdog bounds the total
            replies = conn.exchange(payload, count)
        except (OSError, EOFError, ValueError) as exc:
            attempt.finish()
            conn.close()
            raise StoreError(_store_reason(exc, attempt.expired)) from None
        attempt.finish()
        if attempt.expired:  # shut as the last reply came in: the socket is unusable
            conn.close()
        return replies


def _store_reason(exc: BaseException, expired: bool) -> str:
    """A short classification of a store transport failure, free of the server's text."""
    if expired or isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, EOFError):
        return "closed without an answer"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    return transport_reason(exc)


# The owner-checked transitions.  Each reads the record, checks the owner token,
# and rewrites it in one step; the liveness deadline comes from the store's own
# clock (TIME), never the pod's.  They return 1 when they changed the key, else 0.
_LUA_OWNED = """
local function live_until(ms)
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ms)
end
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record.owner ~= ARGV[1] then return 0 end
"""
DISPATCHING_SCRIPT = RedisScript(_LUA_OWNED + """
if record.state == 'done' then return 0 end
record.state = 'dispatching'
record.provider = ARGV[2]
record.live_until = live_until(ARGV[3])
redis.call('SET', KEYS[1], cjson.encode(record), 'PX', ARGV[4])
return 1
""")  # ARGV: owner, provider, liveness ms, ttl ms
COMPLETE_SCRIPT = RedisScript(_LUA_OWNED + """
record.state = 'done'
record.live_until = nil
record.answer = ARGV[2]
redis.call('SET', KEYS[1], cjson.encode(record), 'PX', ARGV[3])
return 1
""")  # ARGV: owner, the answer's JSON text, ttl ms
RELEASE_SCRIPT = RedisScript(_LUA_OWNED + """
if record.state == 'done' then return 0 end
redis.call('DEL', KEYS[1])
return 1
""")  # ARGV: owner
TAKEOVER_SCRIPT = RedisScript(_LUA_OWNED + """
record.owner = ARGV[2]
record.state = 'dispatching'
record.provider = ARGV[3]
record.answer = nil
record.live_until = live_until(ARGV[4])
redis.call('SET', KEYS[1], cjson.encode(record), 'PX', ARGV[5])
return 1
""")  # ARGV: the owner seen, the new owner, provider, liveness ms, ttl ms


def _compact_json(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"))


class RedisIdempotencyStore(IdempotencyStore):
    """The store every replica and worker shares: one Redis or Valkey key per
    Idempotency-Key, ``smsp:idem:<key>``, holding its Record as JSON.

    A claim is one ``SET key record NX GET PX lease``, sent with TIME (the
    store's clock, to judge a holder's liveness); the other transitions are
    the owner-checked scripts above.  A claimed key lives ``lease`` seconds,
    a dispatching or done one ``ttl``; a dispatching holder must mark again
    within ``liveness`` seconds or its key is HOLDER_LOST.  Every operation is
    counted in ``metrics``; ``status()`` reports how the last one went
    without waiting.  Thread-safe.
    """

    PREFIX = "smsp:idem:"

    def __init__(self, client: RedisClient, *, ttl: float, lease: float, liveness: float,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._ttl_ms = max(1, round(ttl * 1000))
        self._lease_ms = max(1, round(lease * 1000))
        self._liveness_ms = max(1, round(liveness * 1000))
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._error: str | None = None  # why the last operation failed; None: it worked
        self._lock = threading.Lock()  # guards the probe bookkeeping only
        self._probing = False
        self._probed = -math.inf

    def claim(self, key: str, fingerprint: str) -> ClaimResult:
        result: ClaimResult = self._run("claim", self._claim, key, fingerprint)
        return result

    def dispatching(self, key: str, token: str, provider: str) -> bool:
        marked = self._run("dispatching", self._script, DISPATCHING_SCRIPT, key, token,
                           provider, self._liveness_ms, self._ttl_ms)
        return bool(marked == 1)

    def complete(self, key: str, token: str, answer: StoredAnswer) -> None:
        self._run("complete", self._script, COMPLETE_SCRIPT, key, token,
                  _compact_json(answer.to_json()), self._ttl_ms)

    def release(self, key: str, token: str) -> None:
        self._run("release", self._script, RELEASE_SCRIPT, key, token)

    def takeover(self, key: str, seen: str, provider: str) -> str | None:
        token = os.urandom(16).hex()
        won = self._run("takeover", self._script, TAKEOVER_SCRIPT, key, seen, token, provider,
                        self._liveness_ms, self._ttl_ms)
        return token if won == 1 else None

    def status(self) -> dict[str, Any]:
        error = self._error
        if error is None:
            return {"kind": "redis", "state": "ok"}
        self._probe_soon()
        return {"kind": "redis", "state": "error", "error": error}

    def check(self) -> str | None:
        try:
            self._run("ping", self._client.call, "PING")
        except StoreError as exc:
            return exc.reason
        return None

    def close(self) -> None:
        self._client.close()

    def _claim(self, key: str, fingerprint: str) -> ClaimResult:
        token = os.urandom(16).hex()
        value = _compact_json(Record(token, RecordState.CLAIMED, fingerprint).to_json())
        held, now = self._client.execute(
            ("SET", self.PREFIX + key, value, "NX", "GET", "PX", self._lease_ms), ("TIME",))
        for reply in (held, now):
            if isinstance(reply, RedisReplyError):
                raise reply
        if held is None:
            return ClaimResult(Claim.NEW, token)
        try:
            record = Record.from_json(json.loads(held))
            seconds = int(now[0]) + int(now[1]) / 1e6
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise StoreError("malformed record") from None  # not written by smsp
        return claim_found(record, fingerprint, seconds)

    def _script(self, script: RedisScript, key: str, *args: str | int) -> Any:
        return self._client.script(script, (self.PREFIX + key,), args)

    def _run(self, operation: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run one store operation, counted and timed, and remember how it went."""
        started = self._clock()
        try:
            result = function(*args)
        except StoreError as exc:
            self._error = exc.reason
            self._count(operation, "error", started)
            raise
        self._error = None
        self._count(operation, "ok", started)
        return result

    def _count(self, operation: str, result: str, started: float) -> None:
        self._metrics.count_and_observe(
            "smsp_idempotency_store_operations_total", (operation, result),
            "smsp_idempotency_store_duration_seconds", (operation,), self._clock() - started)

    def _probe_soon(self) -> None:
        """Ask the store again in the background, at most once a second, so that
        /healthcheck sees it recover even while no request carries a key."""
        now = self._clock()
        with self._lock:
            if self._probing or now - self._probed < 1.0:
                return
            self._probing, self._probed = True, now
        start_thread(self._probe, "smsp-store-probe")

    def _probe(self) -> None:
        try:
            self.check()
        finally:
            self._probing = False


# --------------------------------------- HTTP messages: parsing and writing ---

_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
CORS_EXPOSE_HEADERS = "X-Request-Id, Retry-After, Idempotent-Replayed"
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


_COMMON_VERSIONS = {"HTTP/1.1": (1, 1), "HTTP/1.0": (1, 0)}


def _parse_version(word: str) -> tuple[int, int]:
    """``HTTP/x.y`` as http.server reads it: 400 when malformed, 505 from 2.0 on."""
    try:
        if not word.startswith("HTTP/"):
            raise ValueError
        parts = word.split("/", 1)[1].split(".")
        if len(parts) != 2 or any(not p.isdigit() or len(p) > 10 for p in parts):
            raise ValueError
        version = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise HTTPError(400, f"Bad request version ({word!r})") from None
    if version >= (2, 0):
        raise HTTPError(505, f"Invalid HTTP version ({word.split('/', 1)[1]})")
    return version


def parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]] | None:
    """Split a request line as http.server does; None for a blank line (just close).

    Raises HTTPError with http.server's status: 400 for bad syntax or
    version, 505 for HTTP/2 and later.  HTTP/0.9 requests are refused with 400.
    """
    text = str(line, "iso-8859-1").rstrip("\r\n")
    words = text.split()
    if not words:
        return None
    version = (0, 9)
    if len(words) >= 3:
        version = _COMMON_VERSIONS.get(words[-1]) or _parse_version(words[-1])
    if not 2 <= len(words) <= 3:
        raise HTTPError(400, f"Bad request syntax ({text[:100]!r})")
    if len(words) == 2:
        raise HTTPError(400, "HTTP/0.9 requests are not supported")
    return words[0], words[1], version


def read_headers(rfile: Any) -> dict[str, str]:
    """Read header lines up to the blank line, with http.server's limits.

    A line over 65536 bytes or more than 100 lines gets 431 as in http.server;
    a line without a colon, or with space before it, gets 400.  Repeated
    headers are joined with ", ", except those that must be unique (400).
    Raises ClientGone when the stream ends first.
    """
    headers: dict[str, str] = {}
    lines = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HTTPError(431, "Line too long")
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
        text = value.strip(b" \t\r\n").decode("iso-8859-1")
        if key in headers:
            if key in _UNIQUE_HEADERS:
                raise HTTPError(400, f"Repeated {key} header")
            text = f"{headers[key]}, {text}"
        headers[key] = text


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
    """An answer: ``provider``, ``delivery``, ``reason`` (a stable code for a
    4xx or 5xx) and ``replayed`` feed the access line."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    provider: str | None = None
    delivery: Delivery | None = None
    reason: str | None = None
    replayed: bool = False


def json_response(status: int, document: Any, **fields: Any) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode(), **fields)


def error_response(status: int, message: str, request_id: str, *,
                   delivery: Delivery | None = None, **fields: Any) -> Response:
    """The JSON error answer every refusal uses: message, request id, and delivery."""
    document = {"message": message, "request_id": request_id}
    if delivery is not None:
        document["delivery"] = delivery.value
    return json_response(status, document, delivery=delivery, **fields)


def response_head(response: Response, request_id: str, date: str, *, keep_alive: bool,
                  http10: bool = False) -> bytes:
    """The status line and headers of an answer, ready for one send with its body."""
    parts = [f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, 'Unknown')}\r\n"
             f"Server: {SERVER_NAME}\r\nDate: {date}\r\n"
             f"X-Request-Id: {request_id}\r\nAccess-Control-Allow-Origin: *\r\n"
             f"Access-Control-Expose-Headers: {CORS_EXPOSE_HEADERS}\r\n"]
    if response.content_type is not None:
        parts.append(f"Content-Type: {response.content_type}\r\n"
                     f"Content-Length: {len(response.body)}\r\n")
    parts.extend(f"{name}: {value}\r\n" for name, value in response.headers)
    if not keep_alive:
        parts.append("Connection: close\r\n")
    elif http10:
        parts.append("Connection: keep-alive\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


# --------------------------------------------------------- HTTP application ---

@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One path of the API: the methods it takes and the Application method that answers."""

    path: str
    methods: tuple[str, ...]
    handler: str


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/email", ("POST",), "email"),
    Endpoint("/healthcheck", ("GET", "HEAD"), "health"),
    Endpoint("/swagger.json", ("GET", "HEAD"), "swagger"),
    Endpoint("/metrics", ("GET", "HEAD"), "metrics_page"),
)
_ENDPOINT_AT = {endpoint.path: endpoint for endpoint in ENDPOINTS}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CORS_ALLOW_HEADERS = "Content-Type, X-API-KEY, X-Request-Id, Idempotency-Key, traceparent"
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
DEFAULT_POLL_ADDRESS = Address("poll@example.com")  # mock mode only: the mock ignores it
STORED_STATUSES = frozenset({200, 422, 502, 504})  # final answers an Idempotency-Key replays

_FAILURE_ANSWERS: Mapping[Failure, tuple[int, Delivery, str]] = {
    Failure.REJECTED: (422, Delivery.NOT_SENT, "{provider} rejected the message: {detail}"),
    Failure.TIMED_OUT: (504, Delivery.UNKNOWN, "{provider} did not answer within {timeout:g} s; "
                        "the message may have been sent, so it was not tried elsewhere"),
    Failure.UNKNOWN: (502, Delivery.UNKNOWN, "{provider} failed after the request was sent "
                      "({detail}); the message may have been sent"),
    Failure.FAILED: (502, Delivery.NOT_SENT, "{provider} failed ({detail}) and no other "
                     "provider could take the message"),
    Failure.ALL_CIRCUITS_OPEN: (503, Delivery.NOT_SENT, "no provider available: every circuit "
                                "is open; retry later"),
    Failure.UNCARRIABLE: (422, Delivery.NOT_SENT, "no provider can carry this message: "
                          "{detail}"),
    Failure.LEASE_LOST: (409, Delivery.NOT_SENT, "another request took this Idempotency-Key "
                         "before the message was sent; nothing was sent, retry later"),
    Failure.STORE_FAILED: (503, Delivery.NOT_SENT, "the idempotency store did not answer; "
                           "nothing was sent, retry later"),
    Failure.HOLDER_LOST: (502, Delivery.UNKNOWN, "the request that held this Idempotency-Key "
                          "stopped after {provider} may have been given the message; it is "
                          "not sent again"),
}


def failure_response(failure: DeliveryFailed, request_id: str, timeout: float) -> Response:
    """The client's answer to a failed delivery: the one place that picks its status."""
    status, delivery, text = _FAILURE_ANSWERS[failure.failure]
    retry_after = failure.retry_after
    if retry_after is None and status in (409, 503):
        retry_after = 1
    headers = () if retry_after is None else (("Retry-After", str(retry_after)),)
    message = text.format(provider=failure.provider, detail=failure.detail, timeout=timeout)
    return error_response(status, message, request_id, delivery=delivery, headers=headers,
                          provider=failure.provider, reason=failure.failure.value)


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


def fingerprint(document: Mapping[str, Any]) -> str:
    """The digest an Idempotency-Key is bound to: the canonical JSON of the body."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def stored_answer(response: Response) -> StoredAnswer:
    return StoredAnswer(response.status, response.headers, response.body, response.provider,
                        None if response.delivery is None else response.delivery.value)


def replayed(answer: StoredAnswer) -> Response:
    return Response(answer.status, answer.body,
                    headers=answer.headers + (("Idempotent-Replayed", "true"),),
                    provider=answer.provider,
                    delivery=None if answer.delivery is None else Delivery(answer.delivery),
                    replayed=True)


class Application:
    """Decides every answer: routing, auth, checks, sending, health, metrics, docs.

    A plain object that tests call with ``handle(Request(...))``; it holds no
    socket.  Checks run in this order: route (404, 405), API key (401),
    Content-Length (411), size (413), Content-Type (415), then the body
    (400).  Thread-safe: its collaborators are.
    """

    def __init__(self, config: Config, *, dispatcher: Dispatcher,
                 idempotency: IdempotencyStore, metrics: Metrics, log: Logger) -> None:
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in config.api_keys)
        self._max_body = config.max_body_bytes
        self._timeout = config.timeout
        self._fail_open = config.idempotency_on_error == "open"
        self.dispatcher = dispatcher
        self.idempotency = idempotency
        self.metrics = metrics
        self.inflight: Callable[[], int] = lambda: 0  # the server sets this
        self._log = log
        self._swagger = json.dumps(openapi_document(config), indent=2).encode()

    def handle(self, request: Request) -> Response:
        endpoint = _ENDPOINT_AT.get(request.path)
        allowed = endpoint.methods if endpoint is not None else ("GET", "HEAD", "POST")
        if request.method == "OPTIONS":
            methods = ", ".join(allowed + ("OPTIONS",))
            return Response(204, content_type=None, headers=(
                ("Allow", methods), ("Access-Control-Allow-Methods", methods),
                ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
                ("Access-Control-Max-Age", "600")))
        if endpoint is None:
            return error_response(404, "no such path; the API is described at /swagger.json",
                                  request.request_id, reason="no_such_path")
        if request.method not in allowed:
            methods = ", ".join(allowed + ("OPTIONS",))
            return error_response(405, f"method not allowed; use {methods}",
                                  request.request_id, headers=(("Allow", methods),),
                                  reason="method_not_allowed")
        answer: Callable[[Request], Response] = getattr(self, endpoint.handler)
        return answer(request)

    def finished(self, method: str, path: str, response: Response, seconds: float,
                 request_id: str) -> None:
        """Account for an answered request: metrics and the access line."""
        route = path if path in _ENDPOINT_AT else "other"
        self.metrics.count_and_observe(
            "smsp_http_requests_total", (method if method in METHODS else "other", route,
                                         str(response.status)),
            "smsp_http_request_duration_seconds", (route,), seconds)
        delivery = response.delivery
        self._log.info("access", request_id=request_id, method=method[:16], path=path[:200],
                       status=response.status, duration_ms=round(seconds * 1000, 3),
                       provider=response.provider,
                       delivery=None if delivery is None else delivery.value,
                       reason=response.reason, replayed=response.replayed or None)

    # -- POST /email

    def _authenticate(self, presented: str | None) -> bytes | None:
        """The digest of the presented key when it is one of ours (constant time)."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("latin-1")).digest()
        found = False
        for key in self._key_digests:  # no early exit
            found |= hmac.compare_digest(digest, key)
        return digest if found else None

    def _refusal(self, headers: Mapping[str, str], rid: str) -> Response | None:
        """The answer to a request whose headers already say no, before its body is read."""
        if "content-length" not in headers or "transfer-encoding" in headers:
            return error_response(411, "Content-Length required (chunked bodies are not "
                                       "accepted)", rid, reason="length_required")
        length = headers["content-length"]
        if not (length.isascii() and length.isdigit()):
            return error_response(400, "Content-Length must be a decimal number", rid,
                                  reason="bad_length")
        if len(length) > 20 or int(length) > self._max_body:
            return error_response(413, f"body larger than {self._max_body} bytes", rid,
                                  reason="body_too_large")
        content_type = headers.get("content-type")
        if content_type is not None and not _is_json_type(content_type):
            return error_response(415, "Content-Type must be application/json (with curl, add "
                                       "-H 'Content-Type: application/json')", rid,
                                  reason="unsupported_media_type")
        key = headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY_RE.match(key):
            return error_response(400, "Idempotency-Key must be 1-255 visible ASCII characters",
                                  rid, reason="bad_idempotency_key")
        return None

    def email(self, request: Request) -> Response:
        rid = request.request_id
        headers = request.headers
        scope = self._authenticate(headers.get("x-api-key"))
        if scope is None:
            return error_response(401, "Unauthorised", rid, reason="bad_key")
        refusal = self._refusal(headers, rid)
        if refusal is not None:
            return refusal
        raw = request.read_body(int(headers["content-length"]))
        try:
            document = parse_json_object(raw)
            message = parse_message(document)
        except ValidationError as exc:
            return error_response(400, str(exc), rid, reason="invalid_field")
        key = headers.get("idempotency-key")
        if key is None:
            return self._deliver(message, rid)
        digest = hashlib.sha256(scope + b"\0" + key.encode("ascii")).hexdigest()
        return self._deliver_once(digest, fingerprint(document), message, rid)

    def _deliver_once(self, key: str, print_: str, message: Message, rid: str) -> Response:
        try:
            found = self.idempotency.claim(key, print_)
        except StoreError as exc:
            if self._fail_open:
                self._log.warning("idempotency_store_bypassed", request_id=rid, phase="claim",
                                  reason=exc.reason)
                return self._deliver(message, rid)
            self._log.error("idempotency_store_failed", request_id=rid, phase="claim",
                            reason=exc.reason)
            return failure_response(DeliveryFailed(Failure.STORE_FAILED, Outcome.NOT_SENT),
                                    rid, self._timeout)
        if found.claim is Claim.NEW:
            return self._deliver_claimed(key, found.token, message, rid)
        if found.claim is Claim.REPLAY and found.answer is not None:
            return replayed(found.answer)
        if found.claim is Claim.MISMATCH:
            return error_response(422, "this Idempotency-Key was already used with a different "
                                       "request body", rid, delivery=Delivery.NOT_SENT,
                                  reason="idempotency_key_reused")
        if found.claim is Claim.HOLDER_LOST:
            return failure_response(DeliveryFailed(Failure.HOLDER_LOST, Outcome.UNKNOWN,
                                                   provider=found.provider), rid, self._timeout)
        return error_response(409, "a request with this Idempotency-Key is still in progress; "
                                   "retry later", rid, delivery=Delivery.NOT_SENT,
                              headers=(("Retry-After", "1"),), reason="idempotency_key_in_flight")

    def _deliver_claimed(self, key: str, token: str, message: Message, rid: str) -> Response:
        marked: list[str] = []  # the providers a dispatch mark was stored for
        response = None
        try:
            response = self._deliver(message, rid, self._marker(key, token, rid, marked))
        finally:
            self._settle(key, token, response, bool(marked), rid)
        return response

    def _marker(self, key: str, token: str, rid: str,
                marked: list[str]) -> Callable[[str], bool]:
        """The dispatcher's check before each attempt: mark the key dispatching.  A
        store failure raises StoreError (the message is not sent), unless the
        store fails open."""
        def before_attempt(provider: str) -> bool:
            try:
                ok = self.idempotency.dispatching(key, token, provider)
            except StoreError as exc:
                if not self._fail_open:
                    raise
                self._log.warning("idempotency_store_bypassed", request_id=rid,
                                  phase="dispatch", reason=exc.reason)
                return True
            if ok:
                marked.append(provider)
            return ok
        return before_attempt

    def _settle(self, key: str, token: str, response: Response | None, marked: bool,
                rid: str) -> None:
        """Store a final answer, or free a key that sent nothing so that a retry can
        send.  After an unexpected error past a dispatch mark the key is left as it
        is: its holder is then lost, and nothing is sent twice."""
        try:
            if response is not None and response.status in STORED_STATUSES:
                self.idempotency.complete(key, token, stored_answer(response))
            elif response is not None or not marked:
                self.idempotency.release(key, token)
        except StoreError as exc:
            self._log.error("idempotency_store_failed", request_id=rid, phase="settle",
                            reason=exc.reason)

    def _deliver(self, message: Message, rid: str,
                 before_attempt: Callable[[str], bool] | None = None) -> Response:
        try:
            receipt = self.dispatcher.send(message, rid, before_attempt=before_attempt)
        except DeliveryFailed as failure:
            return failure_response(failure, rid, self._timeout)
        except StoreError as exc:  # the dispatch mark failed: nothing was sent
            self._log.error("idempotency_store_failed", request_id=rid, phase="dispatch",
                            reason=exc.reason)
            return failure_response(DeliveryFailed(Failure.STORE_FAILED, Outcome.NOT_SENT),
                                    rid, self._timeout)
        message_id = "null" if receipt.message_id is None else _json_text(receipt.message_id)
        body = (f'{{"status":"sent","provider":{_json_text(receipt.provider)},'
                f'"message_id":{message_id}}}')
        return Response(200, body.encode(), provider=receipt.provider, delivery=Delivery.SENT)

    # -- the other routes

    def health(self, request: Request) -> Response:
        return json_response(200, {
            "status": "ok", "version": VERSION,
            "providers": [lane.breaker.snapshot() for lane in self.dispatcher.lanes],
            "idempotency": self.idempotency.status()})

    def swagger(self, request: Request) -> Response:
        return Response(200, self._swagger)

    def metrics_page(self, request: Request) -> Response:
        lanes = self.dispatcher.lanes
        text = self.metrics.render({
            "smsp_circuit_open": [((lane.provider.name,), int(lane.breaker.state is State.OPEN))
                                  for lane in lanes],
            "smsp_inflight_requests": [((), self.inflight())],
        })
        return Response(200, text.encode(), content_type=METRICS_TYPE)


def _answer(description: str, schema: str | None = "Error",
            headers: tuple[str, ...] = ()) -> dict[str, Any]:
    result: dict[str, Any] = {"description": description, "headers": {
        name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id",) + headers}}
    if schema is not None:
        result["content"] = {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return result


def _operations(config: Config) -> dict[str, dict[str, Any]]:
    """The OpenAPI operation of each Application handler (its GET or POST)."""
    answer = _answer
    text_plain = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "email": {
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
                "409": answer("the first request with this Idempotency-Key is in progress; "
                              "nothing was sent", "DeliveryError", ("Retry-After",)),
                "411": answer("Content-Length required"),
                "413": answer(f"body larger than {config.max_body_bytes} bytes"),
                "415": answer("Content-Type is not application/json"),
                "422": answer("a provider rejected the message, no provider can carry it, or "
                              "the Idempotency-Key was used with another body; not sent",
                              "DeliveryError", ("Idempotent-Replayed",)),
                "502": answer("the provider failed; see delivery", "DeliveryError",
                              ("Idempotent-Replayed",)),
                "503": answer("every circuit is open (Retry-After says until when), the "
                              "idempotency store is down, or the server is overloaded or "
                              "shutting down; not sent", "DeliveryError", ("Retry-After",)),
                "504": answer("the provider did not answer in time; delivery unknown",
                              "DeliveryError", ("Idempotent-Replayed",)),
            }},
        "health": {"summary": "Liveness, circuit states and the idempotency store",
                   "operationId": "health",
                   "responses": {"200": answer("serving", "Health")}},
        "swagger": {"summary": "This document", "operationId": "openapi",
                    "responses": {"200": {"description": "OpenAPI document", "content": {
                        JSON_TYPE: {"schema": {"type": "object"}}}}}},
        "metrics_page": {"summary": "Prometheus metrics", "operationId": "metrics",
                         "responses": {"200": {"description": "text exposition format 0.0.4",
                                               "content": text_plain}}},
    }


def _openapi_paths(operations: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI ``paths`` from ENDPOINTS; a HEAD is its GET without a body."""
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        operation = operations[endpoint.handler]
        item = paths[endpoint.path] = {}
        for method in endpoint.methods:
            if method != "HEAD":
                item[method.lower()] = operation
                continue
            item["head"] = {"summary": f"{operation['summary']}: headers only",
                            "operationId": f"{operation['operationId']}Head",
                            "responses": {"200": {"description": "headers only"}}}
    return paths


STORE_STATUS_SCHEMA: Mapping[str, Any] = {  # IdempotencyStore.status() in /healthcheck
    "type": "object", "required": ["kind", "state"],
    "properties": {"kind": {"type": "string", "enum": ["memory", "redis"]},
                   "state": {"type": "string", "enum": ["ok", "error"]},
                   "error": {"type": "string", "description": "why the store failed last: "
                             "a short classification such as 'timed out'"}}}


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3 description of every route; it states exactly what is accepted."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "smsp: send-mail service proxy", "version": VERSION,
                 "description": "Sends one plain-text email through Mailgun or SendGrid with "
                                "failover behind circuit breakers. Error bodies on 422, 502, 503 "
                                "and 504 say whether the mail was not sent or its fate is "
                                "unknown (do not retry blindly: use Idempotency-Key). Any route "
                                "may also answer a malformed HTTP request with 400, 414, 431 or "
                                "505, as http.server does."},
        "paths": _openapi_paths(_operations(config)),
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
                "Email": message_schema(),
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
                            "last_error": {"type": "string", "nullable": True}}}},
                    "idempotency": STORE_STATUS_SCHEMA}},
            },
        },
    }


# -------------------------------------------------- HTTP handler and server ---


class _Connection(Deadline):
    """A client connection's request budget, and what the drain needs to know of it."""

    __slots__ = ("drained", "idle")

    def __init__(self, deadline: float, handler: "Handler") -> None:
        super().__init__(deadline, handler, "request", socket.SHUT_RD)
        self.drained = False
        self.idle = True


class Handler(http.server.BaseHTTPRequestHandler):
    """The thin HTTP layer: parse a request, ask the application, write the answer.

    It keeps http.server's limits with a lean header parser (the email
    package costs more than the rest of a request), writes every response in
    one send, and bounds each request by the client budget through the
    server's watchdog instead of a socket timeout (which would add a poll()
    to every read).  Shared state is reached through ``self.server``.
    """

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    disable_nagle_algorithm = True
    server: "Server"

    def setup(self) -> None:
        server = self.server
        self.conn = _Connection(server.clock() + server.client_timeout, self)
        server.watchdog.watch(self.conn)
        server.track(self.conn)
        self.tls_failed = False
        if server.ssl_context is not None:
            try:  # the handshake runs here, in the connection's thread, within the budget
                self.request = server.ssl_context.wrap_socket(self.request, server_side=True)
            except (OSError, ValueError):
                self.tls_failed = True
        super().setup()

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

    def handle_one_request(self) -> None:
        server = self.server
        conn = self.conn
        conn.deadline = server.clock() + server.client_timeout
        conn.idle = True  # before the draining check: see Server.drain
        self.close_connection = True
        if server.draining:
            return
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except OSError:
            return
        if not line:
            return  # an idle connection closed or timed out: no answer owed
        if not server.begin_request(conn):
            rid = server.ids()
            self._answer(error_response(503, "server is shutting down", rid,
                                        delivery=Delivery.NOT_SENT), rid)
            return
        try:
            self._serve(line)
        finally:
            server.end_request()

    def _serve(self, line: bytes) -> None:
        server = self.server
        started = server.clock()
        rid = ""
        method = path = "-"
        try:
            head = self._read_head(line)
            if head is None:
                return
            method, path, version, headers = head
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

    def _read_head(self, line: bytes) -> tuple[str, str, tuple[int, int], dict[str, str]] | None:
        """Method, path (no query), version and headers; None for a blank line.

        Raises HTTPError for what http.server would refuse, ClientGone when
        the stream ends first.
        """
        if not line.endswith(b"\n"):
            if len(line) > MAX_REQUEST_LINE:
                raise HTTPError(414, "Request-URI Too Long")
            raise ClientGone("request line incomplete")
        parsed = parse_request_line(line)
        if parsed is None:
            return None
        method, target, version = parsed
        path = target.split("?", 1)[0]
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        return method, path, version, read_headers(self.rfile)

    def _answer(self, response: Response, rid: str, method: str = "-", path: str = "-",
                started: float | None = None, *, keep_alive: bool = False,
                head_only: bool = False, http10: bool = False) -> None:
        """Write the whole response in one send, then account for it."""
        server = self.server
        self.close_connection = not keep_alive
        data = response_head(response, rid, server.date(), keep_alive=keep_alive, http10=http10)
        try:
            self.wfile.write(data if head_only else data + response.body)
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
        if self._expect and size:
            handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = handler.rfile.read(size) if size else b""
        if len(data) < size:
            raise ClientGone("body incomplete")
        self.pending = False
        handler.conn.deadline = None  # the budget covers receiving, not our provider calls
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
            response = error_response(503, "overloaded", rid, delivery=Delivery.NOT_SENT,
                                      headers=(("Retry-After", "1"),))
            head = response_head(response, rid, self.date(), keep_alive=False)
            try:
                request.setblocking(False)
                request.send(head + response.body)
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

    def begin_request(self, conn: _Connection) -> bool:
        """Count a request in flight, unless the drain already closed its connection."""
        with self._lock:
            if conn.drained:
                return False
            conn.idle = False
            self._inflight += 1
            return True

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
        """Close idle connections, let requests in flight finish; return how many did not."""
        deadline = self.clock() + grace
        with self._lock:
            self.draining = True
            idle = [c for c in self._connections if c.idle]
            for conn in idle:
                conn.drained = True
        for conn in idle:
            conn.interrupt()
        while self._inflight and (left := deadline - self.clock()) > 0:
            self._quiet.clear()
            if self._inflight:  # a request that ended between the test and clear() set it
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
        return {lane.provider.name: lane.breaker for lane in self.dispatcher.lanes}

    def close(self) -> None:
        """Cancel the poll timers, wake mock timeouts, drop provider and store connections."""
        self.stop_event.set()
        for lane in self.dispatcher.lanes:
            lane.breaker.stop()
            lane.provider.close()
        self.app.idempotency.close()
        self.watchdog.stop()


def config_secrets(config: Config) -> list[str]:
    """Every secret value configured: client keys and the providers' secret rows."""
    secrets = list(config.api_keys)
    if config.idempotency_url is not None and config.idempotency_url.password:
        secrets.append(config.idempotency_url.password)
    for name, cls in PROVIDERS.items():
        values = config.provider_settings.get(name, {})
        secrets += [values[row.field] for row in cls.settings if row.secret and values.get(
            row.field)]
    return secrets


def _lanes(config: Config, context: ProviderContext, *, log: Logger, metrics: Metrics,
           clock: Callable[[], float], timer: Callable[[float, Callable[[], None]], Any]
           ) -> list[Lane]:
    def on_change(change: StateChange) -> None:
        metrics.inc("smsp_circuit_transitions_total", change.breaker, change.new.value)
        log.log(Level.WARNING if change.new is State.OPEN else Level.INFO, "circuit_state_change",
                provider=change.breaker, **{"from": change.old.value}, to=change.new.value,
                reason=change.reason)

    def on_poll(name: str, ok: bool) -> None:
        metrics.inc("smsp_circuit_polls_total", name, "success" if ok else "failure")

    address = config.poll_address or DEFAULT_POLL_ADDRESS
    lanes = []
    for provider in build_providers(config, context):
        breaker = CircuitBreaker(provider.name, make_probe(provider, address, config.timeout),
                                 threshold=config.failure_threshold,
                                 interval=config.poll_interval,
                                 interval_max=config.poll_interval_max, clock=clock, timer=timer,
                                 on_change=on_change, on_poll=on_poll)
        lanes.append(Lane(provider, breaker))
    return lanes


def store_tls_context(config: Config) -> ssl.SSLContext | None:
    """Verified TLS for a rediss:// store: the system CAs, or SMSP_IDEMPOTENCY_CA's."""
    if config.idempotency_url is None or not config.idempotency_url.tls:
        return None
    return ssl.create_default_context(cafile=config.idempotency_ca or None)


def build_store(config: Config, *, watchdog: Watchdog, metrics: Metrics,
                clock: Callable[[], float], lanes: int) -> IdempotencyStore:
    """The shared store when SMSP_IDEMPOTENCY_URL is set, else the per-process one.
    Nothing connects here: the shared store connects on first use."""
    liveness = config.timeout + IDEMPOTENCY_MARGIN
    if config.idempotency_url is None:
        return MemoryIdempotencyStore(ttl=config.idempotency_ttl,
                                      max_entries=config.idempotency_max,
                                      lease=config.timeout * lanes + IDEMPOTENCY_MARGIN,
                                      liveness=liveness, clock=clock)
    client = RedisClient(config.idempotency_url, watchdog=watchdog,
                         timeout=config.idempotency_timeout,
                         ssl_context=store_tls_context(config))
    return RedisIdempotencyStore(client, ttl=config.idempotency_ttl, lease=IDEMPOTENCY_LEASE,
                                 liveness=liveness, metrics=metrics)


def build_service(config: Config, *, log: Logger | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  timer: Callable[[float, Callable[[], None]], Any] = start_timer,
                  worker: int | None = None) -> Service:
    """Wire the objects.  ``clock`` and ``timer`` drive the breakers and the idempotency
    store (tests pass fakes); deadlines on sockets always use the real monotonic clock."""
    log = log or Logger(config.log_format, debug=config.log_debug, worker=worker)
    metrics = Metrics(worker=worker)
    watchdog = Watchdog(recheck=min(1.0, config.client_timeout))
    stop = threading.Event()
    context = ProviderContext(watchdog, time.monotonic, stop, Redactor(config_secrets(config)),
                              config.pool_size, config.pool_idle)
    lanes = _lanes(config, context, log=log, metrics=metrics, clock=clock, timer=timer)
    dispatcher = Dispatcher(lanes, timeout=config.timeout, log=log, metrics=metrics)
    idempotency = build_store(config, watchdog=watchdog, metrics=metrics, clock=clock,
                              lanes=len(lanes))
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


def report_store(store: IdempotencyStore, log: Logger) -> None:
    """Ask the idempotency store once at start and log by name why it failed.  smsp
    serves anyway (keyed requests get 503 until the store answers), so that a
    store that is down or refuses the password does not make pods crash-loop."""
    failed = store.check()
    if failed is not None:
        log.error("idempotency_store_failed", phase="start", reason=failed)


def serve(config: Config, *, sock: socket.socket | None = None, worker: int | None = None,
          log: Logger | None = None) -> int:
    """Run one server until SIGTERM or SIGINT, then drain; the process exit status.

    Every thread smsp starts blocks both signals (see start_thread), so the
    kernel hands them to the main thread; it also wakes twice a second in
    case a thread started by someone else took one.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    service = build_service(config, log=log, worker=worker)
    log = service.log
    try:
        report_store(service.app.idempotency, log)
        try:
            server = make_server(service, sock=sock)
        except (OSError, ssl.SSLError) as exc:
            log.error("start_failed", error=f"{type(exc).__name__}: {exc}")
            service.close()
            return 2
        for signum in STOP_SIGNALS:
            signal.signal(signum, on_signal)
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
        log.close()  # a worker leaves with os._exit: write out its last lines now


def run_workers(config: Config, log: Logger | None = None) -> int:
    """Fork ``config.workers`` servers sharing one listening socket and keep them running.

    A worker that dies is replaced; SIGTERM or SIGINT is forwarded to every
    worker, which drains as a single server does.  Each worker has its own
    breakers, as separate nodes have.  Returns the worst worker exit status.
    """
    log = log or Logger(config.log_format, debug=config.log_debug)
    sock = socket.create_server((config.host, config.port), backlog=1024)
    children: dict[int, int] = {}
    stopping = False
    restarts: collections.deque[float] = collections.deque(maxlen=10)

    def spawn(index: int) -> None:
        # Signals wait until the child has dropped the parent's handler (which would
        # otherwise run in the child, signal its siblings and leave it serving).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)  # until serve() installs its own
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                code = serve(config, sock=sock, worker=index)
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


def _default_text(row: Setting) -> str:
    if row.required:
        return "required"
    if row.default in (None, "", ()):
        return "unset"
    return f"default {row.shown(row.default)}"


def _row(env: str) -> Setting:
    return next(row for row in SETTINGS if row.env == env)


def _cli_value(env: str) -> Callable[[str], Any]:
    """An argparse type that parses a command-line value with the setting's own parser."""
    def parse(text: str) -> Any:
        try:
            return _row(env).parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    lines = ["environment variables:"]
    for row in all_settings():
        lines.append(f"  {row.env:<28} {row.help} ({_default_text(row)})")
    parser = argparse.ArgumentParser(
        prog="smsp.py", description="smsp: the send-mail service proxy.",
        epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", type=_cli_value("SMSP_HOST"),
                        help="listen address (overrides SMSP_HOST)")
    parser.add_argument("--port", type=_cli_value("SMSP_PORT"),
                        help="listen port (overrides SMSP_PORT)")
    parser.add_argument("--check-config", action="store_true",
                        help="print the effective configuration (secrets masked) and exit")
    parser.add_argument("--version", action="version", version=f"smsp {VERSION}")
    return parser


def describe_config(config: Config) -> list[str]:
    """The effective configuration, one ``NAME=value`` line each, secrets masked;
    in mock mode the provider rows are left out, as they are ignored."""
    lines = []
    for row in SETTINGS:
        shown = row.shown(config.value(row.field))
        if row.field == "providers" and config.mock:
            shown = "mock (SMSP_MOCK_EMAIL_SERVICE=true: provider settings are ignored)"
        lines.append(f"{row.env}={shown}")
    for name in config.active_providers:
        cls = PROVIDERS.get(name)
        for row in cls.settings if cls is not None else ():
            lines.append(f"{row.env}={row.shown(config.provider_settings[name][row.field])}")
    return lines


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(os.environ if environ is None else environ)
    except ConfigError as exc:
        print("smsp: invalid configuration:\n" + "".join(f"  - {p}\n" for p in exc.problems)
              + "For a demo without real providers set SMSP_MOCK_EMAIL_SERVICE=true "
                "(and SMSP_API_KEY).", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    if args.check_config:
        print("\n".join(describe_config(config)))
        print("configuration OK")
        return 0
    if config.workers > 1:
        return run_workers(config)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
