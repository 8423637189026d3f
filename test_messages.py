"""Rich messages: every new field in each provider's native form, the rules, the old shape.

Each provider test goes through the real server to a strict fake (fakes.py), which refuses
what the provider's published document or official SDK would not send; the test then reads
the field back from what the fake recorded.
"""

import base64
import email.utils
import json
import pathlib
import re
import shutil
import subprocess
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import smsp
from fakes import Recorded
from testkit import Running, make_config, provider_config, running

ROOT = pathlib.Path(__file__).resolve().parent
PDF = b"%PDF-1.4\n" + bytes(range(256)) + b"\r\n--boundary\r\n"  # binary, CRLF, a fake delimiter
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
HTML = '<p>Thanks, <b>Bob</b> <img src="cid:logo"></p>'
BASE = {"fromaddress": "Shop <shop@example.com>", "toaddress": "bob@example.org",
        "subject": "Your receipt", "plaintextbody": "Thanks, Bob"}
ATTACHMENTS = [
    {"filename": "receipt.pdf", "content_type": "application/pdf",
     "content": base64.b64encode(PDF).decode()},
    {"filename": "logo.png", "content_type": "image/png", "content_id": "logo",
     "content": base64.b64encode(PNG).decode()}]
CASES: dict[str, dict[str, Any]] = {
    "toaddress": {"toaddress": ["Bob <bob@example.org>", "carol@example.org"]},
    "ccaddress": {"ccaddress": ["Dan <dan@example.org>", "erin@example.org"]},
    "bccaddress": {"bccaddress": ["audit@example.org"]},
    "htmlbody": {"htmlbody": HTML},
    "replyto": {"replyto": "Help Desk <help@example.com>"},
    "headers": {"headers": {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>",
                            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}},
    "attachments": {"attachments": ATTACHMENTS},
    "tags": {"tags": ["receipt", "shop"]},
    "metadata": {"metadata": {"order": "1234", "customer": "c-9"}},
}


def header_text(text: str) -> str:
    """An address as smsp writes it into header text (Address's own formatting)."""
    return str(smsp.parse_address("test", text))


def files(rec: Recorded) -> list[tuple[str, str, str, bytes]]:
    return [(f.name, f.filename, f.content_type, f.content) for f in rec.fields.files]


def personalization(rec: Recorded) -> dict[str, Any]:
    [only] = rec.fields["personalizations"]
    return only


# What each provider must have received for each field: (what it got, what it should get).
EXPECT: dict[tuple[str, str], Callable[[Recorded], tuple[Any, Any]]] = {
    ("mailgun", "toaddress"): lambda r: (r.fields["to"], [
        header_text("Bob <bob@example.org>"), "carol@example.org"]),
    ("mailgun", "ccaddress"): lambda r: (r.fields["cc"], [
        header_text("Dan <dan@example.org>"), "erin@example.org"]),
    ("mailgun", "bccaddress"): lambda r: (r.fields["bcc"], ["audit@example.org"]),
    ("mailgun", "htmlbody"): lambda r: ((r.fields["text"], r.fields["html"]),
                                        (["Thanks, Bob"], [HTML])),
    ("mailgun", "replyto"): lambda r: (r.fields["h:Reply-To"], [
        header_text("Help Desk <help@example.com>")]),
    ("mailgun", "headers"): lambda r: (
        {k[2:]: v for k, v in r.fields.items() if k.startswith("h:") and k != "h:Reply-To"},
        {k: [v] for k, v in CASES["headers"]["headers"].items()}),
    ("mailgun", "attachments"): lambda r: (
        (r.headers["content-type"].split(";")[0], files(r), r.fields["text"]),
        ("multipart/form-data", [("attachment", "receipt.pdf", "application/pdf", PDF),
                                 ("inline", "logo", "image/png", PNG)], ["Thanks, Bob"])),
    ("mailgun", "tags"): lambda r: (r.fields["o:tag"], ["receipt", "shop"]),
    ("mailgun", "metadata"): lambda r: ((r.fields["v:order"], r.fields["v:customer"]),
                                        (["1234"], ["c-9"])),
    ("sendgrid", "toaddress"): lambda r: (personalization(r), {"to": [
        {"email": "bob@example.org", "name": "Bob"}, {"email": "carol@example.org"}]}),
    ("sendgrid", "ccaddress"): lambda r: (personalization(r), {
        "to": [{"email": "bob@example.org"}],
        "cc": [{"email": "dan@example.org", "name": "Dan"}, {"email": "erin@example.org"}]}),
    ("sendgrid", "bccaddress"): lambda r: (personalization(r), {
        "to": [{"email": "bob@example.org"}], "bcc": [{"email": "audit@example.org"}]}),
    ("sendgrid", "htmlbody"): lambda r: (r.fields["content"], [
        {"type": "text/plain", "value": "Thanks, Bob"}, {"type": "text/html", "value": HTML}]),
    ("sendgrid", "replyto"): lambda r: (r.fields["reply_to"], {
        "email": "help@example.com", "name": "Help Desk"}),
    ("sendgrid", "headers"): lambda r: (r.fields["headers"], CASES["headers"]["headers"]),
    ("sendgrid", "attachments"): lambda r: (r.fields["attachments"], [
        {"content": ATTACHMENTS[0]["content"], "filename": "receipt.pdf",
         "type": "application/pdf", "disposition": "attachment"},
        {"content": ATTACHMENTS[1]["content"], "filename": "logo.png", "type": "image/png",
         "disposition": "inline", "content_id": "logo"}]),
    ("sendgrid", "tags"): lambda r: (r.fields["categories"], ["receipt", "shop"]),
    ("sendgrid", "metadata"): lambda r: (personalization(r).get("custom_args"), {
        "order": "1234", "customer": "c-9"}),
}


