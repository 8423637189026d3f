"""Unit and in-process integration tests for smsp.py.

Everything runs over real sockets on 127.0.0.1 with port 0, against the
strict fake providers in fakes.py.  Breakers and the idempotency store get a
fake clock and a fake timer, so no test sleeps to cross a poll interval.
Timing numbers never appear in assertions except as generous upper bounds
that prove a request was bounded at all.
"""

import ast
import base64
import http.client
import http.server
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import smsp
from fakes import CloseWithoutResponse, Delay, FakeMailgun, FakeSendGrid, Hang, Status
from testkit import (
    API_KEY,
    EMAIL,
    MG_DOMAIN,
    MG_KEY,
    POLL,
    SG_KEY,
    FakeClock,
    FakeTimers,
    free_port,
    Lines,
    make_config,
    provider_config,
    raw_exchange,
    running,
    Running,
    status_of,
    wait_for,
)

# ------------------------------------------------------------ configuration ---


def test_config_with_only_mock_and_key_uses_documented_defaults() -> None:
    config = smsp.load_config({"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true"})
    assert config.api_keys == ("k",)
    assert config.active_providers == ("mock",)
    assert (config.timeout, config.poll_interval, config.poll_interval_max) == (2.0, 5.0, 60.0)
    # 10 MiB of attachments as base64 (4 * ceil(10485760 / 3)) plus 1 MiB for the rest
    assert (config.failure_threshold, config.max_attachment_bytes, config.max_body_bytes) == \
        (1, 10 << 20, 13981016 + (1 << 20))
    assert (config.host, config.port, config.log_format) == ("0.0.0.0", 8080, "DEBUG")
    assert (config.max_connections, config.client_timeout, config.shutdown_grace) == \
        (1024, 10.0, 10.0)
    assert (config.idempotency_ttl, config.idempotency_max) == (86400.0, 10000)
    assert (config.pool_size, config.pool_idle, config.workers) == (16, 15.0, 1)


def test_config_reports_every_missing_variable_at_once() -> None:
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config({})
    text = str(caught.value)
    for name in ("SMSP_API_KEY", "SMSP_MG_DOMAIN", "SMSP_MG_API_KEY", "SMSP_SG_API_KEY",
                 "SMSP_POLL_MESSAGE_ADDRESS"):
        assert name in text


GOOD_VALUES = [
    ("SMSP_API_KEY", " a , b ,c", "api_keys", ("a", "b", "c")),
    ("SMSP_MOCK_EMAIL_SERVICE", "TRUE", "mock", True),
    ("SMSP_PROVIDERS", "sendgrid", "providers", ("sendgrid",)),
    ("SMSP_MG_DOMAIN", "mg.example.com", "mg_domain", "mg.example.com"),
    ("SMSP_MG_API_KEY", "mgk", "mg_api_key", "mgk"),
    ("SMSP_MG_BASE_URL", "https://api.eu.mailgun.net/", "mg_base_url",
     urllib.parse.urlsplit("https://api.eu.mailgun.net")),
    ("SMSP_SG_API_KEY", "SG.x", "sg_api_key", "SG.x"),
    ("SMSP_SG_BASE_URL", "http://127.0.0.1:9", "sg_base_url",
     urllib.parse.urlsplit("http://127.0.0.1:9")),
    ("SMSP_SES_REGION", "eu-west-1", "ses_region", "eu-west-1"),
    ("SMSP_SES_ACCESS_KEY_ID", "AKIA1", "ses_access_key_id", "AKIA1"),
    ("SMSP_SES_SECRET_ACCESS_KEY", "s3cr3t", "ses_secret_access_key", "s3cr3t"),
    ("SMSP_SES_SESSION_TOKEN", "tok", "ses_session_token", "tok"),
    ("SMSP_SES_CONFIGURATION_SET", "tracked", "ses_configuration_set", "tracked"),
    ("SMSP_SES_BASE_URL", "http://127.0.0.1:9", "ses_base_url",
     urllib.parse.urlsplit("http://127.0.0.1:9")),
    ("SMSP_PM_SERVER_TOKEN", "pm-t", "pm_server_token", "pm-t"),
    ("SMSP_PM_BASE_URL", "http://127.0.0.1:9", "pm_base_url",
     urllib.parse.urlsplit("http://127.0.0.1:9")),
    ("SMSP_PM_MESSAGE_STREAM", "broadcast", "pm_message_stream", "broadcast"),
    ("SMSP_RESEND_API_KEY", "re_1", "resend_api_key", "re_1"),
    ("SMSP_RESEND_BASE_URL", "http://127.0.0.1:9", "resend_base_url",
     urllib.parse.urlsplit("http://127.0.0.1:9")),
    ("SMSP_SMTP_HOST", "smtp.example.com", "smtp_host", "smtp.example.com"),
    ("SMSP_SMTP_PORT", "465", "smtp_port", 465),
    ("SMSP_SMTP_SECURITY", "TLS", "smtp_security", "tls"),
    ("SMSP_SMTP_USERNAME", "u", "smtp_username", "u"),
    ("SMSP_SMTP_PASSWORD", "p", "smtp_password", "p"),
    ("SMSP_SMTP_HELO", "mx.example.com", "smtp_helo", "mx.example.com"),
    ("SMSP_POLL_MESSAGE_ADDRESS", "Poll <p@example.com>", "poll_address",
     smsp.Address("p@example.com", "Poll")),
    ("SMSP_TIMEOUT", "0.5", "timeout", 0.5),
    ("SMSP_POLL_INTERVAL", "2", "poll_interval", 2.0),
    ("SMSP_POLL_INTERVAL_MAX", "90", "poll_interval_max", 90.0),
    ("SMSP_FAILURE_THRESHOLD", "3", "failure_threshold", 3),
    ("SMSP_POLL_SANDBOX", "true", "poll_sandbox", True),
    ("SMSP_MAX_BODY_BYTES", "2048", "max_body_bytes", 2048),
    ("SMSP_MAX_ATTACHMENT_BYTES", "0", "max_attachment_bytes", 0),
    ("SMSP_MAX_INFLIGHT_BODY_BYTES", "33554432", "max_inflight_body_bytes", 33554432),
    ("SMSP_HOST", "127.0.0.1", "host", "127.0.0.1"),
    ("SMSP_TRUSTED_PROXIES", "10.0.0.0/8, ::1", "trusted_proxies",
     (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))),
    ("SMSP_PORT", "9090", "port", 9090),
    ("SMSP_LOG_OUTPUT_FORMAT", "json_online", "log_format", "JSON_ONELINE"),
    ("SMSP_LOG_OUTPUT_FORMAT", "JSON_PRETTY", "log_format", "JSON_PRETTY"),
    ("SMSP_LOG_OUTPUT_DEBUG", "yes", "log_debug", True),
    ("SMSP_MAX_CONNECTIONS", "10", "max_connections", 10),
    ("SMSP_CLIENT_TIMEOUT", "3", "client_timeout", 3.0),
    ("SMSP_SHUTDOWN_GRACE", "0", "shutdown_grace", 0.0),
    ("SMSP_IDEMPOTENCY_TTL", "60", "idempotency_ttl", 60.0),
    ("SMSP_IDEMPOTENCY_MAX", "5", "idempotency_max", 5),
    ("SMSP_IDEMPOTENCY_URL", "rediss://smsp:p%40ss@Redis.example:6380/2", "idempotency_url",
     smsp.StoreAddress(True, "redis.example", 6380, 2, "smsp", "p@ss")),
    ("SMSP_IDEMPOTENCY_URL", "redis://:pw@10.0.0.1", "idempotency_url",
     smsp.StoreAddress(False, "10.0.0.1", 6379, 0, "", "pw")),
    ("SMSP_IDEMPOTENCY_URL", "redis://[::1]/", "idempotency_url", smsp.StoreAddress(False, "::1")),
    ("SMSP_IDEMPOTENCY_TIMEOUT", "0.25", "idempotency_timeout", 0.25),
    ("SMSP_IDEMPOTENCY_ON_ERROR", " Open", "idempotency_on_error", "open"),
    ("SMSP_POOL_SIZE", "0", "pool_size", 0),
    ("SMSP_POOL_IDLE", "1.5", "pool_idle", 1.5),
    ("SMSP_WORKERS", "2", "workers", 2),
]


PROVIDERS_ENV = {"SMSP_API_KEY": "k", "SMSP_PROVIDERS": "mailgun,sendgrid,ses,postmark,resend,smtp",
                 "SMSP_MG_DOMAIN": "mg.example.com", "SMSP_MG_API_KEY": "mgk",
                 "SMSP_SG_API_KEY": "SG.k", "SMSP_SES_REGION": "us-east-1",
                 "SMSP_SES_ACCESS_KEY_ID": "AKID", "SMSP_SES_SECRET_ACCESS_KEY": "sek",
                 "SMSP_PM_SERVER_TOKEN": "pmt", "SMSP_RESEND_API_KEY": "re_k",
                 "SMSP_SMTP_HOST": "relay.example.com", "SMSP_SMTP_USERNAME": "user",
                 "SMSP_SMTP_PASSWORD": "pass",
                 "SMSP_POLL_MESSAGE_ADDRESS": "p@example.com"}


@pytest.mark.parametrize(("env", "raw", "field", "expected"), GOOD_VALUES)
def test_config_parses_every_variable(env: str, raw: str, field: str, expected: Any) -> None:
    assert smsp.load_config({**PROVIDERS_ENV, env: raw}).value(field) == expected


