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
SendGrid, SES, Postmark, Resend, SMTP, mock); the circuit breaker; the dispatcher
(failover); idempotency (the store interface and the in-memory store); the shared
idempotency store (a small RESP2 client and the Redis or Valkey store every replica
shares);
HTTP messages (the lean parser); the HTTP application (routes and responses,
no sockets); the HTTP handler and server; and finally workers and main (``main()``).

Every response tells the client whether its mail was sent, not sent, or
unknown.  A message whose fate is unknown (the provider timed out after the
request was written) is never re-sent through another provider.
"""

import argparse
import atexit
import base64
import binascii
import bisect
import collections
import contextvars
import dataclasses
import email.charset
import email.headerregistry
import email.message
import email.policy
import email.utils
import enum
import functools
import hashlib
import heapq
import hmac
import http.client
import http.server
import ipaddress
import io
import itertools
import json
import math
import os
import random
import re
import select
import signal
import smtplib
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

# ---------------------------------------------------------------- constants ---

VERSION = "3.0.0"
SERVER_NAME = f"smsp/{VERSION}"

MAX_REQUEST_LINE = 65536  # the limit http.server enforces (414 past it)
MAX_HEAD = 65536  # request line and headers together, as the bytes arrive (431 past it)
MAX_HEADERS = 100  # header lines including the blank one that ends them, as http.client
MAX_ADDRESS_FIELD = 320
MAX_ADDRESS = 254
MAX_LOCAL_PART = 64
MAX_SUBJECT = 998  # RFC 5322 line length
MAX_RECIPIENTS = 50  # to, cc and bcc together
MAX_CUSTOM_HEADERS = 10
MAX_HEADER_NAME = 64
MAX_HEADER_VALUE = 998  # RFC 5322 line length
MAX_ATTACHMENTS = 10
MAX_FILENAME = 255
MAX_CONTENT_ID = 255
MAX_TAGS = 3  # Mailgun's limit, the strictest of the providers'
MAX_TAG = 128
MAX_METADATA = 10
MAX_METADATA_TEXT = 128  # characters of each key and each value
MAX_METADATA_BYTES = 1024  # UTF-8 bytes of every key and value together
DEFAULT_MAX_ATTACHMENT_BYTES = 10 << 20  # decoded, per message: what Postmark and SES allow
BODY_HEADROOM = 1 << 20  # request bytes allowed besides the attachments' base64
MAX_JSON_DEPTH = 32  # arrays and objects in a request body; the API itself needs three
MAX_PROVIDER_REPLY = 1 << 20  # bytes of a provider reply we are willing to read
MAX_PROVIDER_MESSAGE = 500  # characters of a provider's error message passed to the client
MAX_SECRET_FILE = 65536  # characters read from a <NAME>_FILE secret
ACCEPT_FANOUT = 2  # waiting connections each new connection thread takes off the listener
GIL_SWITCH_INTERVAL = 0.05  # seconds; CPython's default is 0.005 (see serve())

_UUID4_BITS = 4 << 76 | 0b10 << 62  # version 4, RFC 4122 variant
_UUID_RANDOM_BITS = ~(0xF << 76 | 0b11 << 62) & (1 << 128) - 1

POLL_SUBJECT = "poll"
POLL_BODY = "poll"
IDEMPOTENCY_MARGIN = 5.0  # seconds a key's lease outlives the longest send it covers
IDEMPOTENCY_LEASE = 5.0  # seconds a shared-store claim holds a key before its first send

_V = typing.TypeVar("_V")


@typing.dataclass_transform(frozen_default=True)
def value_class(cls: type[_V]) -> type[_V]:
    """A dataclass that is frozen to the type checker and a plain slotted one at run time.

    For the values made for every request (addresses, messages, receipts,
    replies, stored answers).  A frozen dataclass sets each field through
    object.__setattr__, and that was 8% of a request's instructions.  Nothing
    assigns to a field: ``mypy --strict`` (make lint) refuses it as it
    would for a frozen class; ``dataclasses.replace`` makes changed copies.
    Equal values hash alike, as frozen ones do.
    """
    return dataclasses.dataclass(slots=True, unsafe_hash=True)(cls)

# ------------------------------------------------------ errors and outcomes ---


class Outcome(enum.Enum):
    """What one provider attempt did to the message (the metrics label too).

    Code run for every request reads a member's ``_value_`` (the attribute
    that holds it): in Python 3.11 ``.value`` is a property written in
    Python, two calls each time.  Delivery below is read the same way.
    """

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
MAIN_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}  # left to the main thread: stop, and reload


def start_thread(target: Callable[..., Any], name: str, **kwargs: Any) -> threading.Thread:
    """Start a daemon thread that leaves SIGTERM and SIGINT to the main thread.

    A process-directed signal goes to any thread that does not block it, but a
    Python handler runs only in the main thread, which may then sleep on.
    Threads started from such a thread (one per connection, poll timers)
    inherit the mask.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_SIGNALS)
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
# A quoted display name (RFC 5322 quoted-string): any printable text, " and \ escaped.
_QUOTED = r' *"(?:[^"\\\x00-\x1f\x7f-\x9f\u2028\u2029]|\\[^\x00-\x1f\x7f-\x9f\u2028\u2029])*" *'
# The OpenAPI document publishes this very pattern, so the fuzzer and we agree.
ADDRESS_PATTERN = (rf"^(?:(?!.{{{MAX_ADDRESS + 1}}}){_ADDR}"
                   rf"|(?:{_NAME}|{_QUOTED})<(?![^>]{{{MAX_ADDRESS + 1}}}){_ADDR}>)$")
_ADDRESS_RE = re.compile(ADDRESS_PATTERN)
_ADDRESS_SHAPE_RE = re.compile(
    rf"^(?:{_ADDR_SHAPE}|(?:{_NAME}|{_QUOTED})<{_ADDR_SHAPE}>)$")  # without the limits
_SPECIALS_RE = re.compile(r'[,;<>"\\]')
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


_PLAIN_NAME_RE = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")  # atoms: no quoting needed
_UTF8 = email.charset.Charset("utf-8")  # header_encode: an RFC 2047 word, B or Q, the shorter


@value_class
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


def _address_problem(value: str) -> str:
    """Which rule an address that does not match breaks, in the client's terms."""
    named = value.endswith(">") and "<" in value
    name, email = (value[:value.rfind("<")], value[value.rfind("<") + 1:-1]) if named \
        else ("", value)
    if not email.isascii():
        return ("address must be ASCII; write an international domain in its xn-- form "
                "(IDNA), like user@xn--bcher-kva.example")
    if _SPECIALS_RE.search(name.strip()) and not re.fullmatch(_QUOTED, name):
        return ('a display name with , ; < > " or \\ must be in double quotes, like '
                '"Doe, John" <john@example.com>')
    if _ADDRESS_SHAPE_RE.match(value):
        return (f"address must be at most {MAX_ADDRESS} characters with a local part of at "
                f"most {MAX_LOCAL_PART}")
    return "must be an address like user@example.com or Name <user@example.com>"


def parse_address(field: str, value: Any) -> Address:
    """Validate ``user@domain``, ``Name <user@domain>`` or ``"Name, quoted" <user@domain>``;
    raise ValidationError saying which rule failed."""
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
        raise ValidationError(field, _address_problem(value))
    if not value.endswith(">"):
        return Address(value)
    name, _, email = value[:-1].rpartition("<")
    name = name.strip()
    if name.startswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return Address(email, name)


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


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value
    return parse


def _parse_log_format(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return "JSON_ONELINE" if value == "JSON_ONLINE" else value


def _parse_text(text: str) -> str:
    return text.strip()


_REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")


def _parse_region(text: str) -> str:
    region = text.strip()
    if not _REGION_RE.fullmatch(region):
        raise ValueError("must be an AWS region such as eu-west-1")
    return region


def base64_size(size: int) -> int:
    """The length of ``size`` bytes in base64 with padding (RFC 4648)."""
    return 4 * -(-size // 3)


def body_bytes_for(attachment_bytes: int) -> int:
    """The request size that fits attachments of ``attachment_bytes`` as base64, and the rest."""
    return base64_size(attachment_bytes) + BODY_HEADROOM


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


def _parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",")
                     if part.strip())
    except ValueError:
        raise ValueError("must be IP addresses or CIDR ranges, comma-separated") from None


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
    ``follows``, when given, makes the value of an unset row follow from the
    rows above it (``default`` is then what it is with their defaults).
    """

    env: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False
    required: bool = False
    follows: Callable[[Mapping[str, Any]], Any] | None = None
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
            return ",".join(str(v) for v in value)
        if isinstance(value, bool):
            return str(value).lower()
        return "" if value is None else str(value)


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
    Setting("SMSP_POLL_SANDBOX", "poll_sandbox", _parse_bool, False,
            "true: polls go in the provider's test mode (Mailgun, SendGrid, Postmark, SES, "
            "Resend), proving the API and keys without delivering"),
    Setting("SMSP_MAX_ATTACHMENT_BYTES", "max_attachment_bytes", _number(int, 0),
            DEFAULT_MAX_ATTACHMENT_BYTES,
            "largest total decoded size of one message's attachments"),
    Setting("SMSP_MAX_BODY_BYTES", "max_body_bytes", _number(int, 1),
            body_bytes_for(DEFAULT_MAX_ATTACHMENT_BYTES),
            "largest request body accepted; unset, SMSP_MAX_ATTACHMENT_BYTES as base64 "
            "plus 1 MiB for the rest",
            follows=lambda values: body_bytes_for(values["max_attachment_bytes"])),
    Setting("SMSP_MAX_INFLIGHT_BODY_BYTES", "max_inflight_body_bytes", _number(int, 1),
            body_bytes_for(DEFAULT_MAX_ATTACHMENT_BYTES),
            "request body bytes held at once, from reading to answering; one more gets 503 "
            "(unset: SMSP_MAX_BODY_BYTES, one largest body at a time)",
            follows=lambda values: values["max_body_bytes"]),
    Setting("SMSP_HOST", "host", _parse_text, "0.0.0.0", "listen address (--host)"),
    Setting("SMSP_TRUSTED_PROXIES", "trusted_proxies", _parse_networks, (),
            "addresses or CIDR ranges of proxies whose X-Forwarded-For names the client"),
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


def _raw_setting(row: Setting, env: Mapping[str, str], problems: list[str]) -> str:
    """A row's text: from its variable, or for a secret from the file ``<NAME>_FILE``
    names (the convention of Docker images and Kubernetes Secrets mounted as files)."""
    raw = env.get(row.env, "")
    path = env.get(f"{row.env}_FILE", "").strip() if row.secret else ""
    if not path:
        return raw
    if raw.strip():
        problems.append(f"{row.env} and {row.env}_FILE are both set; set one of them")
        return ""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(MAX_SECRET_FILE).rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8 text"
        problems.append(f"{row.env}_FILE cannot be read: {why} ({path})")
        return ""
    if not text.strip():  # a secret mounted empty: say so rather than "is required"
        problems.append(f"{row.env}_FILE names an empty file ({path})")
    return text


def parse_settings(rows: Iterable[Setting], env: Mapping[str, str],
                   problems: list[str]) -> dict[str, Any]:
    """Each row's value from ``env`` (its default when unset); problems are appended."""
    values: dict[str, Any] = {}
    for row in rows:
        raw = _raw_setting(row, env, problems)
        if raw.strip() == "":
            values[row.field] = row.default if row.follows is None else row.follows(values)
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
    poll_sandbox: bool
    max_body_bytes: int
    max_attachment_bytes: int
    max_inflight_body_bytes: int
    host: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
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
        if self.max_inflight_body_bytes < self.max_body_bytes:
            problems.append("SMSP_MAX_INFLIGHT_BODY_BYTES must be at least SMSP_MAX_BODY_BYTES, "
                            "or the largest bodies could never be taken")
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


# Printable ASCII but " and \: text that is its own JSON string body.
_plain_json = re.compile(r'[ !#-\[\]-~]*').fullmatch


def _json_text(value: str) -> str:
    """A JSON string literal, without the json module in the common plain case."""
    return f'"{value}"' if _plain_json(value) else json.dumps(value)


_DEBUG_QUOTE_RE = re.compile(r'[\s"=\\]')


def _debug_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or not text.isprintable() or _DEBUG_QUOTE_RE.search(text):
        return json.dumps(text)
    return text


