"""The SMTP provider against a real SMTP server (aiosmtpd, driven by smtp_server.py).

Every row of SMTPProvider.CLASSIFICATION is a test here, and every test looks at
what the server actually received: the commands it was sent, the envelope, and
the message parsed with email.parser.
"""

import email.message
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import smsp
from smtp_server import CLOSE, HANG, PASSWORD, USERNAME, Received, SMTPServer
from testkit import wait_for

Address = smsp.Address
SENT, NOT_SENT = smsp.Outcome.SENT, smsp.Outcome.NOT_SENT
REJECTED, UNKNOWN = smsp.Outcome.REJECTED, smsp.Outcome.UNKNOWN

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\r\n.\r\n" + bytes(range(256)) * 8  # a lone dot line inside, and every byte

FULL = smsp.Message(
    sender=Address("alice@example.com", "Zoë J. Smith"),
    to=(Address("bob@example.org", "Bob (Ops)"), Address("carol@example.net")),
    cc=(Address("dave@example.com", "Dave"),),
    bcc=(Address("boss@example.org", "Hidden Boss"),),
    subject="Grüße: your order",
    text="Hello,\nyour order is on its way.\n",
    html='<p>Hello, <img src="cid:logo@example.com"></p>',
    reply_to=Address("help@example.com", "Help Desk"),
    headers=(("X-Campaign", "spring"), ("List-Unsubscribe", "<mailto:unsubscribe@example.com>")),
    attachments=(smsp.Attachment("réport.pdf", "application/pdf", PDF),
                 smsp.Attachment("logo.png", "image/png", PNG, "logo@example.com")),
    tags=("welcome", "spring, 2026"),
    metadata=(("order id", "A-1"), ("customer", "Zoë")),
)
ENVELOPE = ("bob@example.org", "carol@example.net", "dave@example.com", "boss@example.org")
OPENING = ["EHLO", "STARTTLS", "EHLO", "AUTH"]  # a good session over STARTTLS with AUTH
TRANSACTION = ["MAIL", "RCPT", "RCPT", "RCPT", "RCPT"]  # FULL's envelope


@pytest.fixture(scope="module")
def watchdog() -> Iterator[smsp.Watchdog]:
    dog = smsp.Watchdog()
    yield dog
    dog.stop()


@pytest.fixture
def server(certificate: tuple[str, str]) -> Iterator[SMTPServer]:
    """A submission relay: STARTTLS required, AUTH required."""
    with SMTPServer(certificate) as relay:
        yield relay


Connect = Callable[..., smsp.SMTPProvider]


@pytest.fixture
def connect(watchdog: smsp.Watchdog) -> Connect:
    """A provider for a relay, set up as the relay wants unless told otherwise."""
    def make(relay: SMTPServer, **overrides: Any) -> smsp.SMTPProvider:
        values: dict[str, Any] = {"security": relay.security, "helo": "client.test",
                                  "username": USERNAME if relay.auth else "",
                                  "password": PASSWORD}
        if relay.security != "none":
            values["ssl_context"] = relay.client_context()
        values.update(overrides)
        return smsp.SMTPProvider(relay.host, relay.port, watchdog=watchdog, **values)
    return make


def send(provider: smsp.SMTPProvider, message: smsp.Message = FULL, seconds: float = 2.0
         ) -> smsp.Receipt:
    return provider.send(message, time.monotonic() + seconds)


def failure(provider: smsp.SMTPProvider, message: smsp.Message = FULL, seconds: float = 2.0
            ) -> smsp.ProviderError:
    with pytest.raises(smsp.ProviderError) as caught:
        send(provider, message, seconds)
    return caught.value


def only(relay: SMTPServer) -> Received:
    assert len(relay.messages) == 1
    return relay.messages[0]


def tree(part: email.message.EmailMessage) -> Any:
    """The MIME structure: a content type, or (multipart type, [children])."""
    if part.is_multipart():
        return (part.get_content_type(), [tree(child) for child in part.iter_parts()])
    return part.get_content_type()


def part_of(message: email.message.EmailMessage, content_type: str
            ) -> email.message.EmailMessage:
    return next(p for p in message.walk() if p.get_content_type() == content_type)


# ----------------------------------------------------------- the message sent ---


