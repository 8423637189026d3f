"""Strict fake of Postmark's ``POST /email`` for smsp's tests (standard library only).

Built on the framework in fakes.py: a real HTTP server on 127.0.0.1, port 0, that records every
request and can be scripted (``Status``, ``Delay``, ``Drip``, ``ResetBeforeResponse``, ...)::

    with FakePostmark(server_token="pm-secret") as pm:
        pm.script(FakePostmark.error(406), FakePostmark.error(100))
        ...point the code under test at pm.url...
        assert pm.accepted[0]["To"] == '"Bob" <bob@example.org>'

What it checks, in order, and where each rule comes from (docs/postmark-error-codes.md cites
the pages):

1. body size (``max_body``, default 10 MB: the overview page's limit for the Email API) -> 413;
   path ``/email`` -> 404 and method POST -> 405 (nginx HTML pages; the real bodies are
   unconfirmed);
2. ``X-Postmark-Server-Token`` equal to ``server_token``; the overview page says header name and
   value are case-insensitive -> 401 ``{"ErrorCode": 10, ...}``;
3. ``Accept`` and ``Content-Type`` both ``application/json`` -> 415. Postmark's status notice of
   2023-11-28 gives the 415; the body carrying ErrorCode 409 ("JSON required") is an assumption;
4. a UTF-8 JSON body -> 422 ErrorCode 402 "Invalid JSON";
5. the body is an object whose keys are SendEmailRequest fields (the published excerpt, plus
   Metadata and MessageStream as in the official SDK), each of its type (strings; TrackOpens a
   boolean; TrackLinks one of its enum; Headers ``[{Name, Value}]``; Attachments
   ``[{Name, Content, ContentType, ContentID}]``; Metadata an object of strings); ``null`` counts
   as absent -> 422 ErrorCode 403 "Invalid request field(s) - <field>" (the status notice);
6. the message (422 ErrorCode 300): every address field parsed with email.utils.getaddresses,
   each address checked against the mailbox and domain patterns of Postmark's support article on
   ErrorCode 300 (an unquoted comma in a display name splits it and is refused, as there); From is
   exactly one address; To has at least one; at most 50 recipients across To, Cc and Bcc; a
   non-empty TextBody or HtmlBody; Tag at most 1000 characters; attachments with a Name, a
   ContentType and a Content that is strict base64; headers with a Name;
7. the sender against ``sender_signatures`` (None allows any) -> 422 ErrorCode 400.

Success is 200 ``{"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}``;
``MessageID`` is a fresh UUID. ``Recorded.fields`` and ``accepted`` hold the parsed JSON.
``FakePostmark.error(code)`` scripts a reply with Postmark's body shape for any code in
``ERROR_CODES``; ``Status(500)`` is a plain 500 without an ErrorCode, ``Status(503)`` the
maintenance reply (ErrorCode 100). Thread-safe like every fake in fakes.py.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import re
import ssl
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

from fakes import (
    json_body,
    JSON,
    TEXT,
    Recorded,
    Status,
    _accepts_json,
    _FakeProvider,
    _json_response,
    _media_type,
    _nginx,
    _Response,
)

__all__ = ["ERROR_CODES", "FakePostmark"]

# The API error codes smsp classifies, with the meaning Postmark's API overview gives them
# (docs/postmark-error-codes.md), and the HTTP status each comes with.
ERROR_CODES: dict[int, tuple[int, str]] = {
    10: (401, "Bad or missing API token"),
    100: (503, "Maintenance"),
    300: (422, "Invalid email request"),
    400: (422, "Sender Signature not found"),
    401: (422, "Sender signature not confirmed"),
    402: (422, "Invalid JSON"),
    403: (422, "Incompatible JSON"),
    405: (422, "Not allowed to send"),
    406: (422, "You tried to send to a recipient that has been marked as inactive. Found "
               "inactive addresses: rcpt@example.org. Inactive recipients are ones that have "
               "generated a hard bounce or a spam complaint."),
    409: (415, "JSON required: send 'Accept: application/json' and "
               "'Content-Type: application/json'."),
    411: (422, "Forbidden attachment type"),
    412: (422, "Account is Pending"),
    413: (422, "Account May Not Send"),
    429: (429, "Rate Limit Exceeded"),
}

_STRING_FIELDS = ("From", "To", "Cc", "Bcc", "Subject", "Tag", "HtmlBody", "TextBody",
                  "ReplyTo", "MessageStream")
_TRACK_LINKS = ("None", "HtmlAndText", "HtmlOnly", "TextOnly")
_ATTACHMENT_FIELDS = ("Name", "Content", "ContentType", "ContentID")
_ADDRESS_FIELDS = ("From", "To", "Cc", "Bcc", "ReplyTo")
_MAX_RECIPIENTS = 50
_MAX_TAG = 1000
# Postmark's own address patterns (support article 1180, "What does ErrorCode 300 mean?"). The
# mailbox pattern is written lower-case there; it is applied case-insensitively here, since
# Postmark accepts upper-case local parts.
_MAILBOX = re.compile(r"[a-z0-9.!#$%&'`*+\-/=^_{}|~]+", re.IGNORECASE)
_DOMAIN = re.compile(r"(\.?[a-zA-Z0-9\-])+")
_MISSING_TOKEN = ("No Account or Server API tokens were supplied in the HTTP headers. Please add "
                  "a header for either X-Postmark-Server-Token or X-Postmark-Account-Token.")
_BAD_TOKEN = ("The Server API Token you provided in the X-Postmark-Server-Token request header "
              "was invalid. Please verify that you are using a valid token.")


def _pm_error(code: int, message: str | None = None, http_status: int | None = None,
              ) -> _Response:
    status, meaning = ERROR_CODES.get(code, (422, "Invalid email request"))
    return _json_response(status if http_status is None else http_status,
                          {"ErrorCode": code, "Message": meaning if message is None else message})


# ---------------------------------------------------------------- field types (ErrorCode 403)


def _type_problem(message: Mapping[str, Any]) -> str | None:
    """The first field of ``message`` that is unknown or of the wrong type, or None."""
    for name, value in message.items():
        if value is None:
            continue
        if name in _STRING_FIELDS:
            ok = isinstance(value, str)
        elif name == "TrackOpens":
            ok = isinstance(value, bool)
        elif name == "TrackLinks":
            ok = value in _TRACK_LINKS
        elif name == "Metadata":
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        elif name in ("Headers", "Attachments"):
            fields = ("Name", "Value") if name == "Headers" else _ATTACHMENT_FIELDS
            problem = _list_problem(name, value, fields)
            if problem is not None:
                return problem
            ok = True
        else:
            ok = False  # not a SendEmailRequest field
        if not ok:
            return name
    return None


def _list_problem(name: str, value: Any, fields: tuple[str, ...]) -> str | None:
    """The first bad item of a Headers/Attachments list: an object of string ``fields``."""
    if not isinstance(value, list):
        return name
    for n, item in enumerate(value):
        if not isinstance(item, dict):
            return f"{name}[{n}]"
        for key, field_value in item.items():
            if key not in fields or not isinstance(field_value, (str, type(None))):
                return f"{name}[{n}].{key}"
    return None


# ---------------------------------------------------------------- the message (ErrorCode 300)


def _illegal_address(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return not (at and _MAILBOX.fullmatch(local) and _DOMAIN.fullmatch(domain))


def _addresses(field: str, value: str) -> tuple[list[str], str | None]:
    """The addresses in one header value, or Postmark's 300 message for the first bad one."""
    found = [address for _name, address in email.utils.getaddresses([value])]
    for address in found:
        # getaddresses mends some damage (it drops spaces and comments inside an address);
        # an address that is not in the header verbatim was mended, and Postmark refuses it.
        if _illegal_address(address) or address not in value:
            reason = "" if "@" in address else " It must contain the '@' symbol."
            return [], f"Error parsing '{field}': Illegal email address '{address}'.{reason}"
    return found, None


