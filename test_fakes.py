"""Tests for fakes.py: the fake providers are as strict as the real APIs and misbehave on cue.

Everything goes over real sockets with http.client. Time-based behaviours use waits under 0.3 s.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fakes import (
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
from testkit import MG_DOMAIN, MG_KEY, SG_KEY

MG_PATH = f"/v3/{MG_DOMAIN}/messages"
MG_AUTH = "Basic " + base64.b64encode(f"api:{MG_KEY}".encode()).decode()
MG_FORM = {"from": "sender@example.com", "to": "rcpt@example.org", "subject": "Hello there",
           "text": "Plain body line 1\nline 2 é"}
SG_PATH = "/v3/mail/send"
SG_MAIL: dict[str, Any] = {
    "from": {"email": "sender@example.com"},
    "subject": "Hello there",
    "personalizations": [{"to": [{"email": "rcpt@example.org"}]}],
    "content": [{"type": "text/plain", "value": "Plain body line 1\nline 2 é"}],
}


@dataclass
class Reply:
    """What the client saw."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(fake: FakeMailgun | FakeSendGrid, timeout: float = 2.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(urllib.parse.urlsplit(fake.url).netloc, timeout=timeout)


def call(conn: http.client.HTTPConnection, path: str, body: bytes | str | None,
         headers: Mapping[str, str], method: str = "POST") -> Reply:
    conn.request(method, path, body, dict(headers))
    response = conn.getresponse()
    return Reply(response.status, response.headers, response.read())


def mg_headers(**overrides: str) -> dict[str, str]:
    return {"Authorization": MG_AUTH, "Content-Type": "application/x-www-form-urlencoded",
            **overrides}


def sg_headers(**overrides: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SG_KEY}", "Content-Type": "application/json",
            "Accept": "application/json", **overrides}


def mg_send(mg: FakeMailgun, form: Mapping[str, str] | None = None, timeout: float = 2.0,
            **headers: str) -> Reply:
    body = urllib.parse.urlencode(MG_FORM if form is None else form)
    return call(connect(mg, timeout), MG_PATH, body, mg_headers(**headers))


def sg_send(sg: FakeSendGrid, mail: Any = None, timeout: float = 2.0, **headers: str) -> Reply:
    body = json.dumps(SG_MAIL if mail is None else mail)
    return call(connect(sg, timeout), SG_PATH, body, sg_headers(**headers))


@pytest.fixture
def mg(mailgun: FakeMailgun) -> FakeMailgun:
    return mailgun  # conftest's fake, under a short name


@pytest.fixture
def sg(sendgrid: FakeSendGrid) -> FakeSendGrid:
    return sendgrid


# ---------------------------------------------------------------- Mailgun contract


def test_mailgun_accepts_sdk_form_and_answers_bracketed_id(mg: FakeMailgun) -> None:
    reply = mg_send(mg)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"<\d{14}\.\d+@mg\.example\.com>", reply.json()["id"])
    assert reply.json()["message"] == "Queued. Thank you."
    assert mg.accepted == [{key: [value] for key, value in MG_FORM.items()}]
    assert mg.requests[0].status == 200
    assert mg.requests[0].headers["authorization"] == MG_AUTH


def test_mailgun_accepts_multipart_as_curl_sends_it(mg: FakeMailgun) -> None:
    parts = [("from", "Excited User <sender@example.com>"), ("to", "rcpt@example.org"),
             ("subject", "Hi"), ("text", "body é")]
    body = "".join(f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                   for name, value in parts) + "--XyZ--\r\n"
    headers = mg_headers(**{"Content-Type": "multipart/form-data; boundary=XyZ"})
    reply = call(connect(mg), MG_PATH, body.encode(), headers)
    assert reply.status == 200
    assert mg.accepted[0]["from"] == ["Excited User <sender@example.com>"]
    assert mg.accepted[0]["text"] == ["body é"]