# The W3C trace id of the request this thread serves, for the events it logs.
TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("smsp_trace_id",
                                                                     default=None)
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None when it is not valid."""
    found = _TRACEPARENT_RE.fullmatch(traceparent.strip()) if traceparent else None
    if found is None or found.group(1) == "ff" or (found.group(1) == "00" and found.group(4)):
        return None
    if found.group(2) == "0" * 32 or found.group(3) == "0" * 16:
        return None
    return found.group(2)


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
        sink = writer.write if writer is not None else write
        assert sink is not None  # one of the two is set above
        self._write: Callable[[str], None] = sink
        self._fmt = fmt
        self._host = host or socket.gethostname()
        self._worker = worker
        worker_field = "" if worker is None else f',"worker":{worker}'
        self._json_tail = f',"host":{_json_text(self._host)}{worker_field}'
        self._wallclock = wallclock
        self._second = -1
        self._stamp = ""

    def log(self, level: Level, event: str, **fields: Any) -> None:
        if level >= self._min:
            self._write(self._line(level, event, fields))

    def _time(self) -> str:
        now = self._wallclock()
        second = int(now)
        if second != self._second:  # a benign race: both threads compute the same text
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def access(self, request_id: str, method: str, path: str, status: int, duration_ms: float,
               *, trace_id: str | None = None, client: str | None = None,
               provider: str | None = None, delivery: str | None = None,
               reason: str | None = None, replayed: bool = False) -> None:
        """The access line of an answered request: the event written for every request.

        In JSON_ONELINE, when no text in it needs escaping (one test of them
        all), it is one expression, not _line's loop over the fields (which
        cost a sixth of a request): the very text ``info("access", ...)``
        writes, which a test holds it to.  Anything else takes that way.
        """
        if self._fmt != "JSON_ONELINE" or not _plain_json("".join((
                request_id, method, path, trace_id or "", client or "", provider or "",
                delivery or "", reason or ""))):
            self.info("access", request_id=request_id, trace_id=trace_id, client=client,
                      method=method, path=path, status=status, duration_ms=duration_ms,
                      provider=provider, delivery=delivery, reason=reason,
                      replayed=replayed or None)
            return
        trace = "" if trace_id is None else f',"trace_id":"{trace_id}"'
        peer = "" if client is None else f',"client":"{client}"'
        sent = "" if provider is None else f',"provider":"{provider}"'
        fate = "" if delivery is None else f',"delivery":"{delivery}"'
        why = "" if reason is None else f',"reason":"{reason}"'
        again = ',"replayed":true' if replayed else ""
        self._write(f'{{"time":"{self._time()}","level":"info","event":"access"{self._json_tail}'
                    f',"request_id":"{request_id}"{trace}{peer},"method":"{method}"'
                    f',"path":"{path}","status":{status},"duration_ms":{duration_ms!r}'
                    f'{sent}{fate}{why}{again}}}\n')

    def _line(self, level: Level, event: str, fields: dict[str, Any]) -> str:
        stamp = self._time()
        if self._fmt == "JSON_ONELINE":  # by hand: other events take this loop
            out = [f'{{"time":"{stamp}","level":"{_LEVEL_NAMES[level]}","event":"{event}"'
                   f'{self._json_tail}']
            for key, value in fields.items():
                kind = type(value)
                if kind is str:
                    out.append(f',"{key}":"{value}"' if _plain_json(value)
                               else f',"{key}":{json.dumps(value)}')
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
            record: dict[str, Any] = {"time": stamp, "level": _LEVEL_NAMES[level],
                                      "event": event, "host": self._host}
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
        h = (self._bits(128) & _UUID_RANDOM_BITS | _UUID4_BITS).to_bytes(16, "big").hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -------------------------------------------------- messages and validation ---


@value_class
class Attachment:
    """One attached file, decoded; with ``content_id`` it is an inline part (``cid:``)."""

    filename: str
    content_type: str
    content: bytes
    content_id: str = ""


@value_class
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
    key: str = ""  # the same on every retry of one keyed request; providers may dedupe by it
    sandbox: bool = False  # a poll in the provider's test mode: checked, never delivered

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Everyone the message goes to: to, cc and bcc."""
        return self.to + self.cc + self.bcc

    def mime_size(self) -> int:
        """About the size of the message as MIME: its bodies, and its attachments as base64."""
        return len(self.text.encode("utf-8", "surrogatepass")) + \
            len(self.html.encode("utf-8", "surrogatepass")) + \
            sum(base64_size(len(a.content)) for a in self.attachments)


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


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The configured bounds a message is held to (the fixed ones are constants)."""

    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES

    @classmethod
    def of(cls, config: Config) -> "Limits":
        return cls(max_attachment_bytes=config.max_attachment_bytes)


DEFAULT_LIMITS = Limits()


def _parse_line(field: str, value: Any, most: int, *, empty: bool = True) -> str:
    """A string of at most ``most`` characters without control characters."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if not value and not empty:
        raise ValidationError(field, "must not be empty")
    if len(value) > most:
        raise ValidationError(field, f"must be at most {most} characters")
    if not (value.isascii() and value.isprintable()):
        if _CONTROL_RE.search(value):
            raise ValidationError(field, "must not contain CR, LF or other control characters")
        _check_text(field, value)
    return value


def _parse_subject(field: str, value: Any, limits: Limits) -> str:
    return _parse_line(field, value, MAX_SUBJECT)


def _parse_body(field: str, value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    if not value.isascii():
        _check_text(field, value)
    return value


def _parse_one_address(field: str, value: Any, limits: Limits) -> Address:
    return parse_address(field, value)


def _address_list(field: str, value: Any, least: int) -> tuple[Address, ...]:
    if not isinstance(value, list):
        raise ValidationError(field, "must be a list of addresses")
    if not least <= len(value) <= MAX_RECIPIENTS:
        raise ValidationError(field, f"must hold {least} to {MAX_RECIPIENTS} addresses")
    return tuple(parse_address(f"{field}[{n}]", item) for n, item in enumerate(value))


def _parse_to(field: str, value: Any, limits: Limits) -> tuple[Address, ...]:
    """One address, as the original API took it, or a list of them."""
    if isinstance(value, str):
        return (parse_address(field, value),)
    if not isinstance(value, list):
        raise ValidationError(field, "must be an address or a list of addresses")
    return _address_list(field, value, 1)


def _parse_copies(field: str, value: Any, limits: Limits) -> tuple[Address, ...]:
    return _address_list(field, value, 0)


_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: visible ASCII but ":"
_LIST_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})  # RFC 2369, 8058
# The message's own header fields, and the names the providers keep for themselves.
_RESERVED_HEADERS = frozenset({
    "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "content-id", "return-path", "received", "dkim-signature",
    "x-sg-id", "x-sg-eid", "x-smtpapi",  # SendGrid's
    "x-tag", "x-metadata",  # where the SMTP provider writes tags and metadata
    "x-pm-tag", "x-pm-metadata", "x-ses-configuration-set",  # Postmark's and SES's
})
_RESERVED_PREFIXES = ("x-mailgun-",)  # Mailgun's own: X-Mailgun-Variables, -Tag, -Sid...


def _check_header_name(field: str, name: str) -> None:
    if len(name) > MAX_HEADER_NAME or not _FIELD_NAME_RE.fullmatch(name):
        raise ValidationError(field, f"header name {name!r} must be 1-{MAX_HEADER_NAME} "
                                     "visible ASCII characters without ':' (RFC 5322)")
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES):
        raise ValidationError(field, f"header {name!r} is reserved")
    if not ((lowered.startswith("x-") and len(name) > 2) or lowered in _LIST_HEADERS):
        raise ValidationError(field, f"header {name!r} is not allowed: names start with X-, "
                                     "or are List-Unsubscribe or List-Unsubscribe-Post")


def _parse_headers(field: str, value: Any, limits: Limits) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object of header names and values")
    if len(value) > MAX_CUSTOM_HEADERS:
        raise ValidationError(field, f"must hold at most {MAX_CUSTOM_HEADERS} headers")
    seen: set[str] = set()
    for name, text in value.items():
        _check_header_name(field, name)
        if name.lower() in seen:
            raise ValidationError(field, f"header {name!r} is given twice")
        seen.add(name.lower())
        _parse_line(f"{field}.{name}", text, MAX_HEADER_VALUE, empty=False)
    return tuple(value.items())


_TOKEN = r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]+"  # RFC 2045
CONTENT_TYPE_PATTERN = rf"^{_TOKEN}/{_TOKEN}$"
_CONTENT_TYPE_RE = re.compile(CONTENT_TYPE_PATTERN)
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
FILENAME_PATTERN = r"^(?!\.\.?$)[^\x00-\x1f\x7f-\x9f\u2028\u2029/\\]+$"
_FILENAME_RE = re.compile(FILENAME_PATTERN)
CONTENT_ID_PATTERN = r"^[A-Za-z0-9!#$%&'*+.=?^_`{|}~@-]+$"  # RFC 5322 atext and . @
_CONTENT_ID_RE = re.compile(CONTENT_ID_PATTERN)
_ATTACHMENT_KEYS = ("filename", "content_type", "content", "content_id")


_ATTACHMENT_RULES: Mapping[str, tuple[re.Pattern[str], int, str]] = {
    "filename": (_FILENAME_RE, MAX_FILENAME,
                 "a file name without a path separator or control character"),
    "content_type": (_CONTENT_TYPE_RE, 255, "a type/subtype pair of tokens like application/pdf"),
    "content_id": (_CONTENT_ID_RE, MAX_CONTENT_ID, "letters, digits and !#$%&'*+-./=?^_`{|}~@"),
}


def _attachment_text(field: str, item: dict[str, Any], key: str) -> str:
    """One of an attachment's strings, checked; "" for an absent content_id."""
    where = f"{field}.{key}"
    if key not in item:
        if key == "content_id":
            return ""
        raise ValidationError(where, "is required")
    value = item[key]
    if not isinstance(value, str):
        raise ValidationError(where, "must be a string")
    rule = _ATTACHMENT_RULES.get(key)
    if rule is not None:
        pattern, most, what = rule
        if len(value) > most or not pattern.fullmatch(value):
            raise ValidationError(where, f"must be {what}, at most {most} characters")
        _check_text(where, value)
    return value


def _decoded_size(field: str, text: str) -> int:
    """The size ``text`` decodes to, from its length alone; padding is required."""
    if not text or len(text) % 4:
        raise ValidationError(field, "must be base64 (RFC 4648) with padding, not empty")
    return len(text) // 4 * 3 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)


def _decode(field: str, text: str) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise ValidationError(field, "must be base64 (RFC 4648) with padding, without line "
                                     "breaks or other characters") from None


def _attachment_shape(field: str, item: Any) -> tuple[str, ...]:
    if not isinstance(item, dict):
        raise ValidationError(field, "must be an object {filename, content_type, content}")
    for key in item:
        if key not in _ATTACHMENT_KEYS:
            raise ValidationError(field, f"has an unknown key {key!r}")
    return tuple(_attachment_text(field, item, key) for key in _ATTACHMENT_KEYS)


def _parse_attachments(field: str, value: Any, limits: Limits) -> tuple[Attachment, ...]:
    """Each item checked, the total size checked from the base64 lengths, then each
    decoded once: a message over the limit is refused before any decoding."""
    if not isinstance(value, list):
        raise ValidationError(field, "must be a list of attachments")
    if len(value) > MAX_ATTACHMENTS:
        raise ValidationError(field, f"must hold at most {MAX_ATTACHMENTS} attachments")
    shapes = [_attachment_shape(f"{field}[{n}]", item) for n, item in enumerate(value)]
    total = sum(_decoded_size(f"{field}[{n}].content", shape[2])
                for n, shape in enumerate(shapes))
    if total > limits.max_attachment_bytes:
        raise ValidationError(field, f"decode to {total} bytes in all; at most "
                                     f"{limits.max_attachment_bytes} (SMSP_MAX_ATTACHMENT_BYTES)")
    ids = [shape[3] for shape in shapes if shape[3]]
    if len(set(ids)) != len(ids):
        raise ValidationError(field, "give each content_id to one attachment only")
    return tuple(Attachment(name, kind, _decode(f"{field}[{n}].content", content), cid)
                 for n, (name, kind, content, cid) in enumerate(shapes))


_TAG_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_TAG}}}")


def _parse_tags(field: str, value: Any, limits: Limits) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError(field, "must be a list of strings")
    if len(value) > MAX_TAGS:
        raise ValidationError(field, f"must hold at most {MAX_TAGS} tags")
    for n, tag in enumerate(value):
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise ValidationError(f"{field}[{n}]", f"must be 1-{MAX_TAG} printable ASCII "
                                                   "characters")
    if len(set(value)) != len(value):
        raise ValidationError(field, "must not hold the same tag twice")
    return tuple(value)


def _parse_metadata(field: str, value: Any, limits: Limits) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object of string keys and string values")
    if len(value) > MAX_METADATA:
        raise ValidationError(field, f"must hold at most {MAX_METADATA} entries")
    for key, text in value.items():
        if not key:
            raise ValidationError(field, "keys must not be empty")
        _parse_line(f"{field} key {key!r}", key, MAX_METADATA_TEXT)
        _parse_line(f"{field}.{key}", text, MAX_METADATA_TEXT)
    size = sum(len(key.encode()) + len(text.encode()) for key, text in value.items())
    if size > MAX_METADATA_BYTES:
        raise ValidationError(field, f"must be at most {MAX_METADATA_BYTES} bytes of keys and "
                                     f"values in all (UTF-8), not {size}")
    return tuple(value.items())


def _check_recipients(message: Message) -> None:
    """No address twice (case and display names aside), and MAX_RECIPIENTS in all."""
    if not (message.cc or message.bcc or len(message.to) > 1):
        return  # one recipient: nothing to compare (the usual message)
    seen: dict[str, str] = {}
    for field, addresses in (("toaddress", message.to), ("ccaddress", message.cc),
                             ("bccaddress", message.bcc)):
        for address in addresses:
            key = address.email.lower()
            if key in seen:
                raise ValidationError(field, f"{address.email} is already a recipient (in "
                                             f"{seen[key]})")
            seen[key] = field
            if len(seen) > MAX_RECIPIENTS:
                raise ValidationError(field, f"makes more than {MAX_RECIPIENTS} recipients in "
                                             "toaddress, ccaddress and bccaddress together")


_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
ADDRESS_SCHEMA: Mapping[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": MAX_ADDRESS_FIELD,
    "pattern": ADDRESS_PATTERN, "example": "someone@example.com",
    "description": f"user@domain or Name <user@domain>; the address itself at most "
                   f"{MAX_ADDRESS} characters, its local part at most {MAX_LOCAL_PART}"}


