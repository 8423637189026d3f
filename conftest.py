"""Fixtures: strict fake providers and the proxy in front of them."""

from collections.abc import Iterator

import pytest

from fakes import FakeMailgun, FakeSendGrid
from testkit import (MG_DOMAIN, MG_KEY, SG_KEY, Running, make_certificate, provider_config,
                     running)


@pytest.fixture
def mailgun() -> Iterator[FakeMailgun]:
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY) as fake:
        yield fake


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(api_key=SG_KEY) as fake:
        yield fake


@pytest.fixture
def proxy(mailgun: FakeMailgun, sendgrid: FakeSendGrid) -> Iterator[Running]:
    with running(provider_config(mailgun, sendgrid)) as server:
        yield server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway certificate and key for 127.0.0.1 (see testkit.make_certificate)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))