def test_mailgun_ids_are_unique(mg: FakeMailgun) -> None:
    ids = {mg_send(mg).json()["id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("auth", [None, "Basic " + base64.b64encode(b"api:wrong").decode(),
                                  "Basic " + base64.b64encode(f"key:{MG_KEY}".encode()).decode(),
                                  f"Bearer {MG_KEY}"])
def test_mailgun_bad_auth_gets_forbidden_text(mg: FakeMailgun, auth: str | None) -> None:
    headers = mg_headers()
    if auth is None:
        del headers["Authorization"]
    else:
        headers["Authorization"] = auth
    reply = call(connect(mg), MG_PATH, urllib.parse.urlencode(MG_FORM), headers)
    assert (reply.status, reply.body) == (401, b"Forbidden")
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.headers["WWW-Authenticate"] == 'Basic realm="MG API"'
    assert mg.accepted == []


def test_mailgun_unknown_domain_gets_domain_not_found(mg: FakeMailgun) -> None:
    reply = call(connect(mg), "/v3/other.example.com/messages", urllib.parse.urlencode(MG_FORM),
                 mg_headers())
    assert reply.status == 404
    assert reply.json() == {"message": "Domain not found: other.example.com"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/v3/messages"), ("GET", MG_PATH),
                                              ("POST", f"/v2/{MG_DOMAIN}/messages")])
def test_mailgun_unknown_route_gets_nginx_html_404(mg: FakeMailgun, method: str,
                                                   path: str) -> None:
    reply = call(connect(mg), path, urllib.parse.urlencode(MG_FORM), mg_headers(), method)
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "text/html"
    assert b"<title>404 Not Found</title>" in reply.body


def test_mailgun_rejects_json_body(mg: FakeMailgun) -> None:
    headers = mg_headers(**{"Content-Type": "application/json"})
    reply = call(connect(mg), MG_PATH, json.dumps(MG_FORM), headers)
    assert reply.status == 400
    assert "message" in reply.json()
    assert mg.accepted == []


def test_mailgun_rejects_form_that_is_not_utf8(mg: FakeMailgun) -> None:
    body = urllib.parse.urlencode(MG_FORM) + "&text=%FF"
    assert call(connect(mg), MG_PATH, body, mg_headers()).status == 400


@pytest.mark.parametrize(("change", "message"), [
    ({"from": None}, "from parameter is missing"),
    ({"from": ""}, "from parameter is missing"),
    ({"to": None}, "to parameter is missing"),
    ({"subject": None}, "subject parameter is missing"),
    ({"text": None},
     "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified"),
    ({"to": "not-an-address"},
     "'to' parameter is not a valid address. please check documentation"),
    ({"to": "rcpt@example.org, bad@"},
     "'to' parameter is not a valid address. please check documentation"),
    ({"from": "Sender <sender@example>"},
     "'from' parameter is not a valid address. please check documentation"),
])
def test_mailgun_field_errors_use_mailgun_wording(mg: FakeMailgun, change: dict[str, Any],
                                                  message: str) -> None:
    form = {k: v for k, v in {**MG_FORM, **change}.items() if v is not None}
    reply = mg_send(mg, form)
    assert (reply.status, reply.json()) == (400, {"message": message})
    assert mg.requests[0].status == 400
    assert mg.accepted == []


@pytest.mark.parametrize("change", [
    {"subject": ""},
    {"text": None, "html": "<p>hi</p>"},
    {"to": '"Doe, Jane" <jane@example.org>, bob@example.org'},
    {"from": "Excited User <sender@example.com>"},
])
def test_mailgun_accepts_valid_variants(mg: FakeMailgun, change: dict[str, Any]) -> None:
    form = {k: v for k, v in {**MG_FORM, **change}.items() if v is not None}
    assert mg_send(mg, form).status == 200


def test_mailgun_body_over_limit_gets_nginx_413() -> None:
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY, max_body=64) as mg:
        reply = mg_send(mg, {**MG_FORM, "text": "x" * 100})
    assert reply.status == 413
    assert b"<title>413 Request Entity Too Large</title>" in reply.body