def _addresses(least: int, example: str, description: str) -> dict[str, Any]:
    # Each list its own example: a document's examples put together make a valid request.
    return {"type": "array", "minItems": least, "maxItems": MAX_RECIPIENTS, "uniqueItems": True,
            "items": {**ADDRESS_SCHEMA, "example": example}, "description": description}


_RECIPIENTS_RULE = (f"at most {MAX_RECIPIENTS} recipients in toaddress, ccaddress and "
                    "bccaddress together, no address twice among them (compared without "
                    "regard to case or display name)")
ATTACHMENT_SCHEMA: Mapping[str, Any] = {
    "type": "object", "required": ["filename", "content_type", "content"],
    "additionalProperties": False, "properties": {
        "filename": {"type": "string", "minLength": 1, "maxLength": MAX_FILENAME,
                     "pattern": FILENAME_PATTERN},
        "content_type": {"type": "string", "maxLength": 255, "pattern": CONTENT_TYPE_PATTERN,
                         "example": "application/pdf"},
        "content": {"type": "string", "minLength": 4, "pattern": BASE64_PATTERN,
                    "description": "the file, base64 (RFC 4648) with padding"},
        "content_id": {"type": "string", "minLength": 1, "maxLength": MAX_CONTENT_ID,
                       "pattern": CONTENT_ID_PATTERN,
                       "description": "makes it an inline part that the HTML shows as "
                                      "cid:<content_id>"}}}
TEXT_VALUE_SCHEMA: Mapping[str, Any] = {"type": "string", "pattern": _NO_CONTROL}


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of the POST /email body: how it is parsed and how it is documented.

    ``attribute`` is the Message attribute it fills; a missing optional field
    leaves the Message's own default.  ``parse(name, value, limits)`` returns
    the attribute's value or raises ValidationError naming the field.
    """

    name: str
    attribute: str
    parse: Callable[[str, Any, Limits], Any]
    schema: Mapping[str, Any]
    required: bool = False


FIELDS: tuple[Field, ...] = (
    Field("fromaddress", "sender", _parse_one_address, ADDRESS_SCHEMA, required=True),
    Field("toaddress", "to", _parse_to, {
        "oneOf": [dict(ADDRESS_SCHEMA), _addresses(1, "someone@example.com", "the recipients")],
        "description": f"one address, or a list of 1-{MAX_RECIPIENTS}; {_RECIPIENTS_RULE}"},
        required=True),
    Field("ccaddress", "cc", _parse_copies,
          _addresses(0, "copy@example.com", f"copies; {_RECIPIENTS_RULE}")),
    Field("bccaddress", "bcc", _parse_copies,
          _addresses(0, "blind@example.com", f"blind copies; {_RECIPIENTS_RULE}")),
    Field("subject", "subject", _parse_subject,
          {"type": "string", "maxLength": MAX_SUBJECT, "pattern": _NO_CONTROL, "default": ""}),
    Field("plaintextbody", "text", _parse_body,
          {"type": "string", "pattern": r"^[^\x00]*$", "default": ""}),
    Field("htmlbody", "html", _parse_body,
          {"type": "string", "pattern": r"^[^\x00]*$", "default": "",
           "description": "the HTML part; it may show inline attachments as cid:<content_id>"}),
    Field("replyto", "reply_to", _parse_one_address, ADDRESS_SCHEMA),
    Field("headers", "headers", _parse_headers, {
        "type": "object", "maxProperties": MAX_CUSTOM_HEADERS,
        "additionalProperties": {**TEXT_VALUE_SCHEMA, "minLength": 1,
                                 "maxLength": MAX_HEADER_VALUE},
        "description": f"custom header fields by name: X-... or List-Unsubscribe and "
                       f"List-Unsubscribe-Post; a name is at most {MAX_HEADER_NAME} visible "
                       "ASCII characters without ':', given once whatever its case, and not "
                       "one a provider reserves (X-SG-ID, X-SG-EID, X-SMTPAPI, X-Mailgun-..., "
                       "X-Tag, X-Metadata)"}),
    Field("attachments", "attachments", _parse_attachments, {
        "type": "array", "maxItems": MAX_ATTACHMENTS, "items": dict(ATTACHMENT_SCHEMA),
        "description": "files; together at most SMSP_MAX_ATTACHMENT_BYTES once decoded "
                       f"(default {DEFAULT_MAX_ATTACHMENT_BYTES}), each content_id on one "
                       "attachment only"}),
    Field("tags", "tags", _parse_tags, {
        "type": "array", "maxItems": MAX_TAGS, "uniqueItems": True,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_TAG,
                  "pattern": r"^[\x20-\x7e]*$"},
        "description": "labels the provider reports by (Mailgun tags, SendGrid categories)"}),
    Field("metadata", "metadata", _parse_metadata, {
        "type": "object", "maxProperties": MAX_METADATA,
        "additionalProperties": {**TEXT_VALUE_SCHEMA, "maxLength": MAX_METADATA_TEXT},
        "description": f"sent with the message, so that provider events can be matched back "
                       f"to it; keys of 1-{MAX_METADATA_TEXT} characters without control "
                       f"characters, at most {MAX_METADATA_BYTES} bytes (UTF-8) in all"}),
)


def parse_message(document: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Validate a decoded POST /email body by FIELDS and ``limits``; unknown fields are
    ignored."""
    values: dict[str, Any] = {}
    for field in FIELDS:
        if field.name in document:
            values[field.attribute] = field.parse(field.name, document[field.name], limits)
        elif field.required:
            raise ValidationError(field.name, "is required")
    message = Message(**values)
    _check_recipients(message)
    return message


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
        self.count_and_observe((), name, labels, value)

    def count_and_observe(self, counters: Iterable[tuple[str, tuple[str, ...]]],
                          histogram: str, histogram_labels: tuple[str, ...],
                          value: float) -> None:
        """Increment counters (name, labels) by one and observe a histogram, under one
        lock: a request's accounting takes it once."""
        slot = bisect.bisect_left(DURATION_BUCKETS, value)  # len(DURATION_BUCKETS): +Inf only
        key = (histogram, histogram_labels)
        with self._lock:
            for counted in counters:
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


@value_class
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


class _Closable(typing.Protocol):
    def close(self) -> None: ...


_C = typing.TypeVar("_C", bound=_Closable)


class IdlePool(typing.Generic[_C]):
    """Idle connections to one peer, kept for reuse: the HTTP and Redis clients' pools.

    At most ``size`` wait, each at most ``max_idle`` seconds (None: no
    limit); ``take(fit)`` returns the most recently used one that ``fit``
    passes, closing the others it looks at, or None; ``put`` keeps one
    (closing what is stale, or it when the pool is full).  Thread-safe:
    connections are closed outside the lock.
    """

    def __init__(self, size: int, max_idle: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._max_idle = max_idle
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[tuple[_C, float]] = []  # the oldest at the bottom

    def _stale(self, since: float, now: float) -> bool:
        return self._max_idle is not None and now - since > self._max_idle

    def take(self, fit: Callable[[_C], bool]) -> _C | None:
        now = self._clock()
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn, since = self._idle.pop()
            if not self._stale(since, now) and fit(conn):
                return conn
            conn.close()  # too old, or the peer closed it (a restart, its idle timeout)

    def put(self, conn: _C) -> None:
        now = self._clock()
        closing = []
        with self._lock:
            while self._idle and self._stale(self._idle[0][1], now):
                closing.append(self._idle.pop(0)[0])
            if len(self._idle) < self._size:
                self._idle.append((conn, now))
            else:
                closing.append(conn)  # the pool is full
        for old in closing:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


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
        self._clock = clock
        self._pool: IdlePool[http.client.HTTPConnection] = IdlePool(pool_size, pool_idle, clock)
        self.connections_made = 0  # for tests and the benchmark

    def _acquire(self) -> http.client.HTTPConnection:
        conn = self._pool.take(lambda idle: idle_socket_open(idle.sock))
        if conn is not None:
            return conn
        self.connections_made += 1
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, context=self._context)
        return http.client.HTTPConnection(self._host, self._port)

    def close(self) -> None:
        self._pool.close()

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
            self._pool.put(conn)
        return reply


# ---------------------------------------------------------------- providers ---


@value_class
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
    wallclock: Callable[[], float] = time.time  # for signatures that carry the time

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
    then skipped for it); by default, a message over ``max_message_bytes``
    as MIME.  Implementations are thread-safe.
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()
    resolves_unknown: ClassVar[bool] = False  # a retry with the same key is sent once at most
    max_message_bytes: ClassVar[int | None] = None

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext) -> "Provider":
        raise NotImplementedError

    @classmethod
    def problems(cls, values: Mapping[str, Any]) -> list[str]:
        """What is wrong across this provider's settings (each parsed fine alone)."""
        return []

    def send(self, message: Message, deadline: float) -> Receipt:
        raise NotImplementedError

    def cannot_carry(self, message: Message) -> str | None:
        """Why this provider cannot carry ``message``, or None when it can."""
        most = self.max_message_bytes
        if most is not None and (size := message.mime_size()) > most:
            return f"{self.name} takes at most {most} bytes a message, this one is {size} as MIME"
        return None

    def poll_message(self, address: Address, sandbox: bool = False) -> Message:
        """The dummy message that polls an open circuit; valid for this provider.  With
        ``sandbox`` it goes in the provider's test mode, where it has one."""
        return Message(address, (address,), POLL_SUBJECT, POLL_BODY, sandbox=sandbox)

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


def json_field(reply: Reply, name: str) -> str | None:
    """The string member ``name`` of the reply's JSON object, or None."""
    document = json_document(reply)
    value = document.get(name) if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


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
    id_field: ClassVar[str] = "id"  # where a success reply's JSON holds the message id

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
        """The message id in the success reply's JSON field ``id_field``."""
        message_id = json_field(reply, self.id_field)
        if message_id is None:
            return Receipt(self.name, None, f"HTTP {reply.status} without a JSON {self.id_field}")
        return Receipt(self.name, message_id)

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


class BearerKeyProvider(HTTPProvider):
    """An HTTP provider whose key goes in ``Authorization: Bearer <key>``."""

    def __init__(self, client: HTTPClient, api_key: str,
                 redact: Callable[[str], str] = str) -> None:
        super().__init__(client, redact)
        self._authorization = f"Bearer {api_key}"


