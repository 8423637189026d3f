"""Strict fake of Resend's ``POST /emails``, idempotency keys included (standard library only).

Built on the framework in fakes.py (a real HTTP server on 127.0.0.1, port 0, recording every
request, scripted with ``Status``, ``Delay``, ``Drip``, ...), plus two behaviours of its own::

    with FakeResend(api_key="re_secret", clock=clock) as rs:
        rs.script(SendThenReset())        # sent, but the client gets a TCP RST
        ...the code under test retries with the same Idempotency-Key...
        assert len(rs.sent) == 1          # Resend sent it once; the retry got the first id

What it checks, in order (sources: PROVIDERS.md 8d, provider-specs/resend/resend.yaml and
resend.com/docs/api-reference/errors):

1. body size -> 413 (nginx page); path ``/emails`` -> 404 ``not_found``; method POST -> 405
   ``method_not_allowed``;
2. ``Authorization: Bearer <api_key>``: none -> 401 ``missing_api_key``; another key -> by default
   403 ``invalid_api_key`` (the errors page; a later version of that page says the sending
   endpoints answer 401 ``validation_error`` instead: pass ``bad_key_error`` for that);
3. ``Idempotency-Key``, when present, 1-256 characters -> 400 ``invalid_idempotency_key``;
4. ``Content-Type: application/json`` and a JSON object body -> 400 ``validation_error``
   (what Resend answers here is unconfirmed);
5. ``from``, ``to`` and ``subject`` present -> 422 ``missing_required_field`` "Missing `to` field."
   (as Resend's own SDK tests show); then every field's type and rule -> 422 ``validation_error``
   naming the field: addresses ``email@example.com`` or ``Name <email@example.com>``; ``to`` a
   string or 1-50 strings; cc, bcc, reply_to a string or strings; text, html strings; headers an
   object of strings; tags ``[{name, value}]``, each of 1-256 ASCII letters, digits, ``_`` or
   ``-`` (the OpenAPI document's prose); attachments objects with ``content`` (strict base64) and
   ``filename``, or ``path`` -> 422 ``invalid_attachment`` when neither. Other keys are ignored.

Success is 200 ``{"id": "<uuid>"}``. Every response carries ``ratelimit-limit``, ``-remaining``
and ``-reset``; a 429 also ``retry-after``. Errors are ``{"statusCode", "name", "message"}``.

Idempotency (resend.com/docs/dashboard/emails/idempotency-keys), rules callers may rely on:

- A request that passes the checks above and carries a key claims it. The same key with the same
  payload (the parsed JSON, compared key order aside) within ``IDEMPOTENCY_TTL`` (24 h on the
  injected ``clock``) gets the first answer again and sends nothing: ``sent`` stays as it was,
  while ``requests`` and ``accepted`` grow. Another payload gets 409 ``invalid_idempotent_request``;
  any request while the key is still in flight gets 409 ``concurrent_idempotent_requests``.
- Only a send's 2xx is kept. A request refused by the checks, or answered by a scripted error
  ``Status``, sends nothing and leaves the key as it was. Whether Resend replays errors is
  unconfirmed.
- ``Hold()`` keeps a request, and its key, in flight until ``release()``; it then sends and
  answers normally. ``SendThenReset()`` sends (and keeps the answer under the key), then resets
  the connection without writing a byte. The fakes.py behaviours that never answer
  (``ResetBeforeResponse``, ``CloseWithoutResponse``, ``Hang``) lose the request before Resend
  processes it: nothing is sent and the key is not touched. A ``Delay`` does not hold the key.
- ``sent`` lists the messages actually sent (``SentEmail``: id, parsed body, key), oldest first.

Thread-safe like every fake in fakes.py; no lock is held while waiting or writing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fakes import (
    json_body,
    JSON,
    _NAMED_ADDRESS,
    Behaviour,
    Recorded,
    ResetBeforeResponse,
    Status,
    _FakeProvider,
    _json_response,
    _media_type,
    _nginx,
    _phrase,
    _Response,
)

__all__ = ["IDEMPOTENCY_TTL", "FakeResend", "Hold", "SendThenReset", "SentEmail"]

IDEMPOTENCY_TTL = 24 * 60 * 60.0
_RATE_LIMIT = 2  # requests per second, Resend's default

# Default messages, from resend.com/docs/api-reference/errors.
_MESSAGES = {
    "invalid_idempotency_key": "The key must be between 1-256 chars.",
    "validation_error": "We found an error with one or more fields in the request.",
    "missing_api_key": "Missing API key in the authorization header.",
    "restricted_api_key": "This API key is restricted to only send emails.",
    "invalid_api_key": "API key is invalid.",
    "not_found": "The requested endpoint does not exist.",
    "method_not_allowed": "Method is not allowed for the requested path.",
    "invalid_idempotent_request": "Same idempotency key used with a different request payload.",
    "concurrent_idempotent_requests": ("Same idempotency key used while original request is "
                                       "still in progress."),
    "invalid_attachment": "Attachment must have either a `content` or `path`.",
    "invalid_from_address": "Invalid `from` field.",
    "missing_required_field": "The request body is missing one or more required fields.",
    "daily_quota_exceeded": "You have reached your daily email sending quota.",
    "monthly_quota_exceeded": "You have reached your monthly email sending quota.",
    "rate_limit_exceeded": ("Too many requests. Please limit the number of requests per second. "
                            "Or contact support to increase rate limit."),
    "security_error": "We may have found a security issue with the request.",
    "application_error": "An unexpected error occurred.",
    "internal_server_error": "An unexpected error occurred.",
}
_NAME_FOR_STATUS = {400: "validation_error", 401: "missing_api_key", 403: "invalid_api_key",
                    404: "not_found", 405: "method_not_allowed",
                    409: "concurrent_idempotent_requests", 422: "validation_error",
                    429: "rate_limit_exceeded", 451: "security_error", 500: "application_error"}
_REQUIRED = ("from", "to", "subject")
_ADDRESS_LISTS = ("cc", "bcc", "reply_to")
_MAX_TO = 50
_TAG_PART = re.compile(r"[A-Za-z0-9_-]{1,256}")
_ADDRESS_FORMAT = ("The email address needs to follow the `email@example.com` or "
                   "`Name <email@example.com>` format.")


@dataclass(frozen=True)
class Hold:
    """Keep the request (and its Idempotency-Key) in flight until ``release()``, then send and
    answer normally; ``close()`` ends it with a 500 instead, sending nothing."""


@dataclass(frozen=True)
class SendThenReset:
    """Send the message (keeping the answer under its key), then reset without answering."""


@dataclass(frozen=True)
class SentEmail:
    """One message the fake really sent: the id it answered, the parsed body, the key if any."""

    id: str
    message: dict[str, Any]
    idempotency_key: str | None


@dataclass
class _Claim:
    """An idempotency key: in flight (``response`` None, ``owner`` set) or done."""

    fingerprint: str
    owner: Recorded | None
    response: _Response | None = None
    stored_at: float = 0.0


def _resend_error(status: int, name: str, message: str | None = None) -> _Response:
    text = _MESSAGES.get(name, _phrase(status)) if message is None else message
    return _json_response(status, {"statusCode": status, "name": name, "message": text})


def _invalid(field: str, detail: str) -> _Response:
    return _resend_error(422, "validation_error", f"Invalid `{field}` field. {detail}")


# ---------------------------------------------------------------- the body's rules


def _address_problem(field: str, value: Any, max_items: int | None = None) -> _Response | None:
    """A string or a list of strings, each ``email@example.com`` or ``Name <email@...>``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return _invalid(field, "It must be a string or an array of strings.")
    if field == "to" and not items:
        return _invalid(field, "It must hold at least one address.")
    if max_items is not None and len(items) > max_items:
        return _invalid(field, f"It may hold at most {max_items} addresses.")
    if not all(_NAMED_ADDRESS.fullmatch(item) for item in items):
        return _invalid(field, _ADDRESS_FORMAT)
    return None