def test_post_without_length_gets_411_and_leaves_script_alone(mg: FakeMailgun) -> None:
    mg.script(Status(503))
    with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(mg.url).port),
                                  timeout=2) as s:
        s.sendall(f"POST {MG_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {MG_AUTH}\r\n\r\n"
                  .encode())
        response = http.client.HTTPResponse(s)
        response.begin()
        assert response.status == 411
        assert response.headers["Content-Type"] == "text/html"
        assert response.headers["Connection"] == "close"
        assert int(response.headers["Content-Length"]) == len(response.read())
    assert mg.hits == 1
    assert mg_send(mg).status == 503


def test_chunked_request_body_is_accepted(mg: FakeMailgun) -> None:
    body = urllib.parse.urlencode(MG_FORM).encode()
    conn = connect(mg)
    conn.request("POST", MG_PATH, iter([body[:10], body[10:]]), mg_headers(),
                 encode_chunked=True)
    assert conn.getresponse().status == 200
    assert mg.requests[0].headers["transfer-encoding"] == "chunked"
    assert mg.accepted[0]["subject"] == ["Hello there"]


# ---------------------------------------------------------------- SendGrid contract


def test_sendgrid_success_is_202_empty_with_message_id(sg: FakeSendGrid) -> None:
    reply = sg_send(sg)
    assert (reply.status, reply.body) == (202, b"")
    assert reply.headers["Content-Length"] == "0"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", reply.headers["X-Message-Id"])
    assert reply.headers["X-RateLimit-Limit"] and reply.headers["X-RateLimit-Reset"].isdigit()
    assert sg.accepted == [SG_MAIL]
    assert sg.requests[0].fields == SG_MAIL


def test_sendgrid_bad_key_gets_401_errors_body(sg: FakeSendGrid) -> None:
    reply = sg_send(sg, Authorization="Bearer SG.wrong")
    assert reply.status == 401
    assert reply.json() == {"errors": [{
        "message": "The provided authorization grant is invalid, expired, or revoked",
        "field": None, "help": None}]}
    assert "X-RateLimit-Remaining" in reply.headers


def test_sendgrid_empty_content_value_lists_the_field(sg: FakeSendGrid) -> None:
    mail = {**SG_MAIL, "content": [{"type": "text/plain", "value": ""}]}
    reply = sg_send(sg, mail)
    assert reply.status == 400
    [error] = reply.json()["errors"]
    assert error["field"] == "content.0.value"
    assert error["message"] == ("The content value must be a string at least one character in "
                                "length.")
    assert sg.accepted == []


def test_sendgrid_collects_every_shape_problem_in_one_400(sg: FakeSendGrid) -> None:
    mail = {"from": {"name": "No Email"}, "personalizations": [{"to": []}, {"to": ["x@y.z"]}],
            "content": [{"type": "text/csv", "value": "v"}]}
    reply = sg_send(sg, mail)
    fields = [error["field"] for error in reply.json()["errors"]]
    assert reply.status == 400
    assert fields == ["personalizations.0.to", "personalizations.1.to.0", "from.email",
                      "subject", "content.0.type"]


def test_sendgrid_missing_personalizations_and_content(sg: FakeSendGrid) -> None:
    reply = sg_send(sg, {"from": {"email": "sender@example.com"}, "subject": "s"})
    fields = {error["field"] for error in reply.json()["errors"]}
    assert fields == {"personalizations", "content"}


def test_sendgrid_without_accept_gets_406(sg: FakeSendGrid) -> None:
    headers = sg_headers()
    del headers["Accept"]
    reply = call(connect(sg), SG_PATH, json.dumps(SG_MAIL), headers)
    assert reply.status == 406
    assert reply.json()["errors"][0]["message"] == "Missing Accept header"