def _quoted(text: str) -> str:
    """``text`` as a quoted-string (RFC 5322 3.2.4), as Content-Disposition parameters take it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _boundary(payloads: list[bytes]) -> str:
    """A random multipart boundary that no payload holds (a clash is a 2**-128 chance)."""
    while True:
        boundary = f"smsp-{os.urandom(16).hex()}"
        if not any(boundary.encode("ascii") in payload for payload in payloads):
            return boundary


def multipart_form_data(fields: Iterable[tuple[str, str]],
                        files: Iterable[tuple[str, str, str, bytes]]) -> tuple[str, bytes]:
    """A multipart/form-data body (RFC 7578) and its Content-Type: text ``fields`` as
    (name, value), then ``files`` as (name, filename, content type, bytes).

    Parts are joined once, so the body is the one copy of the files made here.  Names
    and file names are quoted-strings of raw UTF-8, as browsers and mailgun.js send them.
    """
    parts: list[tuple[str, str, bytes]] = [
        (f"form-data; name={_quoted(name)}", "", value.encode("utf-8")) for name, value in fields]
    parts += [(f"form-data; name={_quoted(name)}; filename={_quoted(filename)}", kind, content)
              for name, filename, kind, content in files]
    boundary = _boundary([payload for *_, payload in parts])
    chunks: list[bytes] = []
    for disposition, kind, payload in parts:
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if kind:
            head += f"Content-Type: {kind}\r\n"
        chunks += [f"{head}\r\n".encode(), payload, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


class MailgunProvider(HTTPProvider):
    """``POST /v3/{domain}/messages``, HTTP Basic ``api:key``: form-encoded, or
    multipart/form-data when the message has attachments (as mailgun.js sends it)."""

    name = "mailgun"
    max_message_bytes = 25_000_000  # "25 MB", Mailgun's documented limit
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
        headers = {"Authorization": self._authorization, "Accept": "application/json"}
        fields = self._fields(message)
        if not message.attachments:  # as the Python SDK sends it, and as smsp always did
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return Outgoing(self.path, headers, urllib.parse.urlencode(fields).encode("ascii"))
        headers["Content-Type"], body = multipart_form_data(fields, self._files(message))
        return Outgoing(self.path, headers, body)

    @staticmethod
    def _fields(message: Message) -> list[tuple[str, str]]:
        """The form's text fields, in Mailgun's own names; repeated names repeat."""
        fields = [("from", str(message.sender))]
        for name, addresses in (("to", message.to), ("cc", message.cc), ("bcc", message.bcc)):
            fields += [(name, str(address)) for address in addresses]
        fields.append(("subject", message.subject))
        if message.text or not message.html:
            fields.append(("text", message.text or " "))  # Mailgun needs a body: one space
        if message.html:
            fields.append(("html", message.html))
        if message.reply_to is not None:
            fields.append(("h:Reply-To", str(message.reply_to)))
        fields += [(f"h:{name}", value) for name, value in message.headers]
        fields += [("o:tag", tag) for tag in message.tags]
        fields += [(f"v:{key}", value) for key, value in message.metadata]
        if message.sandbox:
            fields.append(("o:testmode", "yes"))  # accepted and checked, never delivered
        return fields

    @staticmethod
    def _files(message: Message) -> list[tuple[str, str, str, bytes]]:
        # Mailgun gives an inline part the Content-ID of its file name (django-anymail
        # relies on it too), so an inline part is named by its content_id for cid: to work.
        return [("inline", a.content_id, a.content_type, a.content) if a.content_id
                else ("attachment", a.filename, a.content_type, a.content)
                for a in message.attachments]

    def error_text(self, reply: Reply) -> str:
        return json_field(reply, "message") or super().error_text(reply)



class SendGridProvider(BearerKeyProvider):
    """``POST /v3/mail/send``, JSON, ``Bearer`` key; 202 with ``X-Message-Id``."""

    name = "sendgrid"
    path = "/v3/mail/send"
    max_message_bytes = 30_000_000  # "30MB" in all, SendGrid's documented limit
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

    @staticmethod
    def _party(address: Address) -> dict[str, str]:
        return {"email": address.email, "name": address.name} if address.name \
            else {"email": address.email}

    def encode(self, message: Message) -> Outgoing:
        body = json.dumps(self._document(message), separators=(",", ":")).encode("utf-8")
        if message.attachments:
            body = self._with_attachments(body, message.attachments)
        return Outgoing(self.path, {"Authorization": self._authorization,
                                    "Accept": "application/json",
                                    "Content-Type": "application/json"}, body)

    def _document(self, message: Message) -> dict[str, Any]:
        """The mail/send body but its attachments: one personalization for everyone."""
        personalization: dict[str, Any] = {"to": [self._party(a) for a in message.to]}
        for name, addresses in (("cc", message.cc), ("bcc", message.bcc)):
            if addresses:
                personalization[name] = [self._party(a) for a in addresses]
        if message.metadata:  # typed object here by SendGrid's document (string at the top)
            personalization["custom_args"] = dict(message.metadata)
        document: dict[str, Any] = {"personalizations": [personalization],
                                    "from": self._party(message.sender)}
        if message.reply_to is not None:
            document["reply_to"] = self._party(message.reply_to)
        # SendGrid rejects an empty subject or content value: send one space
        document["subject"] = message.subject or " "
        document["content"] = []  # text/plain first, then text/html: SendGrid requires it
        if message.text or not message.html:
            document["content"].append({"type": "text/plain", "value": message.text or " "})
        if message.html:
            document["content"].append({"type": "text/html", "value": message.html})
        if message.headers:
            document["headers"] = dict(message.headers)
        if message.tags:
            document["categories"] = list(message.tags)
        if message.sandbox:  # validated, never delivered
            document["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return document

    @staticmethod
    def _with_attachments(body: bytes, attachments: tuple[Attachment, ...]) -> bytes:
        """``body`` (a JSON object) with an ``attachments`` member added: each file goes
        base64-encoded straight into the bytes, never through a JSON string of its own."""
        chunks = [body[:-1], b',"attachments":[']
        for n, attachment in enumerate(attachments):
            rest: dict[str, str] = {"filename": attachment.filename,
                                    "type": attachment.content_type,
                                    "disposition": "inline" if attachment.content_id
                                    else "attachment"}
            if attachment.content_id:
                rest["content_id"] = attachment.content_id
            chunks += [b"," if n else b"", b'{"content":"', base64.b64encode(attachment.content),
                       b'",', json.dumps(rest, separators=(",", ":")).encode("ascii")[1:]]
        chunks.append(b"]}")
        return b"".join(chunks)

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


# AWS Signature Version 4, for Amazon SES v2.  Every step follows botocore's SigV4Auth
# (auth.py, botocore 1.44.8), which is what AWS's own Python SDK sends; the tests hold it
# to AWS's SigV4 test suite and to botocore's signatures.

# botocore's SIGNED_HEADERS_BLACKLIST: headers that proxies rewrite or that vary per attempt.
_SIGV4_UNSIGNED = frozenset({
    "baggage", "connection", "expect", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "traceparent", "tracestate", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "x-amzn-trace-id",
})
# Headers the signer itself writes: a stale copy from an earlier attempt is never signed.
_SIGV4_OWN = frozenset({"authorization", "x-amz-date", "x-amz-security-token"})
_SIGV4_DATE = re.compile(r"\d{8}T\d{6}Z")


def _sigv4_path(path: str, normalize: bool = True) -> str:
    """The canonical URI: without empty and dot segments (every service but S3), then
    percent-encoded, so a path already encoded on the wire is encoded twice, as AWS asks."""
    if normalize:
        segments: list[str] = []
        for segment in path.split("/"):
            if segment == "..":
                if segments:
                    segments.pop()
            elif segment and segment != ".":
                segments.append(segment)
        trailing = "/" if path.endswith("/") and segments else ""
        path = "/" + "/".join(segments) + trailing
    return urllib.parse.quote(path or "/", safe="/~")


def _sigv4_query(query: str) -> str:
    """The canonical query: names and values encoded with only the unreserved characters
    bare, sorted by name, then by value."""
    pairs = []
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        pairs.append((urllib.parse.quote(urllib.parse.unquote(name), safe="-_.~"),
                      urllib.parse.quote(urllib.parse.unquote(value), safe="-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _sigv4_host(url: str) -> str:
    """The Host header an HTTP client sends for ``url``: no userinfo, no default port."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def _sigv4_canonical_request(method: str, url: str, headers: Mapping[str, str], body: bytes,
                             signed: Iterable[str] | None, *, normalize: bool = True
                             ) -> tuple[str, str]:
    """The canonical request and its signed-header list (``a;b;c``).

    Header names are compared without case; repeated names (differing only in case) are
    joined with commas, and each value is trimmed with its inner runs of white space
    squeezed to one space.  ``signed`` None means every header but ``_SIGV4_UNSIGNED``.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    values.setdefault("host", [_sigv4_host(url)])
    if signed is None:
        names = {name for name in values if name not in _SIGV4_UNSIGNED}
    else:
        names = {name.lower() for name in signed} | {"host"}
        if names - values.keys():
            raise ValueError(f"cannot sign absent headers: {sorted(names - values.keys())}")
    ordered = sorted(names)
    parts = urllib.parse.urlsplit(url)
    lines = [method.upper(), _sigv4_path(parts.path, normalize), _sigv4_query(parts.query)]
    lines += [f"{name}:{','.join(values[name])}" for name in ordered]
    lines += ["", ";".join(ordered), hashlib.sha256(body).hexdigest()]
    return "\n".join(lines), ";".join(ordered)


def _sigv4_string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{digest}"


def _sigv4_signature(secret_key: str, scope: str, string_to_sign: str) -> str:
    """HMAC-SHA256 of ``string_to_sign`` under the key derived along ``scope``
    (date, region, service, ``aws4_request``)."""
    key = f"AWS4{secret_key}".encode()
    for step in scope.split("/"):
        key = hmac.new(key, step.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sigv4_authorization(method: str, url: str, headers: Mapping[str, str], body: bytes, *,
                        region: str, service: str, access_key: str, secret_key: str,
                        session_token: str | None, amz_date: str,
                        signed: Iterable[str] | None = None) -> dict[str, str]:
    """The headers that sign one request with AWS Signature Version 4, as botocore signs it.

    Returns ``X-Amz-Date``, ``Authorization`` and, with a session token,
    ``X-Amz-Security-Token``.  The caller sends ``method`` to ``url`` with exactly
    ``headers``, these, and ``body``, changing nothing that was signed.  ``amz_date`` is the
    signing time, UTC, as ``YYYYMMDDTHHMMSSZ``.  ``signed`` names the headers of ``headers``
    to sign (default: all but those botocore leaves unsigned, such as User-Agent); Host
    (from ``url`` unless given), X-Amz-Date and the token are always signed.  The body's
    SHA-256 is in the canonical request; no X-Amz-Content-SHA256 header is added.
    Raises ValueError for a malformed ``amz_date`` or a ``signed`` name not in ``headers``.
    """
    if not _SIGV4_DATE.fullmatch(amz_date):
        raise ValueError(f"amz_date must be YYYYMMDDTHHMMSSZ, not {amz_date!r}")
    added = {"X-Amz-Date": amz_date}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    given = {name: value for name, value in headers.items() if name.lower() not in _SIGV4_OWN}
    if signed is not None:
        signed = [*signed, *added]
    canonical, signed_names = _sigv4_canonical_request(method, url, {**given, **added}, body,
                                                       signed)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signature = _sigv4_signature(secret_key, scope,
                                 _sigv4_string_to_sign(amz_date, scope, canonical))
    added["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                              f"SignedHeaders={signed_names}, Signature={signature}")
    return added


_PAIR_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")


def tag_pairs(message: Message) -> list[tuple[str, str]] | str:
    """Tags and metadata as the name/value pairs of SES and Resend: each metadata entry
    is a pair, each tag a pair with the value ``true``; or why they cannot be."""
    pairs = list(message.metadata) + [(tag, "true") for tag in message.tags]
    for name, value in pairs:
        if not (_PAIR_RE.fullmatch(name) and _PAIR_RE.fullmatch(value)):
            return ("tags and metadata may hold only ASCII letters, digits, '_' and '-' "
                    f"here ({name!r} does not fit)")
    return pairs


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _header_texts(addresses: Iterable[Address]) -> list[str]:
    return [str(address) for address in addresses]


SES_SIMULATOR = "success@simulator.amazonses.com"  # SES's mailbox simulator: "delivered"


class SESProvider(HTTPProvider):
    """Amazon SES v2 ``SendEmail``: ``POST /v2/email/outbound-emails``, JSON, SigV4.

    SES answers most errors with HTTP 400, so a reply is classified by its error
    type (the ``x-amzn-ErrorType`` header, else the body's ``__type`` or
    ``code``, without a ``namespace#`` prefix, as botocore reads it); a 403 (bad
    signature or credentials) refuses us.
    """

    name = "ses"
    path = "/v2/email/outbound-emails"
    max_message_bytes = 40_000_000  # SES v2: 40 MB a message, after base64
    id_field = "MessageId"
    settings = (
        Setting("SMSP_SES_REGION", "ses_region", _parse_region, "", "AWS region, e.g. eu-west-1",
                required=True),
        Setting("SMSP_SES_ACCESS_KEY_ID", "ses_access_key_id", _parse_text, "",
                "AWS access key id", required=True),
        Setting("SMSP_SES_SECRET_ACCESS_KEY", "ses_secret_access_key", _parse_text, "",
                "AWS secret access key", secret=True, required=True),
        Setting("SMSP_SES_SESSION_TOKEN", "ses_session_token", _parse_text, "",
                "AWS session token of temporary credentials", secret=True),
        Setting("SMSP_SES_CONFIGURATION_SET", "ses_configuration_set", _parse_text, "",
                "SES configuration set named in every send"),
        Setting("SMSP_SES_BASE_URL", "ses_base_url", _parse_base_url, None,
                "SES API base (default https://email.<region>.amazonaws.com)"),
    )
    statuses: ClassVar[Mapping[int, Outcome]] = {413: Outcome.REJECTED}
    codes: ClassVar[Mapping[str, Outcome]] = {
        "MessageRejected": Outcome.REJECTED,
        "BadRequestException": Outcome.REJECTED,
        "MailFromDomainNotVerifiedException": Outcome.NOT_SENT,
        "AccountSuspendedException": Outcome.NOT_SENT,
        "SendingPausedException": Outcome.NOT_SENT,
        "NotFoundException": Outcome.NOT_SENT,
        "TooManyRequestsException": Outcome.NOT_SENT,
        "LimitExceededException": Outcome.NOT_SENT,
    }

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "SESProvider":
        region = values["ses_region"]
        base = values["ses_base_url"] or \
            _parse_base_url(f"https://email.{region}.amazonaws.com")
        credentials = (values["ses_access_key_id"], values["ses_secret_access_key"],
                       values["ses_session_token"])
        return cls(context.http_client(base), base, region, credentials,
                   values["ses_configuration_set"], context.redact, context.wallclock)

    def __init__(self, client: HTTPClient, base_url: urllib.parse.SplitResult, region: str,
                 credentials: tuple[str, str, str], configuration_set: str = "",
                 redact: Callable[[str], str] = str,
                 wallclock: Callable[[], float] = time.time) -> None:
        super().__init__(client, redact)
        self._url = base_url.geturl() + self.path
        self._region = region
        self._access_key, self._secret_key, self._token = credentials
        self._configuration_set = configuration_set
        self._wallclock = wallclock

    def cannot_carry(self, message: Message) -> str | None:
        for name, value in message.headers:
            if not (value.isascii() and len(value) <= 995):
                return f"SES takes only ASCII header values of at most 995 characters ({name})"
        pairs = tag_pairs(message)
        return pairs if isinstance(pairs, str) else super().cannot_carry(message)

    def encode(self, message: Message) -> Outgoing:
        document: dict[str, Any] = {
            "FromEmailAddress": str(message.sender),
            "Destination": {k: v for k, v in (("ToAddresses", _header_texts(message.to)),
                                              ("CcAddresses", _header_texts(message.cc)),
                                              ("BccAddresses", _header_texts(message.bcc))) if v},
            "Content": {"Simple": self._simple(message)}}
        if message.reply_to is not None:
            document["ReplyToAddresses"] = [str(message.reply_to)]
        pairs = tag_pairs(message)
        if pairs and not isinstance(pairs, str):
            document["EmailTags"] = [{"Name": n, "Value": v} for n, v in pairs]
        if self._configuration_set:
            document["ConfigurationSetName"] = self._configuration_set
        return Outgoing(self.path, {"Content-Type": "application/json"},
                        json.dumps(document, separators=(",", ":")).encode("utf-8"))

    @staticmethod
    def _simple(message: Message) -> dict[str, Any]:
        body = {}
        if message.text or not message.html:
            body["Text"] = {"Data": message.text, "Charset": "UTF-8"}
        if message.html:
            body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
        simple: dict[str, Any] = {"Subject": {"Data": message.subject, "Charset": "UTF-8"},
                                  "Body": body}
        if message.headers:
            simple["Headers"] = [{"Name": n, "Value": v} for n, v in message.headers]
        if message.attachments:
            simple["Attachments"] = [
                {"RawContent": _b64(a.content), "FileName": a.filename,
                 "ContentType": a.content_type,
                 "ContentDisposition": "INLINE" if a.content_id else "ATTACHMENT",
                 **({"ContentId": a.content_id} if a.content_id else {})}
                for a in message.attachments]
        return simple

    def sign(self, request: Outgoing) -> None:
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wallclock()))
        request.headers.update(sigv4_authorization(
            "POST", self._url, request.headers, request.body, region=self._region,
            service="ses", access_key=self._access_key, secret_key=self._secret_key,
            session_token=self._token or None, amz_date=amz_date, signed=["Content-Type"]))

    def poll_message(self, address: Address, sandbox: bool = False) -> Message:
        """In test mode to SES's mailbox simulator, which accepts and delivers nothing."""
        poll = super().poll_message(address, sandbox)
        return dataclasses.replace(poll, to=(Address(SES_SIMULATOR),)) if sandbox else poll

    def error_code(self, reply: Reply) -> str | None:
        kind = reply.headers.get("x-amzn-errortype", "").partition(":")[0]
        if not kind:
            document = json_document(reply)
            if isinstance(document, dict):
                kind = str(document.get("__type") or document.get("code") or "")
        return kind.rpartition("#")[2] or None

    def error_text(self, reply: Reply) -> str:
        text = json_field(reply, "message") or json_field(reply, "Message")
        return f"{self.error_code(reply) or 'error'}: {text}" if text \
            else super().error_text(reply)



