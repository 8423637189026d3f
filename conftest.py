"""Fixtures: strict fake providers, the proxy in front of them, and real Redis servers."""

from collections.abc import Iterator
from typing import Any

import pytest

from fake_postmark import FakePostmark
from fake_resend import FakeResend
from fake_ses import FakeSES
from fakes import FakeMailgun, FakeSendGrid
from redis_server import RedisServer, available
from smtp_server import FaultPeer, SMTPServer
from testkit import (
    API_KEY,
    MG_DOMAIN,
    MG_KEY,
    PM_TOKEN,
    RS_KEY,
    SES_ACCESS_KEY,
    SES_REGION,
    SES_SECRET_KEY,
    SG_KEY,
    Running,
    make_certificate,
    make_config,
    provider_config,
    running,
)

# Every idempotency store the suite runs against.  Debian 12 has no valkey-server
# package: the Valkey rows run wherever it is installed and are skipped elsewhere.
STORE_KINDS = (
    pytest.param("memory", id="memory"),
    pytest.param("redis-server", id="redis"),
    pytest.param("valkey-server", id="valkey", marks=pytest.mark.skipif(
        not available("valkey-server"), reason="valkey-server is not installed")),
)
SERVER_KINDS = STORE_KINDS[1:]


@pytest.fixture
def mailgun() -> Iterator[FakeMailgun]:
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY) as fake:
        yield fake


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(api_key=SG_KEY) as fake:
        yield fake


@pytest.fixture
def ses_fake() -> Iterator[FakeSES]:
    with FakeSES(access_key=SES_ACCESS_KEY, secret_key=SES_SECRET_KEY,
                 region=SES_REGION) as fake:
        yield fake


@pytest.fixture
def postmark() -> Iterator[FakePostmark]:
    with FakePostmark(server_token=PM_TOKEN) as fake:
        yield fake


@pytest.fixture
def resend() -> Iterator[FakeResend]:
    with FakeResend(api_key=RS_KEY) as fake:
        yield fake


@pytest.fixture
def relay() -> Iterator[FaultPeer]:
    """A real SMTP relay (aiosmtpd, AUTH required, no TLS), as the fault table sees a fake."""
    with SMTPServer(security="none") as server:
        yield FaultPeer(server)


@pytest.fixture
def fakes(mailgun: FakeMailgun, sendgrid: FakeSendGrid, ses_fake: FakeSES,
          postmark: FakePostmark, resend: FakeResend, relay: FaultPeer) -> dict[str, Any]:
    """Every provider's peer, by provider name: strict fakes, and a real SMTP server."""
    return {"mailgun": mailgun, "sendgrid": sendgrid, "ses": ses_fake, "postmark": postmark,
            "resend": resend, "smtp": relay}


@pytest.fixture
def mock() -> Iterator[Running]:
    """smsp in mock mode with two client keys."""
    with running(make_config(api_keys=(API_KEY, "rotated-key"))) as server:
        yield server


@pytest.fixture
def proxy(mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> Iterator[Running]:
    with running(provider_config(mailgun, sendgrid)) as server:
        yield server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway certificate and key for 127.0.0.1 (see testkit.make_certificate)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def store_servers() -> Iterator[dict[str, RedisServer]]:
    """One shared server per binary, started on first use and stopped at the end."""
    servers: dict[str, RedisServer] = {}
    yield servers
    for server in servers.values():
        server.stop()


def shared_server(servers: dict[str, RedisServer], binary: str) -> RedisServer:
    """The session's ``binary`` server, emptied for the test that asks for it."""
    if binary not in servers:
        servers[binary] = RedisServer(binary)
        servers[binary].start()
    server = servers[binary]
    server.command("FLUSHALL")
    return server


@pytest.fixture(params=SERVER_KINDS)
def shared_redis(request: pytest.FixtureRequest,
                 store_servers: dict[str, RedisServer]) -> RedisServer:
    """A real Redis (and, where installed, Valkey) server, empty; shared, so never to
    be frozen or killed (fault tests start their own)."""
    return shared_server(store_servers, request.param)


@pytest.fixture(params=STORE_KINDS)
def store_settings(request: pytest.FixtureRequest,
                   store_servers: dict[str, RedisServer]) -> dict[str, Any]:
    """Config overrides that pick each idempotency store in turn: in memory, then
    a real Redis (and Valkey) server."""
    if request.param == "memory":
        return {}
    return {"idempotency_url": shared_server(store_servers, request.param).url()}
