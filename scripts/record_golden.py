"""Record the exact provider requests that four-field POST /email requests produce.

Run once against a known-good smsp (``python scripts/record_golden.py``); it writes
testdata/golden-four-field-requests.json, which test_golden.py holds every later
smsp to, byte for byte (the only allowed change: display names are quoted).
"""

import base64
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fakes import FakeMailgun, FakeSendGrid  # noqa: E402
from testkit import MG_DOMAIN, MG_KEY, SG_KEY, provider_config, running  # noqa: E402

SHAPES = [
    {"fromaddress": "alice@example.com", "toaddress": "bob@example.org",
     "subject": "Hello", "plaintextbody": "hello"},
    {"fromaddress": "Alice <alice@example.com>", "toaddress": "Bob Smith <bob@example.org>",
     "subject": "Hello", "plaintextbody": "line 1\nline 2 é"},
    {"fromaddress": "J. R. Doe <jr@example.com>", "toaddress": "bob@example.org",
     "subject": "dots in the name", "plaintextbody": "x"},
    {"fromaddress": "Zoë Ünicode <z@example.com>", "toaddress": "René <r@example.org>",
     "subject": "Grüße ✓", "plaintextbody": "tab\there, emoji 🎉"},
    {"fromaddress": "a@example.com", "toaddress": "b@example.com"},
    {"fromaddress": "a@example.com", "toaddress": "b@example.com", "subject": "",
     "plaintextbody": ""},
    {"fromaddress": "a@example.com", "toaddress": "b@example.com", "subject": "only subject"},
    {"fromaddress": "a@example.com", "toaddress": "b@example.com", "plaintextbody": "only body"},
    {"fromaddress": "a+tag@sub.example.co.uk", "toaddress": "x_y-z@xn--bcher-kva.example",
     "subject": "& = + ? % #", "plaintextbody": "a=b&c=d\r\nCRLF line"},
    {"fromaddress": "a@example.com", "toaddress": "b@example.com", "subject": "s",
     "plaintextbody": "b", "unknownfield": {"ignored": True}},
]

VOLATILE = {"host", "content-length"}


def wire(recorded) -> dict:
    return {"method": recorded.method, "path": recorded.path,
            "headers": {k: v for k, v in sorted(recorded.headers.items()) if k not in VOLATILE},
            "body": base64.b64encode(recorded.body).decode("ascii")}


def record() -> list[dict]:
    cases = []
    with FakeMailgun(domain=MG_DOMAIN, api_key=MG_KEY) as mg, FakeSendGrid(api_key=SG_KEY) as sg:
        for shape in SHAPES:
            case: dict = {"request": shape}
            for provider, fake in (("mailgun", mg), ("sendgrid", sg)):
                mg.reset()
                sg.reset()
                config = provider_config(mg, sg, providers=(provider,))
                with running(config) as server:
                    status, _, _ = server.send(shape)
                assert status == 200, (provider, shape, status)
                case[provider] = wire(fake.requests[0])
            cases.append(case)
    return cases


if __name__ == "__main__":
    out = ROOT / "testdata" / "golden-four-field-requests.json"
    out.write_text(json.dumps(record(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