def _tags_problem(tags: Any) -> _Response | None:
    if not isinstance(tags, list):
        return _invalid("tags", "It must be an array of `{name, value}` objects.")
    for tag in tags:
        parts = [tag.get("name"), tag.get("value")] if isinstance(tag, dict) else [None]
        if not all(isinstance(part, str) and _TAG_PART.fullmatch(part) for part in parts):
            return _invalid("tags", "A tag's name and value can only contain ASCII letters, "
                                    "numbers, underscores, or dashes, and at most 256 characters.")
    return None


def _attachments_problem(attachments: Any) -> _Response | None:
    if not isinstance(attachments, list) or not all(isinstance(a, dict) for a in attachments):
        return _invalid("attachments", "It must be an array of objects.")
    for attachment in attachments:
        content, path = attachment.get("content"), attachment.get("path")
        if content is None and path is None:
            return _resend_error(422, "invalid_attachment")
        strings = ("filename", "content", "path", "content_type", "content_id")
        if any(not isinstance(attachment.get(key), (str, type(None))) for key in strings):
            return _invalid("attachments", "Its fields must be strings.")
        if content is not None and not attachment.get("filename"):
            return _invalid("attachments", "An attachment with `content` needs a `filename`.")
        try:
            base64.b64decode(content or "", validate=True)
        except (binascii.Error, ValueError):
            return _invalid("attachments", "`content` must be base64.")
    return None


