"""Per-provider behaviour, keyed by provider name: a new provider adds a row, not code.

Each row says how to read, from what its strict fake recorded, who a message was
from and to.  The tests here hold every provider to the same contract.
"""

import base64
import dataclasses
import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

import smsp
from fake_postmark import FakePostmark
from fake_resend import FakeResend, Hold, SendThenReset
from fake_ses import FakeSES
from fakes import FakeMailgun, FakeSendGrid, Hang, ResetBeforeResponse, Status
from testkit import API_KEY, MG_KEY, peers_config, provider_config, running, wait_for

POLL_NAMED = "Poll Box <poll@smsp.example.com>"


Parties = list[tuple[str, str]]


def _pairs(*texts: str) -> Parties:
    return email.utils.getaddresses(list(texts))


def _sendgrid(sent: Any) -> tuple[Parties, Parties]:
    def pair(party: dict[str, str]) -> tuple[str, str]:
        return party.get("name", ""), party["email"]
    return [pair(sent["from"])], [pair(p) for p in sent["personalizations"][0]["to"]]


# Who the last message a peer accepted was from and to, as (name, address) pairs.
PARTIES: dict[str, Callable[[Any], tuple[Parties, Parties]]] = {
    "mailgun": lambda sent: (_pairs(*sent["from"]), _pairs(*sent["to"])),
    "sendgrid": _sendgrid,
    "ses": lambda sent: (_pairs(sent["FromEmailAddress"]),
                         _pairs(*sent["Destination"]["ToAddresses"])),
    "postmark": lambda sent: (_pairs(sent["From"]), _pairs(sent["To"])),
    "resend": lambda sent: (_pairs(sent["from"]), _pairs(*sent["to"])),
    "smtp": lambda sent: (_pairs(str(sent.message["From"])), _pairs(str(sent.message["To"]))),
}


def test_every_provider_has_a_row_here() -> None:
    assert set(PARTIES) == set(smsp.PROVIDERS)


@pytest.mark.parametrize("provider", sorted(PARTIES))
def test_poll_message_is_built_from_the_parsed_poll_address(
        provider: str, fakes: dict[str, Any]) -> None:
    peer = fakes[provider]
    peer.script({"final dot": "451 4.3.0 busy"} if provider == "smtp" else Status(500))
    config = peers_config({provider: peer}, poll_address=POLL_NAMED)
    with running(config) as server:
        server.send()
        assert server.states() == {provider: "open"}
        if provider == "smtp":
            peer.server.script.clear()
        server.timers.fire_next()
        assert server.states() == {provider: "closed"}
        assert len(peer.accepted) == 1  # the poll, accepted by the strict peer
    sender, to = PARTIES[provider](peer.accepted[-1])
    assert sender == to == [("Poll Box", "poll@smsp.example.com")]


# ----------------------------------------- Resend: an unknown fate, resolved ---


def mails(resend: FakeResend) -> list[Any]:
    """What Resend really sent, polls left out."""
    return [sent for sent in resend.sent if sent.message["subject"] != "poll"]


def keyed_send(server: Any, key: str) -> tuple[int, dict[str, Any]]:
    status, _, body = server.send(Idempotency_Key=key)
    return status, body


def close_circuit(server: Any, name: str) -> None:
    """Fire the pending poll of an open circuit; its poll succeeds."""
    assert server.states()[name] == "open"
    server.timers.fire_next()
    assert server.states()[name] == "closed"


def test_resend_unknown_then_retry_is_resolved_by_resends_own_key_without_a_second_send(
        resend: FakeResend, mailgun: FakeMailgun) -> None:
    resend.script(SendThenReset())  # Resend sent it, the answer never came back
    with running(peers_config({"resend": resend, "mailgun": mailgun})) as server:
        status, body = keyed_send(server, "order-1")
        assert (status, body["delivery"]) == (502, "unknown")
        assert len(mails(resend)) == 1 and mailgun.hits == 0  # never failed over
        status, body = keyed_send(server, "order-1")  # circuit still open: the stored unknown
        assert (status, body["delivery"]) == (502, "unknown")
        close_circuit(server, "resend")
        status, body = keyed_send(server, "order-1")
        assert (status, body["provider"]) == (200, "resend")
        assert body["message_id"] == mails(resend)[0].id  # Resend's first answer, replayed
        assert len(mails(resend)) == 1 and mailgun.hits == 0
        status, headers, replay = server.send(Idempotency_Key="order-1")
        assert (status, replay, headers.get("idempotent-replayed")) == (200, body, "true")
    sent_keys = {r.headers["idempotency-key"] for r in resend.requests
                 if "idempotency-key" in r.headers}  # the poll carries none
    assert len(sent_keys) == 1  # one derived key, the same every time
    assert sent_keys.pop().startswith("smsp-")


