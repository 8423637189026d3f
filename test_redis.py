"""The idempotency stores, against real servers: the in-memory store and Redis (and Valkey
where installed) run the same state-machine tests; then what only a shared store can show.

Every server is a real ``redis-server`` from redis_server.py on 127.0.0.1 with a password.
Store-level tests share one server per binary (emptied per test); fault tests (SIGSTOP,
SIGKILL, a restart) start their own.  The multi-process tests start ``python smsp.py`` in
front of the strict fake Mailgun and count what it accepted.  No test sleeps to cross a
lease or a deadline: they wait for the server's own state (a key gone, its clock past a
deadline), and timings appear only as generous bounds.
"""

import contextlib
import hashlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import smsp
from conftest import SERVER_KINDS, STORE_KINDS, shared_server
from fakes import Delay, FakeMailgun, Hang
from redis_server import ACL_RULES, RedisServer
from testkit import (
    API_KEY,
    EMAIL,
    MG_DOMAIN,
    MG_KEY,
    FakeClock,
    Process,
    Running,
    free_port,
    mailgun_env,
    make_config,
    running,
    smsp_process,
    wait_for,
)

ANSWER = smsp.StoredAnswer(200, (), b'{"status":"sent"}', "mailgun", "sent")
LEASE, LIVENESS, TTL = 1.0, 1.5, 30.0  # a Redis store's, in the state-machine tests
PREFIX = smsp.RedisIdempotencyStore.PREFIX


def mailgun_config(mailgun: FakeMailgun, **overrides: Any) -> smsp.Config:
    """In-process smsp in front of the fake Mailgun alone."""
    return make_config(mock=False, providers=("mailgun",), mg_domain=MG_DOMAIN,
                       mg_api_key=MG_KEY, mg_base_url=mailgun.url, **overrides)


def digest(key: str, api_key: str = API_KEY) -> str:
    """The store key the Application derives from a client's Idempotency-Key."""
    scope = hashlib.sha256(api_key.encode()).digest()
    return hashlib.sha256(scope + b"\0" + key.encode()).hexdigest()


def redis_store(url: str, watchdog: smsp.Watchdog, *, timeout: float = 2.0,
                lease: float = LEASE, liveness: float = LIVENESS, ttl: float = TTL,
                metrics: smsp.Metrics | None = None,
                cls: type[smsp.RedisIdempotencyStore] = smsp.RedisIdempotencyStore,
                ca: str = "") -> smsp.RedisIdempotencyStore:
    """A Redis store on ``url``, its address parsed by the loader production uses."""
    config = make_config(idempotency_url=url, idempotency_ca=ca)
    assert config.idempotency_url is not None
    client = smsp.RedisClient(config.idempotency_url, watchdog=watchdog, timeout=timeout,
                              ssl_context=smsp.store_tls_context(config))
    return cls(client, ttl=ttl, lease=lease, liveness=liveness, metrics=metrics)


def server_time(server: RedisServer) -> float:
    """The server's clock, in seconds."""
    seconds, micros = server.command("TIME")
    return int(seconds) + int(micros) / 1e6


def stored(server: RedisServer, key: str) -> smsp.Record:
    return smsp.Record.from_json(json.loads(server.command("GET", PREFIX + key)))


def access_reason(events: Callable[[str], list[dict[str, Any]]], rid: str) -> Any:
    """The reason on the access line of request ``rid`` (written just after its answer)."""
    [line] = wait_for(lambda: [e for e in events("access") if e.get("request_id") == rid])
    return line.get("reason")


@pytest.fixture
def watchdog() -> Iterator[smsp.Watchdog]:
    dog = smsp.Watchdog()
    yield dog
    dog.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of this test's own, to freeze or kill."""
    with RedisServer() as server:
        yield server


def keyed(server: Running, key: str, **headers: str
          ) -> tuple[int, dict[str, str], dict[str, Any]]:
    return server.send(Idempotency_Key=key, **headers)


# ================================================= one state machine, two stores ===


class Harness:
    """A store and the means to let its time pass: a fake clock for the memory store,
    the server's own clock and expiry for Redis (waited for, never slept through)."""

    def __init__(self, kind: str, servers: dict[str, RedisServer],
                 watchdog: smsp.Watchdog) -> None:
        self.clock = FakeClock()
        self.server: RedisServer | None = None
        if kind == "memory":
            self.store: smsp.IdempotencyStore = smsp.MemoryIdempotencyStore(
                ttl=TTL, max_entries=100, lease=LEASE, liveness=LIVENESS, clock=self.clock)
        else:
            self.server = shared_server(servers, kind)
            self.store = redis_store(self.server.url(), watchdog)

    def record(self, key: str) -> smsp.Record:
        if self.server is None:
            assert isinstance(self.store, smsp.MemoryIdempotencyStore)
            return self.store._entries[key].record
        return stored(self.server, key)

    def now(self) -> float:
        """The store's clock."""
        return self.clock() if self.server is None else server_time(self.server)

    def pass_lease(self, key: str) -> None:
        server = self.server
        if server is None:
            self.clock.advance(LEASE)
        else:
            wait_for(lambda: server.command("EXISTS", PREFIX + key) == 0)

    def pass_time(self, until: float) -> None:
        """Until the store's clock reads ``until``."""
        if self.server is None:
            self.clock.advance(max(0.0, until - self.clock()))
        else:
            wait_for(lambda: self.now() >= until)