def test_sendgrid_accept_check_can_be_disabled() -> None:
    with FakeSendGrid(api_key=SG_KEY, require_accept=False) as sg:
        headers = sg_headers()
        del headers["Accept"]
        assert call(connect(sg), SG_PATH, json.dumps(SG_MAIL), headers).status == 202


def test_sendgrid_wrong_content_type_gets_415(sg: FakeSendGrid) -> None:
    assert sg_send(sg, **{"Content-Type": "text/plain"}).status == 415


def test_sendgrid_non_json_body_gets_bad_request(sg: FakeSendGrid) -> None:
    reply = call(connect(sg), SG_PATH, b"{not json\xff", sg_headers())
    assert reply.status == 400
    assert reply.json()["errors"][0]["message"] == "Bad Request"


def test_sendgrid_unknown_path_404_and_wrong_method_405(sg: FakeSendGrid) -> None:
    conn = connect(sg)
    assert call(conn, "/v3/mail/sendx", json.dumps(SG_MAIL), sg_headers()).status == 404
    reply = call(conn, SG_PATH, None, sg_headers(), method="GET")
    assert reply.status == 405
    assert reply.json()["errors"][0]["message"] == "method not allowed"


def test_sendgrid_unverified_sender_gets_403() -> None:
    with FakeSendGrid(api_key=SG_KEY, verified_senders={"ok@example.com"}) as sg:
        reply = sg_send(sg)
        assert reply.status == 403
        assert reply.json()["errors"][0]["field"] == "from"
        mail = {**SG_MAIL, "from": {"email": "OK@example.com"}}
        assert sg_send(sg, mail).status == 202


def test_sendgrid_body_over_limit_gets_413() -> None:
    with FakeSendGrid(api_key=SG_KEY, max_body=64) as sg:
        reply = sg_send(sg)
    assert reply.status == 413
    assert reply.json()["errors"][0]["message"] == "content too large"


# ---------------------------------------------------------------- Status and the script


def test_mailgun_status_429_has_real_body_and_retry_after(mg: FakeMailgun) -> None:
    mg.script(Status(429))
    reply = mg_send(mg)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "120"
    assert "account-requests-per-sec limit exceeded" in reply.json()["message"]
    assert (mg.hits, mg.accepted) == (1, [])


def test_sendgrid_status_429_has_rate_limit_headers(sg: FakeSendGrid) -> None:
    sg.script(Status(429))
    reply = sg_send(sg)
    assert reply.status == 429
    assert reply.json() == {"errors": [{"field": None, "message": "too many requests"}]}
    assert reply.headers["X-RateLimit-Remaining"] == "0"
    assert int(reply.headers["X-RateLimit-Reset"]) > time.time()


def test_status_body_and_headers_override_defaults(mg: FakeMailgun) -> None:
    mg.script(Status(429, headers={"Retry-After": "1"}), Status(500, body={"message": "boom"}))
    assert mg_send(mg).headers["Retry-After"] == "1"
    assert mg_send(mg).json() == {"message": "boom"}


def test_status_2xx_still_runs_strict_checks(mg: FakeMailgun) -> None:
    mg.script(Status(200), Status(200))
    assert mg_send(mg, {**MG_FORM, "to": "bad"}).status == 400
    assert mg_send(mg).status == 200
    assert len(mg.accepted) == 1


def test_script_is_fifo_then_normal_and_reset_clears_it(mg: FakeMailgun) -> None:
    mg.script(Status(503), Status(500))
    assert [mg_send(mg).status for _ in range(3)] == [503, 500, 200]
    mg.script(Status(503))
    mg.reset()
    assert (mg.hits, mg.accepted, mg.connections) == (0, [], 0)
    assert mg_send(mg).status == 200


# ---------------------------------------------------------------- faults seen by the client