def _address_problem(message: Mapping[str, Any]) -> str | None:
    recipients = 0
    for field in _ADDRESS_FIELDS:
        found, problem = _addresses(field, message.get(field) or "")
        if problem is not None:
            return problem
        if field == "From" and len(found) != 1:
            return f"Invalid 'From' address: '{message.get('From') or ''}'."
        if field == "To" and not found:
            return "Zero recipients specified"
        if field in ("To", "Cc", "Bcc"):
            recipients += len(found)
    if recipients > _MAX_RECIPIENTS:
        return f"Maximum of {_MAX_RECIPIENTS} recipients allowed per email message"
    return None


def _attachment_problem(attachments: list[dict[str, Any]]) -> str | None:
    for n, attachment in enumerate(attachments):
        for key in ("Name", "ContentType", "Content"):
            if not attachment.get(key):
                return f"Attachment {n}: '{key}' is required."
        try:
            base64.b64decode(attachment["Content"], validate=True)
        except (binascii.Error, ValueError):
            return f"Attachment {n} ('{attachment['Name']}'): Content is not valid base64."
    return None


def _message_problem(message: Mapping[str, Any]) -> str | None:
    """Postmark's ErrorCode 300 message for the first problem in ``message``, or None."""
    problem = _address_problem(message)
    if problem is not None:
        return problem
    if not (message.get("TextBody") or message.get("HtmlBody")):
        return "Provide either email TextBody or HtmlBody or both."
    if len(message.get("Tag") or "") > _MAX_TAG:
        return f"The Tag is too long: it may have at most {_MAX_TAG} characters."
    if any(not header.get("Name") for header in message.get("Headers") or []):
        return "Every header needs a Name."
    return _attachment_problem(message.get("Attachments") or [])