def send_through(provider: str, fakes: dict[str, Any], document: dict[str, Any]
                 ) -> Recorded:
    """``document`` sent by smsp through ``provider`` alone; what its strict fake got."""
    config = provider_config(fakes["mailgun"], fakes["sendgrid"], providers=(provider,))
    with running(config) as server:
        status, _, answer = server.send(document)
    assert (status, answer.get("provider")) == (200, provider), answer
    [recorded] = fakes[provider].requests
    assert recorded.status is not None and 200 <= recorded.status < 300  # the fake took it
    return recorded


@pytest.mark.parametrize(("provider", "field"), sorted(EXPECT))
def test_each_new_field_reaches_each_provider_in_its_native_form(
        provider: str, field: str, fakes: dict[str, Any]) -> None:
    got, want = EXPECT[(provider, field)](send_through(provider, fakes, {**BASE, **CASES[field]}))
    assert got == want


def every_field() -> dict[str, Any]:
    document = dict(BASE)
    for extra in CASES.values():
        document.update(extra)
    return document


@pytest.mark.parametrize("provider", ["mailgun", "sendgrid"])
def test_every_field_at_once_reaches_the_provider(provider: str, fakes: dict[str, Any]) -> None:
    recorded = send_through(provider, fakes, every_field())
    for field in CASES:
        if field not in ("toaddress", "ccaddress", "bccaddress"):  # those three share a field
            got, want = EXPECT[(provider, field)](recorded)
            assert got == want, field


def test_mailgun_without_attachments_stays_urlencoded(fakes: dict[str, Any]) -> None:
    document = {k: v for k, v in every_field().items() if k != "attachments"}
    recorded = send_through("mailgun", fakes, document)
    assert recorded.headers["content-type"] == "application/x-www-form-urlencoded"
    pairs = urllib.parse.parse_qsl(recorded.body.decode(), keep_blank_values=True)
    assert [name for name, _ in pairs] == [
        "from", "to", "to", "cc", "cc", "bcc", "subject", "text", "html", "h:Reply-To",
        "h:X-Campaign", "h:List-Unsubscribe", "h:List-Unsubscribe-Post", "o:tag", "o:tag",
        "v:order", "v:customer"]


@pytest.mark.parametrize("provider", ["mailgun", "sendgrid"])
def test_html_alone_is_sent_without_a_text_part(provider: str, fakes: dict[str, Any]) -> None:
    document = {**BASE, "plaintextbody": "", "htmlbody": HTML}
    recorded = send_through(provider, fakes, document)
    if provider == "mailgun":
        assert "text" not in recorded.fields and recorded.fields["html"] == [HTML]
    else:
        assert recorded.fields["content"] == [{"type": "text/html", "value": HTML}]