def test_a_sent_message_is_the_relays_with_the_message_id_of_the_receipt(
        server: SMTPServer, connect: Connect) -> None:
    receipt = send(connect(server))
    received = only(server)
    assert receipt.provider == "smtp" and receipt.warning is None
    assert received.message["Message-ID"] == receipt.message_id
    assert receipt.message_id.startswith("<") and receipt.message_id.endswith("@example.com>")
    assert received.message["Date"].datetime.tzinfo is not None
    assert server.commands == [*OPENING, *TRANSACTION, "DATA", "final dot", "QUIT"]
    assert (received.tls, received.login, received.helo) == (True, USERNAME, "client.test")
    assert send(connect(server)).message_id != receipt.message_id


def test_every_recipient_is_in_the_envelope_and_bcc_in_no_header(
        server: SMTPServer, connect: Connect) -> None:
    send(connect(server))
    received = only(server)
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ENVELOPE
    assert b"boss@example.org" not in received.header_block
    assert b"Hidden Boss" not in received.content and b"bcc:" not in received.content.lower()
    message = received.message
    assert [a.addr_spec for a in message["To"].addresses] == ["bob@example.org",
                                                              "carol@example.net"]
    assert [a.addr_spec for a in message["Cc"].addresses] == ["dave@example.com"]


def test_text_html_inline_image_and_attachment_make_mixed_alternative_related(
        server: SMTPServer, connect: Connect) -> None:
    send(connect(server))
    message = only(server).message
    assert tree(message) == ("multipart/mixed", [
        ("multipart/alternative", [
            "text/plain",
            ("multipart/related", ["text/html", "image/png"]),
        ]),
        "application/pdf",
    ])
    assert part_of(message, "text/plain").get_content() == "Hello,\r\nyour order is on its way.\r\n"
    assert part_of(message, "text/html").get_content().strip() == FULL.html


def test_display_names_are_quoted_and_non_ascii_goes_in_encoded_words(
        server: SMTPServer, connect: Connect) -> None:
    send(connect(server))
    received = only(server)
    headers = received.header_block
    assert b'To: "Bob (Ops)" <bob@example.org>, carol@example.net' in headers
    assert b"From: =?utf-8?q?Zo=C3=AB_J=2E?= Smith <alice@example.com>" in headers
    assert b"Subject: =?utf-8?" in headers
    assert received.content.isascii()  # 7-bit all through: no 8BITMIME needed
    message = received.message
    assert message["From"].addresses[0].display_name == "Zoë J. Smith"
    assert message["Subject"] == "Grüße: your order"
    assert message["Reply-To"].addresses[0].display_name == "Help Desk"


def test_attachments_decode_back_to_the_same_bytes(server: SMTPServer, connect: Connect
                                                   ) -> None:
    send(connect(server))
    pdf = part_of(only(server).message, "application/pdf")
    assert pdf.get_content() == PDF
    assert pdf.get_filename() == "réport.pdf"
    assert pdf.get_content_disposition() == "attachment"


def test_an_inline_image_has_its_content_id_inside_multipart_related(
        server: SMTPServer, connect: Connect) -> None:
    send(connect(server))
    related = part_of(only(server).message, "multipart/related")
    assert related.get_param("type") == "text/html"
    html, image = related.iter_parts()
    assert 'src="cid:logo@example.com"' in html.get_content()
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG


