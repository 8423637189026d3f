"""Tests for Amazon SES v2: smsp's SigV4 signer and the strict fake SES (fake_ses.py).

The signer is held to AWS's SigV4 test suite (read from the shared provider specs) and to the
signatures botocore computes for real SendEmail requests. The fake is checked over real sockets.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

import smsp
from fake_ses import PROVIDER_SPECS, SES_PATH, FakeSES, sendemail_model
from fakes import Status

SUITE = PROVIDER_SPECS / "sigv4-test-suite" / "v4"

# ---------------------------------------------------------------- the AWS SigV4 test suite


@dataclass
class Vector:
    """One case of the suite: the request, its context and each expected stage."""

    name: str
    context: dict[str, Any]
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    canonical_request: str
    string_to_sign: str
    signature: str
    signed_request: dict[str, str]  # the headers of header-signed-request.txt


def _parse_request(text: str) -> tuple[str, str, dict[str, str], str]:
    """Method, target, headers and body of a request.txt.

    Folded lines continue the previous value; a repeated name is joined with a comma, the
    combined form HTTP allows, which is also how SigV4 canonicalises repeated headers.
    """
    head, _, body = text.partition("\n\n")
    request_line, *lines = head.split("\n")
    method, _, rest = request_line.partition(" ")
    target = rest.rpartition(" ")[0]
    headers: dict[str, str] = {}
    name = ""
    for line in lines:
        if not line:
            continue  # the file's final newline
        if line[:1] in (" ", "\t"):
            headers[name] += " " + line
            continue
        name, _, value = line.partition(":")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return method, target, headers, body


def load_vector(case: Path) -> Vector:
    method, target, headers, body = _parse_request((case / "request.txt").read_text("utf-8"))
    host = next(value for name, value in headers.items() if name.lower() == "host")
    signed = _parse_request((case / "header-signed-request.txt").read_text("utf-8"))[2]
    return Vector(
        name=case.name, context=json.loads((case / "context.json").read_text("utf-8")),
        method=method, url=f"https://{host}{target}", headers=headers, body=body.encode(),
        canonical_request=(case / "header-canonical-request.txt").read_text("utf-8"),
        string_to_sign=(case / "header-string-to-sign.txt").read_text("utf-8"),
        signature=(case / "header-signature.txt").read_text("utf-8").strip(),
        signed_request=signed)


def suite_cases() -> list[Path | None]:
    """The cases on disk that do not sign the body into a header, or [None] when there are
    none, so that the tests fail instead of being skipped."""
    cases = sorted(path.parent for path in SUITE.glob("*/context.json")
                   if not json.loads(path.read_text("utf-8"))["sign_body"])
    return list(cases) or [None]


def _amz_date(context: dict[str, Any]) -> str:
    moment = datetime.datetime.fromisoformat(context["timestamp"].replace("Z", "+00:00"))
    return moment.strftime("%Y%m%dT%H%M%SZ")


def _case(case: Path | None) -> Vector:
    assert case is not None, f"no SigV4 test vectors without sign_body under {SUITE}"
    return load_vector(case)


@pytest.mark.parametrize("case", suite_cases(), ids=lambda case: getattr(case, "name", "none"))
def test_each_signing_stage_matches_the_aws_test_vector(case: Path | None) -> None:
    vector = _case(case)
    context = vector.context
    amz_date = _amz_date(context)
    token = context["credentials"].get("token")
    signing = {"X-Amz-Date": amz_date}
    if token and not context.get("omit_session_token"):
        signing["X-Amz-Security-Token"] = token
    canonical, _ = smsp._sigv4_canonical_request(
        vector.method, vector.url, {**vector.headers, **signing}, vector.body, None,
        normalize=context["normalize"])
    scope = f"{amz_date[:8]}/{context['region']}/{context['service']}/aws4_request"
    string_to_sign = smsp._sigv4_string_to_sign(amz_date, scope, canonical)
    assert canonical == vector.canonical_request
    assert string_to_sign == vector.string_to_sign
    secret = context["credentials"]["secret_access_key"]
    assert smsp._sigv4_signature(secret, scope, string_to_sign) == vector.signature


NORMALIZED = [case for case in suite_cases()
              if case is None or json.loads((case / "context.json").read_text())["normalize"]]


@pytest.mark.parametrize("case", NORMALIZED, ids=lambda case: getattr(case, "name", "none"))
def test_sigv4_authorization_gives_the_headers_of_the_signed_request(case: Path | None) -> None:
    # sigv4_authorization always normalises the path, as for every service but S3, so the
    # suite's unnormalised cases are checked stage by stage above.
    vector = _case(case)
    context = vector.context
    credentials = context["credentials"]
    # "omit_session_token": the token header is added after signing, so it is not signed.
    token = None if context.get("omit_session_token") else credentials.get("token")
    added = smsp.sigv4_authorization(
        vector.method, vector.url, vector.headers, vector.body, region=context["region"],
        service=context["service"], access_key=credentials["access_key_id"],
        secret_key=credentials["secret_access_key"], session_token=token,
        amz_date=_amz_date(context))
    expected = {name: value for name, value in vector.signed_request.items()
                if name in ("X-Amz-Date", "Authorization", "X-Amz-Security-Token")}
    if context.get("omit_session_token"):
        assert expected.pop("X-Amz-Security-Token") == credentials["token"]
    assert added == expected


def test_the_suite_has_cases_for_the_paths_smsp_signs() -> None:
    names = {case.name for case in suite_cases() if case is not None}
    for needed in ("post-vanilla", "get-vanilla-with-session-token", "post-sts-header-before",
                   "get-utf8", "get-space-normalized", "post-header-key-case"):
        assert needed in names


# ---------------------------------------------------------------- the signer against botocore

REGION = "eu-west-1"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEBYaDEXAMPLETOKEN//////////wEaDHZRMGYtZXhhbXBsZQ=="
SES_URL = f"https://email.{REGION}.amazonaws.com{SES_PATH}"
WHEN = datetime.datetime(2026, 12, 1, 20, 40, 3)

PLAIN = {"FromEmailAddress": "sender@example.com",
         "Destination": {"ToAddresses": ["rcpt@example.org"]},
         "Content": {"Simple": {"Subject": {"Data": "Hello", "Charset": "UTF-8"},
                                "Body": {"Text": {"Data": "line 1\nline 2"}}}}}
NON_ASCII = {"FromEmailAddress": "=?utf-8?q?Zo=C3=AB?= <zoe@example.com>",
             "Destination": {"ToAddresses": ["bob@example.org"], "CcAddresses": ["ça@example.fr"]},
             "ReplyToAddresses": ["reply@example.com"],
             "Content": {"Simple": {
                 "Subject": {"Data": "Grüße aus Köln — 日本語 ✉", "Charset": "UTF-8"},
                 "Body": {"Text": {"Data": "Zoë: ½ € ☃ 😀", "Charset": "UTF-8"},
                          "Html": {"Data": "<p>Zoë ☃</p>", "Charset": "UTF-8"}},
                 "Headers": [{"Name": "X-Campaign", "Value": "winter"}]}},
             "EmailTags": [{"Name": "kind", "Value": "welcome"}],
             "ConfigurationSetName": "smsp"}


def _botocore_body(params: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """What botocore's rest-json serializer sends for SendEmail (JSON with \\u escapes)."""
    serialized = create_serializer("rest-json").serialize_to_request(params, sendemail_model())
    return dict(serialized["headers"]), serialized["body"]