def test_resend_unknown_that_was_never_processed_is_sent_once_on_retry(
        resend: FakeResend, mailgun: FakeMailgun) -> None:
    resend.script(Hang())  # Resend never processed it: nothing sent, the key stays free
    config = peers_config({"resend": resend, "mailgun": mailgun}, timeout=0.3)
    with running(config) as server:
        status, body = keyed_send(server, "order-2")
        assert (status, body["delivery"]) == (504, "unknown") and mails(resend) == []
        close_circuit(server, "resend")
        status, body = keyed_send(server, "order-2")
        assert (status, body["provider"]) == (200, "resend")
        assert len(mails(resend)) == 1 and mailgun.hits == 0


def test_resend_still_busy_with_the_first_send_keeps_the_answer_unknown(
        resend: FakeResend, mailgun: FakeMailgun) -> None:
    resend.script(Hold())  # the first request stays in flight at Resend
    config = peers_config({"resend": resend, "mailgun": mailgun}, timeout=0.3)
    with running(config) as server:
        status, body = keyed_send(server, "order-3")
        assert (status, body["delivery"]) == (504, "unknown")
        assert resend.wait_for_held(1)
        close_circuit(server, "resend")
        status, body = keyed_send(server, "order-3")  # 409 concurrent_idempotent_requests
        assert (status, body["delivery"]) == (502, "unknown")
        assert mailgun.hits == 0 and mails(resend) == []
        resend.release()
        assert wait_for(lambda: len(mails(resend)) == 1)
        close_circuit(server, "resend")  # the 409 counted as a failure
        status, body = keyed_send(server, "order-3")
        assert (status, body["provider"]) == (200, "resend")
        assert len(mails(resend)) == 1 and mailgun.hits == 0


def test_an_unknown_at_another_provider_is_replayed_never_resent(
        mailgun: FakeMailgun, resend: FakeResend) -> None:
    mailgun.script(ResetBeforeResponse())
    with running(peers_config({"mailgun": mailgun, "resend": resend})) as server:
        assert keyed_send(server, "order-4")[0] == 502
        close_circuit(server, "mailgun")
        status, body = keyed_send(server, "order-4")
        assert (status, body["delivery"]) == (502, "unknown")
        assert mailgun.hits == 2 and resend.hits == 0  # the poll, not a resend


# ------------------------------------------------ every field, native form ---

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
RICH = smsp.Message(
    sender=smsp.Address("alice@example.com", "Alice Example"),
    to=(smsp.Address("bob@example.org", "Bob"), smsp.Address("carol@example.org")),
    subject="Receipt ✓", text="plain text", html="<p>html <img src=\"cid:logo\"></p>",
    cc=(smsp.Address("dave@example.org"),), bcc=(smsp.Address("erin@example.org"),),
    reply_to=smsp.Address("help@example.com"),
    headers=(("X-Campaign", "spring"), ("List-Unsubscribe", "<mailto:u@example.com>")),
    attachments=(smsp.Attachment("receipt.pdf", "application/pdf", b"%PDF-1.4 \x00\xff"),
                 smsp.Attachment("logo.png", "image/png", PNG, "logo")),
    tags=("receipt",), metadata=(("order", "A-1"),))


def send_direct(name: str, fake: Any, message: smsp.Message) -> smsp.Receipt:
    config = peers_config({name: fake})
    watchdog = smsp.Watchdog()
    try:
        provider = smsp.build_providers(config, smsp.ProviderContext(watchdog))[0]
        return provider.send(message, time.monotonic() + 5)
    finally:
        watchdog.stop()