def test_reply_to_and_custom_headers_are_message_headers(server: SMTPServer,
                                                          connect: Connect) -> None:
    send(connect(server))
    message = only(server).message
    assert message["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert message["X-Campaign"] == "spring"
    assert message["List-Unsubscribe"] == "<mailto:unsubscribe@example.com>"


def test_tags_are_x_tag_headers_and_metadata_one_json_x_metadata_header(
        server: SMTPServer, connect: Connect) -> None:
    send(connect(server))
    message = only(server).message
    assert message.get_all("X-Tag") == ["welcome", "spring, 2026"]
    assert json.loads(message["X-Metadata"]) == {"order id": "A-1", "customer": "Zoë"}


def test_lines_of_dots_survive_dot_stuffing(server: SMTPServer, connect: Connect) -> None:
    text = "before\n.\n..\n.after\nlast\n"  # an unstuffed lone dot would end the message
    message = smsp.Message(Address("alice@example.com"), (Address("bob@example.org"),), "dots",
                           text)
    send(connect(server), message)
    body = only(server).message.get_content()
    assert body.replace("\r\n", "\n") == text


@pytest.mark.parametrize(("text", "html", "shape", "body"), [
    ("plain words\n", "", "text/plain", "plain words\r\n"),
    ("", "<p>only html</p>", "text/html", "<p>only html</p>\r\n"),
    ("", "", "text/plain", ""),
])
def test_a_single_body_is_a_single_part(server: SMTPServer, connect: Connect, text: str,
                                        html: str, shape: str, body: str) -> None:
    message = smsp.Message(Address("alice@example.com"), (Address("bob@example.org"),), "one",
                           text, html)
    send(connect(server), message)
    received = only(server).message
    assert tree(received) == shape
    assert received.get_content().strip("\r\n") == body.strip("\r\n")


def test_implicit_tls_sends_without_starttls(certificate: tuple[str, str],
                                             connect: Connect) -> None:
    with SMTPServer(certificate, security="tls") as relay:
        send(connect(relay))
        received = only(relay)
        assert (received.tls, received.login) == (True, USERNAME)
        assert relay.commands == ["EHLO", "AUTH", *TRANSACTION, "DATA", "final dot", "QUIT"]


def test_security_none_sends_in_clear_to_a_private_relay(connect: Connect) -> None:
    with SMTPServer(security="none", auth=False) as relay:
        send(connect(relay))
        received = only(relay)
        assert (received.tls, received.login) == (False, None)
        assert relay.commands == ["EHLO", *TRANSACTION, "DATA", "final dot", "QUIT"]


def test_the_default_greeting_name_is_this_hosts_fqdn(server: SMTPServer,
                                                      connect: Connect) -> None:
    send(connect(server, helo=""))
    assert only(server).helo == socket.getfqdn()


def test_the_size_is_declared_when_the_relay_offers_it(server: SMTPServer,
                                                       connect: Connect) -> None:
    send(connect(server))
    received = only(server)
    declared = [o for o in received.mail_options if o.startswith("SIZE=")]
    assert len(declared) == 1 and int(declared[0][5:]) >= len(received.content)


# -------------------------------------------- before the message: not sent ---


def test_a_refused_connection_is_not_sent(watchdog: smsp.Watchdog) -> None:
    with socket.socket() as unused:  # bound, never listening: the port refuses
        unused.bind(("127.0.0.1", 0))
        provider = smsp.SMTPProvider("127.0.0.1", unused.getsockname()[1], "none",
                                     watchdog=watchdog)
        error = failure(provider)
    assert (error.outcome, error.reason) == (NOT_SENT, "connection refused at connect")
    assert error.trips_breaker and not error.timed_out


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service not available",
                                      "554 5.7.1 No SMTP service here"])
def test_a_refusing_greeting_is_not_sent(server: SMTPServer, connect: Connect,
                                         greeting: str) -> None:
    server.script["greeting"] = greeting
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (NOT_SENT, f"SMTP {greeting[:3]} at connect")
    assert error.detail == greeting[4:]
    assert server.commands == [] and server.messages == []


def test_a_greeting_that_never_comes_is_not_sent_by_the_deadline(server: SMTPServer,
                                                                 connect: Connect) -> None:
    server.script["greeting"] = HANG
    error = failure(connect(server), seconds=1.0)
    assert (error.outcome, error.reason, error.timed_out) == (NOT_SENT, "timed out at connect",
                                                              True)
    assert server.commands == []


@pytest.mark.parametrize(("security", "phase", "commands"), [
    ("tls", "connect", []),
    ("starttls", "STARTTLS", ["EHLO", "STARTTLS"]),
])
def test_a_failed_tls_handshake_is_not_sent(certificate: tuple[str, str], connect: Connect,
                                            security: str, phase: str,
                                            commands: list[str]) -> None:
    with SMTPServer(certificate, security=security) as relay:
        untrusting = ssl.create_default_context()  # the throwaway certificate is unknown
        error = failure(connect(relay, ssl_context=untrusting))
        assert (error.outcome, error.reason) == (NOT_SENT, f"TLS handshake failed at {phase}")
        assert relay.commands == commands and relay.logins == []


def test_starttls_not_offered_is_not_sent_and_nothing_goes_in_clear(
        connect: Connect) -> None:
    with SMTPServer(security="none", auth=True) as relay:
        error = failure(connect(relay, security="starttls", username=USERNAME))
        assert (error.outcome, error.reason) == (NOT_SENT, "not offered at STARTTLS")
        assert relay.commands == ["EHLO", "QUIT"] and relay.logins == []