def test_reset_before_response_is_connection_reset(mg: FakeMailgun) -> None:
    mg.script(ResetBeforeResponse())
    with pytest.raises(ConnectionResetError) as caught:
        mg_send(mg)
    assert not isinstance(caught.value, http.client.RemoteDisconnected)
    assert mg.hits == 1
    assert mg.requests[0].status is None
    assert mg.accepted == []


def test_reset_mid_body_delivers_headers_then_resets(mg: FakeMailgun) -> None:
    mg.script(ResetMidBody())
    conn = connect(mg)
    conn.request("POST", MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers())
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        response.read()
    assert len(mg.accepted) == 1  # the provider queued it; only the answer was lost


def test_close_without_response_is_remote_disconnected(sg: FakeSendGrid) -> None:
    sg.script(CloseWithoutResponse())
    with pytest.raises(http.client.RemoteDisconnected):
        sg_send(sg)
    assert sg.hits == 1
    assert sg.accepted == []


def test_hang_is_released_by_close() -> None:
    mg = FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY)
    mg.script(Hang())
    outcome: list[BaseException] = []

    def client() -> None:
        try:
            mg_send(mg, timeout=5.0)
        except OSError as exc:  # ConnectionError expected, asserted below
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert mg.wait_for_hits(1)
    started = time.monotonic()
    mg.close()
    thread.join(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionError)
    mg.close()  # idempotent


def test_delay_trips_a_client_read_timeout(mg: FakeMailgun) -> None:
    mg.script(Delay(0.25))
    with pytest.raises(TimeoutError):
        mg_send(mg, timeout=0.05)
    assert mg.hits == 1


def test_delay_then_normal_success(sg: FakeSendGrid) -> None:
    sg.script(Delay(0.1))
    started = time.monotonic()
    reply = sg_send(sg)
    assert time.monotonic() - started >= 0.1
    assert reply.status == 202


def test_drip_arrives_slowly_but_completely(mg: FakeMailgun) -> None:
    mg.script(Drip(interval=0.01, chunk=8))
    conn = connect(mg, timeout=0.2)  # per-read timeout far above the drip interval
    conn.request("POST", MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers())
    response = conn.getresponse()
    length = int(response.headers["Content-Length"])
    started = time.monotonic()
    body = response.read()
    assert time.monotonic() - started >= (length // 8 - 1) * 0.01
    assert len(body) == length
    assert json.loads(body)["message"] == "Queued. Thank you."


def test_sendgrid_drip_sends_a_json_body_with_message_id(sg: FakeSendGrid) -> None:
    sg.script(Drip(interval=0.005, chunk=4))
    reply = sg_send(sg)
    assert reply.status == 202
    assert reply.headers["X-Message-Id"]
    assert reply.json() and reply.headers["Content-Type"] == "application/json"


def test_malformed_2xx_counts_as_accepted(mg: FakeMailgun, sg: FakeSendGrid) -> None:
    mg.script(Malformed2xx())
    sg.script(Malformed2xx())
    mg_reply = mg_send(mg)
    sg_reply = sg_send(sg)
    assert mg_reply.status == 200 and mg_reply.headers["Content-Type"] == "text/html"
    with pytest.raises(ValueError):
        mg_reply.json()
    assert sg_reply.status == 202 and "X-Message-Id" not in sg_reply.headers
    assert len(mg.accepted) == len(sg.accepted) == 1


def test_refuse_gives_connection_refused_and_drops_pooled_connections(mg: FakeMailgun) -> None:
    url = mg.url
    pooled = connect(mg)
    assert call(pooled, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers()).status == 200
    mg.refuse()
    assert mg.url == url
    with pytest.raises(ConnectionRefusedError):
        mg_send(mg)
    with pytest.raises(ConnectionError):
        call(pooled, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers())


def test_faults_print_nothing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY) as mg:
        mg.script(ResetBeforeResponse(), ResetMidBody(), CloseWithoutResponse(), Delay(0.2))
        for _ in range(3):
            with pytest.raises(ConnectionError):
                mg_send(mg)
        with pytest.raises(TimeoutError):
            mg_send(mg, timeout=0.02)  # the fake then writes to a socket the client closed
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------- connections and waiting