def test_mailgun_names_an_inline_part_by_its_content_id(fakes: dict[str, Any]) -> None:
    # Mailgun makes an inline part's Content-ID from its file name: cid:logo must find it.
    attachment = {**ATTACHMENTS[1], "filename": "company-logo.png"}
    recorded = send_through("mailgun", fakes, {**BASE, "htmlbody": HTML,
                                               "attachments": [attachment]})
    assert files(recorded) == [("inline", "logo", "image/png", PNG)]


def test_attachment_names_reach_mailgun_quoted_and_intact(fakes: dict[str, Any]) -> None:
    names = {"headers": {'X-Odd"Name\\': "v"}, "metadata": {'k"ey\\': "v"},
             "attachments": [{**ATTACHMENTS[0], "filename": 'Résumé "final".pdf'}]}
    recorded = send_through("mailgun", fakes, {**BASE, **names})
    assert recorded.fields['h:X-Odd"Name\\'] == ["v"] and recorded.fields['v:k"ey\\'] == ["v"]
    assert files(recorded) == [("attachment", 'Résumé "final".pdf', "application/pdf", PDF)]


# ------------------------------------------------------------------ the rules ---


@pytest.fixture
def mock() -> Iterator[Running]:
    with running(make_config()) as server:
        yield server


def addresses(n: int, start: int = 0) -> list[str]:
    return [f"r{k}@example.org" for k in range(start, start + n)]


def attachment(**change: Any) -> dict[str, Any]:
    return {k: v for k, v in {**ATTACHMENTS[0], **change}.items() if v is not None}