def test_postmark_gets_every_field_in_its_native_form(postmark: FakePostmark) -> None:
    receipt = send_direct("postmark", postmark, RICH)
    sent = postmark.accepted[0]
    assert receipt.message_id and receipt.provider == "postmark"
    assert sent["From"] == "Alice Example <alice@example.com>"
    assert email.utils.getaddresses([sent["To"]]) == [("Bob", "bob@example.org"),
                                                      ("", "carol@example.org")]
    assert (sent["Cc"], sent["Bcc"], sent["ReplyTo"]) == \
        ("dave@example.org", "erin@example.org", "help@example.com")
    assert (sent["Subject"], sent["TextBody"], sent["HtmlBody"]) == \
        (RICH.subject, RICH.text, RICH.html)
    assert sent["Headers"] == [{"Name": "X-Campaign", "Value": "spring"},
                               {"Name": "List-Unsubscribe", "Value": "<mailto:u@example.com>"}]
    assert [(a["Name"], a["ContentType"], base64.b64decode(a["Content"]), a.get("ContentID"))
            for a in sent["Attachments"]] == [
        ("receipt.pdf", "application/pdf", b"%PDF-1.4 \x00\xff", None),
        ("logo.png", "image/png", PNG, "cid:logo")]
    assert (sent["Tag"], sent["Metadata"], sent["MessageStream"]) == \
        ("receipt", {"order": "A-1"}, "outbound")


def test_resend_gets_every_field_in_its_native_form(resend: FakeResend) -> None:
    receipt = send_direct("resend", resend, dataclasses.replace(RICH, key="k1"))
    sent = resend.sent[0].message
    assert receipt.message_id == resend.sent[0].id
    assert sent["to"] == ["Bob <bob@example.org>", "carol@example.org"]
    assert (sent["cc"], sent["bcc"], sent["reply_to"]) == \
        (["dave@example.org"], ["erin@example.org"], ["help@example.com"])
    assert (sent["subject"], sent["text"], sent["html"]) == (RICH.subject, RICH.text, RICH.html)
    assert sent["headers"] == dict(RICH.headers)
    assert [(a["filename"], a["content_type"], base64.b64decode(a["content"]),
             a.get("content_id")) for a in sent["attachments"]] == [
        ("receipt.pdf", "application/pdf", b"%PDF-1.4 \x00\xff", None),
        ("logo.png", "image/png", PNG, "logo")]
    assert sent["tags"] == [{"name": "order", "value": "A-1"},
                            {"name": "receipt", "value": "true"}]
    assert resend.sent[0].idempotency_key == "smsp-k1"


def test_ses_gets_every_field_in_its_native_form_valid_for_the_sesv2_model(
        ses_fake: FakeSES) -> None:
    receipt = send_direct("ses", ses_fake, RICH)  # the fake checks SigV4 and the model
    sent = ses_fake.accepted[0]
    assert receipt.message_id and sent["FromEmailAddress"] == "Alice Example <alice@example.com>"
    assert sent["Destination"] == {"ToAddresses": ["Bob <bob@example.org>", "carol@example.org"],
                                   "CcAddresses": ["dave@example.org"],
                                   "BccAddresses": ["erin@example.org"]}
    assert sent["ReplyToAddresses"] == ["help@example.com"]
    simple = sent["Content"]["Simple"]
    assert simple["Subject"] == {"Data": RICH.subject, "Charset": "UTF-8"}
    assert simple["Body"] == {"Text": {"Data": RICH.text, "Charset": "UTF-8"},
                              "Html": {"Data": RICH.html, "Charset": "UTF-8"}}
    assert simple["Headers"] == [{"Name": n, "Value": v} for n, v in RICH.headers]
    assert [(a["FileName"], a["ContentType"], a["ContentDisposition"], a.get("ContentId"),
             base64.b64decode(a["RawContent"])) for a in simple["Attachments"]] == [
        ("receipt.pdf", "application/pdf", "ATTACHMENT", None, b"%PDF-1.4 \x00\xff"),
        ("logo.png", "image/png", "INLINE", "logo", PNG)]
    assert sent["EmailTags"] == [{"Name": "order", "Value": "A-1"},
                                 {"Name": "receipt", "Value": "true"}]