def test_keep_alive_reuses_one_connection(mg: FakeMailgun) -> None:
    conn = connect(mg)
    replies = [call(conn, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers())
               for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert "Connection" not in replies[0].headers
    assert mg.connections == 1


def test_client_connection_close_is_honoured(mg: FakeMailgun) -> None:
    conn = connect(mg)
    reply = call(conn, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers(Connection="close"))
    assert reply.headers["Connection"] == "close"
    call(conn, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers())
    assert mg.connections == 2


def test_without_keep_alive_every_response_closes() -> None:
    with FakeSendGrid(api_key=SG_KEY, keep_alive=False) as sg:
        conn = connect(sg)
        replies = [call(conn, SG_PATH, json.dumps(SG_MAIL), sg_headers()) for _ in range(3)]
        assert all(reply.headers["Connection"] == "close" for reply in replies)
        assert sg.connections == 3


def test_wait_for_hits_wakes_on_requests_and_times_out(sg: FakeSendGrid) -> None:
    thread = threading.Thread(target=lambda: [sg_send(sg) for _ in range(2)])
    thread.start()
    assert sg.wait_for_hits(2, timeout=5.0)
    thread.join()
    assert not sg.wait_for_hits(3, timeout=0.05)


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_when_given_an_ssl_context(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY, ssl_context=server_context) as mg:
        assert mg.url.startswith("https://127.0.0.1:")
        client_context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection(urllib.parse.urlsplit(mg.url).netloc, timeout=2,
                                           context=client_context)
        for _ in range(2):
            assert call(conn, MG_PATH, urllib.parse.urlencode(MG_FORM), mg_headers()).status == 200
        assert mg.connections == 1


# ---------------------------------------------------------------- rich messages: Mailgun

BINARY = bytes(range(256)) + b"\r\n--XyZ\r\n" + b"\x00\xff" * 10  # CRLF, a fake delimiter, NULs


def multipart(parts: list[tuple[str, str]], files: list[tuple[str, str, str, bytes]] = (),
              boundary: str = "XyZ-boundary", extra_head: str = "") -> bytes:
    """A form-data body built by hand (file parts: name, filename, Content-Type, bytes)."""
    out = b""
    for name, value in parts:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n{extra_head}'
                f"\r\n{value}\r\n").encode()
    for name, filename, kind, content in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; ' \
               f'filename="{filename}"\r\n' + (f"Content-Type: {kind}\r\n" if kind else "")
        out += head.encode() + b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def mg_multipart(mg: FakeMailgun, body: bytes, boundary: str = "XyZ-boundary") -> Reply:
    headers = mg_headers(**{"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return call(connect(mg), MG_PATH, body, headers)


def test_mailgun_multipart_files_arrive_byte_for_byte(mg: FakeMailgun) -> None:
    files = [("attachment", 'Résumé \\"final\\".pdf', "application/pdf", BINARY),
             ("inline", "logo", "image/png", b"\x89PNG\r\n")]
    reply = mg_multipart(mg, multipart(list(MG_FORM.items()), files))
    assert reply.status == 200, reply.body
    form = mg.accepted[0]
    assert form["text"] == [MG_FORM["text"]] and form["attachment"] == ['Résumé "final".pdf']
    assert [(f.name, f.filename, f.content_type, f.content) for f in form.files] == [
        ("attachment", 'Résumé "final".pdf', "application/pdf", BINARY),
        ("inline", "logo", "image/png", b"\x89PNG\r\n")]


@pytest.mark.parametrize(("body", "message"), [
    (multipart(list(MG_FORM.items()), [("document", "a.pdf", "application/pdf", b"x")]),
     "'document' parameter is not a file parameter"),
    (multipart(list(MG_FORM.items()), [("attachment", "a.pdf", "", b"x")]),
     "'attachment' file needs a file name and a Content-Type"),
    (multipart(list(MG_FORM.items()), [("attachment", "", "application/pdf", b"x")]),
     "'attachment' file needs a file name and a Content-Type"),
    (multipart([*MG_FORM.items(), ("attachment", "not a file")]),
     "'attachment' parameter must be a file: send it as multipart/form-data"),
])
def test_mailgun_files_must_be_attachment_or_inline_file_parts(mg: FakeMailgun, body: bytes,
                                                               message: str) -> None:
    reply = mg_multipart(mg, body)
    assert (reply.status, reply.json()) == (400, {"message": message})


def test_mailgun_attachment_in_a_urlencoded_form_is_refused(mg: FakeMailgun) -> None:
    reply = mg_send(mg, {**MG_FORM, "attachment": "report.pdf"})
    assert reply.status == 400 and "multipart/form-data" in reply.json()["message"]


@pytest.mark.parametrize("body", [
    multipart(list(MG_FORM.items()))[:-len(b"--XyZ-boundary--\r\n")],  # no closing delimiter
    b"preamble\r\n" + multipart(list(MG_FORM.items())),
    multipart(list(MG_FORM.items()), extra_head="Content-Transfer-Encoding: base64\r\n"),
    multipart(list(MG_FORM.items())).replace(b"\r\n", b"\n"),
    multipart(list(MG_FORM.items())).replace(b'name="to"', b"filename=x"),
])
def test_mailgun_malformed_multipart_is_refused(mg: FakeMailgun, body: bytes) -> None:
    reply = mg_multipart(mg, body)
    assert reply.status == 400
    assert mg.accepted == []


@pytest.mark.parametrize(("change", "message"), [
    ({"o:tag": ["a", "b", "c", "d"]}, "'o:tag' is invalid: at most 3 tags of 1-128 ASCII "
                                      "characters"),
    ({"o:tag": ["t" * 129]}, "'o:tag' is invalid: at most 3 tags of 1-128 ASCII characters"),
    ({"o:tag": ["caf\u00e9"]}, "'o:tag' is invalid: at most 3 tags of 1-128 ASCII characters"),
    ({"h:X-Note": ["one\r\ntwo"]}, "'h:X-Note' is not a valid header"),
    ({"h:X Note": ["one"]}, "'h:X Note' is not a valid header"),
    ({"v:big": ["x" * 16380]},
     "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"),
    ({"cc": ["not an address"]}, "'cc' parameter is not a valid address. please check "
                                 "documentation"),
])
def test_mailgun_option_limits(mg: FakeMailgun, change: dict[str, list[str]],
                               message: str) -> None:
    body = urllib.parse.urlencode([*MG_FORM.items(),
                                   *((k, v) for k, vs in change.items() for v in vs)])
    reply = call(connect(mg), MG_PATH, body, mg_headers())
    assert (reply.status, reply.json()) == (400, {"message": message})


def test_mailgun_accepts_every_option_at_its_limit(mg: FakeMailgun) -> None:
    options = [("o:tag", "a" * 128), ("o:tag", "b"), ("o:tag", "c"), ("h:X-Note", "n" * 998),
               ("h:Reply-To", "r@example.org"), ("v:order", "1"), ("cc", "c@example.org"),
               ("bcc", "d@example.org")]
    body = urllib.parse.urlencode([*MG_FORM.items(), *options])
    assert call(connect(mg), MG_PATH, body, mg_headers()).status == 200
    assert mg.accepted[0]["o:tag"] == ["a" * 128, "b", "c"]


# ---------------------------------------------------------------- rich messages: SendGrid

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
SG_RICH: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "a@example.org"}], "cc": [{"email": "b@example.org"}],
                          "bcc": [{"email": "c@example.org", "name": "C"}],
                          "custom_args": {"order": "1234"}}],
    "from": {"email": "sender@example.com"}, "reply_to": {"email": "help@example.com"},
    "subject": "s",
    "content": [{"type": "text/plain", "value": "t"}, {"type": "text/html", "value": "<p>h</p>"}],
    "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
    "attachments": [{"content": PNG, "filename": "a.png", "type": "image/png",
                     "disposition": "attachment"},
                    {"content": PNG, "filename": "logo.png", "type": "image/png",
                     "disposition": "inline", "content_id": "logo"}],
    "categories": ["receipt", "shop"],
}