RULES: list[tuple[dict[str, Any], str]] = [
    ({"toaddress": addresses(30), "ccaddress": addresses(21, 30)},
     "ccaddress: makes more than 50 recipients in toaddress, ccaddress and bccaddress together"),
    ({"toaddress": addresses(51)}, "toaddress: must hold 1 to 50 addresses"),
    ({"toaddress": []}, "toaddress: must hold 1 to 50 addresses"),
    ({"toaddress": 7}, "toaddress: must be an address or a list of addresses"),
    ({"toaddress": ["a@example.org", "nobody"]}, "toaddress[1]: must be an address like"),
    ({"ccaddress": "dan@example.org"}, "ccaddress: must be a list of addresses"),
    ({"bccaddress": addresses(51)}, "bccaddress: must hold 0 to 50 addresses"),
    ({"bccaddress": ["Bob Again <BOB@Example.org>"]},
     "bccaddress: BOB@Example.org is already a recipient (in toaddress)"),
    ({"ccaddress": ["x@example.org", "X@EXAMPLE.ORG"]},
     "ccaddress: X@EXAMPLE.ORG is already a recipient (in ccaddress)"),
    ({"htmlbody": "a\x00b"}, "htmlbody: must not contain NUL characters"),
    ({"htmlbody": ["<p>"]}, "htmlbody: must be a string"),
    ({"replyto": "help desk"}, "replyto: must be an address like"),
    ({"headers": ["X-A: b"]}, "headers: must be an object of header names and values"),
    ({"headers": {"X-SG-ID": "1"}}, "headers: header 'X-SG-ID' is reserved"),
    ({"headers": {"x-sg-eid": "1"}}, "headers: header 'x-sg-eid' is reserved"),
    ({"headers": {"X-Mailgun-Variables": "{}"}},
     "headers: header 'X-Mailgun-Variables' is reserved"),
    ({"headers": {"From": "boss@example.com"}}, "headers: header 'From' is reserved"),
    ({"headers": {"Importance": "high"}}, "headers: header 'Importance' is not allowed"),
    ({"headers": {"X-": "1"}}, "headers: header 'X-' is not allowed"),
    ({"headers": {"X-A B": "1"}}, "headers: header name 'X-A B' must be 1-64"),
    ({"headers": {"X-A:B": "1"}}, "headers: header name 'X-A:B' must be 1-64"),
    ({"headers": {"X-" + "a" * 63: "1"}}, "headers: header name 'X-aaa"),
    ({"headers": {"X-A": "1", "x-a": "2"}}, "headers: header 'x-a' is given twice"),
    ({"headers": {f"X-{n}": "1" for n in range(11)}}, "headers: must hold at most 10 headers"),
    ({"headers": {"X-A": "one\r\nBcc: spy@example.org"}},
     "headers.X-A: must not contain CR, LF or other control characters"),
    ({"headers": {"X-A": "tab\there"}},
     "headers.X-A: must not contain CR, LF or other control characters"),
    ({"headers": {"X-A": "v" * 999}}, "headers.X-A: must be at most 998 characters"),
    ({"headers": {"X-A": ""}}, "headers.X-A: must not be empty"),
    ({"headers": {"X-A": 5}}, "headers.X-A: must be a string"),
    ({"attachments": {"filename": "a"}}, "attachments: must be a list of attachments"),
    ({"attachments": [attachment()] * 11}, "attachments: must hold at most 10 attachments"),
    ({"attachments": ["JVBERg=="]}, "attachments[0]: must be an object"),
    ({"attachments": [attachment(content="JVBERi0")]},
     "attachments[0].content: must be base64 (RFC 4648) with padding"),
    ({"attachments": [attachment(content="JVBE\nRi0x")]},
     "attachments[0].content: must be base64 (RFC 4648) with padding"),
    ({"attachments": [attachment(content="JVB*Ri0x")]},
     "attachments[0].content: must be base64 (RFC 4648) with padding"),
    ({"attachments": [attachment(content="JVBERi0xLjQ=====")]},
     "attachments[0].content: must be base64 (RFC 4648) with padding"),
    ({"attachments": [attachment(content="")]},
     "attachments[0].content: must be base64 (RFC 4648) with padding, not empty"),
    ({"attachments": [attachment(content=None)]}, "attachments[0].content: is required"),
    ({"attachments": [attachment(filename="../etc/passwd")]},
     "attachments[0].filename: must be a file name without a path separator"),
    ({"attachments": [attachment(filename="dir\\receipt.pdf")]},
     "attachments[0].filename: must be a file name without a path separator"),
    ({"attachments": [attachment(filename="..")]},
     "attachments[0].filename: must be a file name without a path separator"),
    ({"attachments": [attachment(filename="a\r\nb.pdf")]},
     "attachments[0].filename: must be a file name without a path separator or control"),
    ({"attachments": [attachment(filename="a" * 256)]},
     "attachments[0].filename: must be a file name"),
    ({"attachments": [attachment(filename=None)]}, "attachments[0].filename: is required"),
    ({"attachments": [attachment(content_type="pdf")]},
     "attachments[0].content_type: must be a type/subtype pair"),
    ({"attachments": [attachment(content_type="application/pdf; name=x")]},
     "attachments[0].content_type: must be a type/subtype pair"),
    ({"attachments": [attachment(content_id="<logo>")]},
     "attachments[0].content_id: must be letters, digits"),
    ({"attachments": [attachment(content_id="")]},
     "attachments[0].content_id: must be letters, digits"),
    ({"attachments": [attachment(content_id="logo"), attachment(content_id="logo")]},
     "attachments: give each content_id to one attachment only"),
    ({"attachments": [attachment(disposition="inline")]},
     "attachments[0]: has an unknown key 'disposition'"),
    ({"attachments": [attachment(filename=5)]}, "attachments[0].filename: must be a string"),
    ({"tags": "receipt"}, "tags: must be a list of strings"),
    ({"tags": ["a", "b", "c", "d"]}, "tags: must hold at most 3 tags"),
    ({"tags": ["caf\u00e9"]}, "tags[0]: must be 1-128 printable ASCII characters"),
    ({"tags": ["t" * 129]}, "tags[0]: must be 1-128 printable ASCII characters"),
    ({"tags": [""]}, "tags[0]: must be 1-128 printable ASCII characters"),
    ({"tags": [3]}, "tags[0]: must be 1-128 printable ASCII characters"),
    ({"tags": ["a", "a"]}, "tags: must not hold the same tag twice"),
    ({"metadata": ["order"]}, "metadata: must be an object of string keys and string values"),
    ({"metadata": {f"k{n}": "v" for n in range(11)}}, "metadata: must hold at most 10 entries"),
    ({"metadata": {"order": 1234}}, "metadata.order: must be a string"),
    ({"metadata": {"order": "1" * 129}}, "metadata.order: must be at most 128 characters"),
    ({"metadata": {"k" * 129: "v"}}, "metadata key 'kkkk"),
    ({"metadata": {"": "v"}}, "metadata: keys must not be empty"),
    ({"metadata": {"a\nb": "v"}}, "metadata key 'a\\nb': must not contain CR, LF"),
    ({"metadata": {f"key{n}": "v" * 120 for n in range(9)}},
     "metadata: must be at most 1024 bytes of keys and values in all"),
]