BODIES = {
    "botocore-plain": _botocore_body(PLAIN),
    "botocore-non-ascii": _botocore_body(NON_ASCII),
    "utf8-non-ascii": ({"Content-Type": "application/json"},
                       json.dumps(NON_ASCII, ensure_ascii=False).encode("utf-8")),
}


def botocore_signed(monkeypatch: pytest.MonkeyPatch, headers: dict[str, str], body: bytes,
                    token: str | None) -> dict[str, str]:
    """The headers botocore's SigV4Auth.add_auth gives a request at WHEN."""
    # add_auth reads the time through botocore.auth.get_current_datetime and nothing else.
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *args, **kwargs: WHEN)
    request = AWSRequest(method="POST", url=SES_URL, data=body, headers=headers)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, token), "ses", REGION).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, TOKEN], ids=["long-term-key", "session-token"])
@pytest.mark.parametrize("body_name", BODIES)
def test_signature_equals_botocores_for_a_sendemail_request(
        monkeypatch: pytest.MonkeyPatch, body_name: str, token: str | None) -> None:
    headers, body = BODIES[body_name]
    headers = {**headers, "User-Agent": "smsp/test"}  # unsigned by both
    theirs = botocore_signed(monkeypatch, headers, body, token)
    ours = smsp.sigv4_authorization(
        "POST", SES_URL, headers, body, region=REGION, service="ses", access_key=ACCESS_KEY,
        secret_key=SECRET_KEY, session_token=token, amz_date=WHEN.strftime("%Y%m%dT%H%M%SZ"))
    assert ours == {name: theirs[name] for name in ours}
    assert set(theirs) - set(headers) == set(ours)  # botocore added nothing else
    signed = "content-type;host;x-amz-date" + (";x-amz-security-token" if token else "")
    assert f"SignedHeaders={signed}," in ours["Authorization"]