@pytest.fixture(params=STORE_KINDS)
def harness(request: pytest.FixtureRequest, store_servers: dict[str, RedisServer],
            watchdog: smsp.Watchdog) -> Iterator[Harness]:
    made = Harness(request.param, store_servers, watchdog)
    yield made
    made.store.close()


def test_a_new_key_is_claimed_and_its_answer_replayed_for_the_same_request_only(
        harness: Harness) -> None:
    store = harness.store
    first = store.claim("k", "f1")
    assert first.claim is smsp.Claim.NEW and first.token
    assert store.claim("k", "f1").claim is smsp.Claim.IN_FLIGHT
    assert store.claim("k", "f2").claim is smsp.Claim.MISMATCH
    assert store.dispatching("k", first.token, "mailgun") is True
    store.complete("k", first.token, ANSWER)
    assert store.claim("k", "f1") == smsp.ClaimResult(smsp.Claim.REPLAY, first.token, ANSWER,
                                                      "mailgun")
    assert store.claim("k", "f2").claim is smsp.Claim.MISMATCH
    assert store.claim("other", "f1").claim is smsp.Claim.NEW


def test_a_claim_is_a_lease_that_expires_and_a_lost_lease_cannot_dispatch(
        harness: Harness) -> None:
    store = harness.store
    first = store.claim("k", "f")
    harness.pass_lease("k")  # the holder sent nothing, so a retry may send
    second = store.claim("k", "f")
    assert second.claim is smsp.Claim.NEW and second.token != first.token
    assert store.dispatching("k", first.token, "mailgun") is False
    assert store.dispatching("k", second.token, "mailgun") is True
    assert harness.record("k").token == second.token


def test_a_holder_silent_past_its_liveness_deadline_is_holder_lost_and_can_be_taken_over(
        harness: Harness) -> None:
    store = harness.store
    token = store.claim("k", "f").token
    assert store.dispatching("k", token, "mailgun")
    assert store.claim("k", "f").claim is smsp.Claim.IN_FLIGHT
    live_until = harness.record("k").live_until
    assert live_until is not None
    harness.pass_time(live_until)  # it may have been sent, and nobody will say
    lost = store.claim("k", "f")
    assert (lost.claim, lost.provider, lost.token) == (smsp.Claim.HOLDER_LOST, "mailgun", token)
    new = store.takeover("k", lost.token, "resend")
    assert new and new != token
    assert store.takeover("k", lost.token, "resend") is None  # the owner changed
    assert store.dispatching("k", token, "mailgun") is False  # the old holder is out
    taken = harness.record("k")
    assert (taken.state, taken.provider, taken.token) == \
        (smsp.RecordState.DISPATCHING, "resend", new)
    store.complete("k", new, ANSWER)
    assert store.claim("k", "f").claim is smsp.Claim.REPLAY


def test_each_dispatch_mark_pushes_the_liveness_deadline_forward(harness: Harness) -> None:
    store = harness.store
    token = store.claim("k", "f").token
    assert store.dispatching("k", token, "mailgun")
    first = harness.record("k").live_until
    assert first is not None
    harness.pass_time(first - LIVENESS + 0.5)  # half a second into the attempt
    assert store.dispatching("k", token, "sendgrid")  # the failover
    second = harness.record("k")
    assert second.provider == "sendgrid" and second.live_until is not None
    assert first < second.live_until <= harness.now() + LIVENESS


def test_a_released_key_can_be_claimed_again_but_only_its_owner_can_release_it(
        harness: Harness) -> None:
    store = harness.store
    token = store.claim("k", "f").token
    store.release("k", "someone else")
    assert store.claim("k", "other").claim is smsp.Claim.MISMATCH
    assert store.dispatching("k", token, "mailgun")
    store.release("k", token)  # a failover that ended with nothing sent
    assert store.claim("k", "other").claim is smsp.Claim.NEW


def test_a_stored_answer_cannot_be_released_or_marked_dispatching_again(
        harness: Harness) -> None:
    store = harness.store
    token = store.claim("k", "f").token
    store.complete("k", token, ANSWER)
    store.release("k", token)
    assert store.dispatching("k", token, "mailgun") is False
    assert harness.record("k").state is smsp.RecordState.DONE
    assert store.claim("k", "f").claim is smsp.Claim.REPLAY


def test_records_and_answers_survive_a_json_round_trip() -> None:
    answer = smsp.StoredAnswer(502, (("Retry-After", "1"),), b'{"delivery":"unknown"}',
                               "sendgrid", "unknown")
    for record in (smsp.Record("t", smsp.RecordState.CLAIMED, "fp"),
                   smsp.Record("t", smsp.RecordState.DISPATCHING, "fp", "mailgun", 1234.5),
                   smsp.Record("t", smsp.RecordState.DONE, "fp", "sendgrid", None, answer)):
        assert smsp.Record.from_json(json.loads(json.dumps(record.to_json()))) == record


