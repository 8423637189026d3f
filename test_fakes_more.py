"""Tests for fake_postmark.py and fake_resend.py: as strict as the real APIs, scripted on cue.

Everything goes over real sockets with http.client (helpers from test_fakes). Resend's
idempotency keys expire on an injected clock; no test sleeps.
"""

from __future__ import annotations

import base64
import copy
import datetime
import http.client
import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from fake_postmark import ERROR_CODES, FakePostmark
from fake_resend import IDEMPOTENCY_TTL, FakeResend, Hold, SendThenReset, SentEmail
from fakes import Malformed2xx, ResetBeforeResponse, Status
from test_fakes import Reply, call, connect
from testkit import FakeClock

PM_TOKEN = "0a1b2c3d-POSTMARK-SERVER-TOKEN"
RS_KEY = "re_RESEND-SECRET-5678"
ATTACHMENT = base64.b64encode(b"%PDF-1.4 tiny").decode()
PM_MAIL: dict[str, Any] = {
    "From": '"Alice Sender" <alice@example.com>',
    "To": '"Bob, Jr." <bob@example.org>, carol@example.org',
    "Cc": "dave@example.org",
    "Bcc": "erin@example.org",
    "Subject": "Hello there",
    "TextBody": "line 1\nline 2 é",
    "HtmlBody": "<p>line 1</p>",
    "ReplyTo": "replies@example.com",
    "Headers": [{"Name": "X-Campaign", "Value": "spring"}],
    "Attachments": [{"Name": "a.pdf", "Content": ATTACHMENT, "ContentType": "application/pdf",
                     "ContentID": None}],
    "Tag": "welcome",
    "Metadata": {"order": "42"},
    "TrackOpens": True,
    "MessageStream": "outbound",
}
RS_MAIL: dict[str, Any] = {
    "from": "Alice Sender <alice@example.com>",
    "to": ["bob@example.org", "Carol <carol@example.org>"],
    "cc": "dave@example.org",
    "bcc": ["erin@example.org"],
    "reply_to": "replies@example.com",
    "subject": "Hello there",
    "text": "line 1\nline 2 é",
    "html": "<p>line 1</p>",
    "headers": {"X-Campaign": "spring"},
    "attachments": [{"filename": "a.pdf", "content": ATTACHMENT,
                     "content_type": "application/pdf"}],
    "tags": [{"name": "category", "value": "welcome_1"}],
}


@pytest.fixture
def pm() -> Iterator[FakePostmark]:
    with FakePostmark(server_token=PM_TOKEN) as fake:
        yield fake


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rs(clock: FakeClock) -> Iterator[FakeResend]:
    with FakeResend(api_key=RS_KEY, clock=clock) as fake:
        yield fake


def with_overrides(headers: dict[str, str], overrides: Mapping[str, str] | None,
                   ) -> dict[str, str]:
    """``headers`` updated with ``overrides``; an override of "-" removes that header."""
    headers.update(overrides or {})
    return {name: value for name, value in headers.items() if value != "-"}