POSTMARK_TEST_TOKEN = "POSTMARK_API_TEST"  # Postmark validates such a request, sends nothing


class PostmarkProvider(HTTPProvider):
    """Postmark ``POST /email``, JSON, ``X-Postmark-Server-Token``.

    Postmark answers most errors with HTTP 422 and an ``ErrorCode``, so a
    reply is classified by that code (docs/postmark-error-codes.md lists each
    with its source), then by its HTTP status (429 and 5xx: not sent).
    """

    name = "postmark"
    path = "/email"
    id_field = "MessageID"
    settings = (
        Setting("SMSP_PM_SERVER_TOKEN", "pm_server_token", _parse_text, "",
                "Postmark server token", secret=True, required=True),
        Setting("SMSP_PM_BASE_URL", "pm_base_url", _parse_base_url,
                _parse_base_url("https://api.postmarkapp.com"), "Postmark API base"),
        Setting("SMSP_PM_MESSAGE_STREAM", "pm_message_stream", _parse_text, "outbound",
                "Postmark message stream"),
    )
    codes: ClassVar[Mapping[str, Outcome]] = {
        "300": Outcome.REJECTED,  # invalid email request
        "406": Outcome.REJECTED,  # inactive recipient (bounced or complained)
        "411": Outcome.REJECTED,  # forbidden attachment type
        "10": Outcome.NOT_SENT,  # bad or missing server token: refuses us
        "400": Outcome.NOT_SENT,  # sender signature not found
        "401": Outcome.NOT_SENT,  # sender signature not confirmed
        "405": Outcome.NOT_SENT,  # not allowed to send (out of credits)
        "412": Outcome.NOT_SENT,  # account pending
        "413": Outcome.NOT_SENT,  # account may not send
        "100": Outcome.NOT_SENT,  # maintenance (HTTP 503)
    }
    max_message_bytes = 10_000_000  # a whole message, attachments included

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "PostmarkProvider":
        return cls(context.http_client(values["pm_base_url"]), values["pm_server_token"],
                   values["pm_message_stream"], context.redact)

    def __init__(self, client: HTTPClient, token: str, stream: str = "outbound",
                 redact: Callable[[str], str] = str) -> None:
        super().__init__(client, redact)
        self._token = token
        self._stream = stream

    def cannot_carry(self, message: Message) -> str | None:
        if len(message.tags) > 1:
            return "Postmark takes one tag per message"
        return super().cannot_carry(message)

    def encode(self, message: Message) -> Outgoing:
        document: dict[str, Any] = {"From": str(message.sender),
                                    "To": ", ".join(_header_texts(message.to)),
                                    "Subject": message.subject, "MessageStream": self._stream}
        optional = (("Cc", ", ".join(_header_texts(message.cc))),
                    ("Bcc", ", ".join(_header_texts(message.bcc))),
                    ("TextBody", message.text or ("" if message.html else " ")),
                    ("HtmlBody", message.html),
                    ("ReplyTo", str(message.reply_to) if message.reply_to else ""),
                    ("Tag", message.tags[0] if message.tags else ""))
        document.update((k, v) for k, v in optional if v)
        if message.headers:
            document["Headers"] = [{"Name": n, "Value": v} for n, v in message.headers]
        if message.attachments:
            document["Attachments"] = [
                {"Name": a.filename, "Content": _b64(a.content), "ContentType": a.content_type,
                 **({"ContentID": f"cid:{a.content_id}"} if a.content_id else {})}
                for a in message.attachments]
        if message.metadata:
            document["Metadata"] = dict(message.metadata)
        token = POSTMARK_TEST_TOKEN if message.sandbox else self._token
        return Outgoing(self.path, {"X-Postmark-Server-Token": token,
                                    "Accept": "application/json",
                                    "Content-Type": "application/json"},
                        json.dumps(document, separators=(",", ":")).encode("utf-8"))

    def error_code(self, reply: Reply) -> str | None:
        document = json_document(reply)
        code = document.get("ErrorCode") if isinstance(document, dict) else None
        return str(code) if isinstance(code, int) and code else None

    def error_text(self, reply: Reply) -> str:
        text = json_field(reply, "Message")
        return f"ErrorCode {self.error_code(reply)}: {text}" if text \
            else super().error_text(reply)



RESEND_TEST_ADDRESS = "delivered@resend.dev"  # Resend's test inbox: accepted, not delivered


class ResendProvider(BearerKeyProvider):
    """Resend ``POST /emails``, JSON, ``Bearer`` key; 200 with ``{id}``.

    Resend keeps an ``Idempotency-Key`` for 24 h: the same key and payload
    answer the first send's id without sending again.  A message with a
    delivery key (the client sent an Idempotency-Key) carries a key derived
    from it, so a retry of an attempt whose fate is unknown may be sent to
    Resend again, and Resend sends it at most once (``resolves_unknown``).
    """

    name = "resend"
    path = "/emails"
    resolves_unknown = True
    max_message_bytes = 40_000_000  # attachments after base64
    settings = (
        Setting("SMSP_RESEND_API_KEY", "resend_api_key", _parse_text, "", "Resend API key",
                secret=True, required=True),
        Setting("SMSP_RESEND_BASE_URL", "resend_base_url", _parse_base_url,
                _parse_base_url("https://api.resend.com"), "Resend API base"),
    )
    statuses: ClassVar[Mapping[int, Outcome]] = {400: Outcome.REJECTED, 422: Outcome.REJECTED}
    codes: ClassVar[Mapping[str, Outcome]] = {
        "concurrent_idempotent_requests": Outcome.UNKNOWN,  # the first is still running
        "invalid_idempotent_request": Outcome.UNKNOWN,  # a first send with this key exists
    }

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "ResendProvider":
        return cls(context.http_client(values["resend_base_url"]), values["resend_api_key"],
                   context.redact)

    def cannot_carry(self, message: Message) -> str | None:
        pairs = tag_pairs(message)
        return pairs if isinstance(pairs, str) else super().cannot_carry(message)

    def encode(self, message: Message) -> Outgoing:
        document: dict[str, Any] = {"from": str(message.sender), "to": _header_texts(message.to),
                                    "subject": message.subject}
        optional = (("cc", _header_texts(message.cc)), ("bcc", _header_texts(message.bcc)),
                    ("reply_to", _header_texts([message.reply_to] if message.reply_to else [])),
                    ("text", message.text or ("" if message.html else " ")),
                    ("html", message.html), ("headers", dict(message.headers)))
        document.update((k, v) for k, v in optional if v)
        if message.attachments:
            document["attachments"] = [
                {"filename": a.filename, "content": _b64(a.content),
                 "content_type": a.content_type,
                 **({"content_id": a.content_id} if a.content_id else {})}
                for a in message.attachments]
        pairs = tag_pairs(message)
        if pairs and not isinstance(pairs, str):
            document["tags"] = [{"name": n, "value": v} for n, v in pairs]
        headers = {"Authorization": self._authorization, "Accept": "application/json",
                   "Content-Type": "application/json"}
        if message.key:
            headers["Idempotency-Key"] = f"smsp-{message.key}"
        return Outgoing(self.path, headers,
                        json.dumps(document, separators=(",", ":")).encode("utf-8"))

    def poll_message(self, address: Address, sandbox: bool = False) -> Message:
        """In test mode to Resend's test address, which is delivered to no one."""
        poll = super().poll_message(address, sandbox)
        return dataclasses.replace(poll, to=(Address(RESEND_TEST_ADDRESS),)) if sandbox else poll

    def error_code(self, reply: Reply) -> str | None:
        return json_field(reply, "name")

    def error_text(self, reply: Reply) -> str:
        text = json_field(reply, "message")
        return f"{self.error_code(reply) or 'error'}: {text}" if text \
            else super().error_text(reply)