# ---------------------------------------------------------------- the fake


TEST_TOKEN = "POSTMARK_API_TEST"  # validates the request, sends nothing (overview page)


class FakePostmark(_FakeProvider):
    """Strict fake of Postmark's ``POST /email`` (the module docstring lists its checks).

    ``sender_signatures`` (None: any sender) is the set of confirmed From addresses; another
    sender gets ErrorCode 400. ``accepted`` holds the parsed JSON bodies answered with a 2xx.
    """

    def __init__(self, server_token: str = "pm-secret", ssl_context: ssl.SSLContext | None = None,
                 keep_alive: bool = True, sender_signatures: set[str] | None = None,
                 max_body: int = 10 * 1024 * 1024) -> None:
        self.server_token = server_token
        self.sender_signatures = (None if sender_signatures is None
                                  else {sender.lower() for sender in sender_signatures})
        super().__init__(ssl_context=ssl_context, keep_alive=keep_alive, max_body=max_body)

    @staticmethod
    def error(code: int, http_status: int | None = None) -> Status:
        """A scripted reply with ErrorCode ``code`` in Postmark's body shape.

        ``http_status`` defaults to the status Postmark pairs with the code (ERROR_CODES: 401
        for 10, 503 for 100, 429 for 429, 415 for 409, else 422). Only codes in ERROR_CODES are
        allowed, so a test cannot script a code nobody has confirmed.
        """
        if code not in ERROR_CODES:
            raise ValueError(f"ErrorCode {code} is not in fake_postmark.ERROR_CODES")
        status, message = ERROR_CODES[code]
        return Status(status if http_status is None else http_status,
                      body={"ErrorCode": code, "Message": message})

    def _parse(self, headers: Mapping[str, str], body: bytes) -> Any:
        return json_body(body)

    def _strict(self, rec: Recorded) -> _Response:
        problem = self._transport_problem(rec)
        if problem is not None:
            return problem
        if rec.fields is None:
            return _pm_error(402)
        if not isinstance(rec.fields, dict):
            return _pm_error(403, "Invalid request field(s) - the body must be a JSON object")
        bad_field = _type_problem(rec.fields)
        if bad_field is not None:
            return _pm_error(403, f"Invalid request field(s) - {bad_field}")
        message = _message_problem(rec.fields)
        if message is not None:
            return _pm_error(300, message)
        sender = email.utils.getaddresses([rec.fields["From"]])[0][1].lower()
        if self.sender_signatures is not None and sender not in self.sender_signatures:
            return _pm_error(400, f"The 'From' address you supplied ({sender}) is not a Sender "
                                  "Signature on your account. Please add and confirm this "
                                  "address in order to be able to use it in the 'From' field "
                                  "of your messages.")
        return _json_response(200, {
            "To": rec.fields["To"],
            "SubmittedAt": datetime.datetime.now(datetime.UTC).isoformat(),
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        })

    def _transport_problem(self, rec: Recorded) -> _Response | None:
        """Size, route, token and media types: everything before the body is read."""
        if len(rec.body) > self.max_body:
            return _nginx(413)
        if urllib.parse.urlsplit(rec.path).path != "/email":
            return _nginx(404)
        if rec.method != "POST":
            return _nginx(405)
        token = rec.headers.get("x-postmark-server-token")
        if not token:
            return _pm_error(10, _MISSING_TOKEN)
        if token.lower() != self.server_token.lower() and token != TEST_TOKEN:
            return _pm_error(10, _BAD_TOKEN)
        if (not _accepts_json(rec.headers.get("accept", ""))
                or _media_type(rec.headers) != JSON):
            return _pm_error(409)
        return None

    def _canned(self, code: int) -> _Response:
        if code == 500:
            # Postmark's published document gives its 500 no body; and its ErrorCodes 500-507
            # belong to the sender-signature API, so a 500 must not carry one.
            return _Response(500, {"Content-Type": TEXT}, b"Internal Server Error")
        by_status = {401: 10, 415: 409, 422: 300, 429: 429, 503: 100}
        if code in by_status:
            return _pm_error(by_status[code], http_status=code)
        return _nginx(code)

    def _malformed(self) -> _Response:
        return _json_response(200, {"ErrorCode": 0, "Message": "OK"})  # no MessageID