def pm_headers(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    return with_overrides({"X-Postmark-Server-Token": PM_TOKEN, "Accept": "application/json",
                           "Content-Type": "application/json"}, overrides)


def pm_send(pm: FakePostmark, mail: Any = None, path: str = "/email", method: str = "POST",
            headers: Mapping[str, str] | None = None) -> Reply:
    body = json.dumps(PM_MAIL if mail is None else mail)
    return call(connect(pm), path, body, pm_headers(headers), method)  # type: ignore[arg-type]


def rs_headers(key: str | None = None, overrides: Mapping[str, str] | None = None,
               ) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {RS_KEY}", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return with_overrides(headers, overrides)


def rs_send(rs: FakeResend, mail: Any = None, key: str | None = None, path: str = "/emails",
            method: str = "POST", timeout: float = 2.0,
            headers: Mapping[str, str] | None = None) -> Reply:
    body = json.dumps(RS_MAIL if mail is None else mail)
    conn = connect(rs, timeout)  # type: ignore[arg-type]
    return call(conn, path, body, rs_headers(key, headers), method)


def changed(mail: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A deep copy of ``mail`` with ``fields`` set (the value ``...`` removes a field)."""
    result = copy.deepcopy(dict(mail))
    for name, value in fields.items():
        if value is ...:
            result.pop(name, None)
        else:
            result[name] = value
    return result


# ---------------------------------------------------------------- Postmark: what it accepts


def test_postmark_accepts_a_full_message_and_answers_its_message_id(pm: FakePostmark) -> None:
    reply = pm_send(pm)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert (body["ErrorCode"], body["Message"], body["To"]) == (0, "OK", PM_MAIL["To"])
    assert uuid.UUID(body["MessageID"])
    assert datetime.datetime.fromisoformat(body["SubmittedAt"]).tzinfo is not None
    assert pm.accepted == [PM_MAIL]
    assert pm.requests[0].headers["x-postmark-server-token"] == PM_TOKEN


def test_postmark_message_ids_are_unique(pm: FakePostmark) -> None:
    ids = {pm_send(pm).json()["MessageID"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("fields", [
    {"To": ", ".join(f"r{n}@example.org" for n in range(48)), "Cc": "c@example.org",
     "Bcc": "b@example.org"},
    {"Tag": "t" * 1000},
    {"TextBody": ..., "HtmlBody": "<p>only html</p>"},
    {"From": "Plain.Name+tag@Example.COM", "Cc": None, "Headers": None, "Attachments": []},
    {"TrackLinks": "HtmlAndText", "Subject": ...},
], ids=["50-recipients", "tag-1000", "html-only", "bare-from-and-nulls", "track-links"])
def test_postmark_accepts_what_the_api_allows(pm: FakePostmark, fields: dict[str, Any]) -> None:
    assert pm_send(pm, changed(PM_MAIL, **fields)).status == 200


def test_postmark_token_is_compared_without_case(pm: FakePostmark) -> None:
    assert pm_send(pm, headers={"X-Postmark-Server-Token": PM_TOKEN.upper()}).status == 200


# ---------------------------------------------------------------- Postmark: what it refuses


@pytest.mark.parametrize("token, wording", [("-", "No Account or Server API tokens"),
                                            ("wrong-token", "was invalid")])
def test_postmark_missing_or_wrong_token_gets_401_error_code_10(pm: FakePostmark, token: str,
                                                                 wording: str) -> None:
    reply = pm_send(pm, headers={"X-Postmark-Server-Token": token})
    assert reply.status == 401
    assert reply.json()["ErrorCode"] == 10
    assert wording in reply.json()["Message"]
    assert pm.accepted == []


@pytest.mark.parametrize("headers", [{"Accept": "-"}, {"Accept": "text/html"},
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "-"}])
def test_postmark_without_json_accept_and_content_type_gets_415(pm: FakePostmark,
                                                                headers: dict[str, str]) -> None:
    reply = pm_send(pm, headers=headers)
    assert reply.status == 415
    assert reply.json()["ErrorCode"] == 409
    assert pm.accepted == []


def test_postmark_body_that_is_not_json_gets_error_code_402(pm: FakePostmark) -> None:
    reply = call(connect(pm), "/email", b'{"From": ', pm_headers())  # type: ignore[arg-type]
    assert (reply.status, reply.json()) == (422, {"ErrorCode": 402, "Message": "Invalid JSON"})


@pytest.mark.parametrize("mail, field", [
    (changed(PM_MAIL, To=["bob@example.org"]), "To"),
    (changed(PM_MAIL, TrackOpens="yes"), "TrackOpens"),
    (changed(PM_MAIL, TrackLinks="Always"), "TrackLinks"),
    (changed(PM_MAIL, Headers=[{"Name": "X-A", "Value": 1}]), "Headers[0].Value"),
    (changed(PM_MAIL, Headers={"X-A": "1"}), "Headers"),
    (changed(PM_MAIL, Attachments=[{"Name": "a", "Size": "1"}]), "Attachments[0].Size"),
    (changed(PM_MAIL, Attachments=["a.pdf"]), "Attachments[0]"),
    (changed(PM_MAIL, Metadata={"order": 42}), "Metadata"),
    (changed(PM_MAIL, Tags=["a", "b"]), "Tags"),
    ([PM_MAIL], "the body must be a JSON object"),
], ids=["to-array", "track-opens", "track-links", "header-value", "headers-object",
        "attachment-field", "attachment-string", "metadata-number", "unknown-field", "array"])
def test_postmark_wrong_field_gets_error_code_403_naming_it(pm: FakePostmark, mail: Any,
                                                            field: str) -> None:
    reply = pm_send(pm, mail)
    assert reply.status == 422
    assert reply.json() == {"ErrorCode": 403, "Message": f"Invalid request field(s) - {field}"}
    assert pm.accepted == []


@pytest.mark.parametrize("fields, wording", [
    ({"From": ...}, "Invalid 'From' address: ''"),
    ({"From": "a@example.com, b@example.com"}, "Invalid 'From' address"),
    ({"From": "alice"}, "Error parsing 'From': Illegal email address 'alice'. It must contain"),
    ({"To": ...}, "Zero recipients specified"),
    ({"To": "bob@example.org, not-an-address"}, "Error parsing 'To': Illegal email address"),
    ({"To": "Bob Smith, Jr. <bob@example.org>"}, "Error parsing 'To': Illegal email address"),
    ({"To": "bob@exa mple.org"}, "Error parsing 'To'"),
    ({"To": "Bob <b(note)ob@example.org>"}, "Error parsing 'To'"),
    ({"To": "bob@[127.0.0.1]"}, "Error parsing 'To'"),
    ({"To": "zoë@example.org"}, "Error parsing 'To'"),
    ({"Cc": "dave@@example.org"}, "Error parsing 'Cc'"),
    ({"Bcc": "erin"}, "Error parsing 'Bcc'"),
    ({"ReplyTo": "replies"}, "Error parsing 'ReplyTo'"),
    ({"To": ", ".join(f"r{n}@example.org" for n in range(49)), "Cc": "c@example.org",
      "Bcc": "b@example.org"}, "Maximum of 50 recipients allowed per email message"),
    ({"TextBody": ..., "HtmlBody": ...}, "Provide either email TextBody or HtmlBody or both."),
    ({"TextBody": "", "HtmlBody": None}, "Provide either email TextBody or HtmlBody or both."),
    ({"Tag": "t" * 1001}, "at most 1000 characters"),
    ({"Headers": [{"Name": "", "Value": "x"}]}, "Every header needs a Name."),
    ({"Attachments": [{"Name": "a.pdf", "Content": "not base64!", "ContentType": "x/y"}]},
     "Content is not valid base64"),
    ({"Attachments": [{"Name": "a.pdf", "Content": ATTACHMENT}]}, "'ContentType' is required"),
], ids=["no-from", "two-froms", "from-no-at", "no-to", "to-no-at", "unquoted-comma",
        "space-in-domain", "comment", "ip-literal", "non-ascii-mailbox", "cc-double-at", "bcc",
        "reply-to", "51-recipients", "no-body", "empty-body", "long-tag", "header-name",
        "bad-base64", "no-content-type"])
def test_postmark_bad_message_gets_error_code_300(pm: FakePostmark, fields: dict[str, Any],
                                                  wording: str) -> None:
    reply = pm_send(pm, changed(PM_MAIL, **fields))
    assert reply.status == 422
    assert reply.json()["ErrorCode"] == 300
    assert wording in reply.json()["Message"]
    assert pm.accepted == []


def test_postmark_sender_without_signature_gets_error_code_400() -> None:
    with FakePostmark(server_token=PM_TOKEN, sender_signatures={"Alice@Example.com"}) as pm:
        assert pm_send(pm).status == 200
        reply = pm_send(pm, changed(PM_MAIL, From="mallory@example.com"))
    assert reply.status == 422
    assert reply.json()["ErrorCode"] == 400
    assert "mallory@example.com" in reply.json()["Message"]
    assert len(pm.accepted) == 1


def test_postmark_unknown_route_404_and_wrong_method_405(pm: FakePostmark) -> None:
    assert pm_send(pm, path="/emails").status == 404
    assert pm_send(pm, method="PUT").status == 405
    assert pm.accepted == []


def test_postmark_body_over_limit_gets_413() -> None:
    with FakePostmark(server_token=PM_TOKEN, max_body=512) as pm:
        reply = pm_send(pm, changed(PM_MAIL, TextBody="x" * 600))
    assert reply.status == 413
    assert pm.accepted == []


# ---------------------------------------------------------------- Postmark: scripted replies


@pytest.mark.parametrize("code, http_status", [
    (10, 401), (100, 503), (300, 422), (400, 422), (401, 422), (405, 422), (406, 422),
    (411, 422), (412, 422), (413, 422), (429, 429),
])
def test_postmark_error_helper_has_the_real_status_and_body(pm: FakePostmark, code: int,
                                                            http_status: int) -> None:
    pm.script(FakePostmark.error(code))
    reply = pm_send(pm)
    assert reply.status == http_status
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {"ErrorCode": code, "Message": ERROR_CODES[code][1]}
    assert pm.accepted == []
    assert pm_send(pm).status == 200  # the script is spent


def test_postmark_error_helper_takes_another_status(pm: FakePostmark) -> None:
    pm.script(FakePostmark.error(406, http_status=400))
    assert pm_send(pm).status == 400


def test_postmark_error_helper_refuses_codes_nobody_confirmed() -> None:
    for code in (1235, 1236, 101, 500):
        with pytest.raises(ValueError, match=str(code)):
            FakePostmark.error(code)


def test_postmark_plain_500_carries_no_error_code(pm: FakePostmark) -> None:
    pm.script(Status(500))
    reply = pm_send(pm)
    assert (reply.status, reply.body) == (500, b"Internal Server Error")
    assert reply.headers["Content-Type"].startswith("text/plain")


def test_postmark_status_503_is_the_maintenance_reply(pm: FakePostmark) -> None:
    pm.script(Status(503))
    reply = pm_send(pm)
    assert (reply.status, reply.json()["ErrorCode"]) == (503, 100)


def test_postmark_malformed_2xx_has_no_message_id_but_counts(pm: FakePostmark) -> None:
    pm.script(Malformed2xx())
    reply = pm_send(pm)
    assert reply.status == 200
    assert "MessageID" not in reply.json()
    assert pm.accepted == [PM_MAIL]


# ---------------------------------------------------------------- Resend: what it accepts


def test_resend_accepts_a_full_message_and_answers_a_uuid(rs: FakeResend) -> None:
    reply = rs_send(rs)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    email_id = reply.json()["id"]
    assert uuid.UUID(email_id)
    assert rs.sent == [SentEmail(email_id, RS_MAIL, None)]
    assert rs.accepted == [RS_MAIL]
    assert (reply.headers["ratelimit-limit"], reply.headers["ratelimit-remaining"]) == ("2", "1")


@pytest.mark.parametrize("fields", [
    {"to": "bob@example.org", "cc": ..., "bcc": ..., "reply_to": ["a@example.com"]},
    {"to": [f"r{n}@example.org" for n in range(50)]},
    {"tags": [{"name": "n" * 256, "value": "v-_9" * 64}]},
    {"attachments": [{"path": "https://example.com/a.pdf"}], "text": ..., "html": ...},
    {"headers": None, "scheduled_at": "in 1 min", "topic_id": "t"},
], ids=["to-string", "50-to", "tag-256", "attachment-path", "nulls-and-extras"])
def test_resend_accepts_what_the_api_allows(rs: FakeResend, fields: dict[str, Any]) -> None:
    assert rs_send(rs, changed(RS_MAIL, **fields)).status == 200
    assert len(rs.sent) == 1


# ---------------------------------------------------------------- Resend: what it refuses


def assert_resend_error(reply: Reply, status: int, name: str, wording: str = "") -> None:
    assert reply.status == status
    assert reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert set(body) == {"statusCode", "name", "message"}
    assert (body["statusCode"], body["name"]) == (status, name)
    assert wording in body["message"]


@pytest.mark.parametrize("authorization", ["-", "Basic " + RS_KEY, "Bearer "])
def test_resend_without_a_bearer_key_gets_401_missing_api_key(rs: FakeResend,
                                                              authorization: str) -> None:
    reply = rs_send(rs, headers={"Authorization": authorization})
    assert_resend_error(reply, 401, "missing_api_key")
    assert rs.sent == []


def test_resend_wrong_key_gets_403_invalid_api_key(rs: FakeResend) -> None:
    reply = rs_send(rs, headers={"Authorization": "Bearer re_wrong"})
    assert_resend_error(reply, 403, "invalid_api_key")
    assert rs.sent == []


def test_resend_wrong_key_answer_can_follow_the_newer_errors_page() -> None:
    with FakeResend(api_key=RS_KEY, bad_key_error=("validation_error", 401)) as rs:
        reply = rs_send(rs, headers={"Authorization": "Bearer re_wrong"})
    assert_resend_error(reply, 401, "validation_error")


def test_resend_idempotency_key_over_256_chars_gets_400(rs: FakeResend) -> None:
    assert_resend_error(rs_send(rs, key="k" * 257), 400, "invalid_idempotency_key")
    assert rs_send(rs, key="k" * 256).status == 200
    assert len(rs.sent) == 1


def test_resend_non_json_request_gets_400_validation_error(rs: FakeResend) -> None:
    reply = rs_send(rs, headers={"Content-Type": "text/plain"})
    assert_resend_error(reply, 400, "validation_error", "Content-Type")
    reply = call(connect(rs), "/emails", b"[1]", rs_headers())  # type: ignore[arg-type]
    assert_resend_error(reply, 400, "validation_error", "JSON object")
    assert rs.sent == []


@pytest.mark.parametrize("field", ["from", "to", "subject"])
def test_resend_missing_required_field_gets_422(rs: FakeResend, field: str) -> None:
    reply = rs_send(rs, changed(RS_MAIL, **{field: ...}))
    assert_resend_error(reply, 422, "missing_required_field", f"Missing `{field}` field.")
    assert rs.sent == []


@pytest.mark.parametrize("fields, field", [
    ({"from": "alice"}, "from"),
    ({"from": ["alice@example.com"]}, "from"),
    ({"to": "bob@example.org, carol@example.org"}, "to"),
    ({"to": [f"r{n}@example.org" for n in range(51)]}, "to"),
    ({"to": []}, "to"),
    ({"to": 42}, "to"),
    ({"cc": ["dave@example"]}, "cc"),
    ({"bcc": [1]}, "bcc"),
    ({"reply_to": "replies"}, "reply_to"),
    ({"subject": 7}, "subject"),
    ({"text": ["a"]}, "text"),
    ({"headers": [["X-A", "1"]]}, "headers"),
    ({"headers": {"X-A": 1}}, "headers"),
    ({"tags": [{"name": "has space", "value": "v"}]}, "tags"),
    ({"tags": [{"name": "n" * 257, "value": "v"}]}, "tags"),
    ({"tags": [{"name": "n"}]}, "tags"),
    ({"tags": {"name": "n", "value": "v"}}, "tags"),
    ({"attachments": [{"filename": "a", "content": "not base64!"}]}, "attachments"),
    ({"attachments": [{"content": ATTACHMENT}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content": ATTACHMENT, "content_type": 1}]},
     "attachments"),
], ids=["from-no-at", "from-array", "to-comma-string", "51-to", "to-empty", "to-number",
        "cc-no-dot", "bcc-number", "reply-to", "subject-number", "text-array", "headers-array",
        "header-number", "tag-space", "tag-257", "tag-no-value", "tags-object", "bad-base64",
        "no-filename", "content-type-number"])
def test_resend_invalid_field_gets_422_validation_error_naming_it(
        rs: FakeResend, fields: dict[str, Any], field: str) -> None:
    reply = rs_send(rs, changed(RS_MAIL, **fields))
    assert_resend_error(reply, 422, "validation_error", f"Invalid `{field}` field.")
    assert rs.sent == []


def test_resend_attachment_without_content_or_path_gets_invalid_attachment(
        rs: FakeResend) -> None:
    reply = rs_send(rs, changed(RS_MAIL, attachments=[{"filename": "a.pdf"}]))
    assert_resend_error(reply, 422, "invalid_attachment", "`content` or `path`")
    assert rs.sent == []


def test_resend_unknown_route_404_and_wrong_method_405(rs: FakeResend) -> None:
    assert_resend_error(rs_send(rs, path="/email"), 404, "not_found")
    assert_resend_error(rs_send(rs, method="PUT"), 405, "method_not_allowed")
    assert rs.sent == []


# ---------------------------------------------------------------- Resend: scripted replies


@pytest.mark.parametrize("name, status", [
    ("validation_error", 400), ("missing_api_key", 401), ("invalid_api_key", 403),
    ("validation_error", 403), ("missing_required_field", 422), ("invalid_from_address", 422),
    ("rate_limit_exceeded", 429), ("daily_quota_exceeded", 429), ("application_error", 500),
    ("internal_server_error", 500),
])
def test_resend_error_helper_has_the_real_shape(rs: FakeResend, name: str, status: int) -> None:
    rs.script(FakeResend.error(name, status))
    reply = rs_send(rs, key="k-1")
    assert_resend_error(reply, status, name)
    assert reply.json()["message"]
    assert ("retry-after" in reply.headers) == (status == 429)
    assert rs.sent == []


def test_resend_error_helper_takes_a_message(rs: FakeResend) -> None:
    rs.script(FakeResend.error("validation_error", 403, "The example.com domain is not verified"))
    assert_resend_error(rs_send(rs), 403, "validation_error", "domain is not verified")


def test_resend_status_429_has_rate_limit_headers(rs: FakeResend) -> None:
    rs.script(Status(429))
    reply = rs_send(rs)
    assert_resend_error(reply, 429, "rate_limit_exceeded")
    assert (reply.headers["ratelimit-remaining"], reply.headers["retry-after"]) == ("0", "1")


# ---------------------------------------------------------------- Resend: idempotency


def test_same_key_and_payload_replays_the_first_answer_without_sending(rs: FakeResend) -> None:
    first = rs_send(rs, key="order-1")
    again = rs_send(rs, json.loads(json.dumps(RS_MAIL, sort_keys=True)), key="order-1")
    assert (first.status, again.status) == (200, 200)
    assert again.json() == first.json()
    assert rs.sent == [SentEmail(first.json()["id"], RS_MAIL, "order-1")]
    assert rs.hits == 2


def test_same_key_with_another_payload_gets_409_and_sends_nothing(rs: FakeResend) -> None:
    rs_send(rs, key="order-1")
    reply = rs_send(rs, changed(RS_MAIL, subject="Changed"), key="order-1")
    assert_resend_error(reply, 409, "invalid_idempotent_request")
    assert len(rs.sent) == 1


def test_other_keys_and_no_key_send_every_time(rs: FakeResend) -> None:
    ids = {rs_send(rs, key=key).json()["id"] for key in ("a", "b", None, None)}
    assert len(ids) == 4
    assert [sent.idempotency_key for sent in rs.sent] == ["a", "b", None, None]


def test_key_in_flight_gets_409_concurrent_then_the_first_answer(rs: FakeResend) -> None:
    rs.script(Hold())
    replies: list[Reply] = []
    first = threading.Thread(target=lambda: replies.append(rs_send(rs, key="order-1",
                                                                   timeout=5.0)))
    first.start()
    try:
        assert rs.wait_for_held(1)
        assert_resend_error(rs_send(rs, key="order-1"), 409, "concurrent_idempotent_requests")
        assert_resend_error(rs_send(rs, changed(RS_MAIL, subject="Other"), key="order-1"), 409,
                            "concurrent_idempotent_requests")
        assert rs.sent == []
    finally:
        rs.release()
        first.join(timeout=5.0)
    assert replies[0].status == 200
    assert rs.held == 0
    assert rs_send(rs, key="order-1").json() == replies[0].json()
    assert [sent.id for sent in rs.sent] == [replies[0].json()["id"]]


def test_held_request_without_a_key_answers_once_released(rs: FakeResend) -> None:
    rs.script(Hold())
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(rs_send(rs, timeout=5.0)))
    thread.start()
    assert rs.wait_for_held(1)
    assert rs_send(rs).status == 200  # nothing else waits on the held one
    rs.release()
    thread.join(timeout=5.0)
    assert replies[0].status == 200
    assert len(rs.sent) == 2


def test_sent_then_reset_retry_gets_the_first_id_and_sends_once(rs: FakeResend) -> None:
    rs.script(SendThenReset())
    with pytest.raises(ConnectionResetError):
        rs_send(rs, key="order-1")
    assert len(rs.sent) == 1
    assert rs.requests[0].status is None  # the client saw no status line
    retry = rs_send(rs, key="order-1")
    assert retry.status == 200
    assert retry.json()["id"] == rs.sent[0].id
    assert len(rs.sent) == 1


def test_request_lost_before_processing_leaves_the_key_free(rs: FakeResend) -> None:
    rs.script(ResetBeforeResponse())
    with pytest.raises(ConnectionResetError):
        rs_send(rs, key="order-1")
    assert rs.sent == []
    assert rs_send(rs, changed(RS_MAIL, subject="Other"), key="order-1").status == 200
    assert len(rs.sent) == 1


def test_errors_are_not_kept_under_the_key(rs: FakeResend) -> None:
    rs.script(FakeResend.error("application_error", 500))
    assert rs_send(rs, key="order-1").status == 500
    assert rs_send(rs, changed(RS_MAIL, to="x"), key="order-1").status == 422
    assert rs_send(rs, key="order-1").status == 200
    assert len(rs.sent) == 1


def test_kept_answer_expires_after_24_hours(rs: FakeResend, clock: FakeClock) -> None:
    first = rs_send(rs, key="order-1").json()["id"]
    clock.advance(IDEMPOTENCY_TTL - 1)
    assert rs_send(rs, key="order-1").json()["id"] == first
    assert_resend_error(rs_send(rs, changed(RS_MAIL, subject="Other"), key="order-1"), 409,
                        "invalid_idempotent_request")
    clock.advance(1)
    second = rs_send(rs, changed(RS_MAIL, subject="Other"), key="order-1").json()["id"]
    assert second != first
    assert [sent.id for sent in rs.sent] == [first, second]


def test_reset_forgets_sent_messages_and_keys(rs: FakeResend) -> None:
    rs_send(rs, key="order-1")
    rs.reset()
    assert (rs.sent, rs.hits) == ([], 0)
    assert rs_send(rs, changed(RS_MAIL, subject="Other"), key="order-1").status == 200


def test_close_ends_a_held_request_without_sending() -> None:
    rs = FakeResend(api_key=RS_KEY)
    rs.script(Hold())
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(rs_send(rs, key="order-1", timeout=5.0))
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert rs.wait_for_held(1)
    rs.close()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert rs.sent == []
    assert len(outcome) == 1 and not (isinstance(outcome[0], Reply) and outcome[0].status == 200)