# ====================================================== what is in the server ===


def test_the_key_is_a_digest_under_smsp_idem_and_its_json_never_holds_the_message(
        shared_redis: RedisServer) -> None:
    config = make_config(idempotency_url=shared_redis.url(), idempotency_ttl=600)
    with running(config) as server:
        assert server.send(Idempotency_Key="order-1")[0] == 200
    key = PREFIX + digest("order-1")
    assert shared_redis.command("KEYS", "*") == [key.encode()]
    raw = shared_redis.command("GET", key)
    document = json.loads(raw)
    assert set(document) == {"v", "owner", "state", "fp", "provider", "answer"}
    assert (document["state"], document["provider"], document["fp"]) == \
        ("done", "mock", smsp.fingerprint(EMAIL))
    assert json.loads(document["answer"])["status"] == 200
    for text in ("line 1", "alice@example.com", "bob@example.org", "Hello"):
        assert text.encode() not in raw  # the message never reaches the store
    assert 590_000 < shared_redis.command("PTTL", key) <= 600_000  # SMSP_IDEMPOTENCY_TTL


def test_a_claim_lives_its_lease_and_a_dispatching_key_the_ttl_with_the_servers_deadline(
        shared_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    store = redis_store(shared_redis.url(), watchdog, lease=5, liveness=7, ttl=600)
    token = store.claim("k", "f").token
    assert 0 < shared_redis.command("PTTL", PREFIX + "k") <= 5000
    before = server_time(shared_redis)
    assert store.dispatching("k", token, "mailgun")
    assert 5000 < shared_redis.command("PTTL", PREFIX + "k") <= 600_000
    live_until = stored(shared_redis, "k").live_until
    assert live_until is not None  # the server's TIME when it marked, plus the liveness
    assert before + 7 <= live_until + 0.001 and live_until <= server_time(shared_redis) + 7


def test_a_script_the_server_forgot_is_sent_again_with_eval(shared_redis: RedisServer,
                                                            watchdog: smsp.Watchdog) -> None:
    store = redis_store(shared_redis.url(), watchdog)
    token = store.claim("k", "f").token
    assert store.dispatching("k", token, "mailgun")  # EVALSHA, then EVAL loads it
    shared_redis.command("SCRIPT", "FLUSH")  # a restart or a failover forgets scripts
    shared_redis.command("CONFIG", "RESETSTAT")
    assert store.dispatching("k", token, "sendgrid")
    stats = shared_redis.command("INFO", "commandstats").decode()
    assert "cmdstat_evalsha:calls=1," in stats and "failed_calls=1" in stats
    assert "cmdstat_eval:calls=1," in stats
    assert shared_redis.command("SCRIPT", "EXISTS", smsp.DISPATCHING_SCRIPT.sha) == [1]
    assert store.dispatching("k", token, "mailgun")  # by EVALSHA again
    assert "cmdstat_eval:calls=1," in shared_redis.command("INFO", "commandstats").decode()
    assert stored(shared_redis, "k").provider == "mailgun"


def test_an_acl_user_and_a_password_alone_both_authenticate_and_select_picks_the_database(
        shared_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    for url in (shared_redis.url(), shared_redis.url(user=False, db=3)):
        store = redis_store(url, watchdog)
        assert store.check() is None and store.status() == {"kind": "redis", "state": "ok"}
        assert store.claim("k", url).claim is smsp.Claim.NEW
        store.close()
    assert shared_redis.command("EXISTS", PREFIX + "k") == 1  # the user's, in database 0
    shared_redis.command("SELECT", 3)
    try:
        assert json.loads(shared_redis.command("GET", PREFIX + "k"))["fp"] == \
            shared_redis.url(user=False, db=3)
    finally:
        shared_redis.command("SELECT", 0)
    assert redis_store(shared_redis.url(db=3), watchdog).check() == "SELECT failed"  # ACL


def test_a_wrong_password_fails_every_operation_as_authentication_failed_and_is_counted(
        shared_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    metrics = smsp.Metrics()
    for url in (shared_redis.url(password="wrong"), shared_redis.url(user=False, password="no")):
        store = redis_store(url, watchdog, metrics=metrics)
        assert store.check() == "authentication failed"
        with pytest.raises(smsp.StoreError) as caught:
            store.claim("k", "f")
        assert caught.value.reason == "authentication failed"
        assert store.status() == {"kind": "redis", "state": "error",
                                  "error": "authentication failed"}
    text = metrics.render({})
    assert 'smsp_idempotency_store_operations_total{operation="claim",result="error"} 2' in text
    pings = re.search(r'operations_total\{operation="ping",result="error"\} (\d+)', text)
    assert pings and int(pings.group(1)) >= 2  # status() may have probed again since
    assert shared_redis.command("DBSIZE") == 0


def test_every_store_operation_is_counted_and_timed(shared_redis: RedisServer,
                                                   watchdog: smsp.Watchdog) -> None:
    metrics = smsp.Metrics()
    store = redis_store(shared_redis.url(), watchdog, metrics=metrics)
    token = store.claim("k", "f").token
    store.dispatching("k", token, "mailgun")
    store.complete("k", token, ANSWER)
    store.release("k", store.claim("j", "f").token)
    store.takeover("k", token, "resend")
    text = metrics.render({})
    for operation, count in (("claim", 2), ("dispatching", 1), ("complete", 1), ("release", 1),
                             ("takeover", 1)):
        assert (f'smsp_idempotency_store_operations_total{{operation="{operation}",'
                f'result="ok"}} {count}') in text
        assert (f'smsp_idempotency_store_duration_seconds_count{{operation="{operation}"}} '
                f'{count}') in text
    assert 'result="error"' not in text


def test_a_record_smsp_did_not_write_or_a_key_of_another_type_fails_the_claim_by_name(
        shared_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    store = redis_store(shared_redis.url(user=False), watchdog)
    shared_redis.command("SET", PREFIX + "junk", "not json")
    shared_redis.command("HSET", PREFIX + "hash", "field", "value")
    for key, reason in (("junk", "malformed record"), ("hash", "server error WRONGTYPE")):
        with pytest.raises(smsp.StoreError) as caught:
            store.claim(key, "f")
        assert caught.value.reason == reason
    assert store.claim("fine", "f").claim is smsp.Claim.NEW  # the connection is still in sync


@pytest.mark.parametrize(("answer", "reason"), [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "malformed answer"),
    (b"", "closed without an answer"),
])
def test_a_peer_that_does_not_speak_resp_fails_by_name(answer: bytes, reason: str,
                                                       watchdog: smsp.Watchdog) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def peer() -> None:  # reads the command, answers ``answer`` and closes
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(answer)

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        store = redis_store(f"redis://127.0.0.1:{listener.getsockname()[1]}", watchdog)
        assert store.check() == reason
        thread.join(5)


def test_a_full_store_refuses_writes_and_keyed_requests_get_503_not_sent(
        own_redis: RedisServer, mailgun: FakeMailgun) -> None:
    with running(mailgun_config(mailgun, idempotency_url=own_redis.url())) as server:
        own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        own_redis.command("CONFIG", "SET", "maxmemory", "1")  # less than it uses already
        status, _, body = keyed(server, "order-1")
        assert (status, body["delivery"], mailgun.hits) == (503, "not_sent", 0)
        [failed] = server.lines.events("idempotency_store_failed", 1)
        assert failed["reason"] == "out of memory"
        own_redis.command("CONFIG", "SET", "maxmemory", "0")
        assert keyed(server, "order-1")[0] == 200


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.fail("no openssl command to make a throwaway certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def test_rediss_is_verified_against_the_configured_ca_or_else_the_system_cas(
        certificate: tuple[str, str], watchdog: smsp.Watchdog) -> None:
    cert, _ = certificate
    with RedisServer(tls=certificate) as server:
        store = redis_store(server.url(), watchdog, ca=cert)
        assert store.claim("k", "f").claim is smsp.Claim.NEW
        untrusted = redis_store(server.url(), watchdog)  # the system CAs do not know it
        assert untrusted.check() == "TLS certificate not trusted"
        assert server.command("DBSIZE") == 1
        plain = redis_store(server.url().replace("rediss:", "redis:"), watchdog, timeout=0.5)
        assert plain.check() in ("closed without an answer", "connection reset", "timed out")


def test_a_ca_needs_rediss_and_a_readable_certificate(tmp_path: Path,
                                                      certificate: tuple[str, str]) -> None:
    cert, _ = certificate
    with pytest.raises(smsp.ConfigError) as caught:
        make_config(idempotency_url="redis://:pw@h", idempotency_ca=cert)
    assert caught.value.problems == ["SMSP_IDEMPOTENCY_CA needs a rediss:// SMSP_IDEMPOTENCY_URL"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(smsp.ConfigError) as caught:
        make_config(idempotency_url="rediss://:pw@h", idempotency_ca=str(junk))
    assert caught.value.problems == ["SMSP_IDEMPOTENCY_CA holds no usable PEM certificate"]
    assert make_config(idempotency_url="rediss://:pw@h", idempotency_ca=cert).idempotency_ca


def test_check_config_masks_the_store_password_and_keeps_the_rest(
        capsys: pytest.CaptureFixture[str]) -> None:
    env = {"SMSP_API_KEY": "k", "SMSP_MOCK_EMAIL_SERVICE": "true",
           "SMSP_IDEMPOTENCY_URL": "rediss://smsp:s3cr%3At@redis.internal:6380/2"}
    assert smsp.main(["--check-config"], environ=env) == 0
    out = capsys.readouterr().out
    assert "SMSP_IDEMPOTENCY_URL=rediss://smsp:****@redis.internal:6380/2" in out
    assert "s3cr" not in out
    config = smsp.load_config(env)
    assert "s3cr" not in repr(config)
    assert "s3cr:t" in smsp.config_secrets(config)  # masked in any text smsp passes on


# ========================================= faults: a frozen, killed, lost server ===


def test_a_frozen_server_bounds_each_call_by_the_timeout_and_its_connection_is_dropped(
        own_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    store = redis_store(own_redis.url(), watchdog, timeout=0.5)
    assert store.claim("a", "f").claim is smsp.Claim.NEW  # a pooled connection now
    own_redis.freeze()
    try:
        for operation in (lambda: store.claim("b", "f"), lambda: store.release("a", "t")):
            started = time.monotonic()
            with pytest.raises(smsp.StoreError) as caught:
                operation()
            assert caught.value.reason == "timed out"
            assert time.monotonic() - started < 3.0  # bounded (the bound is 0.5 s)
        fresh = redis_store(own_redis.url(), watchdog, timeout=0.5)
        assert fresh.check() == "timed out"  # connect succeeds (the kernel), AUTH does not
        assert store.status()["error"] == "timed out"  # never waits on the frozen server
    finally:
        own_redis.thaw()
    # What the frozen server had buffered runs when it wakes: the claim of "b" lands late.
    wait_for(lambda: own_redis.command("EXISTS", PREFIX + "b") == 1)
    # So "b" is in flight now.  A reused timed-out connection would instead read the
    # stale reply to the first claim (nil: NEW).
    assert store.claim("b", "f").claim is smsp.Claim.IN_FLIGHT
    assert store._client.connections_made >= 2
    assert store.status() == {"kind": "redis", "state": "ok"}


def test_a_killed_server_fails_calls_as_refused_until_it_is_back_and_health_recovers(
        own_redis: RedisServer, watchdog: smsp.Watchdog) -> None:
    store = redis_store(own_redis.url(), watchdog)
    assert store.claim("a", "f").claim is smsp.Claim.NEW
    own_redis.kill()
    with pytest.raises(smsp.StoreError) as caught:
        store.claim("b", "f")
    assert caught.value.reason == "connect refused"  # the closed pooled one was not used
    own_redis.start()
    assert store.status() == {"kind": "redis", "state": "error", "error": "connect refused"}
    wait_for(lambda: store.status()["state"] == "ok")  # a background probe, no request
    assert store.claim("b", "f").claim is smsp.Claim.NEW


def test_while_the_store_is_frozen_a_keyed_request_gets_503_not_sent_and_others_are_sent(
        own_redis: RedisServer, mailgun: FakeMailgun) -> None:
    config = mailgun_config(mailgun, idempotency_url=own_redis.url(), idempotency_timeout=0.5)
    with running(config) as server:
        own_redis.freeze()
        try:
            started = time.monotonic()
            status, headers, body = keyed(server, "order-1")
            assert time.monotonic() - started < 3.0  # bounded by the store timeout
            assert (status, body["delivery"], headers["retry-after"]) == (503, "not_sent", "1")
            assert access_reason(server.lines.events, body["request_id"]) == \
                "idempotency_store_failed"
            assert mailgun.hits == 0
            [failed] = server.lines.events("idempotency_store_failed", 1)
            assert (failed["phase"], failed["reason"]) == ("claim", "timed out")
            assert server.send()[0] == 200  # no key: the store is never asked
            status, _, raw = server.request("GET", "/healthcheck")
            assert (status, json.loads(raw)["idempotency"]) == \
                (200, {"kind": "redis", "state": "error", "error": "timed out"})
        finally:
            own_redis.thaw()
        assert keyed(server, "order-1")[0] == 200
        assert len(mailgun.accepted) == 2


class FreezesAtTheMark(smsp.RedisIdempotencyStore):
    """Freezes its server just before marking dispatching (the test sets ``server``)."""

    server: RedisServer

    def dispatching(self, key: str, token: str, provider: str) -> bool:
        self.server.freeze()
        return super().dispatching(key, token, provider)


def test_a_dispatch_mark_that_times_out_sends_nothing_and_landing_late_gives_holder_lost(
        own_redis: RedisServer, mailgun: FakeMailgun) -> None:
    own_redis.command("SCRIPT", "LOAD", smsp.DISPATCHING_SCRIPT.source)  # so it can land
    with running(mailgun_config(mailgun)) as server:
        store = redis_store(own_redis.url(), server.service.watchdog, timeout=0.5,
                            lease=10, liveness=0.5, cls=FreezesAtTheMark)
        store.server = own_redis
        server.service.app.idempotency = store
        try:
            status, _, body = keyed(server, "order-1")
        finally:
            own_redis.thaw()  # what it had buffered runs now: the mark (the release
            # never left smsp: its new connection's AUTH timed out first)
        assert (status, body["delivery"], mailgun.hits) == (503, "not_sent", 0)
        assert access_reason(server.lines.events, body["request_id"]) == \
            "idempotency_store_failed"
        assert [e["phase"] for e in server.lines.events("idempotency_store_failed", 2)] == \
            ["dispatch", "settle"]
        wait_for(lambda: stored(own_redis, digest("order-1")).state
                 is smsp.RecordState.DISPATCHING)  # the late mark landed
        server.service.app.idempotency = redis_store(own_redis.url(), server.service.watchdog)
        assert keyed(server, "order-1")[0] == 409  # within its liveness deadline

        def settled() -> Any:
            answer = keyed(server, "order-1")
            return answer if answer[0] != 409 else None

        status, _, body = wait_for(settled)
        assert (status, body["delivery"]) == (502, "unknown")  # safe: it was never sent
        assert access_reason(server.lines.events, body["request_id"]) == "holder_lost"
        assert mailgun.hits == 0


def test_fail_open_at_the_dispatch_mark_sends_with_a_warning(
        own_redis: RedisServer, mailgun: FakeMailgun) -> None:
    with running(mailgun_config(mailgun, idempotency_on_error="open")) as server:
        store = redis_store(own_redis.url(), server.service.watchdog, timeout=0.5,
                            cls=FreezesAtTheMark)
        store.server = own_redis
        server.service.app.idempotency = store
        try:
            status, _, body = keyed(server, "order-1")
        finally:
            own_redis.thaw()
        assert (status, body["status"], len(mailgun.accepted)) == (200, "sent", 1)
        [bypassed] = server.lines.events("idempotency_store_bypassed", 1)
        assert (bypassed["phase"], bypassed["reason"]) == ("dispatch", "timed out")


def test_a_key_whose_holder_went_silent_after_dispatch_is_answered_unknown_not_sent(
        shared_redis: RedisServer, mailgun: FakeMailgun) -> None:
    config = mailgun_config(mailgun, idempotency_url=shared_redis.url())
    with running(config) as server:
        holder = redis_store(shared_redis.url(), server.service.watchdog, liveness=0.2)
        key = digest("order-1")
        token = holder.claim(key, smsp.fingerprint(EMAIL)).token
        assert holder.dispatching(key, token, "sendgrid")  # and then it died
        live_until = stored(shared_redis, key).live_until
        assert live_until is not None
        wait_for(lambda: server_time(shared_redis) >= live_until)
        status, _, body = keyed(server, "order-1")
        assert (status, body["delivery"]) == (502, "unknown")
        assert "stopped after sendgrid may have been given the message" in body["message"]
        assert access_reason(server.lines.events, body["request_id"]) == "holder_lost"
        assert mailgun.hits == 0


class LateToDispatch(smsp.RedisIdempotencyStore):
    """Reaches the dispatch mark only once its claim's lease is over."""

    server: RedisServer

    def dispatching(self, key: str, token: str, provider: str) -> bool:
        wait_for(lambda: self.server.command("EXISTS", PREFIX + key) == 0)
        return super().dispatching(key, token, provider)


def test_a_lease_that_expires_before_dispatch_sends_nothing_and_answers_409(
        shared_redis: RedisServer, mailgun: FakeMailgun) -> None:
    config = mailgun_config(mailgun)
    with running(config) as server:
        store = redis_store(shared_redis.url(), server.service.watchdog, lease=0.2,
                            cls=LateToDispatch)
        store.server = shared_redis
        server.service.app.idempotency = store
        status, headers, body = keyed(server, "order-1")
        assert (status, body["delivery"], headers["retry-after"]) == (409, "not_sent", "1")
        assert access_reason(server.lines.events, body["request_id"]) == "lease_lost"
        assert mailgun.hits == 0


def test_the_store_failing_after_the_provider_answered_gives_the_real_outcome_and_no_resend(
        mailgun: FakeMailgun) -> None:
    """Redis killed mid-request, then restarted from its append-only file."""
    mailgun.script(Delay(0.5))
    with RedisServer(appendonly=True) as redis:
        config = mailgun_config(mailgun, idempotency_url=redis.url(), timeout=2.0)
        with running(config) as server:
            results: list[Any] = []
            first = threading.Thread(target=lambda: results.append(keyed(server, "order-1")))
            first.start()
            assert mailgun.wait_for_hits(1)  # marked dispatching, at the provider now
            redis.kill()
            first.join(10)
            status, _, body = results[0]
            assert (status, body["status"]) == (200, "sent")  # the real outcome, not a 5xx
            [failed] = server.lines.events("idempotency_store_failed", 1)
            assert (failed["phase"], failed["reason"]) == ("settle", "connect refused")
            assert keyed(server, "order-2")[0] == 503  # down: keyed requests are refused
            redis.start()
            status, _, body = keyed(server, "order-1")  # the record is still dispatching
            assert status == 409
            assert access_reason(server.lines.events, body["request_id"]) == \
                "idempotency_key_in_flight"
            assert keyed(server, "order-2")[0] == 200  # the store is back
            assert (mailgun.hits, len(mailgun.accepted)) == (2, 2)


def test_fail_open_sends_without_deduplication_and_warns_each_time(
        shared_redis: RedisServer) -> None:
    config = make_config(idempotency_url=shared_redis.url(password="wrong"),
                         idempotency_on_error="open")
    with running(config) as server:
        for _ in range(2):
            status, headers, body = keyed(server, "order-1")
            assert (status, body["status"], "idempotent-replayed" in headers) == \
                (200, "sent", False)
        warnings = server.lines.events("idempotency_store_bypassed", 2)
        assert [(w["level"], w["phase"], w["reason"]) for w in warnings] == \
            [("warning", "claim", "authentication failed")] * 2


# ======================================== several processes sharing one store ===


def post(port: int, key: str, results: list[Any], rid: str = "") -> None:
    """One keyed POST /email on a new connection; appends (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/email", json.dumps(EMAIL).encode(),
                     {"X-API-KEY": API_KEY, "Content-Type": "application/json",
                      "Idempotency-Key": key, **({"X-Request-Id": rid} if rid else {})})
        response = conn.getresponse()
        body = json.loads(response.read())
        results.append((response.status, {k.lower(): v for k, v in response.getheaders()},
                        body))
    finally:
        conn.close()


def at_once(targets: list[tuple[int, str]]) -> list[Any]:
    """POSTs started together, one thread each; their answers in any order."""
    results: list[Any] = []
    threads = [threading.Thread(target=post, args=(port, key, results)) for port, key in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == len(targets)
    return results


def is_replay_or_409(answer: Any) -> bool:
    status, headers, body = answer
    if status == 409:
        return "still in progress" in body["message"]
    return status == 200 and headers.get("idempotent-replayed") == "true"


@contextlib.contextmanager
def processes(count: int, **env: str) -> Iterator[list[Process]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(smsp_process(**env)) for _ in range(count)]


@pytest.mark.parametrize("binary", SERVER_KINDS)
def test_two_processes_sharing_a_store_send_a_key_once_and_replay_it_across(
        binary: str, store_servers: dict[str, RedisServer], mailgun: FakeMailgun) -> None:
    redis = shared_server(store_servers, binary)
    mailgun.script(Delay(0.3), Delay(0.3))
    env = mailgun_env(mailgun, SMSP_IDEMPOTENCY_URL=redis.url())
    with processes(2, **env) as (a, b):
        answers = at_once([(a.port, "order-1"), (b.port, "order-1")])
        assert sorted(status for status, _, _ in answers)[0] == 200
        assert sum(is_replay_or_409(answer) for answer in answers) == 1
        assert len(mailgun.accepted) == 1
        for port in (a.port, b.port):  # a retry through either process is replayed
            retry: list[Any] = []
            post(port, "order-1", retry)
            status, headers, _ = retry[0]
            assert (status, headers.get("idempotent-replayed")) == (200, "true")
        assert len(mailgun.accepted) == 1


@contextlib.contextmanager
def stopped_at_exit(process: Process) -> Iterator[None]:
    """SIGTERM, so that the parent stops its workers (a SIGKILL would orphan them)."""
    try:
        yield
    finally:
        process.terminate()
        process.proc.wait(20)


def workers_of(process: Process, answers: list[Any]) -> set[int]:
    """The workers whose access lines answered ``answers`` (matched by X-Request-Id)."""
    rids = {headers["x-request-id"] for _, headers, _ in answers}

    def lines() -> list[dict[str, Any]]:
        found = [line for line in process.events("access") if line.get("request_id") in rids]
        return found if len(found) == len(rids) else []

    return {line["worker"] for line in wait_for(lines)}


def test_workers_of_one_process_sharing_a_store_send_each_key_once(
        shared_redis: RedisServer, mailgun: FakeMailgun) -> None:
    if shared_redis.name != "redis":
        pytest.skip("one server kind is enough for the workers")
    env = mailgun_env(mailgun, SMSP_IDEMPOTENCY_URL=shared_redis.url(), SMSP_WORKERS="2")
    with smsp_process(**env) as process, stopped_at_exit(process):
        both = False
        for round_ in range(20):  # until both workers have answered the same key
            mailgun.script(Delay(0.2))
            answers = at_once([(process.port, f"order-{round_}")] * 4)
            assert len(mailgun.accepted) == round_ + 1  # one send per key, every round
            assert sum(is_replay_or_409(answer) for answer in answers) == 3
            both = workers_of(process, answers) == {0, 1}
            if both:
                break
        assert both, "the kernel never gave one key's requests to both workers"


def test_a_wrong_password_at_start_is_logged_by_name_and_smsp_still_serves(
        shared_redis: RedisServer, mailgun: FakeMailgun) -> None:
    password = "wrong-but-secret-password"
    env = mailgun_env(mailgun, SMSP_IDEMPOTENCY_URL=shared_redis.url(password=password))
    with smsp_process(**env) as process:
        [failed] = process.wait_for("idempotency_store_failed")
        assert (failed["level"], failed["phase"], failed["reason"]) == \
            ("error", "start", "authentication failed")
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
        conn.request("GET", "/healthcheck")
        health = json.loads(conn.getresponse().read())
        conn.close()
        assert (health["status"], health["idempotency"]) == \
            ("ok", {"kind": "redis", "state": "error", "error": "authentication failed"})
        answers: list[Any] = []
        post(process.port, "order-1", answers)
        status, headers, body = answers[0]
        assert (status, body["delivery"], headers["retry-after"]) == (503, "not_sent", "1")
        assert mailgun.hits == 0
        assert process.proc.poll() is None  # still running: no crash loop
    assert password not in "".join(process.text)


def test_a_holder_killed_while_its_provider_hangs_leaves_the_key_unknown_never_resent(
        shared_redis: RedisServer, mailgun: FakeMailgun) -> None:
    if shared_redis.name != "redis":
        pytest.skip("one server kind is enough for a process killed mid-send")
    mailgun.script(Hang())
    env = mailgun_env(mailgun, SMSP_IDEMPOTENCY_URL=shared_redis.url(), SMSP_TIMEOUT="1")
    with processes(2, **env) as (holder, other):
        results: list[Any] = []
        sender = threading.Thread(target=post_quietly, args=(holder.port, results), daemon=True)
        sender.start()
        assert mailgun.wait_for_hits(1)  # dispatching, and the provider has the message
        holder.proc.kill()
        holder.proc.wait(10)
        first: list[Any] = []
        post(other.port, "order-1", first)
        assert (first[0][0], "still in progress" in first[0][2]["message"]) == (409, True)

        def settled() -> Any:
            answers: list[Any] = []
            post(other.port, "order-1", answers)
            return answers[0] if answers[0][0] != 409 else None

        # Asked every 0.2 s: the holder's liveness deadline is SMSP_TIMEOUT + 5 s away.
        status, _, body = wait_for(settled, timeout=30, interval=0.2)
        assert (status, body["delivery"]) == (502, "unknown")
        assert "stopped after mailgun may have been given the message" in body["message"]
        assert access_reason(other.events, body["request_id"]) == "holder_lost"
        assert mailgun.hits == 1


def post_quietly(port: int, results: list[Any]) -> None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        post(port, "order-1", results)


# ============================================= the manifests' Redis, for real ===

DEPLOY = Path(__file__).parent / "deploy"


def manifest(name: str, kind: str) -> dict[str, Any]:
    import yaml

    documents = yaml.safe_load_all((DEPLOY / name).read_text())
    return next(d for d in documents if d and d["kind"] == kind)


def test_the_redis_of_deploy_runs_with_its_own_config_and_smsp_works_as_its_acl_user(
        tmp_path: Path, watchdog: smsp.Watchdog) -> None:
    """deploy/redis.yaml's config and start command, run here (paths and port moved
    into a temporary directory), and kubernetes.yaml's SMSP_IDEMPOTENCY_URL against it."""
    container = manifest("redis.yaml", "StatefulSet")["spec"]["template"]["spec"][
        "containers"][0]
    config = manifest("redis.yaml", "ConfigMap")["data"]["redis.conf"]
    assert {"maxmemory-policy noeviction", "appendonly yes", "appendfsync everysec"} <= \
        set(config.splitlines())
    assert f"'{ACL_RULES}'" in container["args"][0]  # the rules this suite runs smsp with
    port = free_port()
    moved = {"/run/redis": str(tmp_path / "run"), "/etc/redis": str(tmp_path / "etc"),
             "/data": str(tmp_path / "data"), "port 6379": f"port {port}",
             "bind 0.0.0.0": "bind 127.0.0.1"}
    for folder in ("run", "etc", "data"):
        (tmp_path / folder).mkdir()
    for old, new in moved.items():
        config = config.replace(old, new)
    (tmp_path / "etc" / "redis.conf").write_text(config)
    script = container["args"][0]
    for old, new in moved.items():
        script = script.replace(old, new)
    password = "0123abcd" * 4
    proc = subprocess.Popen(["sh", "-c", script], env={"PATH": "/usr/bin:/bin",
                                                       "REDIS_PASSWORD": password})
    try:
        env = {e["name"]: e.get("value") for e in manifest("kubernetes.yaml", "Deployment")[
            "spec"]["template"]["spec"]["containers"][0]["env"]}
        url = env["SMSP_IDEMPOTENCY_URL"].replace("$(REDIS_PASSWORD)", password) \
            .replace("smsp-redis:6379", f"127.0.0.1:{port}")
        store = redis_store(url, watchdog)
        assert wait_for(lambda: store.check() is None)
        token = store.claim("k", "f").token
        assert store.dispatching("k", token, "mailgun")
        new = store.takeover("k", token, "sendgrid")
        assert new is not None
        store.complete("k", new, ANSWER)
        store.release("k", new)
        assert store.claim("k", "f").claim is smsp.Claim.REPLAY
        assert redis_store(url.replace("smsp:", "default:"), watchdog).check() == \
            "authentication failed"  # the default user is off
        assert (tmp_path / "data" / "appendonlydir").is_dir()
    finally:
        proc.terminate()
        proc.wait(10)