@pytest.mark.parametrize(("phase", "reply", "commands"), [
    ("EHLO", "554 5.7.1 Go away", ["EHLO", "QUIT"]),
    ("STARTTLS", "454 4.7.0 TLS not available due to temporary reason",
     ["EHLO", "STARTTLS", "QUIT"]),
    # smtplib's login tries PLAIN and then LOGIN, hence two AUTH commands
    ("AUTH", "530 5.7.0 Authentication required", [*OPENING, "AUTH", "QUIT"]),
    ("AUTH", "534 5.7.9 Authentication mechanism is too weak", [*OPENING, "AUTH", "QUIT"]),
    ("AUTH", "538 5.7.11 Encryption required for requested authentication mechanism",
     [*OPENING, "AUTH", "QUIT"]),
    ("AUTH", "454 4.7.0 Temporary authentication failure", [*OPENING, "AUTH", "QUIT"]),
    ("MAIL", "451 4.3.0 Try again later", [*OPENING, "MAIL", "QUIT"]),
    ("MAIL", "452 4.5.3 Daily sending limit reached", [*OPENING, "MAIL", "QUIT"]),
    ("RCPT carol@example.net", "450 4.2.1 Mailbox busy", [*OPENING, *TRANSACTION, "QUIT"]),
    ("DATA", "451 4.3.0 Queue full", [*OPENING, *TRANSACTION, "DATA", "QUIT"]),
    ("DATA", "554 5.5.1 No valid recipients", [*OPENING, *TRANSACTION, "DATA", "QUIT"]),
])
def test_a_refusal_before_the_body_is_not_sent(server: SMTPServer, connect: Connect,
                                               phase: str, reply: str,
                                               commands: list[str]) -> None:
    server.script[phase] = reply
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (NOT_SENT, f"SMTP {reply[:3]} at {phase.split()[0]}")
    assert error.detail == reply[4:] and error.trips_breaker and not error.timed_out
    assert server.commands == commands and server.messages == []


def test_wrong_credentials_are_535_and_not_sent(server: SMTPServer, connect: Connect) -> None:
    error = failure(connect(server, password="not-the-password"))
    assert (error.outcome, error.reason) == (NOT_SENT, "SMTP 535 at AUTH")
    assert error.detail == "5.7.8 Authentication credentials invalid"
    assert server.logins == [] and server.commands == [*OPENING, "AUTH", "QUIT"]


def test_a_relay_that_wants_auth_answers_530_at_mail_and_it_is_not_sent(
        server: SMTPServer, connect: Connect) -> None:
    error = failure(connect(server, username=""))
    assert (error.outcome, error.reason) == (NOT_SENT, "SMTP 530 at MAIL")
    assert error.trips_breaker  # our configuration is wrong, not the message
    assert server.commands == ["EHLO", "STARTTLS", "EHLO", "MAIL", "QUIT"]


def test_no_time_left_is_not_sent_without_connecting(server: SMTPServer,
                                                     connect: Connect) -> None:
    error = failure(connect(server), seconds=0.0)
    assert (error.outcome, error.timed_out) == (NOT_SENT, True)
    assert server.commands == []


# ------------------------------------------ refused at MAIL or RCPT: rejected ---


def test_5xx_at_mail_is_answered_with_rset_and_rejected(server: SMTPServer,
                                                        connect: Connect) -> None:
    server.script["MAIL"] = "550 5.7.1 Sender address not allowed"
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (REJECTED, "SMTP 550 at MAIL")
    assert error.detail == "5.7.1 Sender address not allowed" and not error.trips_breaker
    assert server.commands == [*OPENING, "MAIL", "RSET", "QUIT"] and server.messages == []


def test_a_message_over_the_relays_size_limit_is_rejected_at_mail(
        certificate: tuple[str, str], connect: Connect) -> None:
    with SMTPServer(certificate, size_limit=1000) as relay:
        error = failure(connect(relay))
        assert (error.outcome, error.reason) == (REJECTED, "SMTP 552 at MAIL")
        assert relay.commands == [*OPENING, "MAIL", "RSET", "QUIT"] and relay.messages == []


def test_5xx_at_rcpt_is_answered_with_rset_and_rejected_naming_the_refused(
        server: SMTPServer, connect: Connect) -> None:
    server.script["RCPT carol@example.net"] = "550 5.1.1 No such user"
    server.script["RCPT boss@example.org"] = "553 5.1.3 Bad destination address"
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (REJECTED, "SMTP 550 at RCPT")
    assert error.detail == ("carol@example.net: 550 5.1.1 No such user; "
                            "boss@example.org: 553 5.1.3 Bad destination address")
    assert not error.trips_breaker
    assert server.commands == [*OPENING, *TRANSACTION, "RSET", "QUIT"]
    assert server.messages == []


