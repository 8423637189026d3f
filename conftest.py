"""Fixtures: strict fake providers, the proxy in front of them, and real Redis servers."""

from collections.abc import Iterator
from typing import Any

import pytest

from fakes import FakeMailgun, FakeSendGrid
from redis_server import RedisServer, available
from testkit import MG_DOMAIN, MG_KEY, SG_KEY, Running, provider_config, running

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
def fakes(mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> dict[str, Any]:
    """Every strict fake provider, by provider name."""
    return {"mailgun": mailgun, "sendgrid": sendgrid}


@pytest.fixture
def proxy(mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> Iterator[Running]:
    with running(provider_config(mailgun, sendgrid)) as server:
        yield server


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
