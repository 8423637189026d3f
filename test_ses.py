"""Tests for Amazon SES v2: smsp's SigV4 signer.

The signer is held to AWS's SigV4 test suite (read from the shared provider specs) and to the
signatures botocore computes for real SendEmail requests.
"""

from __future__ import annotations

import datetime
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import OperationModel, ServiceModel
from botocore.serialize import create_serializer

import smsp

PROVIDER_SPECS = Path(__file__).resolve().parent.parent / "shared" / "provider-specs"
SUITE = PROVIDER_SPECS / "sigv4-test-suite" / "v4"
SES_PATH = "/v2/email/outbound-emails"


def sendemail_model() -> OperationModel:
    with gzip.open(PROVIDER_SPECS / "ses" / "sesv2-2019-09-27-service-2.json.gz") as model:
        return ServiceModel(json.load(model), "sesv2").operation_model("SendEmail")

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
