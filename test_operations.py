"""What operators see: configuration mistakes caught by name, logs that explain a failed
send, and answers a browser client can read."""

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import smsp
from fakes import FakeMailgun, FakeSendGrid, Status
from test_smsp import scrape
from testkit import API_KEY, MG_DOMAIN, provider_config, running

SMSP = Path(smsp.__file__).resolve()
REAL = {"SMSP_API_KEY": "k", "SMSP_PROVIDERS": "mailgun", "SMSP_MG_DOMAIN": "mg.example.com",
        "SMSP_MG_API_KEY": "mgk", "SMSP_POLL_MESSAGE_ADDRESS": "p@example.com"}
MOCK = {"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true"}


# ------------------------------------------------------ configuration checks ---


@pytest.mark.parametrize("argv", [["--check-config"], ["--check-config", "--port", "99999"]])
def test_a_port_out_of_range_exits_2_by_name(argv: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    env = {**MOCK, "SMSP_PORT": "99999"} if "--port" not in argv else MOCK
    with pytest.raises(SystemExit) if "--port" in argv else _no_raise() as caught:
        assert smsp.main(argv, environ=env) == 2
    if caught is not None:
        assert caught.value.code == 2  # argparse, with the setting's own parser
    assert "at most 65535" in capsys.readouterr().err


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_base_url_with_a_path_is_an_error_naming_the_right_form(
        capsys: pytest.CaptureFixture[str]) -> None:
    env = {**REAL, "SMSP_MG_BASE_URL": "https://api.eu.mailgun.net/v3"}
    assert smsp.main(["--check-config"], environ=env) == 2
    err = capsys.readouterr().err
    assert "SMSP_MG_BASE_URL must be scheme and host only, like https://api.eu.mailgun.net" in err


def test_mock_mode_check_config_says_what_will_really_happen(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert smsp.main(["--check-config"], environ={**MOCK, "SMSP_PROVIDERS": "foo"}) == 0
    out = capsys.readouterr().out.splitlines()
    assert "SMSP_PROVIDERS=mock (SMSP_MOCK_EMAIL_SERVICE=true: provider settings are ignored)" \
        in out
    assert not any(line.startswith("SMSP_MG_") for line in out)


def test_a_config_error_in_mock_mode_does_not_suggest_mock_mode(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert smsp.main(["--check-config"], environ={**MOCK, "SMSP_TIMEOUT": "soon"}) == 2
    err = capsys.readouterr().err
    assert "SMSP_TIMEOUT must be a number" in err and "SMSP_MOCK_EMAIL_SERVICE" not in err
    assert smsp.main(["--check-config"], environ={"SMSP_API_KEY": "k"}) == 2
    assert "set SMSP_MOCK_EMAIL_SERVICE=true" in capsys.readouterr().err


def test_help_gives_each_variable_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        smsp.main(["--help"], environ={})
    out = capsys.readouterr().out
    for row in smsp.all_settings():
        lines = [line for line in out.splitlines() if line.strip().startswith(row.env + " ")]
        assert len(lines) == 1, row.env
    assert "[required]" not in out and "['']" not in out and "''" not in out


def test_several_workers_fail_to_start_with_one_line_and_status_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**MOCK, "SMSP_WORKERS": "2", "SMSP_LOG_OUTPUT_FORMAT": "JSON_ONELINE",
               "SMSP_HOST": "127.0.0.1", "SMSP_PORT": str(port)}
        done = subprocess.run([sys.executable, str(SMSP)], env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["start_failed"]
    assert "Address already in use" in lines[0]["error"]
    assert "Traceback" not in done.stderr + done.stdout


# ----------------------------------------------------------- logs and alerts ---


def test_failover_is_a_warning_naming_both_providers_and_is_counted(
        proxy: Any, mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(503))
    status, _, body = proxy.send()
    assert (status, body["provider"]) == (200, "sendgrid")
    [event] = proxy.lines.events("failover", at_least=1)
    assert (event["level"], event["from"], event["to"]) == ("warning", "mailgun", "sendgrid")
    assert event["request_id"] == proxy.lines.events("access", at_least=1)[0]["request_id"]
    samples = scrape(proxy)
    assert samples[("smsp_failovers_total", (("from", "mailgun"), ("to", "sendgrid")))] == 1


def test_a_failed_poll_is_logged_at_the_first_failure_and_on_each_change_only(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500), Status(503), Status(503), Status(503), Status(401))
    with running(provider_config(mailgun, sendgrid, providers=("mailgun",))) as server:
        server.send()
        for _ in range(4):
            server.timers.fire_next()
        failed = [(e["level"], e["reason"]) for e in server.lines.events("poll_failed")]
        assert failed == [("warning", "HTTP 503"), ("warning", "HTTP 401")]
        assert scrape(server)[("smsp_circuit_polls_total",
                               (("provider", "mailgun"), ("result", "failure")))] == 4


def access_by_id(server: Any, count: int) -> dict[str, dict[str, Any]]:
    """The access lines by request id: a line is written just after its answer, so two
    requests' lines may come in either order."""
    return {a["request_id"]: a for a in server.lines.events("access", at_least=count)}


def test_error_access_lines_carry_a_stable_reason(mock: Any) -> None:
    assert mock.send(X_API_KEY="wrong", X_Request_Id="r1")[0] == 401
    assert mock.send({"toaddress": "x@example.com"}, X_Request_Id="r2")[0] == 400
    assert mock.send({**_email(), "subject": "fail"}, X_Request_Id="r3")[0] == 502
    access = access_by_id(mock, 3)
    assert [access[rid].get("reason") for rid in ("r1", "r2", "r3")] == \
        ["bad_key", "invalid_field", "provider_failed"]


def test_a_replayed_answer_says_so_in_the_access_line(mock: Any) -> None:
    assert mock.send(Idempotency_Key="k-1", X_Request_Id="first")[0] == 200
    assert mock.send(Idempotency_Key="k-1", X_Request_Id="again")[0] == 200
    access = access_by_id(mock, 2)
    assert [access[rid].get("replayed") for rid in ("first", "again")] == [None, True]


def _email() -> dict[str, str]:
    return {"fromaddress": "a@example.com", "toaddress": "b@example.com", "subject": "s"}


# -------------------------------------------------------------- browser use ---


def test_cors_exposes_the_headers_a_browser_client_needs_to_read(mock: Any) -> None:
    status, headers, _ = mock.request("POST", "/email", b"{}", {"X-API-KEY": API_KEY})
    exposed = {h.strip() for h in headers["access-control-expose-headers"].split(",")}
    assert {"X-Request-Id", "Retry-After", "Idempotent-Replayed"} <= exposed
    status, headers, _ = mock.request("OPTIONS", "/email")
    assert status == 204 and "traceparent" in headers["access-control-allow-headers"]


# --------------------------------------------------------- secrets from files ---


def test_every_secret_can_come_from_a_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    keys, mg = tmp_path / "keys", tmp_path / "mg"
    keys.write_text("from-file-1,from-file-2\n")
    mg.write_text("key-from-file\n")
    env = {**REAL, "SMSP_API_KEY_FILE": str(keys), "SMSP_MG_API_KEY_FILE": str(mg)}
    del env["SMSP_API_KEY"], env["SMSP_MG_API_KEY"]
    config = smsp.load_config(env)
    assert config.api_keys == ("from-file-1", "from-file-2")
    assert config.provider_settings["mailgun"]["mg_api_key"] == "key-from-file"
    assert smsp.main(["--check-config"], environ=env) == 0
    out = capsys.readouterr().out
    assert "from-file" not in out and "SMSP_API_KEY=****,****" in out


def test_a_secret_set_twice_or_unreadable_is_an_error_by_name(tmp_path: Path) -> None:
    secret = tmp_path / "k"
    secret.write_text("k2")
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config({**MOCK, "SMSP_API_KEY_FILE": str(secret)})
    assert caught.value.problems == ["SMSP_API_KEY and SMSP_API_KEY_FILE are both set; "
                                     "set one of them"]
    env = {"SMSP_MOCK_EMAIL_SERVICE": "true", "SMSP_API_KEY_FILE": str(tmp_path / "missing")}
    with pytest.raises(smsp.ConfigError) as caught:
        smsp.load_config(env)
    assert caught.value.problems == [f"SMSP_API_KEY_FILE cannot be read: No such file or "
                                     f"directory ({tmp_path / 'missing'})"]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for name, base in (("SMSP_API_KEY", {"SMSP_MOCK_EMAIL_SERVICE": "true"}),
                       ("SMSP_MG_API_KEY", {k: v for k, v in REAL.items()
                                            if k != "SMSP_MG_API_KEY"})):
        with pytest.raises(smsp.ConfigError) as caught:
            smsp.load_config({**base, f"{name}_FILE": str(empty)})
        assert caught.value.problems == [f"{name}_FILE names an empty file ({empty})"]


def test_only_secret_settings_read_a_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("9")
    config = smsp.load_config({**MOCK, "SMSP_TIMEOUT_FILE": str(tmp_path / "t")})
    assert config.timeout == 2.0


# ------------------------------------------------------------------ tracing ---

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(("header", "trace"), [
    (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
    (f"01-{TRACE}-00f067aa0ba902b7-01-future", TRACE),  # a later version may add fields
    (f"00-{TRACE}-00f067aa0ba902b7-01-x", None), (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", None), (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None), ("garbage", None), (None, None)])
def test_traceparent_is_read_as_w3c_trace_context_says(header: str | None,
                                                       trace: str | None) -> None:
    assert smsp.trace_id_of(header) == trace


def test_the_trace_id_reaches_the_access_line_and_the_provider_events(
        mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> None:
    mailgun.script(Status(500))
    with running(provider_config(mailgun, sendgrid, log_debug=True)) as server:
        assert server.send(traceparent=f"00-{TRACE}-00f067aa0ba902b7-01",
                           X_Request_Id="traced")[0] == 200
        assert server.send(X_Request_Id="plain")[0] == 200
        access = access_by_id(server, 2)
        assert [access[rid].get("trace_id") for rid in ("traced", "plain")] == [TRACE, None]
        attempts = server.lines.events("provider_attempt", at_least=3)
        assert [a.get("trace_id") for a in attempts] == [TRACE, TRACE, None]
        assert server.lines.events("failover")[0]["trace_id"] == TRACE


def test_reload_swaps_client_and_provider_keys_and_keeps_them_when_the_file_breaks(
        tmp_path: Path, sendgrid: FakeSendGrid) -> None:
    keys, mg = tmp_path / "keys", tmp_path / "mg"
    keys.write_text(API_KEY)
    mg.write_text("key-OLD-1")
    with FakeMailgun(domain=MG_DOMAIN, api_key="key-NEW-2") as rotated:  # refuses the old key
        env = {**_env_of(provider_config(rotated, sendgrid, providers=("mailgun",))),
               "SMSP_API_KEY_FILE": str(keys), "SMSP_MG_API_KEY_FILE": str(mg)}
        del env["SMSP_API_KEY"], env["SMSP_MG_API_KEY"]
        with running(smsp.load_config(env)) as server:
            assert server.send()[0] == 502
            keys.write_text("new-client-key")
            mg.write_text("key-NEW-2")
            assert server.service.reload(env)
            assert server.send()[0] == 401  # the old client key stopped working
            server.timers.fire_next()  # the poll, with the new provider key, closes it
            status, _, body = server.send(X_API_KEY="new-client-key")
            assert (status, body["provider"]) == (200, "mailgun")
            keys.write_text(" , ")  # broken: keeps what it had
            assert not server.service.reload(env)
            assert server.send(X_API_KEY="new-client-key")[0] == 200
            [failed] = server.lines.events("reload_failed")
            assert failed["problems"] == ["SMSP_API_KEY must hold at least one key"]
            assert "new-client-key" not in server.lines.text
            assert "key-NEW-2" not in server.lines.text


def _env_of(config: smsp.Config) -> dict[str, str]:
    from testkit import env_text
    env = {row.env: env_text(config.value(row.field)) for row in smsp.SETTINGS
           if config.value(row.field) is not None}
    for name in config.active_providers:
        if name not in smsp.PROVIDERS:  # the mock has no settings
            continue
        cls = smsp.PROVIDERS[name]
        env.update({row.env: env_text(config.provider_settings[name][row.field])
                    for row in cls.settings})
    return {k: v for k, v in env.items() if v}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_rereads_the_client_keys_without_a_restart(tmp_path: Path, workers: str) -> None:
    import http.client
    import signal

    from testkit import smsp_process

    keys = tmp_path / "keys"
    keys.write_text("old-key\n")

    def status(port: int, key: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/email", json.dumps(_email()).encode(),
                     {"X-API-KEY": key, "Content-Type": "application/json"})
        answer = conn.getresponse().status
        conn.close()
        return answer

    with smsp_process(SMSP_MOCK_EMAIL_SERVICE="true", SMSP_API_KEY="",
                      SMSP_API_KEY_FILE=str(keys), SMSP_WORKERS=workers) as process:
        if workers == "2":
            assert len(process.wait_for("started", timeout=20)) >= 1
            assert wait_until(lambda: len(process.events("started")) == 2)
        assert status(process.port, "old-key") == 200
        keys.write_text("new-key\n")
        process.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(process.events("reloaded")) == int(workers))
        for _ in range(4):  # whichever worker takes the connection
            assert (status(process.port, "new-key"), status(process.port, "old-key")) == \
                (200, 401)
        keys.write_text(" , ")
        process.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: len(process.events("reload_failed")) == int(workers))
        assert status(process.port, "new-key") == 200
        assert process.proc.poll() is None  # SIGHUP never stops it
        process.proc.send_signal(signal.SIGTERM)  # every worker drains and exits with it
        assert process.proc.wait(30) == 0


def wait_until(condition: Any, timeout: float = 20.0) -> bool:
    from testkit import wait_for
    return bool(wait_for(condition, timeout))


# ---------------------------------------------------------- client addresses ---

PROXIES = (smsp._parse_networks("10.0.0.0/8,127.0.0.1"))


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # not a proxy: its header is not believed
    ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
    ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.3", "198.51.100.1"),  # the client wrote 6.6.6.6
    ("10.0.0.2", None, "10.0.0.2"),
    ("10.0.0.2", "10.0.0.9", "10.0.0.9"),  # every hop a proxy: the farthest one
])
def test_the_client_is_the_peer_unless_a_trusted_proxy_names_it(
        peer: str, forwarded: str | None, client: str) -> None:
    assert smsp.client_address(peer, forwarded, PROXIES) == client


def test_the_access_line_names_the_client(mock: Any) -> None:
    assert mock.send(X_Forwarded_For="198.51.100.1")[0] == 200
    [access] = mock.lines.events("access", at_least=1)
    assert access["client"] == "127.0.0.1"  # the peer is no trusted proxy here
    with running(smsp.load_config({"SMSP_API_KEY": API_KEY, "SMSP_MOCK_EMAIL_SERVICE": "true",
                                   "SMSP_HOST": "127.0.0.1", "SMSP_PORT": "0",
                                   "SMSP_TRUSTED_PROXIES": "127.0.0.1"})) as server:
        assert server.send(X_Forwarded_For="198.51.100.1", X_Request_Id="proxied")[0] == 200
        assert server.request("GET", "/nowhere", headers={"X-Request-Id": "direct"})[0] == 404
        access = access_by_id(server, 2)
    assert [access[rid]["client"] for rid in ("proxied", "direct")] == \
        ["198.51.100.1", "127.0.0.1"]


def test_sighup_rereads_the_tls_certificate_for_new_handshakes(tmp_path: Path) -> None:
    import shutil
    import ssl

    from testkit import make_certificate, make_config

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_certificate(tmp_path / "a"), make_certificate(tmp_path / "b")
    live = (str(tmp_path / "live.pem"), str(tmp_path / "live.key"))
    shutil.copy(first[0], live[0])
    shutil.copy(first[1], live[1])

    def served_certificate(port: int) -> bytes:
        context = ssl.create_default_context(cafile=first[0])
        context.load_verify_locations(second[0])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

    def der_of(pem: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert(Path(pem).read_text())

    config = make_config(tls_cert=live[0], tls_key=live[1])
    with running(config) as server:
        assert served_certificate(server.port) == der_of(first[0])
        shutil.copy(second[0], live[0])
        shutil.copy(second[1], live[1])
        smsp._reload(server.service, server.server, _env_of(config))
        assert served_certificate(server.port) == der_of(second[0])
        assert server.lines.events("reloaded", at_least=1)


def test_deliveries_count_what_clients_were_told(mock: Any) -> None:
    from test_smsp import scrape
    assert mock.send()[0] == 200
    assert mock.send({**_email(), "subject": "fail"})[0] == 502
    assert mock.send({**_email(), "subject": "fail"})[0] == 503  # every circuit open
    mock.lines.events("access", at_least=3)  # counted just before each access line
    samples = scrape(mock)
    counted = {dict(labels)["delivery"]: value for (name, labels), value in samples.items()
               if name == "smsp_deliveries_total"}
    assert counted == {"sent": 1, "not_sent": 2}


@pytest.mark.parametrize(("raw", "status", "reason"), [
    (b"GET /healthcheck HTTP/1.1\r\n\r\n", 400, "bad_request"),  # no Host
    (b"GET /healthcheck HTTP/1.2\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    (b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431,
     "head_too_large"),
    (b"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode() +
     b"\r\nContent-Length: 10\r\n\r\n{", 408, "client_timeout"),
])
def test_refusals_of_the_http_layer_carry_a_reason_too(raw: bytes, status: int, reason: str
                                                       ) -> None:
    from testkit import make_config, raw_exchange, status_of
    with running(make_config(client_timeout=0.5)) as server:
        assert status_of(raw_exchange(server.port, raw)) == status
        [access] = server.lines.events("access", at_least=1)
    assert (access["status"], access["reason"]) == (status, reason)