class SMTPProvider(Provider):
    """Any SMTP submission relay, through ``smtplib``, one connection per message.

    ``send`` drives the phases itself (connect, EHLO, STARTTLS and EHLO again,
    AUTH when a username is set, MAIL, one RCPT per recipient, DATA, the body,
    the final dot) so that each failure is classified by its phase and reply
    code with CLASSIFICATION, read by ``classify``.  Only what happens after
    the whole message and its final dot were written can be UNKNOWN.  The
    whole exchange, QUIT included, is bounded by the deadline (the watchdog
    shuts the socket); QUIT never changes an outcome already decided.  A
    ProviderError's ``reason`` names the phase and code only; ``detail``
    holds the server's reply text (for a refused recipient, each refused
    address with its reply).  With ``starttls`` a relay that does not offer
    STARTTLS is not spoken to in clear: NOT_SENT.  Thread-safe: nothing is
    shared between sends.

    The message is built with ``email.message.EmailMessage``: text/plain,
    text/html, or multipart/alternative for both; inline parts (with a
    ``content_id``) join the HTML (else the text) in a multipart/related;
    other attachments make the whole a multipart/mixed.  Headers are From,
    To, Cc, Reply-To, Subject, Date and a Message-ID made here from the
    sender's domain (the receipt's ``message_id``, angle brackets included),
    then the custom headers.
    Display names are quoted where needed and non-ASCII goes in encoded
    words; the body is 7-bit (quoted-printable or base64), so a relay without
    8BITMIME takes it.  Bcc addresses are RCPT only, never a header.  SMTP has
    no standard for tags and metadata; they go as the X-headers that
    Mailgun's and SendGrid's SMTP interfaces read in the same spirit: one
    ``X-Tag`` header per tag, and all metadata as one JSON object in
    ``X-Metadata`` (any key survives, where ``X-Metadata-<key>`` would need
    every key to be a header name).
    """

    name = "smtp"
    settings = (
        Setting("SMSP_SMTP_HOST", "smtp_host", _parse_text, "", "SMTP relay host",
                required=True),
        Setting("SMSP_SMTP_PORT", "smtp_port", _number(int, 1, 65535), 587,
                "SMTP relay port (465 for implicit TLS)"),
        Setting("SMSP_SMTP_SECURITY", "smtp_security", _choice("starttls", "tls", "none"),
                "starttls", "starttls, tls (implicit, port 465) or none (a private relay only)"),
        Setting("SMSP_SMTP_USERNAME", "smtp_username", _parse_text, "",
                "SMTP AUTH user (with SMSP_SMTP_PASSWORD)"),
        Setting("SMSP_SMTP_PASSWORD", "smtp_password", _parse_text, "", "SMTP AUTH password",
                secret=True),
        Setting("SMSP_SMTP_HELO", "smtp_helo", _parse_text, "",
                "name to greet the relay with (default: this host's FQDN)"),
    )

    @classmethod
    def problems(cls, values: Mapping[str, Any]) -> list[str]:
        if bool(values["smtp_username"]) != bool(values["smtp_password"]):
            return ["SMSP_SMTP_USERNAME and SMSP_SMTP_PASSWORD must be set together"]
        return []

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], context: ProviderContext
                      ) -> "SMTPProvider":
        return cls(values["smtp_host"], values["smtp_port"], values["smtp_security"],
                   values["smtp_username"], values["smtp_password"], values["smtp_helo"],
                   watchdog=context.watchdog, clock=context.clock)

    # (phase, reply) -> outcome; None means the phase went well, go on.  A
    # reply is looked up by its code, then its class ("4xx"); "*" is any other
    # reply and also no reply at all (refused, reset, closed, timed out).
    CLASSIFICATION: ClassVar[dict[tuple[str, str], Outcome | None]] = {
        ("connect", "220"): None,
        ("connect", "*"): Outcome.NOT_SENT,  # refused, DNS, TLS, a 421 or 554 greeting
        ("EHLO", "2xx"): None,
        ("EHLO", "*"): Outcome.NOT_SENT,
        ("STARTTLS", "220"): None,
        ("STARTTLS", "*"): Outcome.NOT_SENT,  # not offered, 454, a failed handshake
        ("AUTH", "2xx"): None,
        ("AUTH", "535"): Outcome.NOT_SENT,  # RFC 4954 §6: bad credentials; it refuses us
        ("AUTH", "530"): Outcome.NOT_SENT,  # authentication required
        ("AUTH", "534"): Outcome.NOT_SENT,  # mechanism too weak
        ("AUTH", "538"): Outcome.NOT_SENT,  # encryption required
        ("AUTH", "454"): Outcome.NOT_SENT,  # temporary authentication failure
        ("AUTH", "*"): Outcome.NOT_SENT,
        ("MAIL", "2xx"): None,
        ("MAIL", "4xx"): Outcome.NOT_SENT,
        ("MAIL", "530"): Outcome.NOT_SENT,  # RFC 4954 §6: AUTH required, so it refuses us
        ("MAIL", "5xx"): Outcome.REJECTED,  # RSET; the sender or the size is refused
        ("MAIL", "*"): Outcome.NOT_SENT,
        ("RCPT", "2xx"): None,
        ("RCPT", "4xx"): Outcome.NOT_SENT,
        ("RCPT", "530"): Outcome.NOT_SENT,
        ("RCPT", "5xx"): Outcome.REJECTED,  # RSET; the detail names the refused recipients
        ("RCPT", "*"): Outcome.NOT_SENT,
        ("DATA", "354"): None,
        ("DATA", "*"): Outcome.NOT_SENT,  # 4xx, 503, 554: no transaction began
        ("body", "*"): Outcome.NOT_SENT,  # the final dot never left, so nothing was accepted
        ("final dot", "2xx"): Outcome.SENT,
        ("final dot", "4xx"): Outcome.NOT_SENT,  # RFC 5321 §4.2.5: it must not deliver it
        ("final dot", "5xx"): Outcome.REJECTED,
        ("final dot", "*"): Outcome.UNKNOWN,  # §4.5.3.2.6: it may have been accepted
    }

    # What a failure without a reply is called, first match wins.
    _NO_REPLY: ClassVar[tuple[tuple[type[Exception], str], ...]] = (
        (smtplib.SMTPNotSupportedError, "not offered"),
        (smtplib.SMTPServerDisconnected, "connection lost"),
        (smtplib.SMTPResponseException, "garbled reply"),  # smtplib's 500, connection closed
        (smtplib.SMTPException, "no usable mechanism"),  # login found none it speaks
        (ssl.SSLError, "TLS handshake failed"),
        (ConnectionRefusedError, "connection refused"),
        (socket.gaierror, "host not found"),
        (ValueError, "not encodable"),  # a non-ASCII login, which smtplib cannot send
        (OSError, "connection lost"),
    )

    # 7-bit bodies: no 8BITMIME needed.  CRLF line ends and 78-column folding.
    POLICY = email.policy.SMTP.clone(cte_type="7bit")

    def __init__(self, host: str, port: int = 587, security: str = "starttls",
                 username: str = "", password: str = "", helo: str = "", *,
                 watchdog: Watchdog, clock: Callable[[], float] = time.monotonic,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if security not in ("starttls", "tls", "none"):
            raise ValueError(f"security must be starttls, tls or none, not {security!r}")
        self.host = host
        self.port = port
        self.security = security
        self._username = username
        self._password = password
        self._helo = helo
        self._watchdog = watchdog
        self._clock = clock
        self._context = ssl_context or ssl.create_default_context()

    @property
    def helo(self) -> str:
        """The name we greet with: the setting, else this host's FQDN (looked up once)."""
        if not self._helo:
            self._helo = socket.getfqdn()  # two threads may both look: same answer
        return self._helo

    @classmethod
    def classify(cls, phase: str, code: int | None) -> Outcome | None:
        """The outcome of ``code`` (None: no reply) at ``phase``; None means go on."""
        keys = [] if code is None else [str(code), f"{code // 100}xx"]
        for key in [*keys, "*"]:
            if (phase, key) in cls.CLASSIFICATION:
                return cls.CLASSIFICATION[(phase, key)]
        raise KeyError(phase)

    def compose(self, message: Message) -> email.message.EmailMessage:
        """The message as the relay gets it (Bcc left out), with a fresh Message-ID."""
        mail = email.message.EmailMessage(policy=self.POLICY)
        mail["From"] = _mail_address(message.sender)
        mail["To"] = [_mail_address(a) for a in message.to]
        if message.cc:
            mail["Cc"] = [_mail_address(a) for a in message.cc]
        if message.reply_to:
            mail["Reply-To"] = _mail_address(message.reply_to)
        if message.subject:
            mail["Subject"] = message.subject
        mail["Date"] = email.utils.formatdate(localtime=True)
        mail["Message-ID"] = email.utils.make_msgid(domain=message.sender.email.rpartition("@")[2])
        for name, value in message.headers:
            mail[name] = value
        for tag in message.tags:
            mail["X-Tag"] = tag
        if message.metadata:
            mail["X-Metadata"] = json.dumps(dict(message.metadata))  # its spaces fold
        _set_mime_body(mail, message)
        return mail

    def send(self, message: Message, deadline: float) -> Receipt:
        mail = self.compose(message)
        data = re.sub(rb"(?m)^\.", b"..", mail.as_bytes())  # RFC 5321 §4.5.2
        data += (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise ProviderError(Outcome.NOT_SENT, "timed out at connect", timed_out=True)
        conn = (smtplib.SMTP_SSL(local_hostname=self.helo, timeout=remaining,
                                 context=self._context) if self.security == "tls"
                else smtplib.SMTP(local_hostname=self.helo, timeout=remaining))
        # smtplib keeps the name to check the certificate against in _host, and
        # only its constructor sets it, by connecting before we could watch.
        conn._host = self.host  # type: ignore[attr-defined]
        attempt = Deadline(deadline, conn)
        self._watchdog.watch(attempt)  # before connecting: it bounds the greeting too
        try:
            self._open(conn, attempt)
            self._envelope(conn, attempt, message, len(data))
            self._expect("DATA", conn, attempt, lambda: conn.docmd("DATA"))
            self._write(conn, attempt, data)
            self._expect("final dot", conn, attempt, conn.getreply)
        finally:
            _quit(conn)
            attempt.finish()
        return Receipt(self.name, str(mail["Message-ID"]))

    def _open(self, conn: smtplib.SMTP, attempt: Deadline) -> None:
        self._expect("connect", conn, attempt, lambda: conn.connect(self.host, self.port))
        self._expect("EHLO", conn, attempt, lambda: conn.ehlo(self.helo))
        if self.security == "starttls":
            self._expect("STARTTLS", conn, attempt, lambda: conn.starttls(context=self._context))
            self._expect("EHLO", conn, attempt, lambda: conn.ehlo(self.helo))
        if self._username:
            self._expect("AUTH", conn, attempt,
                         lambda: conn.login(self._username, self._password))

    def _envelope(self, conn: smtplib.SMTP, attempt: Deadline, message: Message,
                  size: int) -> None:
        """MAIL and every RCPT; a 5xx is answered with RSET and raised as REJECTED."""
        options = [f"SIZE={size}"] if conn.has_extn("size") else []
        code, text = self._reply("MAIL", conn, attempt,
                                 lambda: conn.mail(message.sender.email, options))
        outcome = self.classify("MAIL", code)
        if outcome is not None:
            raise self._refused(conn, outcome, f"SMTP {code} at MAIL", text)
        refused: list[tuple[int, str]] = []
        failed: list[tuple[int, str]] = []
        for address in message.recipients:
            code, text = self._reply("RCPT", conn, attempt,
                                     functools.partial(conn.rcpt, address.email))
            outcome = self.classify("RCPT", code)
            if outcome is Outcome.REJECTED:
                refused.append((code, f"{address.email}: {code} {text}"))
            elif outcome is not None:
                failed.append((code, text))
        # A refused address is refused by every provider: that answer wins over
        # another recipient's 4xx, and the client learns which addresses to fix.
        if refused:
            raise self._refused(conn, Outcome.REJECTED, f"SMTP {refused[0][0]} at RCPT",
                                "; ".join(line for _, line in refused))
        if failed:
            raise self._refused(conn, Outcome.NOT_SENT, f"SMTP {failed[0][0]} at RCPT",
                                failed[0][1])

    @staticmethod
    def _refused(conn: smtplib.SMTP, outcome: Outcome, reason: str, detail: str
                 ) -> ProviderError:
        if outcome is Outcome.REJECTED:
            try:
                conn.rset()  # end the transaction before QUIT, as RFC 5321 §4.1.1.5 has it
            except (OSError, ValueError):
                pass
        return ProviderError(outcome, reason, detail=detail[:MAX_PROVIDER_MESSAGE])

    def _write(self, conn: smtplib.SMTP, attempt: Deadline, data: bytes) -> None:
        try:
            conn.send(data)
        except (OSError, ValueError) as exc:
            raise self._no_reply("body", conn, attempt, exc) from None

    def _expect(self, phase: str, conn: smtplib.SMTP, attempt: Deadline,
                action: Callable[[], tuple[int, bytes]]) -> None:
        code, text = self._reply(phase, conn, attempt, action)
        outcome = self.classify(phase, code)
        if outcome is not None and outcome is not Outcome.SENT:
            raise ProviderError(outcome, f"SMTP {code} {self._where(phase)}",
                                detail=text[:MAX_PROVIDER_MESSAGE])

    def _reply(self, phase: str, conn: smtplib.SMTP, attempt: Deadline,
               action: Callable[[], tuple[int, bytes]]) -> tuple[int, str]:
        """Run one command: its reply code and text, or a ProviderError if none came."""
        reply: bytes | str
        try:
            code, reply = action()
        except smtplib.SMTPResponseException as exc:
            if conn.sock is None:  # smtplib's own 500 for a garbled reply: no answer
                raise self._no_reply(phase, conn, attempt, exc) from None
            code, reply = exc.smtp_code, exc.smtp_error
        except (OSError, ValueError) as exc:  # SMTPException is an OSError
            raise self._no_reply(phase, conn, attempt, exc) from None
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
        return code, " ".join(text.split())

    def _no_reply(self, phase: str, conn: smtplib.SMTP, attempt: Deadline,
                  exc: Exception) -> ProviderError:
        """No reply came; a broken or half-TLS connection is closed, so it gets no QUIT."""
        if isinstance(exc, smtplib.SMTPServerDisconnected) or \
                not isinstance(exc, (smtplib.SMTPException, ValueError)):
            conn.close()
        timed_out = (attempt.expired or isinstance(exc, TimeoutError)
                     or isinstance(exc.__context__, TimeoutError)  # smtplib wraps it
                     or self._clock() >= (attempt.deadline or 0.0))
        what = "timed out" if timed_out else \
            next(name for kind, name in self._NO_REPLY if isinstance(exc, kind))
        outcome = self.classify(phase, None)
        assert outcome is not None  # every phase has a "*" row that is an outcome
        return ProviderError(outcome, f"{what} {self._where(phase)}", timed_out=timed_out)

    @staticmethod
    def _where(phase: str) -> str:
        return {"body": "while writing the body",
                "final dot": "after the final dot"}.get(phase, f"at {phase}")


def _mail_address(address: Address) -> email.headerregistry.Address:
    return email.headerregistry.Address(address.name, addr_spec=address.email)


def _set_mime_body(mail: email.message.EmailMessage, message: Message) -> None:
    """Text and HTML as alternatives, inline parts related to the HTML, then attachments."""
    if message.html and message.text:
        mail.set_content(message.text)
        mail.add_alternative(message.html, subtype="html")
        root = list(mail.iter_parts())[-1]
    else:
        mail.set_content(message.html or message.text, subtype="html" if message.html else "plain")
        root = mail
    inline = [item for item in message.attachments if item.content_id]
    for item in inline:
        maintype, _, subtype = item.content_type.partition("/")
        root.add_related(item.content, maintype, subtype, disposition="inline",
                         filename=item.filename, cid=f"<{item.content_id.strip('<>')}>")
    if inline:
        root.set_param("type", next(root.iter_parts()).get_content_type())  # RFC 2387
    for item in message.attachments:
        if not item.content_id:
            maintype, _, subtype = item.content_type.partition("/")
            mail.add_attachment(item.content, maintype, subtype, filename=item.filename)


def _quit(conn: smtplib.SMTP) -> None:
    """Say goodbye if the connection is still up; whatever happens, close it."""
    try:
        if conn.sock is not None:
            conn.quit()
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


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
    "mailgun": MailgunProvider, "sendgrid": SendGridProvider, "ses": SESProvider,
    "postmark": PostmarkProvider, "resend": ResendProvider, "smtp": SMTPProvider,
}


def load_config(env: Mapping[str, str]) -> Config:
    """Parse ``env`` with SETTINGS and every registered provider's rows; raise
    ConfigError naming every problem at once.  Provider rows are checked only
    for the providers in use (none in mock mode)."""
    problems: list[str] = []
    values = parse_settings(SETTINGS, env, problems)
    problems += [f"{row.env} is required" for row in SETTINGS
                 if row.required and not values[row.field]
                 and not any(p.startswith(row.env) for p in problems)]
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
        missing = [f"{row.env} is required for provider {name}" for row in cls.settings
                   if row.required and not own[row.field]
                   and not any(p.startswith(row.env) for p in problems)]
        problems += missing or cls.problems(own)
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
                 on_poll: Callable[[str, str | None], None] | None = None,
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
            self._on_poll(self.name, error)
        if change is not None:
            self._notify(change)
        else:
            self._schedule(delay, generation)

    def _notify(self, change: StateChange) -> None:
        if self._on_change is not None:
            self._on_change(change)


def make_probe(provider: Callable[[], Provider], address: Address, timeout: float,
               clock: Callable[[], float] = time.monotonic, *,
               sandbox: bool = False) -> Callable[[], str | None]:
    """A breaker probe that sends the poll message of ``provider()`` (the provider in
    use at that moment: keys may be reloaded), from and to ``address``, built as a
    client's message is; a rejection still proves health."""
    def probe() -> str | None:
        current = provider()
        try:
            current.send(current.poll_message(address, sandbox), clock() + timeout)
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

    def lane(self, provider: str | None) -> Lane | None:
        """The lane of the provider called ``provider``, if it is configured."""
        return next((lane for lane in self.lanes if lane.provider.name == provider), None)

    def provider(self, name: str) -> Provider:
        lane = self.lane(name)
        assert lane is not None, name
        return lane.provider

    def replace_providers(self, providers: Iterable[Provider]) -> list[Provider]:
        """Put new provider objects (same names, same order) behind the same breakers;
        the old ones are returned.  A send already under way keeps the one it has."""
        old = self.lanes
        self.lanes = [Lane(new, lane.breaker) for new, lane in zip(providers, old, strict=True)]
        return [lane.provider for lane in old]

    def send(self, message: Message, request_id: str | None = None, *,
             before_attempt: Callable[[str], bool] | None = None,
             only: str | None = None) -> Receipt:
        failed: str | None = None
        skipped: dict[str, str] = {}  # provider name -> why it cannot carry the message
        for lane in self.lanes:
            name = lane.provider.name
            if only is not None and name != only:
                continue
            cannot = lane.provider.cannot_carry(message)
            if cannot is not None:
                skipped[name] = cannot
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

    def _nothing_tried(self, skipped: dict[str, str]) -> DeliveryFailed:
        carriers = [lane for lane in self.lanes if lane.provider.name not in skipped]
        if skipped and not carriers:
            return DeliveryFailed(Failure.UNCARRIABLE, Outcome.REJECTED,
                                  detail="; ".join(f"{n}: {why}" for n, why in skipped.items()))
        waits = [w for w in (lane.breaker.retry_after() for lane in carriers) if w is not None]
        return DeliveryFailed(Failure.ALL_CIRCUITS_OPEN, Outcome.NOT_SENT,
                              retry_after=max(1, math.ceil(min(waits, default=1.0))))

    def _attempted(self, name: str, outcome: Outcome, started: float, request_id: str | None,
                   message: Message, reason: str | None = None) -> None:
        elapsed = self._clock() - started
        self._metrics.count_and_observe(
            (("smsp_provider_attempts_total", (name, outcome._value_)),),
            "smsp_provider_attempt_duration_seconds", (name,), elapsed)
        if self._log.debug_enabled:
            self._log.debug("provider_attempt", request_id=request_id,
                            trace_id=TRACE_ID.get(), provider=name,
                            outcome=outcome.value, duration_ms=round(elapsed * 1000, 2),
                            reason=reason, fromaddress=message.sender.email,
                            toaddress=",".join(a.email for a in message.to))

    def _skipped(self, name: str, reason: str, request_id: str | None) -> None:
        self._metrics.inc("smsp_provider_attempts_total", name, "skipped")
        self._log.info("provider_skipped", request_id=request_id, trace_id=TRACE_ID.get(),
                       provider=name, reason=reason)

    def _failover(self, failed: str, name: str, request_id: str | None) -> None:
        self._metrics.inc("smsp_failovers_total", failed, name)
        self._log.warning("failover", request_id=request_id, trace_id=TRACE_ID.get(),
                          **{"from": failed}, to=name)


# -------------------------------------------------------------- idempotency ---


class Claim(enum.Enum):
    """What ``claim`` found for a key."""

    NEW = "new"  # ours: mark dispatching() before sending, then complete() or release()
    REPLAY = "replay"  # a final answer is stored: send it again, send no mail
    IN_FLIGHT = "in_flight"  # claimed, or dispatching within its liveness deadline
    MISMATCH = "mismatch"  # the key was used with a different request
    HOLDER_LOST = "holder_lost"  # dispatching past its liveness deadline: the fate is unknown


@value_class
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


@value_class
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


@value_class
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
        self._clock = clock
        self._pool: IdlePool[_RedisConnection] = IdlePool(pool_size, clock=clock)
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
        self._pool.close()

    def _acquire(self) -> _RedisConnection:
        return self._pool.take(_RedisConnection.fit_for_reuse) or self._connect()

    def _release(self, conn: _RedisConnection) -> None:
        if conn.sock is not None:  # not closed by a failed exchange
            self._pool.put(conn)

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
            (("smsp_idempotency_store_operations_total", (operation, result)),),
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


_PARSE_REASONS = {400: "bad_request", 413: "body_too_large", 414: "request_line_too_long",
                  431: "head_too_large", 505: "http_version_not_supported"}


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
        if not colon or not name or (not name.replace(b"-", b"").isalnum()  # the usual name
                                     and name.translate(None, _TOKEN_BYTES)):
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
    peer: str = ""  # the socket's remote address


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
    client: str | None = None  # who asked: the peer, or whom a trusted proxy names


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
    if response.headers:
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


def client_address(peer: str, forwarded: str | None,
                   proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """Who sent a request: the peer, unless the peer is a trusted proxy; then the
    rightmost X-Forwarded-For address that is not a trusted proxy itself (the
    entries left of it could have been written by the client).  With no proxy
    trusted it is the peer; the application then does not ask (the usual case)."""
    hops = [hop.strip() for hop in reversed((forwarded or "").split(",")) if hop.strip()]
    chain = [peer, *hops]
    for hop in chain:
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return hop[:64]  # not an address: report it, and believe nothing further left
        if not any(address in network for network in proxies):
            return hop
    return chain[-1]


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
    Content-Length (411), size (413), Content-Type (415), Idempotency-Key
    (400), room in the body budget (503 overloaded, before the body is read),
    then the body (400).  Thread-safe: its collaborators are.
    """

    def __init__(self, config: Config, *, dispatcher: Dispatcher,
                 idempotency: IdempotencyStore, metrics: Metrics, log: Logger) -> None:
        self.set_keys(config.api_keys)
        self._max_body = config.max_body_bytes
        self._limits = Limits.of(config)
        self._timeout = config.timeout
        self._proxies = config.trusted_proxies
        self._max_body_digits = len(str(config.max_body_bytes))
        self.bodies = ByteBudget(config.max_inflight_body_bytes)
        self._fail_open = config.idempotency_on_error == "open"
        self.dispatcher = dispatcher
        self.idempotency = idempotency
        self.metrics = metrics
        self.inflight: Callable[[], int] = lambda: 0  # the server sets this
        self._log = log
        self._swagger = json.dumps(openapi_document(config), indent=2).encode()

    def set_keys(self, keys: Iterable[str]) -> None:
        """The client keys from now on; a request already authenticated is not disturbed."""
        self._key_digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    def handle(self, request: Request) -> Response:
        traceparent = request.headers.get("traceparent")
        TRACE_ID.set(None if traceparent is None else trace_id_of(traceparent))  # to finished()
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
        response = answer(request)
        response.client = request.peer if not self._proxies else client_address(
            request.peer, request.headers.get("x-forwarded-for"), self._proxies)
        return response

    def finished(self, method: str, path: str, response: Response, seconds: float,
                 request_id: str, peer: str = "") -> None:
        """Account for an answered request: metrics and the access line."""
        route = path if path in _ENDPOINT_AT else "other"
        counted = ("smsp_http_requests_total", (method if method in METHODS else "other",
                                                route, str(response.status)))
        delivery = None if response.delivery is None else response.delivery._value_
        self.metrics.count_and_observe(  # with what the client was told of its mail
            (counted,) if delivery is None else (counted, ("smsp_deliveries_total", (delivery,))),
            "smsp_http_request_duration_seconds", (route,), seconds)
        self._log.access(request_id, method[:16], path[:200], response.status,
                         round(seconds * 1000, 3), trace_id=TRACE_ID.get(),
                         client=response.client or peer or None, provider=response.provider,
                         delivery=delivery, reason=response.reason, replayed=response.replayed)
        TRACE_ID.set(None)

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
        digits = length.lstrip("0") or "0"  # int() refuses more than 4,300 digits: look first
        if len(digits) > self._max_body_digits or int(digits) > self._max_body:
            return error_response(413, f"body larger than {self._max_body} bytes", rid,
                                  reason="body_too_large")
        content_type = headers.get("content-type")
        if content_type is not None and content_type != JSON_TYPE and \
                not _is_json_type(content_type):
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
        size = int(headers["content-length"].lstrip("0") or "0")
        if not self.bodies.take(size):
            return error_response(503, "overloaded", rid, delivery=Delivery.NOT_SENT,
                                  headers=(("Retry-After", "1"),), reason="overloaded")
        try:  # the bytes count until the answer: the body, its document and the message
            return self._receive(request, size, scope, rid)
        finally:
            self.bodies.give_back(size)

    def _receive(self, request: Request, size: int, scope: bytes, rid: str) -> Response:
        try:
            message, print_ = self._read_message(request, size)
        except ValidationError as exc:
            return error_response(400, str(exc), rid, reason="invalid_field")
        key = request.headers.get("idempotency-key")
        if key is None or print_ is None:
            return self._deliver(message, rid)
        digest = hashlib.sha256(scope + b"\0" + key.encode("ascii")).hexdigest()
        return self._deliver_once(digest, print_, dataclasses.replace(message, key=digest),
                                  rid)

    def _read_message(self, request: Request, size: int) -> tuple[Message, str | None]:
        """The message and, with an Idempotency-Key, its body's fingerprint.  The raw body
        and its JSON (attachments as base64) are let go here, before any provider call."""
        raw = request.read_body(size)
        document = parse_json_object(raw)
        message = parse_message(document, self._limits)
        keyed = "idempotency-key" in request.headers
        return message, fingerprint(document) if keyed else None

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
        if self._resolvable(found):
            return self._resolve(key, found, message, rid)
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

    def _resolvable(self, found: ClaimResult) -> bool:
        """Whether an unknown fate can be settled by sending again: the attempt went to a
        provider that sends a keyed message at most once, and its circuit is closed."""
        unknown = found.claim is Claim.HOLDER_LOST or (
            found.claim is Claim.REPLAY and found.answer is not None
            and found.answer.delivery == Delivery.UNKNOWN.value)
        lane = self.dispatcher.lane(found.provider or (found.answer.provider
                                                       if found.answer else None))
        return unknown and lane is not None and lane.provider.resolves_unknown and \
            lane.breaker.state is State.CLOSED

    def _resolve(self, key: str, found: ClaimResult, message: Message, rid: str) -> Response:
        """Send an unknown-fate message again to the provider that dedupes it by key.

        Only that provider is tried (an unknown never fails over).  Whatever
        happens, the key keeps a final answer: the new one when there is one,
        else the unknown it had, so a retry never sends elsewhere.
        """
        store = self.idempotency
        provider = found.provider or (found.answer.provider if found.answer else None) or ""
        try:
            token = store.takeover(key, found.token, provider)
        except StoreError:
            token = None
        if token is None:
            return failure_response(DeliveryFailed(Failure.LEASE_LOST, Outcome.NOT_SENT), rid,
                                    self._timeout)
        response = self._deliver(message, rid,
                                 lambda name: store.dispatching(key, token, name), provider)
        if response.status in STORED_STATUSES:
            answer = stored_answer(response)
        elif found.answer is not None:  # not settled: the key keeps the unknown it had
            answer, response = found.answer, replayed(found.answer)
        else:
            response = failure_response(DeliveryFailed(Failure.HOLDER_LOST, Outcome.UNKNOWN,
                                                       provider=provider), rid, self._timeout)
            answer = stored_answer(response)
        try:
            store.complete(key, token, answer)
        except StoreError:
            self._log.error("idempotency_store_failed", request_id=rid, phase="settle")
        return response

    def _deliver(self, message: Message, rid: str,
                 before_attempt: Callable[[str], bool] | None = None,
                 only: str | None = None) -> Response:
        try:
            receipt = self.dispatcher.send(message, rid, before_attempt=before_attempt,
                                           only=only)
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
            "smsp_log_lines_dropped_total": [((), self._log.dropped)],
        })
        return Response(200, text.encode(), content_type=METRICS_TYPE)


EMAIL_EXAMPLES: Mapping[str, Any] = {
    "plain": {"summary": "the original four fields", "value": {
        "fromaddress": "Alice <alice@example.com>", "toaddress": "bob@example.org",
        "subject": "Hello", "plaintextbody": "Hello Bob"}},
    "receipt": {"summary": "HTML with an inline logo and a PDF, to a team", "value": {
        "fromaddress": "Shop <orders@example.com>",
        "toaddress": ["Bob <bob@example.org>", "carol@example.org"],
        "ccaddress": ["accounts@example.org"], "replyto": "help@example.com",
        "subject": "Your receipt", "plaintextbody": "Thank you for your order.",
        "htmlbody": "<p><img src=\"cid:logo\"> Thank you for your order.</p>",
        "headers": {"List-Unsubscribe": "<mailto:unsubscribe@example.com>"},
        "attachments": [
            {"filename": "receipt.pdf", "content_type": "application/pdf",
             "content": "JVBERi0xLjQK"},
            {"filename": "logo.png", "content_type": "image/png", "content_id": "logo",
             "content": "iVBORw0KGgo="}],
        "tags": ["receipt"], "metadata": {"order": "1234"}}},
}


def _answer(description: str, schema: str | None = "Error",
            headers: tuple[str, ...] = ()) -> dict[str, Any]:
    result: dict[str, Any] = {"description": description, "headers": {
        name: {"$ref": f"#/components/headers/{name}"} for name in ("X-Request-Id",) + headers}}
    if schema is not None:
        result["content"] = {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    return result


def _email_operation(config: Config) -> dict[str, Any]:
    """The OpenAPI operation of POST /email."""
    answer = _answer
    return {
        "summary": "Send one email",
        "operationId": "sendEmail",
        "security": [{"apiKey": []}],
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
                        "description": "replays the first final answer for 24 h"}],
        "requestBody": {"required": True, "content": {JSON_TYPE: {
            "schema": {"$ref": "#/components/schemas/Email"},
            "examples": EMAIL_EXAMPLES}}},
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
                          "idempotency store is down, or the server is overloaded; not sent",
                          "DeliveryError", ("Retry-After",)),
            "504": answer("the provider did not answer in time; delivery unknown",
                          "DeliveryError", ("Idempotent-Replayed",)),
        },
    }


def _operations(config: Config) -> dict[str, dict[str, Any]]:
    """The OpenAPI operation of each Application handler (its GET or POST)."""
    answer = _answer
    text_plain = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "email": _email_operation(config),
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
                 "description": "Sends one email (text and HTML, several recipients, "
                                "attachments) through Mailgun or SendGrid with "
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
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    """The OpenAPI schemas of the request body and of the answers."""
    return {
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
            "idempotency": {"type": "object", "required": ["kind", "state"],
                            "properties": {"kind": {"type": "string"},
                                           "state": {"type": "string"}}}}},
    }


# -------------------------------------------------- HTTP handler and server ---


def _keep_alive(connection: str | None, version: tuple[int, int]) -> bool:
    """Whether the client wants the connection kept: HTTP/1.1 unless ``close``."""
    if connection is None:
        return version >= (1, 1)
    tokens = {t.strip() for t in connection.lower().split(",")}
    return "close" not in tokens if version >= (1, 1) else "keep-alive" in tokens


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
        self.peer = str(self.client_address[0])  # the socket's remote address
        self.conn = _Connection(server.clock() + server.client_timeout, self,
                                tls=context is not None)
        server.watchdog.watch(self.conn)
        server.track(self.conn)
        self.tls_failed = context is not None and not self._handshake(context)
        super().setup()
        self.rfile.close()  # socket.makefile's raw stream is Python code run for every read
        if context is None:  # reads in C: a blocking socket's file descriptor, left open
            self.rfile = io.BufferedReader(io.FileIO(self.request.fileno(), "rb",
                                                     closefd=False))
        elif not self.tls_failed:
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
            keep_alive = _keep_alive(headers.get("connection"), version)
            body = _BodyReader(self, headers, version)
            try:
                response = server.app.handle(Request(method, path, headers, rid, body.read,
                                                     self.peer))
            except (ClientGone, OSError):
                raise
            except Exception as exc:  # the one catch-all at the request boundary
                server.log.error("internal_error", request_id=rid, error=type(exc).__name__,
                                 where=_traceback_summary(exc))
                response = error_response(500, "internal error", rid, close=True,
                                          reason="internal_error")
        except HTTPError as exc:
            rid = rid or server.ids()
            self._answer(error_response(exc.status, exc.message, rid,
                                        reason=_PARSE_REASONS.get(exc.status, "bad_request")),
                         rid, method, path, started)
            return
        except (ClientGone, OSError):
            if self.conn.expired:  # out of time mid-request: say so, then close
                rid = rid or server.ids()
                self._answer(error_response(408, "request not received in time", rid,
                                            reason="client_timeout"), rid,
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
        self.request.sendall(data)  # the whole answer in one call: wfile would add a frame

    def _answer(self, response: Response, rid: str, method: str = "-", path: str = "-",
                started: float | None = None, *, keep_alive: bool = False,
                head_only: bool = False, http10: bool = False) -> None:
        """Write the whole response in one send, then account for it."""
        server = self.server
        self.close_connection = not keep_alive
        data = response_head(response, rid, server.date(), keep_alive=keep_alive, http10=http10)
        try:
            self.send_within_budget(data if head_only else data + response.body,
                                    server.clock() + server.client_timeout)
        except OSError:
            self.close_connection = True
        if started is not None:
            server.app.finished(method, path, response, server.clock() - started, rid,
                                self.peer)


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
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no getfqdn() DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

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
        self.app.metrics.inc("smsp_deliveries_total", Delivery.NOT_SENT.value)
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
    context: ProviderContext

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        return {lane.provider.name: lane.breaker for lane in self.dispatcher.lanes}

    def reload(self, env: Mapping[str, str]) -> bool:
        """Reread the secrets (on SIGHUP): client keys and provider keys, from their
        variables or files.  Other settings keep the values they started with.  When
        the configuration no longer parses, everything stays as it was and the
        problems are logged by name."""
        try:
            new = load_config(env)
        except ConfigError as exc:
            self.log.error("reload_failed", problems=exc.problems)
            return False
        self.app.set_keys(new.api_keys)
        self.context = dataclasses.replace(self.context, redact=Redactor(config_secrets(new)))
        kept = dataclasses.replace(new, mock=self.config.mock, providers=self.config.providers)
        for old in self.dispatcher.replace_providers(build_providers(kept, self.context)):
            old.close()  # idle connections only; a send under way finishes on its own
        self.log.info("reloaded", api_keys=len(new.api_keys))
        return True

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


def _lanes(config: Config, providers: list[Provider], dispatcher: Dispatcher, *, log: Logger,
           metrics: Metrics, clock: Callable[[], float],
           timer: Callable[[float, Callable[[], None]], Any]) -> list[Lane]:
    def on_change(change: StateChange) -> None:
        metrics.inc("smsp_circuit_transitions_total", change.breaker, change.new.value)
        log.log(Level.WARNING if change.new is State.OPEN else Level.INFO, "circuit_state_change",
                provider=change.breaker, **{"from": change.old.value}, to=change.new.value,
                reason=change.reason)

    last_error: dict[str, str | None] = {}  # one breaker polls one at a time

    def on_poll(name: str, error: str | None) -> None:
        metrics.inc("smsp_circuit_polls_total", name, "failure" if error else "success")
        if error is not None and last_error.get(name) != error:  # the first, or a change
            log.warning("poll_failed", provider=name, reason=error)
        last_error[name] = error

    def current(name: str) -> Callable[[], Provider]:
        return lambda: dispatcher.provider(name)

    address = config.poll_address or DEFAULT_POLL_ADDRESS
    return [Lane(provider, CircuitBreaker(
        provider.name, make_probe(current(provider.name), address, config.timeout,
                                  sandbox=config.poll_sandbox),
        threshold=config.failure_threshold, interval=config.poll_interval,
        interval_max=config.poll_interval_max, clock=clock, timer=timer, on_change=on_change,
        on_poll=on_poll)) for provider in providers]


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
    log = log or Logger(config.log_format, debug=config.log_debug, worker=worker,
                        grace=config.shutdown_grace)
    metrics = Metrics(worker=worker)
    watchdog = Watchdog(recheck=min(1.0, config.client_timeout))
    stop = threading.Event()
    context = ProviderContext(watchdog, time.monotonic, stop, Redactor(config_secrets(config)),
                              config.pool_size, config.pool_idle)
    dispatcher = Dispatcher([], timeout=config.timeout, log=log, metrics=metrics)
    dispatcher.lanes = _lanes(config, build_providers(config, context), dispatcher, log=log,
                              metrics=metrics, clock=clock, timer=timer)
    idempotency = build_store(config, watchdog=watchdog, metrics=metrics, clock=clock,
                              lanes=len(dispatcher.lanes))
    app = Application(config, dispatcher=dispatcher, idempotency=idempotency, metrics=metrics,
                      log=log)
    return Service(config, log, metrics, watchdog, dispatcher, app, IdGenerator(), stop,
                   context)


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


def _stop_on_signals(stop: threading.Event, reload: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` from now on, and SIGHUP sets ``reload``.

    A worker starts with them blocked (see Supervisor): one that came while it
    was starting up was held back, and is handled now.
    """
    def on_signal(signum: int, frame: Any) -> None:
        (reload if signum == signal.SIGHUP else stop).set()

    for signum in MAIN_SIGNALS:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_SIGNALS)


def _reload(service: Service, server: Server, environ: Mapping[str, str]) -> None:
    """SIGHUP: reread the secrets, and the TLS certificate and key for new handshakes."""
    if not service.reload(environ) or server.ssl_context is None:
        return
    try:
        server.ssl_context.load_cert_chain(service.config.tls_cert, service.config.tls_key)
    except (OSError, ssl.SSLError) as exc:  # the old certificate stays
        service.log.error("tls_reload_failed", error=type(exc).__name__)


def _drain(service: Service, server: Server) -> int:
    """Stop accepting, let what has arrived finish; the exit status."""
    config, log = service.config, service.log
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


def serve(config: Config, *, environ: Mapping[str, str] | None = None,
          sock: socket.socket | None = None, worker: int | None = None,
          log: Logger | None = None) -> int:
    """Run one server until SIGTERM or SIGINT, then drain; the process exit status.

    SIGHUP rereads the secrets from ``environ`` (os.environ by default) and
    their files.  Every thread smsp starts blocks these signals (see
    start_thread), so the kernel hands them to the main thread; it also
    wakes twice a second in case a thread started by someone else took one.
    """
    stop, reload = threading.Event(), threading.Event()
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
        _stop_on_signals(stop, reload)
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
            if reload.is_set():
                reload.clear()
                _reload(service, server, os.environ if environ is None else environ)
        return _drain(service, server)
    finally:
        log.close()  # a worker leaves with os._exit: write out its last lines now (or give up)


class Supervisor:
    """Forks ``config.workers`` servers sharing one listening socket, keeps them running.

    A worker that dies is replaced (ten deaths within 10 s stop them all);
    SIGTERM or SIGINT is forwarded to every worker, which drains as a single
    server does, and SIGHUP too, which each worker reloads on.  Each worker
    has its own breakers, as separate nodes have.
    """

    def __init__(self, config: Config, sock: socket.socket, log: Logger,
                 environ: Mapping[str, str] | None) -> None:
        self.config, self.sock, self.log, self.environ = config, sock, log, environ
        self.children: dict[int, int] = {}
        self.stopping = False
        self.restarts: collections.deque[float] = collections.deque(maxlen=10)

    def spawn(self, index: int) -> None:
        # Signals wait until the child has dropped the parent's handler (which would
        # otherwise run in the child, signal its siblings and leave it serving), and
        # then until serve() has its own: a SIGTERM while a worker starts is drained.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in MAIN_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                code = serve(self.config, environ=self.environ, sock=self.sock,
                             worker=index)  # unblocks the signals
            finally:
                os._exit(code)
        self.children[pid] = index
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
            self.sock.close()  # with every worker's copy closed too, new connections fail
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        """Start the workers and wait for them; the worst worker exit status."""
        for signum in MAIN_SIGNALS:
            signal.signal(signum, self.on_signal)
        for index in range(self.config.workers):
            self.spawn(index)
        self.log.info("workers_started", workers=self.config.workers,
                      port=self.sock.getsockname()[1], pid=os.getpid())
        worst = 0
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = self.children.pop(pid, -1)
            if index >= 0:
                worst = max(worst, self.ended(index, pid, os.waitstatus_to_exitcode(status)))
        return worst

    def ended(self, index: int, pid: int, code: int) -> int:
        """Account for a worker that ended; the exit status it stands for."""
        if self.stopping:
            return code if code >= 0 else 1
        self.log.warning("worker_died", worker=index, pid=pid, exit_code=code)
        self.restarts.append(time.monotonic())
        if len(self.restarts) == self.restarts.maxlen and \
                self.restarts[-1] - self.restarts[0] < 10:
            self.log.error("workers_crashing", restarts=len(self.restarts))
            self.on_signal(signal.SIGTERM, None)
            return 1
        self.spawn(index)
        return 0


