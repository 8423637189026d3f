"""Fixtures: strict fake providers and the proxy in front of them."""

from collections.abc import Iterator
from typing import Any

import pytest

from fakes import FakeMailgun, FakeSendGrid
from testkit import MG_DOMAIN, MG_KEY, SG_KEY, Running, provider_config, running


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