@pytest.mark.parametrize(("name", "message", "reason"), [
    ("postmark", dataclasses.replace(RICH, tags=("a", "b")), "one tag"),
    ("resend", dataclasses.replace(RICH, tags=("has space",)), "only ASCII letters"),
    ("ses", dataclasses.replace(RICH, metadata=(("k", "v!"),)), "only ASCII letters"),
    ("ses", dataclasses.replace(RICH, headers=(("X-Name", "Zoë"),)), "ASCII header values"),
])
def test_a_provider_names_what_it_cannot_carry(name: str, message: smsp.Message,
                                               reason: str) -> None:
    assert reason in (smsp.PROVIDERS[name].cannot_carry(
        object.__new__(smsp.PROVIDERS[name]), message) or "")


# ------------------------------------------- provider text on anonymous pages ---


def test_healthcheck_shows_a_short_classification_never_provider_text_or_secrets(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    echo = f"upstream said: Authorization: Basic {base64.b64encode(b'api:' + MG_KEY.encode())}"
    mailgun.script(Status(500, body={"message": echo}))
    sendgrid.refuse()
    with running(provider_config(mailgun, sendgrid)) as server:
        status, _, body = server.send()
        assert (status, body["delivery"]) == (502, "not_sent")
        assert MG_KEY not in body["message"] and "Basic" not in body["message"]
        health = json.loads(server.request("GET", "/healthcheck")[2])
    errors = {p["name"]: p["last_error"] for p in health["providers"]}
    assert errors == {"mailgun": "HTTP 500", "sendgrid": "connect refused, request not sent"}


def test_a_rejection_passes_the_providers_words_with_every_secret_masked(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    token = base64.b64encode(f"api:{MG_KEY}".encode()).decode()
    mailgun.script(Status(400, body={"message": f"bad 'to' ({MG_KEY}, {API_KEY}, "
                                                f"Authorization: Basic {token})"}))
    with running(provider_config(mailgun, sendgrid)) as server:
        status, _, body = server.send()
    assert status == 422 and "bad 'to'" in body["message"]
    for secret in (MG_KEY, API_KEY, token):
        assert secret not in body["message"]
    assert body["message"].count("****") == 3


# --------------------------------------------------------------- sandbox polls ---

# How each peer shows that a request came in the provider's test mode.
SANDBOXED: dict[str, Callable[[Any], bool]] = {
    "mailgun": lambda peer: peer.accepted[-1].get("o:testmode") == ["yes"],
    "sendgrid": lambda peer: peer.accepted[-1].get("mail_settings") ==
    {"sandbox_mode": {"enable": True}},
    "postmark": lambda peer: peer.requests[-1].headers["x-postmark-server-token"] ==
    "POSTMARK_API_TEST",
    "ses": lambda peer: peer.accepted[-1]["Destination"]["ToAddresses"] ==
    ["success@simulator.amazonses.com"],
    "resend": lambda peer: peer.accepted[-1]["to"] == ["delivered@resend.dev"],
}


@pytest.mark.parametrize("provider", sorted(SANDBOXED))
def test_sandbox_polls_go_in_the_providers_test_mode_and_real_mail_never_does(
        provider: str, fakes: dict[str, Any]) -> None:
    peer = fakes[provider]
    peer.script(Status(500))
    with running(peers_config({provider: peer}, poll_sandbox=True)) as server:
        server.send()
        assert not SANDBOXED[provider](_as_accepted(peer, provider))  # the real send
        server.timers.fire_next()
        assert server.states() == {provider: "closed"}
        assert SANDBOXED[provider](peer)
        status, _, body = server.send()
        assert (status, body["provider"]) == (200, provider)
        assert not SANDBOXED[provider](peer)


def _as_accepted(peer: Any, provider: str) -> Any:
    """The refused first send as if accepted, so the same check reads it."""
    class Last:
        accepted = [peer.requests[-1].fields]
        requests = peer.requests
    return Last