def run_workers(config: Config, log: Logger | None = None,
                environ: Mapping[str, str] | None = None) -> int:
    """Run ``config.workers`` servers under a Supervisor; the worst worker exit status."""
    log = log or Logger(config.log_format, debug=config.log_debug, grace=config.shutdown_grace)
    try:
        sock = socket.create_server((config.host, config.port), backlog=1024)
    except OSError as exc:  # as serve() says it: one line and status 2, no traceback
        log.error("start_failed", error=f"{type(exc).__name__}: {exc}")
        log.close()
        return 2
    worst = Supervisor(config, sock, log, environ).run()
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
        mock = (os.environ if environ is None else environ).get("SMSP_MOCK_EMAIL_SERVICE", "")
        hint = "" if mock.strip().lower() in _TRUE else (
            "For a demo without real providers set SMSP_MOCK_EMAIL_SERVICE=true "
            "(and SMSP_API_KEY).\n")
        print("smsp: invalid configuration:\n" + "".join(f"  - {p}\n" for p in exc.problems)
              + hint, file=sys.stderr, end="")
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    if args.check_config:
        print("\n".join(describe_config(config)))
        print("configuration OK")
        return 0
    if config.workers > 1:
        return run_workers(config, environ=environ)
    return serve(config, environ=environ)


if __name__ == "__main__":
    sys.exit(main())
