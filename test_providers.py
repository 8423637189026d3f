"""Per-provider behaviour, keyed by provider name: a new provider adds a row, not code.

Each row says how to read, from what its strict fake recorded, who a message was
from and to.  The tests here hold every provider to the same contract.
"""

import email.utils
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from fakes import FakeMailgun, FakeSendGrid, Status
from testkit import provider_config, running

POLL_NAMED = "Poll Box <poll@smsp.example.com>"


def _mailgun_parties(body: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    fields = urllib.parse.parse_qs(body.decode(), strict_parsing=True, keep_blank_values=True)
    return email.utils.getaddresses(fields["from"]), email.utils.getaddresses(fields["to"])


def _sendgrid_parties(body: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    document = json.loads(body)

    def pair(party: dict[str, str]) -> tuple[str, str]:
        return party.get("name", ""), party["email"]
    to = [pair(p) for p in document["personalizations"][0]["to"]]
    return [pair(document["from"])], to


PARTIES: dict[str, Callable[[bytes], tuple[list[tuple[str, str]], list[tuple[str, str]]]]] = {
    "mailgun": _mailgun_parties,
    "sendgrid": _sendgrid_parties,
}


@pytest.mark.parametrize("provider", sorted(PARTIES))
def test_poll_message_is_built_from_the_parsed_poll_address(
        provider: str, fakes: dict[str, Any], mailgun: FakeMailgun,
        sendgrid: FakeSendGrid) -> None:
    fake = fakes[provider]
    fake.script(Status(500))
    config = provider_config(mailgun, sendgrid, providers=(provider,), poll_address=POLL_NAMED)
    with running(config) as server:
        server.send()
        assert server.states() == {provider: "open"}
        server.timers.fire_next()
        poll = fake.requests[-1]
        assert poll.status is not None and 200 <= poll.status < 300, poll.status  # accepted
        assert server.states() == {provider: "closed"}
    sender, to = PARTIES[provider](poll.body)
    assert sender == to == [("Poll Box", "poll@smsp.example.com")]