def test_signed_names_only_the_headers_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    headers, body = BODIES["utf8-non-ascii"]
    theirs = botocore_signed(monkeypatch, headers, body, TOKEN)
    ours = smsp.sigv4_authorization(
        "POST", SES_URL, {**headers, "Accept": "application/json"}, body, region=REGION,
        service="ses", access_key=ACCESS_KEY, secret_key=SECRET_KEY, session_token=TOKEN,
        amz_date=WHEN.strftime("%Y%m%dT%H%M%SZ"), signed=["Content-Type"])
    assert ours["Authorization"] == theirs["Authorization"]


def test_a_changed_body_changes_the_signature() -> None:
    def authorization(body: bytes) -> str:
        return smsp.sigv4_authorization(
            "POST", SES_URL, {"Content-Type": "application/json"}, body, region=REGION,
            service="ses", access_key=ACCESS_KEY, secret_key=SECRET_KEY, session_token=None,
            amz_date="20261201T204003Z")["Authorization"]

    assert authorization(b'{"a":"\xc3\xa9"}') != authorization(b'{"a":"e"}')


def test_stale_signing_headers_are_replaced_not_signed_twice() -> None:
    stale = {"Content-Type": "application/json", "x-amz-date": "20200101T000000Z",
             "Authorization": "AWS4-HMAC-SHA256 old", "X-Amz-Security-Token": "old"}
    fresh = {"Content-Type": "application/json"}
    arguments: dict[str, Any] = dict(region=REGION, service="ses", access_key=ACCESS_KEY,
                                     secret_key=SECRET_KEY, session_token=TOKEN,
                                     amz_date="20261201T204003Z")
    assert smsp.sigv4_authorization("POST", SES_URL, stale, b"{}", **arguments) == \
        smsp.sigv4_authorization("POST", SES_URL, fresh, b"{}", **arguments)


@pytest.mark.parametrize("problem", [
    {"amz_date": "2026-12-01T20:40:03Z"}, {"signed": ["X-Not-There"]},
])
def test_bad_arguments_are_refused(problem: dict[str, Any]) -> None:
    arguments: dict[str, Any] = dict(region=REGION, service="ses", access_key=ACCESS_KEY,
                                     secret_key=SECRET_KEY, session_token=None,
                                     amz_date="20261201T204003Z")
    with pytest.raises(ValueError):
        smsp.sigv4_authorization("POST", SES_URL, {"Content-Type": "application/json"}, b"{}",
                                 **{**arguments, **problem})


def test_host_comes_from_the_url_without_its_default_port() -> None:
    assert smsp._sigv4_host("https://Email.EU-West-1.amazonaws.com:443/v2") == \
        "email.eu-west-1.amazonaws.com"
    assert smsp._sigv4_host("http://127.0.0.1:8443/v2") == "127.0.0.1:8443"
    assert smsp._sigv4_host("http://[::1]:80/") == "[::1]"