def _message_problem(message: Mapping[str, Any]) -> _Response | None:
    """Resend's answer to the first problem of a SendEmailRequest, or None."""
    for field in _REQUIRED:
        if message.get(field) is None:
            return _resend_error(422, "missing_required_field", f"Missing `{field}` field.")
    if not isinstance(message["from"], str) or not _NAMED_ADDRESS.fullmatch(message["from"]):
        return _invalid("from", _ADDRESS_FORMAT)
    problem = _address_problem("to", message["to"], _MAX_TO)
    for field in _ADDRESS_LISTS:
        if problem is None and message.get(field) is not None:
            problem = _address_problem(field, message[field])
    if problem is not None:
        return problem
    for field in ("subject", "text", "html"):
        if message.get(field) is not None and not isinstance(message[field], str):
            return _invalid(field, "It must be a string.")
    headers = message.get("headers")
    if headers is not None and not (isinstance(headers, dict)
                                    and all(isinstance(v, str) for v in headers.values())):
        return _invalid("headers", "It must be an object of strings.")
    if message.get("tags") is not None:
        problem = _tags_problem(message["tags"])
    if problem is None and message.get("attachments") is not None:
        problem = _attachments_problem(message["attachments"])
    return problem


# ---------------------------------------------------------------- the fake


class FakeResend(_FakeProvider):
    """Strict fake of Resend's ``POST /emails`` with its idempotency keys (see the module).

    ``clock`` (seconds, default time.monotonic) dates the kept answers; ``bad_key_error`` is the
    (name, status) a wrong key gets. ``sent`` lists what was really sent, ``held`` counts requests
    waiting on a ``Hold``; ``release()`` lets them go.
    """

    def __init__(self, api_key: str = "re_secret", ssl_context: ssl.SSLContext | None = None,
                 keep_alive: bool = True, clock: Callable[[], float] = time.monotonic,
                 bad_key_error: tuple[str, int] = ("invalid_api_key", 403),
                 max_body: int = 40 * 1024 * 1024) -> None:
        self.api_key = api_key
        self.clock = clock
        self.bad_key_error = bad_key_error
        self._sent: list[SentEmail] = []
        self._claims: dict[str, _Claim] = {}
        self._held: list[threading.Event] = []
        super().__init__(ssl_context=ssl_context, keep_alive=keep_alive, max_body=max_body)

    # -- public API

    @staticmethod
    def error(name: str, status: int, message: str | None = None) -> Status:
        """A scripted error reply ``{"statusCode": status, "name": name, "message": ...}``."""
        text = _MESSAGES.get(name, _phrase(status)) if message is None else message
        return Status(status, body={"statusCode": status, "name": name, "message": text})

    @property
    def sent(self) -> list[SentEmail]:
        """Snapshot of the messages actually sent, oldest first (replays add nothing)."""
        with self._lock:
            return list(self._sent)

    @property
    def held(self) -> int:
        """Number of requests waiting on a ``Hold`` right now."""
        with self._lock:
            return len(self._held)

    def script(self, *behaviours: Behaviour | Hold | SendThenReset) -> None:
        """Queue behaviours, Resend's own included; each incoming request pops one (FIFO)."""
        with self._lock:
            self._script.extend(behaviours)  # type: ignore[arg-type]

    def wait_for_held(self, n: int, timeout: float = 5.0) -> bool:
        """Block until ``n`` requests are held (their keys in flight); False on timeout."""
        with self._hit:
            return self._hit.wait_for(lambda: len(self._held) >= n, timeout)

    def release(self) -> None:
        """Let every held request go on: it sends and answers normally."""
        with self._lock:
            held, self._held = self._held, []
        for event in held:
            event.set()

    def reset(self) -> None:
        """Also forget what was sent and every idempotency key."""
        super().reset()
        with self._lock:
            self._sent.clear()
            self._claims.clear()

    def close(self) -> None:
        self._stop.set()  # held requests, once released, answer without sending...
        self.release()  # ...and must end for close() to join their threads
        super().close()

    # -- behaviours of this fake

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes, *,
                scripted: bool) -> tuple[Recorded, int, Behaviour | None]:
        rec, generation, behaviour = super()._record(method, path, headers, body,
                                                     scripted=scripted)
        if isinstance(behaviour, SendThenReset):
            self._strict(rec)  # sends, and keeps the answer under the key...
            behaviour = ResetBeforeResponse()  # ...which the client never sees
        return rec, generation, behaviour

    def _decide(self, rec: Recorded, behaviour: Behaviour | None) -> _Response:
        if isinstance(behaviour, Hold):
            self._hold(rec)
            if self._stop.is_set():
                return self._finish(_resend_error(500, "application_error"))
            behaviour = None
        return super()._decide(rec, behaviour)

    def _hold(self, rec: Recorded) -> None:
        key = rec.headers.get("idempotency-key")
        if key is not None and self._problem(rec) is None:
            self._claim(rec, key)  # in flight from now on (unless it is a replay or a 409)
        released = threading.Event()
        with self._hit:
            self._held.append(released)
            self._hit.notify_all()
        released.wait()

    # -- the contract

    def _parse(self, headers: Mapping[str, str], body: bytes) -> Any:
        return json_body(body)

    def _strict(self, rec: Recorded) -> _Response:
        problem = self._problem(rec)
        if problem is not None:
            return problem
        key = rec.headers.get("idempotency-key")
        if key is None:
            return self._send(rec, None)
        earlier = self._claim(rec, key)
        if earlier is not None:
            return earlier
        response = self._send(rec, key)
        self._keep(key, response)
        return response

    def _problem(self, rec: Recorded) -> _Response | None:
        """The error for a request that must not reach sending, or None."""
        if len(rec.body) > self.max_body:
            return _nginx(413)
        if urllib.parse.urlsplit(rec.path).path != "/emails":
            return _resend_error(404, "not_found")
        if rec.method != "POST":
            return _resend_error(405, "method_not_allowed")
        scheme, _, key = rec.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return _resend_error(401, "missing_api_key")
        if key.strip() != self.api_key:
            return _resend_error(self.bad_key_error[1], self.bad_key_error[0])
        idempotency_key = rec.headers.get("idempotency-key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 256:
            return _resend_error(400, "invalid_idempotency_key")
        if _media_type(rec.headers) != JSON:
            return _resend_error(400, "validation_error", "Content-Type must be application/json.")
        if not isinstance(rec.fields, dict):
            return _resend_error(400, "validation_error", "The body must be a JSON object.")
        return _message_problem(rec.fields)

    def _send(self, rec: Recorded, key: str | None) -> _Response:
        sent = SentEmail(str(uuid.uuid4()), rec.fields, key)
        with self._lock:
            self._sent.append(sent)
        return _json_response(200, {"id": sent.id})

    def _claim(self, rec: Recorded, key: str) -> _Response | None:
        """None if ``rec`` may send under ``key`` (now in flight); else the answer it gets."""
        fingerprint = json.dumps(rec.fields, sort_keys=True, separators=(",", ":"))
        now = self.clock()
        with self._lock:
            claim = self._claims.get(key)
            if claim is not None and claim.response is not None \
                    and now - claim.stored_at >= IDEMPOTENCY_TTL:
                claim = None  # expired: the key is new again
            if claim is None:
                self._claims[key] = _Claim(fingerprint, owner=rec)
                return None
            if claim.response is None:
                return None if claim.owner is rec else _resend_error(
                    409, "concurrent_idempotent_requests")
            if claim.fingerprint != fingerprint:
                return _resend_error(409, "invalid_idempotent_request")
            return claim.response

    def _keep(self, key: str, response: _Response) -> None:
        """Keep the answer to a send under ``key`` for IDEMPOTENCY_TTL from now.

        Errors never get here: a scripted error status skips ``_strict``, and a request that
        fails the checks is refused before it claims a key.
        """
        now = self.clock()
        with self._lock:
            claim = self._claims.get(key)
            if claim is not None:  # None only when reset() ran while this request was sending
                claim.response, claim.owner, claim.stored_at = response, None, now

    def _canned(self, code: int) -> _Response:
        if code == 413:
            return _nginx(413)
        name = _NAME_FOR_STATUS.get(code, _phrase(code).lower().replace(" ", "_"))
        return _resend_error(code, name)

    def _malformed(self) -> _Response:
        return _Response(200, {"Content-Type": "text/html"}, b"<html>ok</html>")

    def _extra_headers(self, status: int) -> dict[str, str]:
        headers = {"ratelimit-limit": str(_RATE_LIMIT),
                   "ratelimit-remaining": "0" if status == 429 else str(_RATE_LIMIT - 1),
                   "ratelimit-reset": "1"}
        if status == 429:
            headers["retry-after"] = "1"
        return headers