def test_sendgrid_accepts_a_rich_mail_as_the_sdk_builds_it(sg: FakeSendGrid) -> None:
    assert sg_send(sg, SG_RICH).status == 202
    assert sg.accepted == [SG_RICH]


def sg_problems(sg: FakeSendGrid, mail: dict[str, Any]) -> list[tuple[str, str]]:
    reply = sg_send(sg, mail)
    assert reply.status == 400
    return [(error["field"], error["message"]) for error in reply.json()["errors"]]


def test_sendgrid_wants_text_plain_before_text_html(sg: FakeSendGrid) -> None:
    mail = {**SG_RICH, "content": SG_RICH["content"][::-1]}
    assert sg_problems(sg, mail) == [("content", (
        "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in "
        "your email: text/plain needs to be first, followed by text/html, followed by any other "
        "content."))]


def test_sendgrid_refuses_an_address_twice_in_a_personalization(sg: FakeSendGrid) -> None:
    mail = {**SG_RICH, "personalizations": [{"to": [{"email": "a@example.org"}],
                                             "bcc": [{"email": "A@Example.org"}]}]}
    [(field, message)] = sg_problems(sg, mail)
    assert field == "personalizations.0.bcc"
    assert message.startswith("Each email address in the personalization block should be unique "
                              "between to, cc, and bcc.")