# ---------------------------------------------------------------- the fake SES


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_type(self) -> str | None:
        value = self.headers.get("x-amzn-ErrorType")
        return None if value is None else value.split(":", 1)[0]


def post(fake: FakeSES, body: bytes, headers: dict[str, str], path: str = SES_PATH,
         method: str = "POST") -> Reply:
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(fake.url).netloc, timeout=5)
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def smsp_signed(fake: FakeSES, body: bytes, **overrides: Any) -> dict[str, str]:
    """Headers as the SES provider will build them with smsp's signer."""
    headers = {"Content-Type": "application/json", "User-Agent": smsp.SERVER_NAME}
    arguments: dict[str, Any] = dict(
        region=fake.region, service="ses", access_key=fake.access_key,
        secret_key=fake.secret_key, session_token=fake.session_token,
        amz_date=datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"))
    arguments.update(overrides)
    return {**headers, **smsp.sigv4_authorization("POST", fake.url + SES_PATH, headers, body,
                                                  **arguments)}


def body_of(params: dict[str, Any]) -> bytes:
    return json.dumps(params, ensure_ascii=False).encode("utf-8")


@pytest.fixture
def ses() -> Any:
    with FakeSES(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION) as fake:
        yield fake


@pytest.fixture
def ses_token() -> Any:
    with FakeSES(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                 session_token=TOKEN) as fake:
        yield fake


def test_fake_accepts_a_request_signed_by_botocore(ses: FakeSES) -> None:
    body = body_of(NON_ASCII)
    reply = post(ses, body, ses.signed_headers(body))
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["MessageId"]
    assert reply.headers["x-amzn-RequestId"]
    assert ses.accepted == [NON_ASCII]
    assert ses.requests[0].fields == NON_ASCII and ses.requests[0].status == 200


@pytest.mark.parametrize("fixture", ["ses", "ses_token"])
def test_fake_accepts_a_request_signed_by_smsp(request: pytest.FixtureRequest,
                                               fixture: str) -> None:
    fake: FakeSES = request.getfixturevalue(fixture)
    body = body_of(NON_ASCII)
    reply = post(fake, body, smsp_signed(fake, body))
    assert reply.status == 200, reply.body
    assert fake.accepted == [NON_ASCII]


def test_a_tampered_body_is_403_signature_does_not_match(ses: FakeSES) -> None:
    headers = smsp_signed(ses, body_of(PLAIN))
    tampered = body_of({**PLAIN, "FromEmailAddress": "mallory@example.com"})
    reply = post(ses, tampered, headers)
    assert (reply.status, reply.error_type) == (403, "SignatureDoesNotMatch")
    message = reply.json()["message"]
    assert message.startswith("The request signature we calculated does not match")
    assert "The Canonical String for this request should have been" in message
    assert ses.accepted == []


def test_a_wrong_secret_is_403_signature_does_not_match(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    reply = post(ses, body, smsp_signed(ses, body, secret_key="not-the-secret"))
    assert (reply.status, reply.error_type) == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize("scope", [{"region": "us-east-1"}, {"service": "email"}],
                         ids=["region", "service"])
def test_a_wrong_credential_scope_is_403_signature_does_not_match(
        ses: FakeSES, scope: dict[str, str]) -> None:
    body = body_of(PLAIN)
    reply = post(ses, body, smsp_signed(ses, body, **scope))
    assert (reply.status, reply.error_type) == (403, "SignatureDoesNotMatch")
    assert "Credential should be scoped" in reply.json()["message"]


def test_a_wrong_access_key_is_403_unrecognized_client(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    reply = post(ses, body, smsp_signed(ses, body, access_key="AKIAOTHERKEY"))
    assert (reply.status, reply.error_type) == (403, "UnrecognizedClientException")
    assert reply.json() == {"message": "The security token included in the request is invalid."}


def test_a_missing_authorization_is_403_missing_authentication_token(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    headers = smsp_signed(ses, body)
    del headers["Authorization"]
    reply = post(ses, body, headers)
    assert (reply.status, reply.error_type) == (403, "MissingAuthenticationTokenException")


@pytest.mark.parametrize("token", [None, "another-token"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_session_token_is_403_unrecognized_client(
        ses_token: FakeSES, token: str | None) -> None:
    body = body_of(PLAIN)
    reply = post(ses_token, body, smsp_signed(ses_token, body, session_token=token))
    assert (reply.status, reply.error_type) == (403, "UnrecognizedClientException")


def test_an_unsigned_session_token_is_403(ses_token: FakeSES) -> None:
    body = body_of(PLAIN)
    headers = smsp_signed(ses_token, body, session_token=None)  # signed without the token
    headers["X-Amz-Security-Token"] = TOKEN
    reply = post(ses_token, body, headers)
    assert (reply.status, reply.error_type) == (403, "SignatureDoesNotMatch")


def test_a_signature_from_outside_the_allowed_skew_is_403() -> None:
    with FakeSES(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                 clock=lambda: WHEN.replace(tzinfo=datetime.UTC).timestamp()) as fake:
        body = body_of(PLAIN)
        late = post(fake, body, smsp_signed(fake, body, amz_date="20261201T203403Z"))
        on_time = post(fake, body, smsp_signed(fake, body, amz_date="20261201T203603Z"))
    assert (late.status, late.error_type) == (403, "SignatureDoesNotMatch")
    assert late.json()["message"] == ("Signature expired: 20261201T203403Z is now earlier than "
                                      "20261201T203503Z (20261201T204003Z - 5 min.)")
    assert on_time.status == 200, on_time.body


VIOLATIONS = {
    "no-content": ({"FromEmailAddress": "sender@example.com"},
                   'Missing required parameter in input: "Content"'),
    "wrong-type": ({**PLAIN, "Destination": {"ToAddresses": "rcpt@example.org"}},
                   "Invalid type for parameter Destination.ToAddresses"),
    "unknown-member": ({**PLAIN, "Bogus": 1}, 'Unknown parameter in input: "Bogus"'),
    "no-body": ({**PLAIN, "Content": {"Simple": {"Subject": {"Data": "x"}}}},
                'Missing required parameter in Content.Simple: "Body"'),
    "enum": ({**PLAIN, "Content": {"Simple": {
        **PLAIN["Content"]["Simple"],
        "Attachments": [{"FileName": "a.txt", "RawContent": base64.b64encode(b"a").decode(),
                         "ContentDisposition": "attached"}]}}},
             "Content.Simple.Attachments[0].ContentDisposition: 'attached' is not one of"),
    "not-base64": ({**PLAIN, "Content": {"Simple": {
        **PLAIN["Content"]["Simple"],
        "Attachments": [{"FileName": "a.txt", "RawContent": "not base64!"}]}}},
                   "Content.Simple.Attachments[0].RawContent: a blob must be base64"),
    "too-many-headers": ({**PLAIN, "Content": {"Simple": {
        **PLAIN["Content"]["Simple"],
        "Headers": [{"Name": f"X-H{n}", "Value": "v"} for n in range(16)]}}},
                         "Content.Simple.Headers: at most 15 items, not 16"),
    "header-name": ({**PLAIN, "Content": {"Simple": {
        **PLAIN["Content"]["Simple"], "Headers": [{"Name": "X Bad:", "Value": "v"}]}}},
                    "Content.Simple.Headers[0].Name: does not match the pattern"),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_a_model_violation_is_400_bad_request(ses: FakeSES, case: str) -> None:
    params, expected = VIOLATIONS[case]
    body = body_of(params)
    reply = post(ses, body, smsp_signed(ses, body))
    assert (reply.status, reply.error_type) == (400, "BadRequestException")
    assert expected in reply.json()["message"]
    assert ses.accepted == []


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"a": "\xff"}'])
def test_a_body_that_is_not_a_json_object_is_400_bad_request(ses: FakeSES, body: bytes) -> None:
    reply = post(ses, body, smsp_signed(ses, body))
    assert (reply.status, reply.error_type) == (400, "BadRequestException")


def test_a_body_that_is_not_json_typed_is_400_bad_request(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    headers = smsp.sigv4_authorization(
        "POST", ses.url + SES_PATH, {"Content-Type": "text/plain"}, body, region=REGION,
        service="ses", access_key=ACCESS_KEY, secret_key=SECRET_KEY, session_token=None,
        amz_date=datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"))
    reply = post(ses, body, {"Content-Type": "text/plain", **headers})
    assert (reply.status, reply.error_type) == (400, "BadRequestException")


def test_an_unverified_sender_is_400_message_rejected() -> None:
    with FakeSES(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
                 verified_identities={"example.com"}) as fake:
        good = body_of(PLAIN)
        bad = body_of({**PLAIN, "FromEmailAddress": "Eve <eve@elsewhere.test>"})
        rejected = post(fake, bad, smsp_signed(fake, bad))
        accepted = post(fake, good, smsp_signed(fake, good))
    assert (rejected.status, rejected.error_type) == (400, "MessageRejected")
    assert rejected.json()["message"].endswith("region EU-WEST-1: eve@elsewhere.test")
    assert accepted.status == 200


def test_another_path_or_method_is_404(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    assert post(ses, body, smsp_signed(ses, body), path="/v2/email/other").status == 404
    assert post(ses, body, smsp_signed(ses, body), method="PUT").status == 404


ERRORS = {  # the statuses issue 12 and PROVIDERS.md 8c give; the fake takes them from the model
    "MessageRejected": 400, "MailFromDomainNotVerifiedException": 400,
    "AccountSuspendedException": 400, "SendingPausedException": 400, "NotFoundException": 404,
    "TooManyRequestsException": 429, "LimitExceededException": 400,
    "BadRequestException": 400, "InternalFailure": 500, "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403, "UnrecognizedClientException": 403,
}


def botocore_error_code(reply: Reply) -> str:
    """The error code botocore's own rest-json parser reads from a reply."""
    parsed = create_parser("rest-json").parse(
        {"status_code": reply.status,
         "headers": {name.lower(): value for name, value in reply.headers.items()},
         "body": reply.body}, sendemail_model().output_shape)
    return str(parsed["Error"]["Code"])


@pytest.mark.parametrize("name", ERRORS)
def test_each_scripted_error_has_its_status_and_error_type(ses: FakeSES, name: str) -> None:
    ses.script(FakeSES.error(name), FakeSES.error(name, "custom text", type_in_body=True))
    body = body_of(PLAIN)
    reply = post(ses, body, smsp_signed(ses, body))
    assert (reply.status, reply.error_type) == (ERRORS[name], name)
    assert reply.json()["message"]
    assert botocore_error_code(reply) == name
    in_body = post(ses, body, smsp_signed(ses, body))
    assert (in_body.status, in_body.error_type) == (ERRORS[name], None)
    assert in_body.json() == {"__type": f"com.amazonaws.sesv2#{name}", "message": "custom text"}
    assert botocore_error_code(in_body) == name
    assert ses.hits == 2 and ses.accepted == []
    assert post(ses, body, smsp_signed(ses, body)).status == 200  # the script is used up


def test_an_unknown_error_name_is_refused() -> None:
    with pytest.raises(KeyError):
        FakeSES.error("NoSuchException")


@pytest.mark.parametrize(("code", "name"), [(400, "BadRequestException"),
                                            (429, "TooManyRequestsException"),
                                            (500, "InternalFailure")])
def test_a_bare_status_gets_ses_error_of_that_status(ses: FakeSES, code: int, name: str) -> None:
    ses.script(Status(code))
    body = body_of(PLAIN)
    reply = post(ses, body, smsp_signed(ses, body))
    assert (reply.status, reply.error_type) == (code, name)


def test_a_malformed_authorization_or_signature_is_403(ses: FakeSES) -> None:
    body = body_of(PLAIN)
    headers = smsp_signed(ses, body)
    incomplete = post(ses, body, {**headers, "Authorization": "AWS4-HMAC-SHA256 Credential=x"})
    non_hex = post(ses, body, {**headers, "Authorization": headers["Authorization"] + "é"})
    assert (incomplete.status, incomplete.error_type) == (403, "IncompleteSignatureException")
    assert (non_hex.status, non_hex.error_type) == (403, "SignatureDoesNotMatch")
    assert ses.accepted == []