@pytest.mark.parametrize(("change", "message"), RULES,
                         ids=[message.split(":")[0] + f"-{n}" for n, (_, message)
                              in enumerate(RULES)])
def test_each_rule_is_a_400_naming_the_field(mock: Running, change: dict[str, Any],
                                             message: str) -> None:
    status, _, answer = mock.send({**BASE, **change})
    assert status == 400 and answer["message"].startswith(message), answer


def test_attachments_over_the_configured_total_are_a_400() -> None:
    with running(make_config(max_attachment_bytes=300)) as server:
        two = [attachment(), attachment(filename="copy.pdf")]  # each of them under 300 bytes
        status, _, answer = server.send({**BASE, "attachments": two})
        assert status == 400
        assert answer["message"] == (f"attachments: decode to {2 * len(PDF)} bytes in all; at "
                                     "most 300 (SMSP_MAX_ATTACHMENT_BYTES)")
        assert server.send({**BASE, "attachments": two[:1]})[0] == 200


def test_the_limits_hold_at_their_edges(mock: Running) -> None:
    edge = {"toaddress": addresses(20), "ccaddress": addresses(20, 20),
            "bccaddress": addresses(10, 40),
            "headers": {f"X-{n}": "v" * 998 for n in range(10)},
            "attachments": [attachment(filename=f"{n}.pdf") for n in range(10)],
            "tags": ["a" * 128, "b", "c"],
            "metadata": {f"k{n}": "v" * (1024 // 10 - 2) for n in range(10)}}
    assert mock.send({**BASE, **edge})[0] == 200


def test_the_body_limit_follows_the_attachment_limit_unless_set() -> None:
    assert make_config(max_attachment_bytes=3 << 20).max_body_bytes == \
        4 * (1 << 20) + (1 << 20)  # 3 MiB as base64 is 4 MiB, plus 1 MiB
    assert make_config(max_attachment_bytes=3 << 20, max_body_bytes=5000).max_body_bytes == 5000


def test_a_body_limit_below_the_attachments_still_bounds_the_body() -> None:
    with running(make_config(max_body_bytes=2000)) as server:
        big = {**BASE, "attachments": [attachment(content=base64.b64encode(
            b"x" * 3000).decode())]}
        assert server.send(big)[0] == 413
        assert server.send({**BASE, "attachments": ATTACHMENTS[:1]})[0] == 200


def test_an_old_four_field_request_keeps_its_meaning() -> None:
    message = smsp.parse_message({**BASE, "htmlbody_typo": "x"})
    assert message.to == (smsp.Address("bob@example.org"),)
    assert (message.cc, message.bcc, message.html, message.attachments) == ((), (), "", ())


# ---------------------------------------------------- nobody can carry it: 422 ---


class NoAttachments(smsp.Provider):
    """A test provider that cannot carry attachments."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.sent: list[smsp.Message] = []

    def cannot_carry(self, message: smsp.Message) -> str | None:
        return "it takes no attachments" if message.attachments else None

    def send(self, message: smsp.Message, deadline: float) -> smsp.Receipt:
        self.sent.append(message)
        return smsp.Receipt(self.name, f"{self.name}-1")


def with_providers(server: Running, *providers: smsp.Provider) -> None:
    lanes = [smsp.Lane(p, smsp.CircuitBreaker(p.name, lambda: None, timer=server.timers,
                                              clock=server.clock)) for p in providers]
    server.service.app.dispatcher = smsp.Dispatcher(
        lanes, timeout=1, log=server.service.log, metrics=server.service.metrics)


def test_a_message_no_provider_can_carry_is_422_with_the_reasons(mock: Running) -> None:
    first, second = NoAttachments("alpha"), NoAttachments("beta")
    with_providers(mock, first, second)
    status, _, answer = mock.send({**BASE, "attachments": ATTACHMENTS[:1]})
    assert status == 422 and answer["delivery"] == "not_sent"
    assert answer["message"] == ("no provider can carry this message: alpha: it takes no "
                                 "attachments; beta: it takes no attachments")
    assert first.sent == second.sent == []
    skipped = mock.lines.events("provider_skipped", at_least=2)
    assert [(e["provider"], e["reason"]) for e in skipped] == [
        ("alpha", "it takes no attachments"), ("beta", "it takes no attachments")]
    metrics = mock.request("GET", "/metrics")[2].decode()
    assert 'smsp_provider_attempts_total{provider="alpha",outcome="skipped"} 1' in metrics
    assert mock.send(BASE)[0] == 200 and len(first.sent) == 1  # without one, alpha takes it


def test_a_message_too_big_for_mailgun_goes_by_sendgrid(fakes: dict[str, Any]) -> None:
    big = smsp.Attachment("big.bin", "application/octet-stream", b"\x01" * 19_000_000)
    message = smsp.Message(smsp.Address("a@example.com"), (smsp.Address("b@example.org"),),
                           "big", "see the file", attachments=(big,))
    with running(provider_config(fakes["mailgun"], fakes["sendgrid"])) as server:
        mailgun = server.service.dispatcher.lanes[0].provider
        assert mailgun.cannot_carry(message) == ("mailgun takes at most 25000000 bytes a "
                                                 f"message, this one is {message.mime_size()} "
                                                 "as MIME")
        receipt = server.service.dispatcher.send(message, "rid")
    assert receipt.provider == "sendgrid" and fakes["mailgun"].hits == 0
    [sent] = fakes["sendgrid"].accepted
    assert base64.b64decode(sent["attachments"][0]["content"]) == big.content


@pytest.mark.parametrize("provider", ["mailgun", "sendgrid"])
def test_provider_bodies_hold_few_copies_of_an_attachment(provider: str,
                                                          fakes: dict[str, Any]) -> None:
    size = 4 << 20
    message = smsp.Message(smsp.Address("a@example.com"), (smsp.Address("b@example.org"),),
                           attachments=(smsp.Attachment("f.bin", "application/octet-stream",
                                                        b"\x02" * size),))
    config = provider_config(fakes["mailgun"], fakes["sendgrid"], providers=(provider,))
    with running(config) as server:
        encoder = server.service.dispatcher.lanes[0].provider
        tracemalloc.start()
        try:
            request = encoder.encode(message)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # Mailgun: the body (1x). SendGrid: the base64 (4/3) and the body holding it (4/3).
    assert len(request.body) >= size and peak < {"mailgun": 1.2, "sendgrid": 2.8}[provider] * size


# ------------------------------------------- the old requests, byte for byte ---

GOLDEN = json.loads((ROOT / "testdata" / "golden-four-field-requests.json").read_text())
VOLATILE = {"host", "content-length"}
ADDRESS_FIELDS = ("from", "to")


def allowed_values(name: str, recorded: str) -> set[str]:
    """The recorded value, and for an address whose display name needs quoting (RFC 5322)
    the form email.utils.formataddr gives it."""
    if name not in ADDRESS_FIELDS:
        return {recorded}
    return {recorded, email.utils.formataddr(email.utils.parseaddr(recorded))}


def assert_same_form(got: bytes, recorded: bytes) -> None:
    if got == recorded:
        return
    got_pairs = urllib.parse.parse_qsl(got.decode("ascii"), keep_blank_values=True)
    want_pairs = urllib.parse.parse_qsl(recorded.decode("ascii"), keep_blank_values=True)
    assert urllib.parse.urlencode(got_pairs).encode() == got  # nothing besides the pairs
    assert [name for name, _ in got_pairs] == [name for name, _ in want_pairs]
    for (name, value), (_, want) in zip(got_pairs, want_pairs, strict=True):
        assert value in allowed_values(name, want), (name, value, want)


@pytest.mark.parametrize(("case", "provider"),
                         [(n, p) for n in range(len(GOLDEN)) for p in ("mailgun", "sendgrid")])
def test_every_recorded_four_field_request_reaches_the_provider_unchanged(
        case: int, provider: str, fakes: dict[str, Any]) -> None:
    golden = GOLDEN[case]
    want = golden[provider]
    recorded = send_through(provider, fakes, golden["request"])
    headers = {k: v for k, v in recorded.headers.items() if k not in VOLATILE}
    assert (recorded.method, recorded.path) == (want["method"], want["path"])
    assert headers == {**want["headers"], "user-agent": smsp.SERVER_NAME}
    body = base64.b64decode(want["body"])
    if provider == "mailgun":
        assert_same_form(recorded.body, body)
    else:
        assert recorded.body == body  # SendGrid takes the name apart from the address


def test_the_golden_file_covers_names_that_need_quoting() -> None:
    names = [email.utils.parseaddr(case["request"][field])
             for case in GOLDEN for field in ("fromaddress", "toaddress")]
    needs = [pair for pair in names if email.utils.formataddr(pair) != (
        f"{pair[0]} <{pair[1]}>" if pair[0] else pair[1])]
    assert ("J. R. Doe", "jr@example.com") in needs and len(needs) >= 3


# ------------------------------------------------------- the OpenAPI document ---


def document() -> dict[str, Any]:
    return smsp.openapi_document(make_config())


def test_the_document_describes_every_field_and_its_first_example_is_four_fields() -> None:
    operation = document()["paths"]["/email"]["post"]["requestBody"]["content"][
        "application/json"]
    schema = document()["components"]["schemas"]["Email"]
    assert list(schema["properties"]) == [field.name for field in smsp.FIELDS]
    first = next(iter(operation["examples"].values()))["value"]
    assert set(first) == {"fromaddress", "toaddress", "subject", "plaintextbody"}


def test_every_example_is_valid_by_the_schema_and_sent(mock: Running) -> None:
    import jsonschema

    doc = document()
    schema = doc["components"]["schemas"]["Email"]
    examples = doc["paths"]["/email"]["post"]["requestBody"]["content"]["application/json"][
        "examples"]
    for example in examples.values():
        jsonschema.validate(example["value"], schema)
        assert mock.send(example["value"])[0] == 200


def patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern":
                yield value
            else:
                yield from patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from patterns(value)


PROBES = ["", "a@example.com", "Name <a@example.com>", "receipt.pdf", "../x", "a\\b", "..",
          "application/pdf", "pdf", "JVBERi0xLjQK", "JVBERi0", "QQ==\n", "logo", "<logo>",
          "caf\u00e9", "tab\there", "line\n", "\u2028", "X-Campaign"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node for ECMA-262 regexes")
def test_every_pattern_reads_alike_in_ecma_262_and_python() -> None:
    found = sorted(set(patterns(document())))
    script = ("const [ps, xs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(ps.map(p => xs.map(x => new RegExp(p).test(x)))));")
    run = subprocess.run(["node", "-e", script], input=json.dumps([found, PROBES]),
                         capture_output=True, text=True, check=True, timeout=60)
    ecma = json.loads(run.stdout)
    python = [[re.search(re.sub(r"\$$", r"\\Z", p), x) is not None for x in PROBES]
              for p in found]
    assert ecma == python
    assert smsp.BASE64_PATTERN in found and smsp.FILENAME_PATTERN in found


def test_the_documented_patterns_are_the_parser_s() -> None:
    schema = document()["components"]["schemas"]["Email"]["properties"]
    item = schema["attachments"]["items"]["properties"]
    assert (item["filename"]["pattern"], item["content_type"]["pattern"],
            item["content"]["pattern"], item["content_id"]["pattern"]) == (
        smsp.FILENAME_PATTERN, smsp.CONTENT_TYPE_PATTERN, smsp.BASE64_PATTERN,
        smsp.CONTENT_ID_PATTERN)
    assert "SMSP_MAX_ATTACHMENT_BYTES" in schema["attachments"]["description"]