@pytest.mark.parametrize(("attachment", "field"), [
    ({"content": PNG[:-1], "filename": "a.png"}, "attachments.0.content"),
    ({"content": PNG[:4] + "\n" + PNG[4:], "filename": "a.png"}, "attachments.0.content"),
    ({"content": "", "filename": "a.png"}, "attachments.0.content"),
    ({"content": PNG}, "attachments.0.filename"),
    ({"content": PNG, "filename": "a.png", "type": "image/png; name=a"}, "attachments.0.type"),
    ({"content": PNG, "filename": "a.png", "disposition": "inline"},
     "attachments.0.content_id"),
    ({"content": PNG, "filename": "a.png", "disposition": "hidden"},
     "attachments.0.disposition"),
])
def test_sendgrid_attachment_rules(sg: FakeSendGrid, attachment: dict[str, str],
                                   field: str) -> None:
    assert [f for f, _ in sg_problems(sg, {**SG_MAIL, "attachments": [attachment]})] == [field]


@pytest.mark.parametrize(("change", "field"), [
    ({"headers": {"X-SG-ID": "x"}}, "headers"),
    ({"headers": {"x-sg-eid": "x"}}, "headers"),
    ({"headers": {"X-Number": 5}}, "headers.X-Number"),
    ({"categories": [f"c{n}" for n in range(11)]}, "categories"),
    ({"categories": ["a", "a"]}, "categories"),
    ({"categories": ["c" * 256]}, "categories"),
    ({"reply_to": {"email": "nobody"}}, "reply_to.email"),
    ({"personalizations": [{"to": [{"email": "a@example.org"}], "custom_args": {"n": 1}}]},
     "personalizations.0.custom_args.n"),
    ({"personalizations": [{"to": [{"email": "a@example.org"}],
                            "custom_args": {"k": "v" * 10_000}}]},
     "personalizations.0.custom_args"),
])
def test_sendgrid_header_category_and_custom_args_rules(sg: FakeSendGrid, change: dict[str, Any],
                                                        field: str) -> None:
    assert [f for f, _ in sg_problems(sg, {**SG_MAIL, **change})] == [field]