def test_every_setting_has_a_good_value_test() -> None:
    files = {"SMSP_TLS_CERT", "SMSP_TLS_KEY", "SMSP_IDEMPOTENCY_CA"}  # tested with real files
    assert {s.env for s in smsp.all_settings()} - files == \
        {env for env, *_ in GOOD_VALUES}


BAD_VALUES = [
    ("SMSP_API_KEY", " , "), ("SMSP_MOCK_EMAIL_SERVICE", "maybe"), ("SMSP_PROVIDERS", "pigeon"),
    ("SMSP_PROVIDERS", "mailgun,mailgun"), ("SMSP_MG_BASE_URL", "ftp://x"),
    ("SMSP_SG_BASE_URL", "http://h:99999"), ("SMSP_TIMEOUT", "0"), ("SMSP_TIMEOUT", "soon"),
    ("SMSP_TIMEOUT", "nan"), ("SMSP_POLL_INTERVAL", "-1"), ("SMSP_POLL_INTERVAL_MAX", "0"),
    ("SMSP_FAILURE_THRESHOLD", "0"), ("SMSP_FAILURE_THRESHOLD", "1.5"),
    ("SMSP_MAX_BODY_BYTES", "0"), ("SMSP_MAX_ATTACHMENT_BYTES", "-1"), ("SMSP_PORT", "-1"),
    ("SMSP_MAX_INFLIGHT_BODY_BYTES", "0"),
    ("SMSP_LOG_OUTPUT_FORMAT", "XML"),
    ("SMSP_LOG_OUTPUT_DEBUG", "2"), ("SMSP_MAX_CONNECTIONS", "0"),
    ("SMSP_CLIENT_TIMEOUT", "0"), ("SMSP_SHUTDOWN_GRACE", "-1"), ("SMSP_IDEMPOTENCY_TTL", "0"),
    ("SMSP_IDEMPOTENCY_MAX", "0"), ("SMSP_POOL_SIZE", "-1"), ("SMSP_POOL_IDLE", "0"),
    ("SMSP_WORKERS", "0"), ("SMSP_TLS_CERT", "/nonexistent.pem"),
    ("SMSP_TRUSTED_PROXIES", "10.0.0.0/33"), ("SMSP_SES_REGION", "Mars"), ("SMSP_PORT", "65536"),
    ("SMSP_SMTP_SECURITY", "ssl"),
    ("SMSP_SMTP_PORT", "0"), ("SMSP_SMTP_USERNAME", " "),
    ("SMSP_MG_BASE_URL", "https://api.eu.mailgun.net/v3"), ("SMSP_PM_BASE_URL", "https://x/?q"),
    ("SMSP_IDEMPOTENCY_URL", "http://redis:6379"), ("SMSP_IDEMPOTENCY_URL", "redis://:pw@"),
    ("SMSP_IDEMPOTENCY_URL", "redis://h:99999"), ("SMSP_IDEMPOTENCY_URL", "redis://h/zero"),
    ("SMSP_IDEMPOTENCY_URL", "redis://h/0?timeout=1"), ("SMSP_IDEMPOTENCY_URL", "redis://u@h"),
    ("SMSP_IDEMPOTENCY_TIMEOUT", "0"), ("SMSP_IDEMPOTENCY_ON_ERROR", "maybe"),
    ("SMSP_IDEMPOTENCY_CA", "/nonexistent.pem"),
]


@pytest.mark.parametrize(("env", "raw"), BAD_VALUES)
def test_config_names_each_bad_value(env: str, raw: str) -> None:
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config({**PROVIDERS_ENV, env: raw})
    assert any(p.startswith(env) for p in caught.value.problems), caught.value.problems


def test_config_reports_several_bad_values_together() -> None:
    env = {"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true", "SMSP_TIMEOUT": "x",
           "SMSP_PORT": "y", "SMSP_POLL_INTERVAL": "9", "SMSP_POLL_INTERVAL_MAX": "3"}
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config(env)
    assert len(caught.value.problems) == 3


def test_config_requires_provider_keys_only_outside_mock_mode() -> None:
    env = {"SMSP_API_KEY": "k", "SMSP_PROVIDERS": "sendgrid", "SMSP_SG_API_KEY": "SG.k",
           "SMSP_POLL_MESSAGE_ADDRESS": "not an address"}
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config(env)
    assert caught.value.problems == ["SMSP_POLL_MESSAGE_ADDRESS must be an address like "
                                     "user@example.com or Name <user@example.com>"]
    env["SMSP_POLL_MESSAGE_ADDRESS"] = "poll@example.com"
    assert smsp.load_config(env).active_providers == ("sendgrid",)


def test_tls_cert_and_key_must_come_together(tmp_path: Any) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    env = {"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true", "SMSP_TLS_CERT": str(cert)}
    with pytest.raises(smsp.ConfigError, match="SMSP_TLS_CERT and SMSP_TLS_KEY"):
        smsp.load_config(env)


def test_cli_host_and_port_override_the_environment(
        capsys: pytest.CaptureFixture[str]) -> None:
    env = {"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true", "SMSP_PORT": "1"}
    assert smsp.main(["--check-config", "--host", "127.0.0.2", "--port", "0"], environ=env) == 0
    out = capsys.readouterr().out.splitlines()
    assert "SMSP_HOST=127.0.0.2" in out and "SMSP_PORT=0" in out


def test_main_without_configuration_exits_2_naming_every_missing_variable(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert smsp.main([], environ={}) == 2
    err = capsys.readouterr().err
    for name in ("SMSP_API_KEY", "SMSP_MG_DOMAIN", "SMSP_SG_API_KEY", "SMSP_POLL_MESSAGE_ADDRESS"):
        assert name in err
    assert "SMSP_MOCK_EMAIL_SERVICE=true" in err


def test_help_lists_every_variable_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        smsp.main(["--help"], environ={})
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for setting in smsp.all_settings():
        assert setting.env in out
    assert "(default https://api.mailgun.net)" in out and "(default 10485760)" in out
    assert "SMSP_API_KEY" in out and "(required)" in out and "''" not in out


def test_check_config_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"SMSP_API_KEY": "topsecret1,topsecret2", "SMSP_MG_DOMAIN": "mg.example.com",
           "SMSP_MG_API_KEY": "mgsecret", "SMSP_SG_API_KEY": "sgsecret",
           "SMSP_POLL_MESSAGE_ADDRESS": "p@example.com"}
    assert smsp.main(["--check-config"], environ=env) == 0
    out = capsys.readouterr().out
    assert "secret" not in out
    assert "SMSP_API_KEY=****,****" in out and "SMSP_MG_DOMAIN=mg.example.com" in out


def test_check_config_with_problems_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert smsp.main(["--check-config"], environ={"SMSP_API_KEY": "k"}) == 2
    assert "SMSP_MG_DOMAIN is required" in capsys.readouterr().err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        smsp.main(["--version"], environ={})
    assert capsys.readouterr().out.strip() == f"smsp {smsp.VERSION}"


# --------------------------------------------------------------- validation ---

GOOD_ADDRESSES = [
    ("a@example.com", smsp.Address("a@example.com")),
    ("first.last+tag@sub.example.co.uk", smsp.Address("first.last+tag@sub.example.co.uk")),
    ("Alice Example <alice@example.com>", smsp.Address("alice@example.com", "Alice Example")),
    ("Zoë Ünïcode <z@example.com>", smsp.Address("z@example.com", "Zoë Ünïcode")),
    ("<bare@example.com>", smsp.Address("bare@example.com")),
    ("x@xn--80ak6aa92e.xn--p1ai", smsp.Address("x@xn--80ak6aa92e.xn--p1ai")),
    ('"Doe, John" <john@example.com>', smsp.Address("john@example.com", "Doe, John")),
    ('"Say \\"hi\\"; <ok>" <a@example.com>', smsp.Address("a@example.com", 'Say "hi"; <ok>')),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_valid_addresses_are_accepted(text: str, expected: smsp.Address) -> None:
    assert smsp.parse_address("toaddress", text) == expected


BAD_ADDRESSES = [
    (42, "must be a string"),
    ("", "must not be empty"),
    ("no-at-sign", "must be an address"),
    ("a@b", "must be an address"),
    ("two@@example.com", "must be an address"),
    ("a b@example.com", "must be an address"),
    ("Name <a@example.com", "must be an address"),
    ('"Unclosed <a@example.com>', "must be in double quotes"),
    ("Doe, John <a@example.com>", 'must be in double quotes, like "Doe, John"'),
    ("a@ex\u00e4mple.com", "must be ASCII; write an international domain in its xn-- form"),
    ("Zo\u00eb <z@b\u00fccher.example>", "must be ASCII"),
    ("a@example.com\r\nBcc: victim@example.com", "control characters"),
    ("a@example.com\n", "control characters"),
    ("Name\t<a@example.com>", "control characters"),
    ("a@exa\x00mple.com", "control characters"),
    ("a@example.com\u2028", "control characters"),
    ("x" * 65 + "@example.com", "local part of at most 64"),
    ("a@" + ("b" * 60 + ".") * 5 + "com", "at most 254"),
    ("N" * 310 + " <a@example.com>", "at most 320"),
]


@pytest.mark.parametrize(("value", "reason"), BAD_ADDRESSES)
def test_invalid_addresses_are_refused_with_the_reason(value: Any, reason: str) -> None:
    with pytest.raises(smsp.ValidationError) as caught:
        smsp.parse_address("toaddress", value)
    assert caught.value.field == "toaddress"
    assert reason in caught.value.reason


def test_address_pattern_is_the_one_published_in_the_openapi_document() -> None:
    doc = smsp.openapi_document(make_config())
    email = doc["components"]["schemas"]["Email"]["properties"]
    assert email["fromaddress"]["pattern"] == smsp.ADDRESS_PATTERN
    assert email["toaddress"]["oneOf"][0]["maxLength"] == 320
    assert email["toaddress"]["oneOf"][1]["items"]["pattern"] == smsp.ADDRESS_PATTERN


def test_message_defaults_and_unknown_fields() -> None:
    message = smsp.parse_message({"fromaddress": "a@example.com", "toaddress": "b@example.com",
                                  "cc": "ignored@example.com"})
    assert (message.subject, message.text) == ("", "")


@pytest.mark.parametrize(("document", "message"), [
    ({"toaddress": "b@example.com"}, "fromaddress: is required"),
    ({"fromaddress": "a@example.com"}, "toaddress: is required"),
    ({**EMAIL, "subject": 5}, "subject: must be a string"),
    ({**EMAIL, "subject": "hi\r\nBcc: x@example.com"}, "subject: must not contain CR, LF"),
    ({**EMAIL, "subject": "s" * 999}, "subject: must be at most 998"),
    ({**EMAIL, "plaintextbody": ["x"]}, "plaintextbody: must be a string"),
    ({**EMAIL, "plaintextbody": "a\x00b"}, "plaintextbody: must not contain NUL"),
    ({**EMAIL, "plaintextbody": "\ud800"}, "plaintextbody: contains an unpaired surrogate"),
    ({**EMAIL, "subject": "\udfff"}, "subject: contains an unpaired surrogate"),
])
def test_message_field_rules(document: dict[str, Any], message: str) -> None:
    with pytest.raises(smsp.ValidationError) as caught:
        smsp.parse_message(document)
    assert str(caught.value).startswith(message)


def test_multiline_body_with_tabs_is_fine() -> None:
    message = smsp.parse_message({**EMAIL, "plaintextbody": "a\r\n\tb\nc"})
    assert message.text == "a\r\n\tb\nc"


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"\xef\xbb\xbf{}", "byte-order mark"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"a": ' + b"9" * 5000 + b"}", "malformed JSON"),
    (b'{"a": NaN}', "NaN is not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "malformed JSON"),
    (b'{"a": "\x00"}', "malformed JSON"),
])
def test_json_body_rules(raw: bytes, message: str) -> None:
    with pytest.raises(smsp.ValidationError) as caught:
        smsp.parse_json_object(raw)
    assert message in str(caught.value)


