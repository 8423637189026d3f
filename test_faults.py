"""Fault-injection tests: smsp against misbehaving providers, clients and signals.

Each provider behaviour runs through the real server (in process, port 0) in front of the strict
fakes, and one test asserts everything observable at once: the client's status and delivery,
which provider was hit how many times (failover exactly as classified, never twice), the breaker
states afterwards, and that the request was bounded by SMSP_TIMEOUT + 0.5 s.  Breakers use the
fake timer of testkit, so no test sleeps to cross a poll interval; timing numbers only appear as
upper bounds that prove something was bounded.

The graceful-shutdown tests start the real ``python smsp.py`` as a subprocess.
"""

import base64
import dataclasses
import http.client
import json
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import smsp
from fake_postmark import FakePostmark
from fake_resend import FakeResend
from fake_ses import FakeSES
from fakes import (
    Behaviour,
    CloseWithoutResponse,
    Delay,
    Drip,
    FakeMailgun,
    FakeSendGrid,
    Hang,
    Malformed2xx,
    ResetBeforeResponse,
    ResetMidBody,
    Status,
)
from testkit import (
    API_KEY,
    EMAIL,
    MG_DOMAIN,
    MG_KEY,
    SG_KEY,
    mailgun_env,
    make_config,
    peers_config,
    provider_config,
    raw_exchange,
    running,
    Running,
    smsp_process,
    status_of,
    wait_for,
)

TIMEOUT = 0.5  # SMSP_TIMEOUT of the in-process server: small, so the suite stays fast
LATE = TIMEOUT + 0.3  # a provider delay that is surely past the deadline
BOUND = TIMEOUT + 0.5  # every request must have finished within this


def timed_send(server: Running, email: dict[str, Any] | None = None, **headers: str
               ) -> tuple[int, dict[str, str], dict[str, Any], float]:
    started = time.monotonic()
    status, response_headers, body = server.send(email, **headers)
    return status, response_headers, body, time.monotonic() - started


def header_block(raw: bytes) -> str:
    return raw.partition(b"\r\n\r\n")[0].decode("latin-1").lower()


def json_body(raw: bytes) -> dict[str, Any]:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


# ============================================ provider behaviours, one table ===


@dataclasses.dataclass(frozen=True)
class Case:
    """One provider behaviour and everything the client and the operator must see.

    Keyed by provider name, so a new provider adds rows, not code: ``script``
    is what each fake does (FIFO), ``unreachable`` names providers that cannot
    be reached ("refuse", "dns", "blackhole" or "tls"), ``hits`` how often
    each fake must have been asked.
    """

    script: tuple[tuple[str, tuple[Behaviour, ...]], ...] = ()
    unreachable: tuple[tuple[str, str], ...] = ()
    providers: tuple[str, ...] = ("mailgun", "sendgrid")
    status: int = 200
    delivery: str = "sent"  # "sent" (a 200), "not_sent" or "unknown"
    hits: tuple[tuple[str, int], ...] = ()
    states: tuple[tuple[str, str], ...] = (("mailgun", "closed"), ("sendgrid", "closed"))
    provider: str | None = None  # who sent it (200 only)
    message_id: bool = True  # 200 only: False means message_id null plus a warning line
    says: str = ""  # 422 only: the provider's own words, passed on to the client


def case(**fields: Any) -> Case:
    """A Case from per-provider keywords: ``<name>=behaviours``, ``<name>_url=how`` and
    ``<name>_hits=n`` for any provider name, beside Case's own fields."""
    own = {f.name for f in dataclasses.fields(Case)}
    script, unreachable_, hits = {}, {}, {}
    for key in [k for k in fields if k not in own]:
        value = fields.pop(key)
        if key.endswith("_url"):
            unreachable_[key[:-4]] = value
        elif key.endswith("_hits"):
            hits[key[:-5]] = value
        else:
            script[key] = value
    return Case(script=tuple(script.items()), unreachable=tuple(unreachable_.items()),
                hits=tuple(hits.items()), **fields)


def closed_open(first: str, second: str) -> tuple[tuple[str, str], ...]:
    return (("mailgun", first), ("sendgrid", second))


MG_DOWN = closed_open("open", "closed")
BOTH_DOWN = closed_open("open", "open")
FAILED_OVER = {"status": 200, "delivery": "sent", "provider": "sendgrid", "mailgun_hits": 1,
               "sendgrid_hits": 1, "states": MG_DOWN}
RATE_LIMIT = {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "0",
              "X-RateLimit-Reset": "1392815263"}


def mailgun_first(**fields: Any) -> Case:
    return case(**fields)


def then_sendgrid(*behaviours: Behaviour, **fields: Any) -> Case:
    """Mailgun fails over with a 500; SendGrid, the last provider, does ``behaviours``."""
    return case(mailgun=(Status(500),), sendgrid=behaviours, mailgun_hits=1, sendgrid_hits=1,
                **fields)


def sendgrid_only(*behaviours: Behaviour, **fields: Any) -> Case:
    states = fields.pop("states", (("sendgrid", "closed"),))
    return case(sendgrid=behaviours, providers=("sendgrid",), sendgrid_hits=1, states=states,
                **fields)


MG_REDIRECT = Status(302, headers={"Location": f"/v3/{MG_DOMAIN}/messages?again=1"})
SG_OPEN = (("sendgrid", "open"),)

