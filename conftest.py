"""Fixtures: strict fake providers and the proxy in front of them."""

from collections.abc import Iterator
from typing import Any

import pytest

from fake_postmark import FakePostmark
from fake_resend import FakeResend
from fake_ses import FakeSES
from fakes import FakeMailgun, FakeSendGrid
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