# ----------------------------------------------------------- circuit breaker ---


class Probe:
    """A breaker probe whose answers the test scripts."""

    def __init__(self) -> None:
        self.answers: list[str | None] = []
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.answers.pop(0) if self.answers else None


def make_breaker(threshold: int = 1, **kw: Any
                 ) -> tuple[smsp.CircuitBreaker, FakeClock, FakeTimers, Probe, list[Any]]:
    clock, timers, probe, changes = FakeClock(), FakeTimers(), Probe(), []
    breaker = smsp.CircuitBreaker("mailgun", probe, threshold=threshold, interval=5,
                                  interval_max=60, clock=clock, timer=timers,
                                  on_change=changes.append, epoch=0.0, **kw)
    return breaker, clock, timers, probe, changes


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker, _, timers, _, changes = make_breaker(threshold=3)
    for _ in range(2):
        breaker.on_failure(breaker.acquire(), "HTTP 500")
    breaker.on_success(breaker.acquire())  # a success resets the count
    for _ in range(2):
        breaker.on_failure(breaker.acquire(), "HTTP 500")
    assert breaker.state is smsp.State.CLOSED and not timers.scheduled
    breaker.on_failure(breaker.acquire(), "HTTP 503")
    assert breaker.state is smsp.State.OPEN
    assert changes == [smsp.StateChange("mailgun", smsp.State.CLOSED, smsp.State.OPEN,
                                        "HTTP 503")]
    assert [t.delay for t in timers.scheduled] == [5]


def test_open_circuit_sends_no_real_mail() -> None:
    breaker, *_ = make_breaker()
    breaker.on_failure(breaker.acquire(), "boom")
    assert breaker.acquire() is None


def test_failed_polls_back_off_doubling_up_to_the_maximum() -> None:
    breaker, _clock, timers, probe, _ = make_breaker()
    breaker.on_failure(breaker.acquire(), "boom")
    probe.answers = ["down"] * 6
    for _ in range(6):
        timers.fire_next()
    assert [t.delay for t in timers.scheduled] == [5, 10, 20, 40, 60, 60, 60]
    assert breaker.state is smsp.State.OPEN and probe.calls == 6
    assert breaker.snapshot()["last_error"] == "down"
    assert breaker.retry_after() == 60


def test_successful_poll_closes_the_circuit_and_resets_the_interval() -> None:
    breaker, _clock, timers, probe, changes = make_breaker()
    breaker.on_failure(breaker.acquire(), "boom")
    probe.answers = ["down", None]
    timers.fire_next()
    timers.fire_next()
    assert breaker.state is smsp.State.CLOSED and breaker.acquire() is not None
    assert changes[-1] == smsp.StateChange("mailgun", smsp.State.OPEN, smsp.State.CLOSED,
                                           "poll succeeded")
    assert not timers.pending
    breaker.on_failure(breaker.acquire(), "again")
    assert timers.pending[0].delay == 5


def test_stale_results_from_an_earlier_generation_are_ignored() -> None:
    breaker, _, timers, _, _ = make_breaker()
    slow = breaker.acquire()  # an attempt that started while closed...
    breaker.on_failure(breaker.acquire(), "fast failure")  # ...then the circuit opened
    timers.fire_next()  # ...and closed again after a good poll
    assert breaker.state is smsp.State.CLOSED
    breaker.on_failure(slow, "late failure of the slow attempt")
    assert breaker.state is smsp.State.CLOSED
    assert breaker.snapshot()["consecutive_failures"] == 0


def test_stopped_breaker_cancels_its_poll_and_ignores_late_timers() -> None:
    breaker, _, timers, probe, _ = make_breaker()
    breaker.on_failure(breaker.acquire(), "boom")
    timer = timers.scheduled[0]
    breaker.stop()
    assert timer.cancelled
    timer.function()  # a timer that fired anyway does nothing
    assert probe.calls == 0


def test_snapshot_reports_times_in_iso_utc() -> None:
    breaker, clock, *_ = make_breaker()
    clock.now = 86400.5
    breaker.on_failure(breaker.acquire(), "HTTP 500")
    snap = breaker.snapshot()
    assert snap == {"name": "mailgun", "state": "open", "consecutive_failures": 1,
                    "opened_at": "1970-01-02T00:00:00.500Z",
                    "next_poll_at": "1970-01-02T00:00:05.500Z", "last_error": "HTTP 500"}


def test_breaker_callbacks_run_outside_the_lock() -> None:
    seen = []
    breaker_box: list[smsp.CircuitBreaker] = []

    def on_change(change: smsp.StateChange) -> None:
        seen.append(breaker_box[0].snapshot()["state"])  # would deadlock under the lock

    breaker = smsp.CircuitBreaker("x", lambda: None, clock=FakeClock(), timer=FakeTimers(),
                                  on_change=on_change)
    breaker_box.append(breaker)
    worker = threading.Thread(target=lambda: breaker.on_failure(breaker.acquire(), "e"))
    worker.start()
    worker.join(5)
    assert not worker.is_alive() and seen == ["open"]


def test_breaker_stays_consistent_under_eight_threads() -> None:
    breaker, _, timers, _, changes = make_breaker(threshold=4000)
    generation = breaker.acquire()
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait()
        for _ in range(1000):
            breaker.on_failure(generation, "e")
            breaker.acquire()
            breaker.snapshot()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # exactly one transition, exactly one poll scheduled, every failure counted until it opened
    assert len(changes) == 1 and len(timers.scheduled) == 1
    assert breaker.snapshot()["consecutive_failures"] == 4000


def test_probe_counts_a_rejection_as_healthy_and_other_failures_as_down() -> None:
    class Scripted(smsp.Provider):
        name = "scripted"

        def __init__(self, error: smsp.ProviderError | None) -> None:
            self.error = error

        def send(self, message: smsp.Message, deadline: float) -> smsp.Receipt:
            if self.error:
                raise self.error
            return smsp.Receipt(self.name, "id")

    poll = smsp.Address(POLL)
    rejected = smsp.ProviderError(smsp.Outcome.REJECTED, "HTTP 400")
    down = smsp.ProviderError(smsp.Outcome.NOT_SENT, "HTTP 503")
    assert smsp.make_probe(lambda: Scripted(None), poll, 1)() is None
    assert smsp.make_probe(lambda: Scripted(rejected), poll, 1)() is None
    assert smsp.make_probe(lambda: Scripted(down), poll, 1)() == "HTTP 503"


# ---------------------------------------------------- classification table ---


@pytest.mark.parametrize(("status", "outcome"), [
    (200, smsp.Outcome.SENT), (202, smsp.Outcome.SENT), (299, smsp.Outcome.SENT),
    (400, smsp.Outcome.REJECTED), (413, smsp.Outcome.REJECTED), (422, smsp.Outcome.REJECTED),
    (301, smsp.Outcome.NOT_SENT), (401, smsp.Outcome.NOT_SENT), (403, smsp.Outcome.NOT_SENT),
    (404, smsp.Outcome.NOT_SENT), (402, smsp.Outcome.NOT_SENT), (429, smsp.Outcome.NOT_SENT),
    (500, smsp.Outcome.NOT_SENT), (503, smsp.Outcome.NOT_SENT), (504, smsp.Outcome.NOT_SENT),
])
def test_status_classification(status: int, outcome: smsp.Outcome) -> None:
    assert smsp.classify_reply(status, None, smsp.HTTP_STATUSES, {}) is outcome