CASES = [
    # -- Mailgun first, SendGrid healthy behind it
    pytest.param(mailgun_first(mailgun=(Status(400),), status=422, delivery="not_sent",
                               mailgun_hits=1, says="'to' parameter is not a valid address"),
                 id="mailgun-400-rejected"),
    pytest.param(mailgun_first(mailgun=(Status(413),), status=422, delivery="not_sent",
                               mailgun_hits=1, says="413 Request Entity Too Large"),
                 id="mailgun-413-rejected"),
    pytest.param(mailgun_first(mailgun=(Status(422, body={"message": "bad message: x"}),),
                               status=422, delivery="not_sent", mailgun_hits=1,
                               says="bad message: x"),
                 id="mailgun-422-rejected"),
    pytest.param(mailgun_first(mailgun=(Status(401),), **FAILED_OVER), id="mailgun-401"),
    pytest.param(mailgun_first(mailgun=(Status(402),), **FAILED_OVER), id="mailgun-402-other"),
    pytest.param(mailgun_first(mailgun=(Status(403),), **FAILED_OVER), id="mailgun-403"),
    pytest.param(mailgun_first(mailgun=(Status(404),), **FAILED_OVER),
                 id="mailgun-404-domain-not-found"),
    pytest.param(mailgun_first(mailgun=(Status(429, headers=RATE_LIMIT),), **FAILED_OVER),
                 id="mailgun-429-rate-limited"),
    pytest.param(mailgun_first(mailgun=(Status(500),), **FAILED_OVER), id="mailgun-500"),
    pytest.param(mailgun_first(mailgun=(Status(502),), **FAILED_OVER), id="mailgun-502"),
    pytest.param(mailgun_first(mailgun=(Status(503),), **FAILED_OVER), id="mailgun-503"),
    pytest.param(mailgun_first(mailgun=(Status(504),), **FAILED_OVER), id="mailgun-504"),
    pytest.param(mailgun_first(mailgun=(MG_REDIRECT,), **FAILED_OVER),
                 id="mailgun-302-not-followed"),
    pytest.param(mailgun_first(mailgun_url="refuse", **{**FAILED_OVER, "mailgun_hits": 0}),
                 id="mailgun-refused"),
    pytest.param(mailgun_first(mailgun_url="dns", **{**FAILED_OVER, "mailgun_hits": 0}),
                 id="mailgun-dns-failure"),
    pytest.param(mailgun_first(mailgun_url="blackhole", **{**FAILED_OVER, "mailgun_hits": 0}),
                 id="mailgun-connect-timeout-or-unreachable"),
    pytest.param(mailgun_first(mailgun_url="tls", **{**FAILED_OVER, "mailgun_hits": 0}),
                 id="mailgun-tls-handshake-fails"),
    pytest.param(mailgun_first(mailgun=(Delay(LATE),), status=504, delivery="unknown",
                               mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-delay-past-timeout"),
    pytest.param(mailgun_first(mailgun=(Drip(interval=0.05, chunk=1),), status=504,
                               delivery="unknown", mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-drip-past-total-deadline"),
    pytest.param(mailgun_first(mailgun=(ResetBeforeResponse(),), status=502, delivery="unknown",
                               mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-reset-before-response"),
    pytest.param(mailgun_first(mailgun=(ResetMidBody(),), status=502, delivery="unknown",
                               mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-reset-mid-body"),
    pytest.param(mailgun_first(mailgun=(Hang(),), status=504, delivery="unknown",
                               mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-hang"),
    pytest.param(mailgun_first(mailgun=(CloseWithoutResponse(),), status=502,
                               delivery="unknown", mailgun_hits=1, states=MG_DOWN),
                 id="mailgun-close-without-response"),
    pytest.param(mailgun_first(mailgun=(Malformed2xx(),), provider="mailgun", message_id=False,
                               mailgun_hits=1),
                 id="mailgun-200-not-json"),
    # -- SendGrid as the last provider
    pytest.param(then_sendgrid(Malformed2xx(), provider="sendgrid", message_id=False,
                               states=MG_DOWN),
                 id="then-sendgrid-202-without-id"),
    pytest.param(then_sendgrid(Status(400), status=422, delivery="not_sent", states=MG_DOWN,
                               says="The to array is required for all personalization"),
                 id="then-sendgrid-400-rejected"),
    pytest.param(then_sendgrid(Status(413), status=422, delivery="not_sent", states=MG_DOWN,
                               says="content too large"),
                 id="then-sendgrid-413-rejected"),
    pytest.param(then_sendgrid(Status(401), status=502, delivery="not_sent", states=BOTH_DOWN),
                 id="then-sendgrid-401"),
    pytest.param(then_sendgrid(Status(403), status=502, delivery="not_sent", states=BOTH_DOWN),
                 id="then-sendgrid-403"),
    pytest.param(then_sendgrid(Status(429), status=502, delivery="not_sent", states=BOTH_DOWN),
                 id="then-sendgrid-429"),
    pytest.param(then_sendgrid(Status(500), status=502, delivery="not_sent", states=BOTH_DOWN),
                 id="then-sendgrid-500"),
    pytest.param(then_sendgrid(Status(503), status=502, delivery="not_sent", states=BOTH_DOWN),
                 id="then-sendgrid-503"),
    pytest.param(then_sendgrid(Delay(LATE), status=504, delivery="unknown", states=BOTH_DOWN),
                 id="then-sendgrid-delay"),
    pytest.param(then_sendgrid(Drip(interval=0.05, chunk=1), status=504, delivery="unknown",
                               states=BOTH_DOWN),
                 id="then-sendgrid-drip"),
    pytest.param(then_sendgrid(Hang(), status=504, delivery="unknown", states=BOTH_DOWN),
                 id="then-sendgrid-hang"),
    pytest.param(then_sendgrid(ResetBeforeResponse(), status=502, delivery="unknown",
                               states=BOTH_DOWN),
                 id="then-sendgrid-reset-before-response"),
    pytest.param(then_sendgrid(ResetMidBody(), status=502, delivery="unknown",
                               states=BOTH_DOWN),
                 id="then-sendgrid-reset-mid-body"),
    pytest.param(then_sendgrid(CloseWithoutResponse(), status=502, delivery="unknown",
                               states=BOTH_DOWN),
                 id="then-sendgrid-close-without-response"),
    pytest.param(mailgun_first(mailgun_url="refuse", sendgrid_url="refuse", status=502,
                               delivery="not_sent", states=BOTH_DOWN),
                 id="both-refused"),
    # -- SendGrid alone, and SendGrid first
    pytest.param(sendgrid_only(Status(429), status=502, delivery="not_sent", states=SG_OPEN),
                 id="sendgrid-only-429"),
    pytest.param(sendgrid_only(Hang(), status=504, delivery="unknown", states=SG_OPEN),
                 id="sendgrid-only-hang"),
    pytest.param(sendgrid_only(Status(400), status=422, delivery="not_sent",
                               says="The to array is required"),
                 id="sendgrid-only-400"),
    pytest.param(sendgrid_only(Malformed2xx(), provider="sendgrid", message_id=False),
                 id="sendgrid-only-202-without-id"),
    pytest.param(case(sendgrid=(Malformed2xx(),), providers=("sendgrid", "mailgun"),
                      provider="sendgrid", message_id=False, sendgrid_hits=1,
                      states=(("sendgrid", "closed"), ("mailgun", "closed"))),
                 id="sendgrid-first-202-without-id"),
    pytest.param(case(sendgrid=(Status(503),), providers=("sendgrid", "mailgun"),
                      provider="mailgun", mailgun_hits=1, sendgrid_hits=1,
                      states=(("sendgrid", "open"), ("mailgun", "closed"))),
                 id="sendgrid-first-503-fails-over-to-mailgun"),
]


def first(name: str, *behaviours: Behaviour, outcome: str, says: str = "",
          hits: int = 1) -> Any:
    """``name`` first with Mailgun behind it, doing ``behaviours``; ``outcome`` is
    "rejected" (422, no trip), "failover" (not sent: trips, Mailgun sends),
    "unknown" (502), "timeout" (504) or "sent"."""
    closed = ((name, "closed"), ("mailgun", "closed"))
    opened = ((name, "open"), ("mailgun", "closed"))
    rows = {
        "rejected": {"status": 422, "delivery": "not_sent", "states": closed, "says": says},
        "failover": {"provider": "mailgun", "mailgun_hits": 1, "states": opened},
        "unknown": {"status": 502, "delivery": "unknown", "states": opened},
        "timeout": {"status": 504, "delivery": "unknown", "states": opened},
        "sent": {"provider": name, "states": closed},
    }
    return pytest.param(case(providers=(name, "mailgun"), **{name: behaviours},
                             **{f"{name}_hits": hits}, **rows[outcome]),
                        id=f"{name}-{label(behaviours)}-{outcome}")


def label(behaviours: tuple[Behaviour, ...]) -> str:
    """A short test id for a scripted behaviour: its error name or code, or its kind."""
    if not behaviours:
        return "ok"
    behaviour = behaviours[0]
    body = getattr(behaviour, "body", None)
    if isinstance(behaviour, dict):  # an SMTP phase and its reply
        phase, reply = next(iter(behaviour.items()))
        return f"{phase.replace(' ', '-')}-{reply.split(' ')[0]}"
    if getattr(behaviour, "name", None):
        return f"{behaviour.code}-{behaviour.name}"  # type: ignore[attr-defined]
    if isinstance(body, dict):
        return f"{behaviour.code}-{body.get('ErrorCode', body.get('name'))}"  # type: ignore
    return type(behaviour).__name__ if not hasattr(behaviour, "code") else str(behaviour.code)


PM = FakePostmark.error
RS = FakeResend.error
SES = FakeSES.error
CASES += [
    first("postmark", outcome="sent"),
    *(first("postmark", PM(code), outcome="rejected", says=f"ErrorCode {code}")
      for code in (300, 406, 411)),
    *(first("postmark", PM(code), outcome="failover")
      for code in (10, 100, 400, 401, 405, 412, 413, 429)),
    first("postmark", Status(500), outcome="failover"),
    first("postmark", Hang(), outcome="timeout"),
    first("postmark", ResetBeforeResponse(), outcome="unknown"),
    first("ses", outcome="sent"),
    *(first("ses", SES(name), outcome="rejected", says=name)
      for name in ("MessageRejected", "BadRequestException")),
    first("ses", SES("MessageRejected", type_in_body=True), outcome="rejected",
          says="MessageRejected"),
    *(first("ses", SES(name), outcome="failover")
      for name in ("MailFromDomainNotVerifiedException", "AccountSuspendedException",
                   "SendingPausedException", "NotFoundException", "SignatureDoesNotMatch",
                   "UnrecognizedClientException", "TooManyRequestsException",
                   "LimitExceededException", "InternalFailure", "ServiceUnavailable")),
    first("ses", Hang(), outcome="timeout"),
    first("ses", ResetMidBody(), outcome="unknown"),
    first("resend", outcome="sent"),
    *(first("resend", RS(name, status), outcome="rejected", says=name)
      for name, status in (("validation_error", 400), ("missing_required_field", 422),
                           ("invalid_attachment", 422), ("invalid_from_address", 422))),
    *(first("resend", RS(name, status), outcome="failover")
      for name, status in (("missing_api_key", 401), ("invalid_api_key", 403),
                           ("validation_error", 403), ("rate_limit_exceeded", 429),
                           ("daily_quota_exceeded", 429), ("application_error", 500))),
    first("resend", RS("concurrent_idempotent_requests", 409), outcome="unknown"),
    first("resend", Hang(), outcome="timeout"),
    first("smtp", outcome="sent"),
    first("smtp", {"AUTH": "535 5.7.8 Authentication credentials invalid"}, outcome="failover",
          hits=0),
    first("smtp", {"AUTH": "454 4.7.0 Temporary authentication failure"}, outcome="failover",
          hits=0),
    first("smtp", {"MAIL": "451 4.3.0 Try again later"}, outcome="failover"),
    first("smtp", {"RCPT": "452 4.2.2 Mailbox full"}, outcome="failover"),
    first("smtp", {"RCPT": "550 5.1.1 No such user here"}, outcome="rejected",
          says="550 5.1.1 No such user here"),
    first("smtp", {"DATA": "554 5.3.0 No transaction"}, outcome="failover"),
    first("smtp", {"final dot": "451 4.3.0 Queue full"}, outcome="failover"),
    first("smtp", {"final dot": "554 5.6.0 Message refused"}, outcome="rejected",
          says="5.6.0 Message refused"),
    first("smtp", {"final dot": "hang"}, outcome="timeout"),
]


def unreachable(fake: Any, how: str) -> str:
    """A base URL for ``fake`` that cannot be reached in the way named by ``how``."""
    if how == "refuse":
        fake.refuse()
        return fake.url
    if how == "dns":
        return "http://unreachable.invalid"  # .invalid never resolves (RFC 2606)
    if how == "blackhole":
        return "http://192.0.2.1:9"  # TEST-NET-1: dropped (timeout) or unreachable at once
    assert how == "tls"
    return fake.url.replace("http://", "https://")  # TLS to a plain-HTTP port
    # (the fake does not count it as a hit: a ClientHello is no HTTP request)


def base_url_field(provider: str) -> str:
    """The field of a provider's base URL setting, read from its own rows."""
    return next(row.field for row in smsp.PROVIDERS[provider].settings
                if row.env.endswith("_BASE_URL"))


@pytest.mark.parametrize("case", CASES)
def test_provider_behaviour(case: Case, fakes: dict[str, Any], mailgun: FakeMailgun,
                            sendgrid: FakeSendGrid) -> None:
    for name, behaviours in case.script:
        fakes[name].script(*behaviours)
    urls = {base_url_field(name): unreachable(fakes[name], how)
            for name, how in case.unreachable}
    config = peers_config({name: fakes[name] for name in case.providers}, timeout=TIMEOUT,
                          **urls)
    with running(config) as server:
        status, _, body, elapsed = timed_send(server)

        assert (status, body.get("delivery", body.get("status"))) == \
            (case.status, case.delivery), body
        assert {name: fake.hits for name, fake in fakes.items()} == \
            {name: dict(case.hits).get(name, 0) for name in fakes}
        assert server.states() == dict(case.states)
        assert elapsed < BOUND
        accepted = {name: len(fake.accepted) for name, fake in fakes.items()}
        assert sum(accepted.values()) <= 1  # never sent twice
        warnings = server.lines.events("provider_reply_malformed")
        if case.status == 200:
            assert case.provider is not None and body["provider"] == case.provider
            assert accepted[case.provider] == 1
            if case.message_id:
                assert isinstance(body["message_id"], str) and body["message_id"]
                assert warnings == []
            else:
                assert body["message_id"] is None
                assert [(w["level"], w["provider"]) for w in warnings] == \
                    [("warning", case.provider)]
        else:
            assert set(body) == {"message", "request_id", "delivery"}
            assert warnings == []
            if case.delivery == "not_sent":
                assert sum(accepted.values()) == 0
        if case.status == 422:
            assert case.says in body["message"]
        access = server.lines.events("access", at_least=1)  # written just after the answer
        assert [(a["status"], a.get("delivery")) for a in access] == \
            [(case.status, case.delivery)]


# ------------------------------------------------ dedicated provider tests ---


def test_a_rejection_resets_the_failure_count(mailgun: FakeMailgun,
                                              sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500), Status(400), Status(500))
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, failure_threshold=2)
    with running(config) as server:
        assert timed_send(server)[0] == 200  # Mailgun 500, failed over: 1 failure of 2
        assert server.breakers["mailgun"].snapshot()["consecutive_failures"] == 1
        status, _, body, _ = timed_send(server)
        assert (status, body["delivery"]) == (422, "not_sent")
        assert server.breakers["mailgun"].snapshot()["consecutive_failures"] == 0
        assert timed_send(server)[0] == 200  # another 500: 1 failure again, still closed
        assert server.states() == {"mailgun": "closed", "sendgrid": "closed"}
        assert (mailgun.hits, sendgrid.hits) == (3, 2)


def test_every_circuit_open_is_503_and_a_successful_poll_reopens_the_way(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500), Status(503))  # the send, then the first poll
    sendgrid.script(Status(500))
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT)) as server:
        status, _, body, _ = timed_send(server)
        assert (status, body["delivery"]) == (502, "not_sent")
        assert server.states() == {"mailgun": "open", "sendgrid": "open"}

        status, headers, body, elapsed = timed_send(server)
        assert (status, body["delivery"]) == (503, "not_sent")
        assert int(headers["retry-after"]) >= 1
        assert elapsed < BOUND
        assert (mailgun.hits, sendgrid.hits) == (1, 1)  # no real mail along an open circuit

        server.timers.fire_next()  # Mailgun's poll fails (503): still open
        assert server.states() == {"mailgun": "open", "sendgrid": "open"}
        server.timers.fire_next()  # SendGrid's poll succeeds
        assert server.states() == {"mailgun": "open", "sendgrid": "closed"}
        assert sendgrid.accepted[-1]["subject"] == "poll"
        status, _, body, _ = timed_send(server)
        assert (status, body["provider"]) == (200, "sendgrid")
        assert (mailgun.hits, sendgrid.hits) == (2, 3)


def test_sendgrid_202_without_id_while_mailgun_circuit_is_open(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(503))
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT)) as server:
        assert timed_send(server)[2]["provider"] == "sendgrid"
        assert server.states()["mailgun"] == "open"
        sendgrid.script(Malformed2xx())
        status, _, body, elapsed = timed_send(server)
        assert (status, body["provider"], body["message_id"]) == (200, "sendgrid", None)
        assert elapsed < BOUND
        assert (mailgun.hits, sendgrid.hits) == (1, 2)
        assert (len(mailgun.accepted), len(sendgrid.accepted)) == (0, 2)
        [warning] = server.lines.events("provider_reply_malformed")
        assert (warning["level"], warning["provider"]) == ("warning", "sendgrid")
        assert "X-Message-Id" in warning["detail"]
        assert server.states() == {"mailgun": "open", "sendgrid": "closed"}


# ===================================================== bounded client side ===

HALF_REQUESTS = [
    pytest.param(b"POST /ema", id="half-request-line"),
    pytest.param(b"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode(),
                 id="half-headers"),
    pytest.param(b"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 + b'{"fromaddress": "a@example.com", ', id="half-body"),
]


@pytest.mark.parametrize("partial", HALF_REQUESTS)
def test_stalled_client_gets_408_and_is_closed(partial: bytes) -> None:
    client_timeout = 0.5
    with running(make_config(client_timeout=client_timeout)) as server:
        threads_before = threading.active_count()
        started = time.monotonic()
        raw = raw_exchange(server.port, partial, timeout=5.0)  # reads until the server closes
        elapsed = time.monotonic() - started
        assert status_of(raw) == 408, raw
        assert "connection: close" in header_block(raw)
        assert json_body(raw)["message"] == "request not received in time"
        assert elapsed < client_timeout + 1.0
        wait_for(lambda: threading.active_count() <= threads_before, 2.0)
        assert server.server.active_connections == 0
        assert server.request("GET", "/healthcheck")[0] == 200


def test_idle_keep_alive_connection_is_closed_silently() -> None:
    client_timeout = 0.5
    with running(make_config(client_timeout=client_timeout)) as server:
        conn = server.connect(timeout=5.0)
        try:
            conn.request("GET", "/healthcheck")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Connection") is None  # kept alive
            response.read()
            started = time.monotonic()
            assert conn.sock.recv(1024) == b""  # EOF, no 408 or any other byte
            assert time.monotonic() - started < client_timeout + 1.0
        finally:
            conn.close()


def test_max_connections_refuses_one_more_fast_and_frees_the_slot_on_close() -> None:
    with running(make_config(max_connections=3, client_timeout=10.0)) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            wait_for(lambda: server.server.active_connections == 3, 5.0)
            started = time.monotonic()
            request = b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"
            raw = raw_exchange(server.port, request, timeout=5.0)
            assert time.monotonic() - started < 1.0  # not waiting for any client budget
            assert status_of(raw) == 503, raw
            assert "connection: close" in header_block(raw)
            assert json_body(raw)["message"] == "overloaded"
            assert json_body(raw)["delivery"] == "not_sent"
            overloaded = server.lines.events("overloaded", at_least=1)  # logged just after
            assert [e["connections"] for e in overloaded] == [3]

            idle.pop().close()
            wait_for(lambda: server.server.active_connections == 2, 5.0)
            status, _, body = server.request("GET", "/healthcheck")
            assert (status, json.loads(body)["status"]) == (200, "ok")
        finally:
            for sock in idle:
                sock.close()


# ================================================ hostile bodies over HTTP ===


def email_with(**fields: Any) -> bytes:
    return json.dumps({**EMAIL, **fields}).encode()


HOSTILE = [
    pytest.param(b"[" * 1_000_000 + b"]" * 1_000_000, 400, "nested too deeply",
                 id="nested-a-million-deep"),
    pytest.param(email_with()[:-1] + b', "x": "\xff\xfe"}', 400, "not valid UTF-8",
                 id="invalid-utf8"),
    pytest.param(email_with(subject="a\x00b").replace(b"\\u0000", b"\x00"), 400,
                 "malformed JSON: Invalid control character", id="raw-nul-byte"),
    pytest.param(email_with(plaintextbody="a\x00b"), 400, "plaintextbody: must not contain NUL",
                 id="escaped-nul-in-body"),
    pytest.param(b"\xef\xbb\xbf" + email_with(), 400, "byte-order mark", id="byte-order-mark"),
    pytest.param(email_with()[:-1] + b', "n": ' + b"9" * 100_000 + b"}", 400,
                 "malformed JSON: Exceeds the limit", id="huge-number"),
    pytest.param(b'{"fromaddress": "a@example.com", "fromaddress": "b@example.com", '
                 b'"toaddress": "c@example.com"}', 400, "duplicate key 'fromaddress'",
                 id="duplicate-keys"),
    pytest.param(b'{"fromaddress": "a@example.com", "toaddress": "c@example.com", '
                 b'"subject": NaN}', 400, "NaN is not valid JSON", id="nan"),
]


@pytest.mark.parametrize(("body", "status", "message"), HOSTILE)
def test_hostile_body_is_refused_clearly_and_the_server_keeps_serving(
        body: bytes, status: int, message: str) -> None:
    with running(make_config(max_body_bytes=3 * 1024 * 1024,
                             max_inflight_body_bytes=3 * 1024 * 1024)) as server:
        got, _, data = server.request("POST", "/email", body, {
            "X-API-KEY": API_KEY, "Content-Type": "application/json"})
        assert got == status, data[:300]
        assert message in json.loads(data)["message"]
        assert server.lines.events("internal_error") == []
        assert server.send()[0] == 200  # still serving


def test_twenty_megabyte_body_gets_413_before_it_is_sent() -> None:
    with running(make_config(client_timeout=5.0)) as server:
        limit = server.service.config.max_body_bytes  # the default: 10 MiB as base64 + 1 MiB
        head = ("POST /email HTTP/1.1\r\nHost: x\r\n"
                f"X-API-KEY: {API_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {20 * 1024 * 1024}\r\n\r\n").encode()
        started = time.monotonic()
        raw = raw_exchange(server.port, head, timeout=5.0)  # the body is never sent
        assert time.monotonic() - started < 2.5  # well before the 5 s client budget
        assert status_of(raw) == 413
        assert "connection: close" in header_block(raw)
        assert json_body(raw)["message"] == f"body larger than {limit} bytes"
        assert server.send()[0] == 200


# ================================================= graceful shutdown (real) ===


def post_email(port: int, results: list[Any]) -> None:
    """One POST /email on a new connection; appends the status (or the exception)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/email", json.dumps(EMAIL).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        results.append(response.status)
    except (OSError, http.client.HTTPException) as exc:
        results.append(exc)
    finally:
        conn.close()


def start_posts(port: int, n: int, provider: FakeMailgun) -> tuple[list[threading.Thread],
                                                                   list[Any]]:
    """``n`` concurrent POST /email, all in flight at the provider when this returns.

    They start in batches of 4: the fakes listen with socketserver's backlog of 5, and 20
    simultaneous connects overflow it (a SYN retransmitted a second later, or a reset).
    """
    results: list[Any] = []
    threads = []
    for start in range(0, n, 4):
        for _ in range(min(4, n - start)):
            thread = threading.Thread(target=post_email, args=(port, results), daemon=True)
            thread.start()
            threads.append(thread)
        assert provider.wait_for_hits(len(threads), timeout=10)
    return threads, results


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_connections(
        mailgun: FakeMailgun) -> None:
    grace = 5.0
    mailgun.script(*[Delay(1.0)] * 20)
    with smsp_process(**mailgun_env(mailgun, SMSP_SHUTDOWN_GRACE=str(grace))) as process:
        threads, results = start_posts(process.port, 20, mailgun)
        signalled = process.terminate()

        finished_when_refused = None
        while time.monotonic() - signalled < 3.0:
            try:
                probe = socket.create_connection(("127.0.0.1", process.port), timeout=1.0)
            except ConnectionRefusedError:
                finished_when_refused = len(results)
                break
            except ConnectionResetError:
                continue  # queued on the listener as it closed
            probe.close()
            time.sleep(0.01)
        assert finished_when_refused is not None, "the listener stayed open after SIGTERM"
        assert finished_when_refused < 20  # refused while the old requests were still running

        code = process.proc.wait(timeout=grace + 5)
        exited_after = time.monotonic() - signalled
        for thread in threads:
            thread.join(5)
        assert results == [200] * 20
        assert len(mailgun.accepted) == 20
        assert code == 0
        assert exited_after < grace + 2.0
        assert process.wait_for("stopped")
        assert process.events("shutdown_grace_exceeded") == []


def test_shutdown_grace_exceeded_exits_1_naming_the_count(mailgun: FakeMailgun) -> None:
    grace = 0.5
    mailgun.script(Delay(3.0), Delay(3.0))
    with smsp_process(**mailgun_env(mailgun, SMSP_SHUTDOWN_GRACE=str(grace))) as process:
        threads, results = start_posts(process.port, 2, mailgun)
        signalled = process.terminate()
        code = process.proc.wait(timeout=grace + 5)
        assert time.monotonic() - signalled < 2.5  # before the provider's 3 s answer
        assert code == 1
        [exceeded] = process.wait_for("shutdown_grace_exceeded")
        assert (exceeded["level"], exceeded["inflight"]) == ("error", 2)
        assert process.events("stopped") == []
        for thread in threads:
            thread.join(5)
        assert 200 not in results  # those requests were cut off, not answered


def test_sigterm_stops_the_server_whichever_thread_takes_it(mailgun: FakeMailgun) -> None:
    """A process-directed signal goes to any thread that does not block it, but a Python
    handler runs only in the main thread.  smsp 2.0.0 slept in stop.wait(3600), so a SIGTERM
    taken by another thread (seen with a plain kill() under load) was acted on only when the
    hour was up.  Here it is handed to a thread other than the main one that can take it."""
    mailgun.script(*[Delay(1.0)] * 4)
    with smsp_process(**mailgun_env(mailgun)) as process:
        threads, results = start_posts(process.port, 4, mailgun)
        main, *others = process.threads()
        assert len(others) >= 2 + 4  # the watchdog, the accept loop, one per request
        assert signal.SIGTERM not in process.blocked_signals(main)
        takers = [tid for tid in others if signal.SIGTERM not in process.blocked_signals(tid)]
        signalled = process.terminate(takers[0] if takers else main)
        try:
            code = process.proc.wait(timeout=4)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"SIGTERM taken by thread {takers[:1] or [main]} was not acted on"
        assert time.monotonic() - signalled < 3.0
        for thread in threads:
            thread.join(5)
        assert results == [200] * 4


def test_idle_keep_alive_connection_does_not_delay_shutdown() -> None:
    env = {"SMSP_MOCK_EMAIL_SERVICE": "true", "SMSP_SHUTDOWN_GRACE": "10",
           "SMSP_CLIENT_TIMEOUT": "10"}
    with smsp_process(**env) as process:
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        try:
            conn.request("GET", "/healthcheck")
            response = conn.getresponse()
            response.read()
            assert (response.status, response.getheader("Connection")) == (200, None)
            signalled = process.terminate()
            code = process.proc.wait(timeout=10)
            assert time.monotonic() - signalled < 3.0  # well before grace and client budget
            assert code == 0
            assert conn.sock.recv(1024) == b""  # closed without a byte
        finally:
            conn.close()
        assert process.wait_for("stopped")


# ================================================================= secrets ===

SECRET_BODY = "BODY-SECRET-the-password-is-swordfish"
WRONG_KEY = "WRONG-client-KEY-SECRET-zzz"


def test_no_secret_or_body_reaches_the_log_even_with_debug(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    email = {**EMAIL, "plaintextbody": SECRET_BODY}
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, log_debug=True)
    with running(config) as server:
        assert timed_send(server, email)[2]["provider"] == "mailgun"
        mailgun.script(Status(500))
        assert timed_send(server, email)[2]["provider"] == "sendgrid"  # failover
        mailgun.script(Status(503))
        server.timers.fire_next()  # failed poll
        server.timers.fire_next()  # successful poll
        assert server.states() == {"mailgun": "closed", "sendgrid": "closed"}
        mailgun.script(Status(400))
        assert timed_send(server, email)[0] == 422
        mailgun.script(Status(401))
        sendgrid.script(Delay(LATE))
        assert timed_send(server, email)[0] == 504  # Mailgun 401, then SendGrid times out
        assert timed_send(server, email)[0] == 503
        assert timed_send(server, email, X_API_KEY=WRONG_KEY)[0] == 401
        server.timers.fire_next()
        server.timers.fire_next()
        assert server.states() == {"mailgun": "closed", "sendgrid": "closed"}

        text = server.lines.text
        assert len(server.lines.events("provider_attempt")) >= 6  # debug lines were written
        assert "bob@example.org" in text  # addresses do go to debug lines
        mg_basic = base64.b64encode(f"api:{MG_KEY}".encode()).decode()
        for secret in (API_KEY, MG_KEY, SG_KEY, mg_basic, SECRET_BODY, WRONG_KEY, "swordfish"):
            assert secret not in text, secret


CRLF = [
    pytest.param({"subject": "Hello\r\nBcc: eve@example.net"}, "subject", id="subject-crlf"),
    pytest.param({"subject": "Hello\nBcc: eve@example.net"}, "subject", id="subject-lf"),
    pytest.param({"toaddress": "bob@example.org\r\nBcc: eve@example.net"}, "toaddress",
                 id="to-crlf"),
    pytest.param({"toaddress": "Bob\r\n <bob@example.org>"}, "toaddress", id="to-name-crlf"),
    pytest.param({"fromaddress": "Alice <alice@example.com>\rBcc: eve@example.net"},
                 "fromaddress", id="from-cr"),
]


@pytest.mark.parametrize(("change", "field"), CRLF)
def test_cr_or_lf_in_headers_is_refused_and_nothing_reaches_a_provider(
        change: dict[str, str], field: str, mailgun: FakeMailgun,
        sendgrid: FakeSendGrid) -> None:
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT)) as server:
        status, _, body, _ = timed_send(server, {**EMAIL, **change})
        assert status == 400
        assert body["message"].startswith(f"{field}: must not contain CR, LF")
        assert (mailgun.hits, sendgrid.hits) == (0, 0)


# ============================================== provider connection pool ===


def test_pool_reuses_one_connection_for_sequential_sends(mailgun: FakeMailgun,
                                                         sendgrid: FakeSendGrid) -> None:
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT, pool_size=16)) as server:
        assert [timed_send(server)[0] for _ in range(3)] == [200, 200, 200]
        assert (mailgun.hits, mailgun.connections) == (3, 1)


def test_pool_size_zero_opens_a_connection_per_send(mailgun: FakeMailgun,
                                                    sendgrid: FakeSendGrid) -> None:
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT, pool_size=0)) as server:
        assert [timed_send(server)[0] for _ in range(2)] == [200, 200]
        assert (mailgun.hits, mailgun.connections) == (2, 2)


@pytest.mark.parametrize("first", [
    pytest.param(Delay(LATE), id="timeout"),
    pytest.param(ResetMidBody(), id="reset-mid-body"),
    pytest.param(CloseWithoutResponse(), id="close-without-response"),
])
def test_no_connection_reuse_after_an_unknown_outcome(first: Behaviour, mailgun: FakeMailgun,
                                                      sendgrid: FakeSendGrid) -> None:
    """After a timeout, the late reply to the first request must not be read as the reply to
    the next one: the next send opens a new connection and gets its own answer."""
    mailgun.script(first)
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, failure_threshold=2)
    with running(config) as server:
        status, _, body, _ = timed_send(server)
        assert body["delivery"] == "unknown"
        status, _, body, elapsed = timed_send(server)
        assert (status, body["provider"]) == (200, "mailgun")
        assert elapsed < BOUND
        assert (mailgun.hits, mailgun.connections, sendgrid.hits) == (2, 2, 0)
        assert body["message_id"].endswith(f"@{MG_DOMAIN}>")


class RawProvider:
    """A hand-written HTTP server for what the fakes cannot do: per connection it reads one
    request, writes ``reply`` and closes (FIN), or with ``reset_after`` stops reading and
    resets the connection after that many seconds."""

    def __init__(self, reply: bytes = b"", reset_after: float | None = None) -> None:
        self.reply = reply
        self.reset_after = reset_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so that the accept loop sees close() soon
        self._stop = threading.Event()
        if reset_after is not None:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.closed = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            self.connections += 1
            with conn:
                if self.reset_after is not None:
                    time.sleep(self.reset_after)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    self._answer(conn)
            self.closed.release()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk
        conn.sendall(self.reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@contextmanager
def http_client(url: str, **options: Any) -> Iterator[smsp.HTTPClient]:
    watchdog = smsp.Watchdog()
    client = smsp.HTTPClient(urllib.parse.urlsplit(url), watchdog=watchdog, **options)
    try:
        yield client
    finally:
        client.close()
        watchdog.stop()


def test_pool_discards_a_connection_the_provider_closed() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    provider = RawProvider(reply)  # a keep-alive answer, then it closes the connection anyway
    try:
        with http_client(provider.url, pool_size=16) as client:
            first = client.post("/send", {}, b"one", time.monotonic() + 5)
            assert provider.closed.acquire(timeout=5)  # the pooled connection is now dead
            second = client.post("/send", {}, b"two", time.monotonic() + 5)
            assert (first.status, second.status, second.body) == (200, 200, b"{}")
            assert (client.connections_made, provider.connections) == (2, 2)
    finally:
        provider.close()


def test_a_reply_body_cut_short_by_a_fin_is_unknown() -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
             b'{"id": "<')
    provider = RawProvider(reply)
    try:
        with http_client(provider.url, pool_size=16) as client:
            with pytest.raises(smsp.ProviderError) as caught:
                client.post("/send", {}, b"one", time.monotonic() + 5)
            assert caught.value.outcome is smsp.Outcome.UNKNOWN
    finally:
        provider.close()


def test_failure_while_writing_the_request_is_not_sent() -> None:
    provider = RawProvider(reset_after=0.3)  # reads nothing, then resets
    try:
        with http_client(provider.url, pool_size=16) as client:
            body = b"x" * (32 * 1024 * 1024)  # far more than the socket buffers hold
            started = time.monotonic()
            with pytest.raises(smsp.ProviderError) as caught:
                client.post("/send", {}, body, time.monotonic() + 5)
            assert caught.value.outcome is smsp.Outcome.NOT_SENT
            assert time.monotonic() - started < 3.0
    finally:
        provider.close()


# ========================================================= idempotency ===


def test_idempotency_key_replays_the_first_answer_without_sending_again(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid, store_settings: dict[str, Any]) -> None:
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, **store_settings)
    with running(config) as server:
        status, headers, first, _ = timed_send(server, Idempotency_Key="order-1")
        assert status == 200
        assert "idempotent-replayed" not in headers
        status, headers, again, _ = timed_send(server, Idempotency_Key="order-1")
        assert (status, headers["idempotent-replayed"], again) == (200, "true", first)
        assert (mailgun.hits, len(mailgun.accepted), sendgrid.hits) == (1, 1, 0)

        status, _, body, _ = timed_send(server, {**EMAIL, "subject": "Other"},
                                        Idempotency_Key="order-1")
        assert (status, body["delivery"]) == (422, "not_sent")
        assert "Idempotency-Key was already used with a different request body" in \
            body["message"]
        assert mailgun.hits == 1


def test_idempotency_key_replays_an_unknown_outcome_instead_of_sending_again(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid, store_settings: dict[str, Any]) -> None:
    mailgun.script(Delay(LATE))
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, failure_threshold=5,
                             **store_settings)
    with running(config) as server:
        status, _, first, _ = timed_send(server, Idempotency_Key="order-2")
        assert (status, first["delivery"]) == (504, "unknown")
        status, headers, again, _ = timed_send(server, Idempotency_Key="order-2")
        assert (status, headers["idempotent-replayed"], again) == (504, "true", first)
        assert (mailgun.hits, sendgrid.hits) == (1, 0)


def test_idempotency_key_in_flight_gets_409(mailgun: FakeMailgun, sendgrid: FakeSendGrid,
                                            store_settings: dict[str, Any]) -> None:
    mailgun.script(Delay(0.5))
    with running(provider_config(mailgun, sendgrid, timeout=1.5, **store_settings)) as server:
        results: list[Any] = []
        first = threading.Thread(
            target=lambda: results.append(server.send(Idempotency_Key="order-3")))
        first.start()
        try:
            assert mailgun.wait_for_hits(1)
            status, _, body, elapsed = timed_send(server, Idempotency_Key="order-3")
            assert status == 409
            assert "still in progress" in body["message"]
            assert elapsed < 0.5  # answered at once, not after the first one
        finally:
            first.join(5)
        assert results[0][0] == 200
        status, headers, _, _ = timed_send(server, Idempotency_Key="order-3")
        assert (status, headers["idempotent-replayed"]) == (200, "true")
        assert (mailgun.hits, len(mailgun.accepted)) == (1, 1)


def test_idempotency_keys_are_scoped_per_api_key(mailgun: FakeMailgun, sendgrid: FakeSendGrid,
                                                 store_settings: dict[str, Any]) -> None:
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, api_keys=("k1", "k2"),
                             **store_settings)
    with running(config) as server:
        status, headers, _, _ = timed_send(server, X_API_KEY="k1", Idempotency_Key="same")
        assert (status, "idempotent-replayed" in headers) == (200, False)
        status, headers, _, _ = timed_send(server, X_API_KEY="k2", Idempotency_Key="same")
        assert (status, "idempotent-replayed" in headers) == (200, False)
        status, headers, _, _ = timed_send(server, X_API_KEY="k1", Idempotency_Key="same")
        assert (status, headers.get("idempotent-replayed")) == (200, "true")
        assert mailgun.hits == 2


@pytest.mark.parametrize("key", ["k" * 256, "has space", "tab\tinside", "caf\u00e9"])
def test_invalid_idempotency_key_is_400(key: str, mailgun: FakeMailgun,
                                        sendgrid: FakeSendGrid) -> None:
    with running(provider_config(mailgun, sendgrid, timeout=TIMEOUT)) as server:
        status, _, body, _ = timed_send(server, Idempotency_Key=key)
        assert status == 400
        assert "Idempotency-Key must be 1-255 visible ASCII characters" in body["message"]
        assert mailgun.hits == 0
        assert timed_send(server, Idempotency_Key="k" * 255)[0] == 200  # the longest allowed


def test_503_is_not_stored_so_a_retry_after_recovery_sends(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid, store_settings: dict[str, Any]) -> None:
    mailgun.script(Status(500))
    sendgrid.script(Status(500))
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, **store_settings)
    with running(config) as server:
        assert timed_send(server)[0] == 502  # both circuits open now
        status, _, body, _ = timed_send(server, Idempotency_Key="order-4")
        assert (status, body["delivery"]) == (503, "not_sent")
        server.timers.fire_next()
        server.timers.fire_next()
        assert server.states() == {"mailgun": "closed", "sendgrid": "closed"}
        hits = mailgun.hits
        status, headers, body, _ = timed_send(server, Idempotency_Key="order-4")
        assert (status, body["provider"], "idempotent-replayed" in headers) == \
            (200, "mailgun", False)
        assert mailgun.hits == hits + 1


def test_validation_failures_are_not_stored(mailgun: FakeMailgun, sendgrid: FakeSendGrid,
                                            store_settings: dict[str, Any]) -> None:
    config = provider_config(mailgun, sendgrid, timeout=TIMEOUT, **store_settings)
    with running(config) as server:
        bad = {k: v for k, v in EMAIL.items() if k != "toaddress"}
        status, headers, body, _ = timed_send(server, bad, Idempotency_Key="order-5")
        assert (status, "idempotent-replayed" in headers) == (400, False)
        assert body["message"] == "toaddress: is required"
        status, headers, _, _ = timed_send(server, bad, Idempotency_Key="order-5")
        assert (status, "idempotent-replayed" in headers) == (400, False)
        status, headers, body, _ = timed_send(server, Idempotency_Key="order-5")
        assert (status, "idempotent-replayed" in headers) == (200, False)
        assert mailgun.hits == 1