def test_a_refused_recipient_wins_over_another_recipients_4xx(server: SMTPServer,
                                                              connect: Connect) -> None:
    server.script["RCPT bob@example.org"] = "451 4.3.0 Try later"
    server.script["RCPT dave@example.com"] = "550 5.1.1 No such user"
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (REJECTED, "SMTP 550 at RCPT")
    assert error.detail == "dave@example.com: 550 5.1.1 No such user"


# ------------------------------------------------------- after the final dot ---


@pytest.mark.parametrize(("reply", "outcome"), [
    ("451 4.3.0 Try again later", NOT_SENT),
    ("554 5.6.0 Message content rejected", REJECTED),
])
def test_a_refusal_after_the_final_dot(server: SMTPServer, connect: Connect, reply: str,
                                       outcome: smsp.Outcome) -> None:
    server.script["final dot"] = reply
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (outcome, f"SMTP {reply[:3]} after the final dot")
    assert error.detail == reply[4:] and error.trips_breaker is (outcome is NOT_SENT)
    assert only(server).message["Subject"] == FULL.subject
    assert server.commands == [*OPENING, *TRANSACTION, "DATA", "final dot", "QUIT"]


def test_no_reply_to_the_final_dot_is_unknown_though_the_relay_had_it_all(
        server: SMTPServer, connect: Connect) -> None:
    server.script["final dot"] = HANG
    error = failure(connect(server), seconds=1.0)
    assert (error.outcome, error.reason) == (UNKNOWN, "timed out after the final dot")
    assert error.timed_out and error.trips_breaker
    message = wait_for(lambda: server.messages)[0].message
    assert tree(message)[0] == "multipart/mixed"
    assert part_of(message, "application/pdf").get_content() == PDF  # the last part, whole


def test_a_close_after_the_final_dot_is_unknown_without_a_timeout(server: SMTPServer,
                                                                  connect: Connect) -> None:
    server.script["final dot"] = CLOSE
    error = failure(connect(server))
    assert (error.outcome, error.reason) == (UNKNOWN, "connection lost after the final dot")
    assert not error.timed_out
    assert part_of(only(server).message, "application/pdf").get_content() == PDF


def test_a_body_that_cannot_be_written_is_not_sent(server: SMTPServer, connect: Connect
                                                   ) -> None:
    # The relay says 354 and hangs up; a body far larger than any socket buffer
    # cannot all be written, so its final dot never leaves.
    server.script["DATA"] = ("354 End data with <CR><LF>.<CR><LF>", CLOSE)
    big = smsp.Attachment("big.bin", "application/octet-stream", bytes(12 << 20))
    message = smsp.Message(Address("alice@example.com"), (Address("bob@example.org"),), "big",
                           "see attached", attachments=(big,))
    error = failure(connect(server), message, seconds=10.0)
    assert (error.outcome, error.reason) == (NOT_SENT, "connection lost while writing the body")
    assert not error.timed_out and server.messages == []


@pytest.mark.parametrize("quit_reply", [CLOSE, HANG, "500 5.5.1 What?"])
def test_a_failed_quit_does_not_change_the_outcome(server: SMTPServer, connect: Connect,
                                                   quit_reply: str) -> None:
    server.script["QUIT"] = quit_reply
    receipt = send(connect(server), seconds=1.0)
    assert only(server).message["Message-ID"] == receipt.message_id
    assert server.commands[-2:] == ["final dot", "QUIT"]


# --------------------------------------------------------------- the table ---


def test_every_phase_of_the_table_has_an_outcome_for_no_reply() -> None:
    phases = {phase for phase, _ in smsp.SMTPProvider.CLASSIFICATION}
    assert phases == {"connect", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "body",
                      "final dot"}
    for phase in phases:
        assert isinstance(smsp.SMTPProvider.classify(phase, None), smsp.Outcome)


def test_an_unknown_security_is_refused(watchdog: smsp.Watchdog) -> None:
    with pytest.raises(ValueError, match="starttls, tls or none"):
        smsp.SMTPProvider("relay.example.com", security="ssl", watchdog=watchdog)