class StubProvider(smsp.Provider):
    """A provider that raises scripted errors and counts calls."""

    def __init__(self, name: str, error: smsp.ProviderError | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self.error = error
        self.calls = 0

    def send(self, message: smsp.Message, deadline: float) -> smsp.Receipt:
        self.calls += 1
        if self.error:
            raise self.error
        return smsp.Receipt(self.name, f"{self.name}-id")


def dispatch(first: smsp.ProviderError | None, second: smsp.ProviderError | None = None,
             opened: tuple[str, ...] = ()) -> tuple[Any, list[StubProvider], list[Any]]:
    clock = FakeClock()
    providers = [StubProvider("mailgun", first), StubProvider("sendgrid", second)]
    routes = [smsp.Lane(p, smsp.CircuitBreaker(p.name, lambda: None, clock=clock,
                                                timer=FakeTimers(), interval=5))
              for p in providers]
    for route in routes:
        if route.provider.name in opened:
            route.breaker.on_failure(route.breaker.acquire(), "down")
    clock.advance(1.5)
    dispatcher = smsp.Dispatcher(routes, timeout=2, log=smsp.Logger(write=lambda line: None),
                                 metrics=smsp.Metrics())
    try:
        result: Any = dispatcher.send(smsp.parse_message(EMAIL))
    except smsp.DeliveryFailed as failure:
        result = Answered(failure)
    return result, providers, [r.breaker.state for r in routes]


class Answered:
    """A delivery failure as the Application answers it: status, delivery, text."""

    def __init__(self, failure: smsp.DeliveryFailed) -> None:
        response = smsp.failure_response(failure, "rid", 2)
        document = json.loads(response.body)
        self.status = response.status
        self.delivery = smsp.Delivery(document["delivery"])
        self.message = document["message"]
        self.provider = failure.provider
        headers = dict(response.headers)
        self.retry_after = int(headers["Retry-After"]) if "Retry-After" in headers else None


NOT_SENT = smsp.ProviderError(smsp.Outcome.NOT_SENT, "HTTP 500")
REJECTED = smsp.ProviderError(smsp.Outcome.REJECTED, "HTTP 400",
                              detail="'to' parameter is not a valid address")
TIMED_OUT = smsp.ProviderError(smsp.Outcome.UNKNOWN, "timed out", timed_out=True)
RESET = smsp.ProviderError(smsp.Outcome.UNKNOWN, "ConnectionResetError")


def test_not_sent_fails_over_to_the_next_provider() -> None:
    result, providers, states = dispatch(NOT_SENT)
    assert isinstance(result, smsp.Receipt) and result.provider == "sendgrid"
    assert [p.calls for p in providers] == [1, 1]
    assert states == [smsp.State.OPEN, smsp.State.CLOSED]


def test_rejection_is_final_and_keeps_the_breaker_closed() -> None:
    result, providers, states = dispatch(REJECTED)
    assert (result.status, result.delivery) == (422, smsp.Delivery.NOT_SENT)
    assert "not a valid address" in result.message
    assert [p.calls for p in providers] == [1, 0]
    assert states == [smsp.State.CLOSED, smsp.State.CLOSED]


def test_timeout_after_writing_is_504_unknown_and_never_fails_over() -> None:
    result, providers, states = dispatch(TIMED_OUT)
    assert (result.status, result.delivery) == (504, smsp.Delivery.UNKNOWN)
    assert [p.calls for p in providers] == [1, 0]
    assert states == [smsp.State.OPEN, smsp.State.CLOSED]


def test_broken_reply_after_writing_is_502_unknown_and_never_fails_over() -> None:
    result, providers, _states = dispatch(RESET)
    assert (result.status, result.delivery) == (502, smsp.Delivery.UNKNOWN)
    assert [p.calls for p in providers] == [1, 0]


def test_every_provider_failing_is_502_not_sent() -> None:
    result, providers, states = dispatch(NOT_SENT, NOT_SENT)
    assert (result.status, result.delivery) == (502, smsp.Delivery.NOT_SENT)
    assert [p.calls for p in providers] == [1, 1]
    assert states == [smsp.State.OPEN, smsp.State.OPEN]


def test_open_circuit_is_skipped() -> None:
    result, providers, _ = dispatch(None, opened=("mailgun",))
    assert result.provider == "sendgrid" and [p.calls for p in providers] == [0, 1]


def test_every_circuit_open_is_503_with_retry_after_until_the_next_poll() -> None:
    result, providers, _ = dispatch(None, opened=("mailgun", "sendgrid"))
    assert (result.status, result.delivery, result.retry_after) == \
        (503, smsp.Delivery.NOT_SENT, 4)  # poll at 5 s, 1.5 s have passed: ceil(3.5)
    assert [p.calls for p in providers] == [0, 0]


def test_a_provider_bug_counts_as_unknown_not_as_safe_to_retry() -> None:
    class Broken(StubProvider):
        def send(self, message: smsp.Message, deadline: float) -> smsp.Receipt:
            self.calls += 1
            raise RuntimeError("bug")

    second = StubProvider("sendgrid")
    routes = [smsp.Lane(p, smsp.CircuitBreaker(p.name, lambda: None, timer=FakeTimers()))
              for p in (Broken("mailgun"), second)]
    dispatcher = smsp.Dispatcher(routes, timeout=1, log=smsp.Logger(write=lambda line: None),
                                 metrics=smsp.Metrics())
    with pytest.raises(smsp.DeliveryFailed) as caught:
        dispatcher.send(smsp.parse_message(EMAIL))
    answered = Answered(caught.value)
    assert (answered.status, answered.delivery) == (502, smsp.Delivery.UNKNOWN)
    assert second.calls == 0


# -------------------------------------------------------------- idempotency ---
# The state machine runs against every store in test_redis.py; here what only the
# in-memory store does.

ANSWER = smsp.StoredAnswer(200, (), b'{"status":"sent"}', "mailgun", "sent")


def memory_store(clock: FakeClock, *, ttl: float = 10, max_entries: int = 5
                 ) -> smsp.MemoryIdempotencyStore:
    return smsp.MemoryIdempotencyStore(ttl=ttl, max_entries=max_entries, lease=3, liveness=4,
                                       clock=clock)


def test_idempotency_store_evicts_least_recently_used_but_never_in_flight() -> None:
    store = memory_store(FakeClock(), ttl=100, max_entries=2)
    store.claim("in-flight", "f")
    store.complete("a", store.claim("a", "f").token, ANSWER)
    store.complete("b", store.claim("b", "f").token, ANSWER)  # over: "a" goes
    assert len(store) == 2
    assert store.claim("in-flight", "f").claim is smsp.Claim.IN_FLIGHT
    assert store.claim("a", "f").claim is smsp.Claim.NEW


def test_a_stored_answer_is_forgotten_after_the_ttl() -> None:
    clock = FakeClock()
    store = memory_store(clock, ttl=10)
    store.complete("k", store.claim("k", "f").token, ANSWER)
    clock.advance(9.9)
    assert store.claim("k", "f").claim is smsp.Claim.REPLAY
    clock.advance(0.1)
    assert store.claim("k", "f").claim is smsp.Claim.NEW


# ------------------------------------------------------------- logging, ids ---


def test_json_oneline_log_line_has_the_documented_fields() -> None:
    lines = Lines()
    log = smsp.Logger("JSON_ONELINE", write=lines.write, host="h1", wallclock=lambda: 0.25)
    log.info("access", request_id="r1", status=200, provider=None)
    assert json.loads(lines[0]) == {"time": "1970-01-01T00:00:00.250Z", "level": "info",
                                    "event": "access", "host": "h1", "request_id": "r1",
                                    "status": 200}
    assert lines[0].count("\n") == 1


ACCESS_VALUES = {  # each optional field absent, plain, or needing escapes
    "trace_id": [None, "4bf92f3577b34da6a3ce929d0e0e4736"],
    "client": [None, "127.0.0.1", 'proxy "x"'],
    "provider": [None, "mock"], "delivery": [None, "sent", "not_sent"],
    "reason": [None, "bad_key"], "replayed": [False, True],
}


@pytest.mark.parametrize("fmt", ["JSON_ONELINE", "DEBUG", "JSON_PRETTY"])
@pytest.mark.parametrize("path", ["/email", '/a"b\\c', "/caf\u00e9", "/\x7f"])
def test_the_access_line_is_the_text_the_general_event_writes(fmt: str, path: str) -> None:
    """Logger.access writes the JSON_ONELINE access line without _line's loop; it must
    be the very text info("access", ...) writes, for every shape of line."""
    import itertools
    names = list(ACCESS_VALUES)
    for combo in itertools.product(*ACCESS_VALUES.values()):
        fields = dict(zip(names, combo))
        fast, general = Lines(), Lines()
        for lines in (fast, general):
            log = smsp.Logger(fmt, write=lines.write, host="h1", worker=2, wallclock=lambda: 3.5)
            if lines is fast:
                log.access("r-1", "POST", path, 503, 1.25, **fields)
            else:
                log.info("access", request_id="r-1", trace_id=fields["trace_id"],
                         client=fields["client"], method="POST", path=path, status=503,
                         duration_ms=1.25, provider=fields["provider"],
                         delivery=fields["delivery"], reason=fields["reason"],
                         replayed=fields["replayed"] or None)
        assert fast == general, fields
        if fmt == "JSON_ONELINE":
            document = json.loads(fast[0])
            assert document["path"] == path and document["status"] == 503
            assert ("replayed" in document) is fields["replayed"]

def test_debug_format_is_one_readable_line_and_debug_events_need_the_flag() -> None:
    lines = Lines()
    log = smsp.Logger("DEBUG", write=lines.write, wallclock=lambda: 0.0)
    log.debug("hidden")
    log.warning("circuit_state_change", provider="mailgun", reason="HTTP 500: x y")
    assert lines == ['1970-01-01T00:00:00.000Z WARNING circuit_state_change provider=mailgun '
                     'reason="HTTP 500: x y"\n']


def test_json_pretty_is_indented_json() -> None:
    lines = Lines()
    smsp.Logger("JSON_PRETTY", write=lines.write).info("started", port=1)
    assert json.loads(lines[0])["port"] == 1 and "\n  " in lines[0]


def test_request_ids_are_unique_uuid4_strings() -> None:
    import uuid
    ids = smsp.IdGenerator()
    made = {ids() for _ in range(1000)}
    assert len(made) == 1000
    assert all(uuid.UUID(i).version == 4 for i in list(made)[:20])
    assert smsp.IdGenerator()()[:23] != ids()[:23]  # another process draws another prefix


def test_smsp_imports_only_the_standard_library() -> None:
    tree = ast.parse(open(smsp.__file__, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    assert names and names <= set(sys.stdlib_module_names)


def test_no_function_is_longer_than_40_lines() -> None:
    tree = ast.parse(open(smsp.__file__, encoding="utf-8").read())
    long = [(node.name, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno is not None and node.end_lineno - node.lineno >= 40]
    assert long == []


def test_the_module_docstring_lists_the_sections_in_the_order_of_the_banners() -> None:
    text = open(smsp.__file__, encoding="utf-8").read()
    banners = re.findall(r"^# -+ (.+?) ---$", text, flags=re.M)
    docstring = " ".join((smsp.__doc__ or "").split()).lower()
    docstring = docstring[docstring.index("how the module reads"):]
    places = [docstring.find(banner.split(":")[0].split(" (")[0].lower()) for banner in banners]
    assert -1 not in places, list(zip(banners, places))
    assert places == sorted(places), list(zip(banners, places))


# ------------------------------------------- providers: wire format, failover ---


def form_fields(recorded: Any) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(recorded.body.decode(), strict_parsing=True,
                                                       keep_blank_values=True).items()}


def test_mailgun_gets_the_exact_request_and_its_id_comes_back(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    status, _, body = proxy.send()
    assert status == 200
    request = mailgun.requests[0]
    assert (request.method, request.path) == ("POST", f"/v3/{MG_DOMAIN}/messages")
    assert request.headers["authorization"] == \
        "Basic " + base64.b64encode(f"api:{MG_KEY}".encode()).decode()
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form_fields(request) == {"from": "Alice <alice@example.com>", "to": "bob@example.org",
                                    "subject": "Hello", "text": "line 1\nline 2 é"}
    message_id = json.loads((mailgun.requests[0].status and b"{}") or b"{}") or None
    assert body["provider"] == "mailgun" and body["status"] == "sent"
    assert body["message_id"].startswith("<") and body["message_id"].endswith(f"@{MG_DOMAIN}>")
    assert message_id is None and sendgrid.hits == 0


def test_failover_to_sendgrid_sends_its_exact_json(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500))
    status, _, body = proxy.send()
    assert (status, body["provider"]) == (200, "sendgrid")
    assert len(body["message_id"]) == 22
    request = sendgrid.requests[0]
    assert request.path == "/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {SG_KEY}"
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {
        "personalizations": [{"to": [{"email": "bob@example.org"}]}],
        "from": {"email": "alice@example.com", "name": "Alice"},
        "subject": "Hello",
        "content": [{"type": "text/plain", "value": "line 1\nline 2 é"}]}
    assert (mailgun.hits, sendgrid.hits) == (1, 1)
    assert proxy.states() == {"mailgun": "open", "sendgrid": "closed"}


def test_sendgrid_gets_a_space_for_an_empty_subject_and_body(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    with running(provider_config(mailgun, sendgrid, providers=("sendgrid",))) as server:
        status, _, _ = server.send({"fromaddress": "a@example.com", "toaddress": "b@example.com"})
    assert status == 200
    document = json.loads(sendgrid.requests[0].body)
    assert (document["subject"], document["content"][0]["value"]) == (" ", " ")


def test_mailgun_gets_a_space_for_an_empty_body(proxy: Running, mailgun: FakeMailgun) -> None:
    status, _, _ = proxy.send({"fromaddress": "a@example.com", "toaddress": "b@example.com"})
    assert status == 200 and form_fields(mailgun.requests[0])["text"] == " "


def test_rejected_message_is_422_without_failover(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(400))
    status, _, body = proxy.send()
    assert (status, body["delivery"]) == (422, "not_sent")
    assert "not a valid address" in body["message"]
    assert (mailgun.hits, sendgrid.hits) == (1, 0)
    assert proxy.states() == {"mailgun": "closed", "sendgrid": "closed"}


def test_silent_provider_is_504_unknown_without_failover(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Hang())
    with running(provider_config(mailgun, sendgrid, timeout=0.3)) as server:
        started = time.monotonic()
        status, _, body = server.send()
        elapsed = time.monotonic() - started
        assert (status, body["delivery"]) == (504, "unknown")
        assert (mailgun.hits, sendgrid.hits) == (1, 0)
        assert server.states() == {"mailgun": "open", "sendgrid": "closed"}
    assert elapsed < 0.3 + 0.5


def test_every_circuit_open_is_503_with_retry_after(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500))
    sendgrid.script(Status(503))
    status, _, body = proxy.send()
    assert (status, body["delivery"]) == (502, "not_sent")
    proxy.clock.advance(2)
    status, headers, body = proxy.send()
    assert (status, body["delivery"], headers["retry-after"]) == (503, "not_sent", "3")
    assert (mailgun.hits, sendgrid.hits) == (1, 1)


def test_open_circuit_recovers_by_polling_with_the_poll_message(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500), Status(502))
    proxy.send()
    assert proxy.states()["mailgun"] == "open"
    assert proxy.timers.pending[0].delay == 5
    proxy.timers.fire_next()  # the poll fails: back off
    assert proxy.timers.pending[0].delay == 10
    proxy.timers.fire_next()  # the poll succeeds: closed
    assert proxy.states()["mailgun"] == "closed"
    poll = form_fields(mailgun.requests[-1])
    assert poll == {"from": POLL, "to": POLL, "subject": "poll", "text": "poll"}
    assert len(mailgun.accepted) == 1 and len(sendgrid.accepted) == 1
    status, _, body = proxy.send()
    assert (status, body["provider"]) == (200, "mailgun")
    events = [json.loads(line) for line in proxy.lines]
    changes = [(e["provider"], e["from"], e["to"]) for e in events
               if e["event"] == "circuit_state_change"]
    assert changes == [("mailgun", "closed", "open"), ("mailgun", "open", "closed")]


def test_no_redirect_is_followed(proxy: Running, mailgun: FakeMailgun,
                                 sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(302, body="", headers={"Location": "http://127.0.0.1:9/elsewhere"}))
    status, _, body = proxy.send()
    assert (status, body["provider"]) == (200, "sendgrid")
    assert mailgun.hits == 1


def test_close_without_answer_after_writing_is_502_unknown(
        proxy: Running, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(CloseWithoutResponse())
    status, _, body = proxy.send()
    assert (status, body["delivery"]) == (502, "unknown")
    assert sendgrid.hits == 0


def test_unreachable_provider_fails_over_as_not_sent(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        with running(provider_config(mailgun, sendgrid, mg_base_url=dead)) as server:
            status, _, body = server.send()
    assert (status, body["provider"]) == (200, "sendgrid")


def test_delay_within_the_timeout_is_fine(mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Delay(0.05))
    with running(provider_config(mailgun, sendgrid, timeout=2)) as server:
        status, _, body = server.send()
    assert (status, body["provider"]) == (200, "mailgun")


# -------------------------------------------------------------- the HTTP API ---


def test_missing_or_wrong_key_is_401_and_rotated_keys_work(mock: Running) -> None:
    assert mock.send(X_API_KEY="nope")[0] == 401
    status, _, body = mock.request("POST", "/email", json.dumps(EMAIL).encode(),
                                   {"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["message"] == "Unauthorised"
    assert mock.send(X_API_KEY="rotated-key")[0] == 200
    status, _, _ = mock.request("POST", "/email", json.dumps(EMAIL).encode(),
                                {"x-api-key": API_KEY})  # header names are case-insensitive
    assert status == 200


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(mock: Running) -> None:
    assert mock.request("GET", "/nope")[0] == 404
    for method, path, allow in [("GET", "/email", "POST, OPTIONS"),
                                ("TRACE", "/email", "POST, OPTIONS"),
                                ("BREW", "/email", "POST, OPTIONS"),
                                ("DELETE", "/healthcheck", "GET, HEAD, OPTIONS")]:
        status, headers, body = mock.request(method, path)
        assert (status, headers["allow"]) == (405, allow), method
        assert set(json.loads(body)) == {"message", "request_id"}


def test_checks_run_in_the_documented_order(mock: Running) -> None:
    def raw(head: str, body: bytes = b"") -> int:
        request = head.encode() + b"Connection: close\r\n\r\n" + body
        return status_of(raw_exchange(mock.port, request))

    post = "POST /email HTTP/1.1\r\nHost: x\r\n"
    key = f"X-API-KEY: {API_KEY}\r\n"
    assert raw("POST /other HTTP/1.1\r\nHost: x\r\n") == 404
    assert raw("GET /email HTTP/1.1\r\nHost: x\r\n") == 405
    assert raw(post) == 401
    assert raw(post + key) == 411
    assert raw(post + key + "Transfer-Encoding: chunked\r\n") == 411
    assert raw(post + key + "Content-Length: 99999999\r\nContent-Type: text/plain\r\n") == 413
    assert raw(post + key + "Content-Length: 2\r\nContent-Type: text/plain\r\n", b"{}") == 415
    assert raw(post + key + "Content-Length: 2\r\n", b"{}") == 400
    assert raw(post + key + "Content-Length: -1\r\n") == 400


def test_oversized_body_is_refused_before_it_is_read_and_the_connection_closed(
        mock: Running) -> None:
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as sock:
        sock.sendall(f"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: {API_KEY}\r\n"
                     f"Content-Length: {mock.service.config.max_body_bytes + 1}\r\n\r\n"
                     .encode())
        answer = sock.makefile("rb").read()  # no body sent: the answer and EOF arrive anyway
    assert status_of(answer) == 413 and b"Connection: close" in answer


def test_refused_request_with_a_body_closes_so_keep_alive_cannot_desynchronise(
        mock: Running) -> None:
    smuggled = b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n"
    first = (f"POST /email HTTP/1.1\r\nHost: x\r\nContent-Length: {len(smuggled)}\r\n\r\n"
             ).encode() + smuggled
    answer = raw_exchange(mock.port, first)
    assert status_of(answer) == 401 and answer.count(b"HTTP/1.1 ") == 1


def test_415_tells_curl_users_what_to_send(mock: Running) -> None:
    status, _, body = mock.request("POST", "/email", json.dumps(EMAIL).encode(), {
        "X-API-KEY": API_KEY, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "-H 'Content-Type: application/json'" in json.loads(body)["message"]
    status, _, _ = mock.request("POST", "/email", json.dumps(EMAIL).encode(), {
        "X-API-KEY": API_KEY, "Content-Type": "application/json; charset=UTF-8"})
    assert status == 200


def test_400_says_which_field_and_why(mock: Running) -> None:
    status, _, body = mock.send({**EMAIL, "toaddress": "not-an-address"})
    assert status == 400 and body["message"].startswith("toaddress: must be an address")
    status, _, body = mock.send({**EMAIL, "subject": "a\nb"})
    assert status == 400 and body["message"].startswith("subject:")


def test_keep_alive_serves_several_requests_on_one_connection(mock: Running) -> None:
    conn = mock.connect()
    for _ in range(3):
        conn.request("POST", "/email", json.dumps(EMAIL).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Connection") is None
        response.read()
    sock = conn.sock
    conn.request("GET", "/healthcheck")
    conn.getresponse().read()
    assert conn.sock is sock
    conn.close()


def test_http10_closes_unless_keep_alive_is_asked_for(mock: Running) -> None:
    answer = raw_exchange(mock.port, b"GET /healthcheck HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 200 and b"Connection: close" in answer
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as sock:
        sock.sendall(b"GET /healthcheck HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
        sock.shutdown(socket.SHUT_WR)
        answers = sock.makefile("rb").read()
    assert answers.count(b"HTTP/1.1 200 OK") == 2
    assert answers.count(b"Connection: keep-alive") == 2


def test_expect_100_continue_is_answered_before_the_body(mock: Running) -> None:
    body = json.dumps(EMAIL).encode()
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as sock:
        sock.sendall(f"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: {API_KEY}\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")


def test_request_id_is_echoed_or_made_and_logged(mock: Running) -> None:
    _, headers, _ = mock.send(X_Request_Id="trace-123")
    assert headers["x-request-id"] == "trace-123"
    status, headers, body = mock.request("GET", "/nope", headers={"X-Request-Id": "has space"})
    made = headers["x-request-id"]
    assert status == 404 and made != "has space" and json.loads(body)["request_id"] == made
    # each connection's thread writes its access line after answering, so the two
    # lines may come in either order
    access = {e["request_id"]: e for e in mock.lines.events("access", at_least=2)}
    assert set(access) == {"trace-123", made}
    sent = access["trace-123"]
    assert (sent["status"], sent["path"], sent["provider"], sent["delivery"]) == \
        (200, "/email", "mock", "sent")
    assert (access[made]["status"], access[made]["path"]) == (404, "/nope")


def test_healthcheck_get_and_head(mock: Running) -> None:
    status, headers, body = mock.request("GET", "/healthcheck")
    document = json.loads(body)
    assert status == 200 and document["status"] == "ok"
    assert document["providers"] == [{"name": "mock", "state": "closed",
                                      "consecutive_failures": 0, "opened_at": None,
                                      "next_poll_at": None, "last_error": None}]
    status, head_headers, head_body = mock.request("HEAD", "/healthcheck")
    assert status == 200 and head_body == b""
    assert head_headers["content-length"] == headers["content-length"]


def test_healthcheck_stays_ok_with_every_circuit_open(mock: Running) -> None:
    mock.send({**EMAIL, "subject": "fail"})
    status, _, body = mock.request("GET", "/healthcheck")
    provider = json.loads(body)["providers"][0]
    assert status == 200 and provider["state"] == "open"
    assert provider["last_error"] == "HTTP 500"
    assert provider["opened_at"].endswith("Z") and provider["next_poll_at"].endswith("Z")


def test_options_preflight_and_cors_on_every_response(mock: Running) -> None:
    status, headers, body = mock.request("OPTIONS", "/email", headers={
        "Origin": "https://editor.swagger.io", "Access-Control-Request-Method": "POST"})
    assert status == 204 and body == b""
    assert "POST" in headers["access-control-allow-methods"]
    assert "X-API-KEY" in headers["access-control-allow-headers"]
    for method, path in [("GET", "/healthcheck"), ("GET", "/nope"), ("POST", "/email")]:
        assert mock.request(method, path)[1]["access-control-allow-origin"] == "*"


def test_swagger_document_is_valid_openapi() -> None:
    from openapi_spec_validator import validate

    with running(make_config()) as server:
        status, headers, body = server.request("GET", "/swagger.json")
    assert status == 200 and headers["content-type"] == "application/json"
    document = json.loads(body)
    validate(document)
    assert set(document["paths"]) == {e.path for e in smsp.ENDPOINTS}
    assert document["components"]["securitySchemes"]["apiKey"] == \
        {"type": "apiKey", "in": "header", "name": "X-API-KEY"}


def observed_answers(server: Running) -> list[tuple[str, str, int, dict[str, str], bytes]]:
    """A scripted walk over every route, provoking every answer each can give."""
    answers = []

    def call(method: str, path: str, body: bytes | None = None, **headers: str) -> None:
        status, got, data = server.request(method, path, body, headers)
        answers.append((method.lower(), path, status, got, data))

    good = json.dumps(EMAIL).encode()
    key = {"X-API-KEY": API_KEY}
    json_key = {**key, "Content-Type": "application/json"}
    for method in ("GET", "HEAD"):
        for path in ("/healthcheck", "/swagger.json", "/metrics"):
            call(method, path)
    call("POST", "/email", good, **json_key)  # 200
    call("POST", "/email", b"{", **json_key)  # 400
    call("POST", "/email", good)  # 401
    call("POST", "/email", good, **{**key, "Content-Type": "text/plain"})  # 415
    too_big = server.service.config.max_body_bytes + 1  # 413, answered without the body
    raw = raw_exchange(server.port, f"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: {API_KEY}"
                                    f"\r\nContent-Length: {too_big}\r\n\r\n".encode())
    answers.append(("post", "/email", status_of(raw), {}, raw.partition(b"\r\n\r\n")[2]))
    raw = raw_exchange(server.port, f"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: {API_KEY}"
                                    "\r\nConnection: close\r\n\r\n".encode())  # 411
    answers.append(("post", "/email", status_of(raw), {}, raw.partition(b"\r\n\r\n")[2]))
    with socket.create_connection(("127.0.0.1", server.port)) as slow:  # 408
        slow.sendall(f"POST /email HTTP/1.1\r\nX-API-KEY: {API_KEY}\r\n".encode())
        raw = slow.makefile("rb").read()
    answers.append(("post", "/email", status_of(raw), {}, raw.partition(b"\r\n\r\n")[2]))
    call("POST", "/email", good, **json_key, **{"Idempotency-Key": "k1"})
    other = json.dumps({**EMAIL, "subject": "other"}).encode()
    call("POST", "/email", other, **json_key, **{"Idempotency-Key": "k1"})  # 422
    slow_send = threading.Thread(target=call, args=(
        "POST", "/email", json.dumps({**EMAIL, "subject": "timeout"}).encode()),
        kwargs={**json_key, "Idempotency-Key": "k2"})
    slow_send.start()  # 504 after the timeout; meanwhile the same key gets 409
    wait_for(lambda: server.server.inflight >= 1)  # either of the two may get the 409
    call("POST", "/email", json.dumps({**EMAIL, "subject": "timeout"}).encode(), **json_key,
         **{"Idempotency-Key": "k2"})  # 409
    slow_send.join()
    call("POST", "/email", good, **json_key)  # 503: the timeout opened the circuit
    server.timers.fire_next()  # the poll closes it
    call("POST", "/email", json.dumps({**EMAIL, "subject": "fail"}).encode(), **json_key)  # 502
    return answers


def resolve(document: dict[str, Any], node: Any) -> Any:
    """A schema with every local $ref replaced by what it points at, and OpenAPI 3.0's
    ``nullable`` turned into the JSON Schema it means."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = document
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return resolve(document, target)
        result = {k: resolve(document, v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable"):
            result["type"] = [node["type"], "null"]
        return result
    if isinstance(node, list):
        return [resolve(document, v) for v in node]
    return node


def test_every_route_and_status_is_documented_and_real_answers_match_the_schemas() -> None:
    import jsonschema

    with running(make_config(client_timeout=0.5, timeout=0.3)) as server:
        document = json.loads(server.request("GET", "/swagger.json")[2])
        answers = observed_answers(server)
    for path, methods in ((e.path, e.methods) for e in smsp.ENDPOINTS):
        assert {m.upper() for m in document["paths"][path]} == set(methods), path
    seen: dict[tuple[str, str], set[int]] = {}
    for method, path, status, headers, body in answers:
        seen.setdefault((method, path), set()).add(status)
        documented = document["paths"][path][method]["responses"]
        assert str(status) in documented, (method, path, status)
        response = resolve(document, documented[str(status)])
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        if schema and method != "head":
            jsonschema.validate(json.loads(body), schema)
        for name in response.get("headers", {}):
            if headers:  # raw exchanges above were not split into headers
                assert name.lower() in headers or name in ("Idempotent-Replayed",
                                                           "Retry-After"), (status, name)
        if status == 503:
            assert int(headers["retry-after"]) >= 1
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert {int(s) for s in operation["responses"]} == seen[(method, path)], \
                (method, path)


def test_internal_error_is_a_json_500_without_details(mock: Running) -> None:
    def broken(request: smsp.Request) -> smsp.Response:
        raise KeyError("secret-detail")

    mock.service.app.health = broken  # type: ignore[method-assign]
    status, _, body = mock.request("GET", "/healthcheck")
    assert status == 500 and b"secret-detail" not in body
    assert set(json.loads(body)) == {"message", "request_id"}
    errors = mock.lines.events("internal_error", at_least=1)
    assert errors[0]["error"] == "KeyError" and "secret-detail" not in mock.lines.text


# ------------------------------------------- lean parser: same limits as stdlib ---


class StdlibHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stdlib_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StdlibHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


CLOSE = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"  # ends a kept-alive exchange
MALFORMED = {
    "bad version word": b"GET /healthcheck FTP/1.1\r\n\r\n",
    "version without minor": b"GET /healthcheck HTTP/1\r\n\r\n",
    "version with three parts": b"GET /healthcheck HTTP/1.1.1\r\n\r\n",
    "version not digits": b"GET /healthcheck HTTP/1.x\r\n\r\n",
    "version number too long": b"GET /healthcheck HTTP/12345678901.1\r\n\r\n",
    "http/2": b"GET /healthcheck HTTP/2.0\r\n\r\n",
    "four words": b"GET /a b HTTP/1.1\r\n\r\n",
    "request line too long": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    "header line too long": b"GET /healthcheck HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "100 header lines": b"GET /healthcheck HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n",
    "99 header lines": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 98
                       + b"\r\n",
    "well formed": b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.1 without Host": b"GET /healthcheck HTTP/1.1\r\n\r\n",
    "version 1.2": b"GET /healthcheck HTTP/1.2\r\nHost: x\r\n\r\n",
    "tab between the parts": b"GET\t/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n",
}
# Where RFC 9112 and http.server disagree, the RFC wins (http.server answers these 200):
# a Host header is required in HTTP/1.1 (§3.2), only HTTP/1.0 and 1.1 are served, and
# single spaces separate the parts of the request line (§3).
RFC_9112_WINS = {"HTTP/1.1 without Host": 400, "version 1.2": 505, "tab between the parts": 400}


@pytest.mark.parametrize("case", MALFORMED)
def test_lean_parser_answers_as_the_stdlib_does(case: str, mock: Running, stdlib_port: int
                                                ) -> None:
    ours = status_of(raw_exchange(mock.port, MALFORMED[case] + CLOSE))
    theirs = status_of(raw_exchange(stdlib_port, MALFORMED[case] + CLOSE))
    assert ours == RFC_9112_WINS.get(case, theirs) != 0


@pytest.mark.parametrize("head", [
    b"X-No-Colon\r\n", b" X-Folded: a\r\n", b"X A: b\r\n", b"Content-Length: 1\r\n" * 2,
])
def test_malformed_header_lines_are_400_not_silently_dropped(mock: Running, head: bytes) -> None:
    answer = raw_exchange(mock.port, b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    assert status_of(answer) == 400 and b"Connection: close" in answer


def test_blank_request_line_closes_quietly(mock: Running) -> None:
    assert raw_exchange(mock.port, b"\r\n") == b""


def test_http09_is_refused(mock: Running) -> None:
    assert status_of(raw_exchange(mock.port, b"GET /healthcheck\r\n")) == 400


def test_leading_double_slash_is_collapsed(mock: Running) -> None:
    request = b"GET //healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(raw_exchange(mock.port, request)) == 200


# ------------------------------------------------------------------ metrics ---


def scrape(server: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_a_scripted_sequence(proxy: Running, mailgun: FakeMailgun,
                                           sendgrid: FakeSendGrid) -> None:
    assert proxy.send()[0] == 200  # mailgun sent
    mailgun.script(Status(500))
    assert proxy.send()[0] == 200  # mailgun not_sent, circuit opens, sendgrid sent
    proxy.timers.fire_next()  # the poll succeeds: closed again
    mailgun.script(Status(400))
    assert proxy.send()[0] == 422  # rejected
    assert proxy.request("GET", "/nope")[0] == 404
    proxy.lines.events("access", at_least=4)
    m = scrape(proxy)

    def get(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert get("smsp_provider_attempts_total", provider="mailgun", outcome="sent") == 1
    assert get("smsp_provider_attempts_total", provider="mailgun", outcome="not_sent") == 1
    assert get("smsp_provider_attempts_total", provider="mailgun", outcome="rejected") == 1
    assert get("smsp_provider_attempts_total", provider="sendgrid", outcome="sent") == 1
    assert get("smsp_provider_attempt_duration_seconds_count", provider="mailgun") == 3
    assert get("smsp_circuit_transitions_total", provider="mailgun", to="open") == 1
    assert get("smsp_circuit_transitions_total", provider="mailgun", to="closed") == 1
    assert get("smsp_circuit_polls_total", provider="mailgun", result="success") == 1
    assert get("smsp_circuit_open", provider="mailgun") == 0
    assert get("smsp_circuit_open", provider="sendgrid") == 0
    assert get("smsp_http_requests_total", method="POST", route="/email", status="200") == 2
    assert get("smsp_http_requests_total", method="POST", route="/email", status="422") == 1
    assert get("smsp_http_requests_total", method="GET", route="other", status="404") == 1
    assert get("smsp_http_request_duration_seconds_count", route="/email") == 3
    assert get("smsp_http_request_duration_seconds_bucket", route="/email", le="+Inf") == 3
    assert get("smsp_inflight_requests") == 1  # the scrape itself
    assert get("smsp_build_info", version=smsp.VERSION) == 1
    assert abs(get("process_start_time_seconds") - time.time()) < 600
    # polls are not attempts
    assert sum(v for (n, _), v in m.items() if n == "smsp_provider_attempts_total") == 4


def test_open_circuit_shows_in_the_gauge(mock: Running) -> None:
    mock.send({**EMAIL, "subject": "fail"})
    m = scrape(mock)
    assert m[("smsp_circuit_open", (("provider", "mock"),))] == 1


def test_every_series_carries_the_worker_label_with_several_workers() -> None:
    metrics = smsp.Metrics(worker=1)
    metrics.inc("smsp_http_requests_total", "GET", "/healthcheck", "200")
    metrics.observe("smsp_http_request_duration_seconds", 0.003, "/healthcheck")
    text = metrics.render({"smsp_inflight_requests": [((), 0)]})
    series = [line for line in text.splitlines() if not line.startswith("#")]
    assert series and all('worker="1"' in line for line in series)


def test_label_values_are_escaped() -> None:
    metrics = smsp.Metrics()
    metrics.inc("smsp_circuit_polls_total", 'we"ird\\\n', "success")
    assert 'provider="we\\"ird\\\\\\n"' in metrics.render({})


# ---------------------------------------------------------------------- TLS ---


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_https_serves_tls_and_drops_plain_http(certificate: tuple[str, str]) -> None:
    import ssl

    cert, key = certificate
    with running(make_config(tls_cert=cert, tls_key=key)) as server:
        context = ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=5)
        conn.request("POST", "/email", json.dumps(EMAIL).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "sent"
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        conn.close()
        answer = raw_exchange(server.port, b"GET /healthcheck HTTP/1.1\r\n\r\n")
        assert not answer.startswith(b"HTTP/")
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port)) as raw:
            old.wrap_socket(raw)


def test_a_bad_certificate_stops_start_up_with_status_2(tmp_path: Any) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    lines = Lines()
    config = make_config(tls_cert=str(bad), tls_key=str(bad))
    assert smsp.serve(config, log=smsp.Logger("JSON_ONELINE", write=lines.write)) == 2
    assert lines.events("start_failed")


# ------------------------------------------------------- worker supervisor ---



def children_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthcheck")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def inflight_of_one_worker(port: int) -> tuple[str, int] | None:
    """(worker, requests in flight on it) from the /metrics of whichever worker answers,
    less the scrape itself; None if none answered."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return None
    found = re.search(r'^smsp_inflight_requests\{worker="(\d+)"\} (\S+)$', text, re.M)
    return None if found is None else (found[1], int(float(found[2])) - 1)


def replace_a_worker(proc: Any, port: int) -> set[int]:
    """SIGKILL one of two workers; once its replacement serves too, the two pids."""
    import os
    import signal

    wait_for(lambda: healthy(port) and len(children_of(proc.pid)) == 2, 30)
    first = children_of(proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: (c := children_of(proc.pid)) and len(c) == 2
                        and victim not in c and c, 30)
    assert len(replaced & first) == 1
    serving: set[str] = set()

    def both_workers_serve() -> bool:  # the new one too, with its signal handlers in
        seen = inflight_of_one_worker(port)
        serving.update(() if seen is None else (seen[0],))
        return len(serving) == 2

    wait_for(both_workers_serve, 30)
    return replaced


def slow_sends_in_flight(port: int, n: int) -> tuple[list[threading.Thread], list[int]]:
    """``n`` sends the mock holds until its timeout, each proved to be in flight."""
    results: list[int] = []

    def slow_send() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/email", json.dumps({**EMAIL, "subject": "timeout"}).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
        results.append(conn.getresponse().status)
        conn.close()

    senders = [threading.Thread(target=slow_send) for _ in range(n)]
    for sender in senders:
        sender.start()
    latest: dict[str, int] = {}  # each worker's count only grows while the sends wait

    def all_arrived() -> bool:
        seen = inflight_of_one_worker(port)
        if seen is not None:
            latest[seen[0]] = seen[1]
        return sum(latest.values()) == n

    wait_for(all_arrived, 30)  # the requests reached the workers: not a count of threads
    return senders, results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_supervisor_replaces_a_killed_worker_and_drains_every_worker_on_sigterm() -> None:
    import os
    import signal
    import subprocess

    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "SMSP_MOCK_EMAIL_SERVICE": "true",
           "SMSP_API_KEY": API_KEY, "SMSP_WORKERS": "2", "SMSP_TIMEOUT": "5",
           "SMSP_LOG_OUTPUT_FORMAT": "JSON_ONELINE"}
    proc = subprocess.Popen([sys.executable, smsp.__file__, "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        replaced = replace_a_worker(proc, port)
        senders, results = slow_sends_in_flight(port, 4)  # mock "timeout": 504 after 5 s
        proc.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(30)
        assert proc.wait(timeout=30) == 0
        assert sorted(results) == [504, 504, 504, 504]  # answered, not cut off
        assert not any(os.path.exists(f"/proc/{pid}") for pid in replaced)
        events = [json.loads(line)["event"] for line in proc.stdout.read().splitlines()]
        assert events.count("worker_died") == 1 and "workers_stopped" in events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_runs_until_sigterm_then_drains_and_exits_0() -> None:
    import os
    import signal

    lines = Lines()
    port = free_port()
    config = make_config(port=port, shutdown_grace=5)
    answers: list[int] = []
    intervals: list[float] = []

    def client() -> None:
        wait_for(lambda: healthy(port))
        intervals.append(sys.getswitchinterval())  # the serving process's GIL interval
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/email", json.dumps(EMAIL).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json"})
        answers.append(conn.getresponse().status)
        conn.close()
        os.kill(os.getpid(), signal.SIGTERM)

    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    previous_interval = sys.getswitchinterval()
    thread = threading.Thread(target=client)
    thread.start()
    try:
        code = smsp.serve(config, log=smsp.Logger("JSON_ONELINE", write=lines.write))
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        sys.setswitchinterval(previous_interval)
        thread.join(10)
    assert code == 0 and answers == [200]
    assert intervals == [pytest.approx(smsp.GIL_SWITCH_INTERVAL)] != [previous_interval]
    assert [e for e in ("started", "stopping", "stopped") if lines.events(e)] == \
        ["started", "stopping", "stopped"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


# -------------------------------------------------------------- log writer ---


def test_log_writer_writes_whole_lines_in_order_in_pipe_sized_writes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    sizes: list[int] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    read_end, write_end = os.pipe()
    writer = smsp.LineWriter(write_end, interval=3600)  # only close() flushes here
    lines = [f"line {i:04d} {'x' * 100}\n" for i in range(200)]  # all one length
    monkeypatch.setattr(smsp.os, "write", recording_write)
    for line in lines:
        writer.write(line)
    writer.close()
    monkeypatch.undo()
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.read() == "".join(lines).encode()
    assert len(sizes) > 1 and max(sizes) <= smsp.PIPE_BUF
    assert all(size % len(lines[0]) == 0 for size in sizes)  # whole lines only


def test_log_writer_flushes_on_its_own_within_the_interval() -> None:
    import os
    import select

    read_end, write_end = os.pipe()
    writer = smsp.LineWriter(write_end, interval=0.01)
    writer.write("hello\n")
    ready, _, _ = select.select([read_end], [], [], 5)
    assert ready and os.read(read_end, 100) == b"hello\n"
    writer.close()
    os.close(read_end)
    os.close(write_end)


def test_smsp_threads_leave_sigterm_to_the_main_thread() -> None:
    import signal

    masks: list[set[int]] = []
    smsp.start_thread(lambda: masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                      "probe").join(5)
    assert {signal.SIGTERM, signal.SIGINT} <= masks[0]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # ours untouched


class PooledThing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_idle_pool_keeps_the_newest_fit_ones_and_closes_the_rest() -> None:
    clock = FakeClock()
    pool: smsp.IdlePool[PooledThing] = smsp.IdlePool(2, max_idle=10.0, clock=clock)
    a, b, c = PooledThing("a"), PooledThing("b"), PooledThing("c")
    for thing in (a, b, c):
        pool.put(thing)
    assert c.closed and not (a.closed or b.closed)  # full at two: the third is closed
    assert pool.take(lambda t: True) is b  # the most recently used first
    assert pool.take(lambda t: False) is None and a.closed  # unfit: closed, not returned
    old, new = PooledThing("old"), PooledThing("new")
    pool.put(old)
    clock.advance(10.5)
    pool.put(new)  # putting one drops what has been idle too long
    assert old.closed and not new.closed
    clock.advance(10.5)
    assert pool.take(lambda t: True) is None and new.closed  # too old by the time it is asked for
    kept = PooledThing("kept")
    pool.put(kept)
    pool.close()
    assert kept.closed and pool.take(lambda t: True) is None


def test_idle_pool_without_max_idle_keeps_them_however_long() -> None:
    clock = FakeClock()
    pool: smsp.IdlePool[PooledThing] = smsp.IdlePool(1, clock=clock)
    thing = PooledThing("t")
    pool.put(thing)
    clock.advance(1e6)
    assert pool.take(lambda t: True) is thing and not thing.closed


def test_pool_drops_a_connection_idle_longer_than_pool_idle(mailgun: FakeMailgun) -> None:
    clock = FakeClock()
    watchdog = smsp.Watchdog(clock=clock)  # deadlines and pool ages on one clock
    client = smsp.HTTPClient(urllib.parse.urlsplit(mailgun.url), watchdog=watchdog,
                             pool_size=4, pool_idle=15, clock=clock)
    provider = smsp.MailgunProvider(client, MG_DOMAIN, MG_KEY)
    message = smsp.parse_message(EMAIL)
    try:
        provider.send(message, clock() + 5)
        clock.advance(10)
        provider.send(message, clock() + 5)  # idle 10 s: reused
        assert mailgun.connections == 1
        clock.advance(16)
        provider.send(message, clock() + 5)  # idle 16 s: dropped, a new one
        assert mailgun.connections == 2 and client.connections_made == 2
        assert len(mailgun.accepted) == 3
    finally:
        client.close()
        watchdog.stop()


def test_connection_threads_drain_a_burst_while_the_accept_loop_is_stalled() -> None:
    # Under load the accept loop waits for the GIL behind every busy connection
    # thread; each new connection thread therefore takes waiting connections too.
    # Here the loop is stopped outright and takes one connection by hand: the
    # threads it starts must take the other six.
    with running(make_config()) as server:
        server.server.shutdown()  # the accept loop stops; the listener stays open
        clients = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                   for _ in range(7)]
        try:
            for client in clients:
                client.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
            server.server._handle_request_noblock()  # what one turn of the loop does
            answers = [client.recv(65536) for client in clients]
        finally:
            for client in clients:
                client.close()
    assert [status_of(answer) for answer in answers] == [200] * 7


def test_accept_waiting_returns_at_once_when_nothing_waits() -> None:
    with running(make_config()) as server:
        step = threading.Thread(target=server.server.accept_waiting, daemon=True)
        step.start()
        step.join(5)
        assert not step.is_alive()
        assert server.server.active_connections == 0


def test_accept_loop_never_blocks_when_another_worker_took_the_connection() -> None:
    # With workers sharing the socket, the selector can announce a connection that
    # another worker accepts first; this worker's accept must not then block (it
    # would hang the accept loop, and shutdown() with it).
    with running(make_config()) as server:
        step = threading.Thread(target=server.server._handle_request_noblock, daemon=True)
        step.start()  # nothing is pending: what a lost race looks like to this worker
        step.join(5)
        assert not step.is_alive()
        assert server.request("GET", "/healthcheck")[0] == 200
