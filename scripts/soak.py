#!/usr/bin/env python3
"""Soak test: many mixed requests over keep-alive connections, then no leaks.

``make soak`` sends 50,000 requests, ``make soak-ci`` 5,000::

    python scripts/soak.py --requests 50000 [--connections 8] [--smsp path/to/smsp.py]

It starts smsp.py in mock mode on a free 127.0.0.1 port (stdout to /dev/null),
sends a warm-up of --warmup requests, lets the server settle and records its
idle thread count and RSS (``Threads:`` and ``VmRSS:`` of /proc/<pid>/status).
Then --requests requests go out over --connections keep-alive connections, one
client thread each (http.client; a connection the server closes, e.g. after a
401 or 413, is opened again).  The mix: 72 % good sends, 1 % each of the mock's
failure subjects "fail" (502) and "timeout" (504, after SMSP_TIMEOUT=0.05 s),
both of which open the circuit until a poll closes it --poll-interval later,
Idempotency-Key sends, malformed JSON, missing fields, control characters,
a wrong or no API key, unknown paths, wrong methods, an oversized body, a wrong
Content-Type, no Content-Length, health checks (GET and HEAD) and metrics.

Every answer must have a status in its kind's expected set (a send may get 503
while the circuit is open) and a well-formed body; any other answer or a
transport error is unexpected.  (At ~4,000 requests/s, SMSP_POLL_INTERVAL=0.05
would keep the circuit open most of the time and turn most good sends into
503s; the default 0.01 lets about two thirds of them through.)
Afterwards the thread count must come back to its idle value (waited for up
to --settle seconds) and RSS must have grown by less than --rss-limit-mb.
Finally the server gets SIGTERM and must exit 0.  The whole run is bounded by
--time-limit seconds.  Prints one summary line and exits 0 only on PASS::

    soak: 50000 requests, 0 unexpected, threads 3->3, rss +1.2 MB: PASS
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "soak"
MAX_BODY = 65536  # SMSP_MAX_BODY_BYTES for the run: the oversized kind claims one byte more
SOCKET_TIMEOUT = 15.0  # a client read that waits longer than this is a hang


# ------------------------------------------------------------------- the mix ---


@dataclasses.dataclass(frozen=True)
class Call:
    """One request to make: ``raw`` sends it without http.client's Content-Length."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None = None
    raw: bool = False


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _email(subject: str = "hi", body: str = "hello", **extra: str) -> bytes:
    document = {"fromaddress": "Soak Test <soak@example.com>", "toaddress": "to@example.com",
                "subject": subject, "plaintextbody": body}
    document.update(extra)
    return _json(document)


def _post(body: bytes, key: str | None = API_KEY, **headers: str) -> Call:
    sent = {"Content-Type": "application/json"}
    if key is not None:
        sent["X-API-KEY"] = key
    sent.update(headers)
    return Call("POST", "/email", sent, body)


IDEMPOTENCY_KEYS = 64  # a small pool, so the server's store stays small: this is no cache test


def _send_ok(rnd: random.Random, n: int) -> Call:
    return _post(_email(f"soak {n}", "line one\nline two\n" * rnd.randint(0, 20)))


def _idempotent(rnd: random.Random, n: int) -> Call:
    key = rnd.randrange(IDEMPOTENCY_KEYS)
    return _post(_email(f"idempotent {key}"), **{"Idempotency-Key": f"soak-{key}"})


def _malformed(rnd: random.Random, n: int) -> Call:
    bodies = (b'{"fromaddress": "a@example.com",', b"not json", b"[1, 2]", b"",
              b'{"fromaddress": "a@example.com", "fromaddress": "b@example.com"}',
              b"\xff\xfe{}", b'{"a": NaN}', b"[" * 5000)
    return _post(rnd.choice(bodies))


def _missing(rnd: random.Random, n: int) -> Call:
    documents = ({"toaddress": "to@example.com"}, {"fromaddress": "a@example.com"}, {},
                 {"fromaddress": "a@example.com", "toaddress": 7},
                 {"fromaddress": "a@example.com", "toaddress": "b@example.com", "subject": 1})
    return _post(_json(rnd.choice(documents)))


def _control(rnd: random.Random, n: int) -> Call:
    bodies = (_email("hi\r\nBcc: victim@example.com"), _email("tab\there"),
              _email(body="nul\x00byte"), _email(toaddress="to@example.com\nBcc: x@example.com"),
              _email(fromaddress="Evil\u2028Name <a@example.com>"))
    return _post(rnd.choice(bodies))


def _wrong_key(rnd: random.Random, n: int) -> Call:
    return _post(_email(), key=rnd.choice(("wrong", "soak2", "SOAK", "x" * 300)))


def _no_key(rnd: random.Random, n: int) -> Call:
    return _post(_email(), key=None)


def _unknown_path(rnd: random.Random, n: int) -> Call:
    path = rnd.choice(("/", "/emails", "/email/", f"/nope/{n}", "/swagger.yaml", "/admin"))
    return Call(rnd.choice(("GET", "POST")), path, {"X-API-KEY": API_KEY})


def _wrong_method(rnd: random.Random, n: int) -> Call:
    method, path = rnd.choice((("GET", "/email"), ("PUT", "/email"), ("DELETE", "/email"),
                               ("POST", "/healthcheck"), ("PATCH", "/metrics"),
                               ("DELETE", "/swagger.json")))
    return Call(method, path, {"X-API-KEY": API_KEY})


def _oversized(rnd: random.Random, n: int) -> Call:
    # The client says how big and waits for the verdict before sending, as
    # curl does for large bodies; the server refuses before reading a byte.
    return Call("POST", "/email", {"X-API-KEY": API_KEY, "Content-Type": "application/json",
                                   "Content-Length": str(MAX_BODY + 1 + rnd.randrange(1 << 20)),
                                   "Expect": "100-continue"}, raw=True)


def _wrong_type(rnd: random.Random, n: int) -> Call:
    content_type = rnd.choice(("text/plain", "application/x-www-form-urlencoded",
                               "application/json; charset=latin-1"))
    return _post(_email(), **{"Content-Type": content_type})


def _no_length(rnd: random.Random, n: int) -> Call:
    return Call("POST", "/email", {"X-API-KEY": API_KEY, "Content-Type": "application/json"},
                raw=True)


def _health(rnd: random.Random, n: int) -> Call:
    return Call(rnd.choice(("GET", "HEAD")), "/healthcheck", {})


def _metrics(rnd: random.Random, n: int) -> Call:
    return Call("GET", "/metrics", {})


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    weight: int  # percent of the mix
    make: Callable[[random.Random, int], Call]
    expected: frozenset[int]


KINDS = (
    Kind("send", 72, _send_ok, frozenset({200, 503})),
    Kind("send_fail", 1, lambda r, n: _post(_email("fail")), frozenset({502, 503})),
    Kind("send_timeout", 1, lambda r, n: _post(_email("timeout")), frozenset({504, 503})),
    Kind("idempotent", 3, _idempotent, frozenset({200, 409, 503})),
    Kind("malformed_json", 3, _malformed, frozenset({400})),
    Kind("missing_field", 3, _missing, frozenset({400})),
    Kind("control_chars", 3, _control, frozenset({400})),
    Kind("wrong_key", 2, _wrong_key, frozenset({401})),
    Kind("no_key", 2, _no_key, frozenset({401})),
    Kind("unknown_path", 2, _unknown_path, frozenset({404})),
    Kind("wrong_method", 2, _wrong_method, frozenset({405})),
    Kind("oversized", 1, _oversized, frozenset({413})),
    Kind("wrong_type", 1, _wrong_type, frozenset({415})),
    Kind("no_length", 1, _no_length, frozenset({411})),
    Kind("healthcheck", 2, _health, frozenset({200})),
    Kind("metrics", 1, _metrics, frozenset({200})),
)
assert sum(k.weight for k in KINDS) == 100


# ---------------------------------------------------------------- the client ---


@dataclasses.dataclass
class Tally:
    """What one client thread saw; merged at the end."""

    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unexpected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)
    connects: int = 0
    requests: int = 0
    timed_out: bool = False

    def merge(self, other: Tally) -> None:
        self.statuses.update(other.statuses)
        self.unexpected.update(other.unexpected)
        self.examples.extend(other.examples[:10 - len(self.examples)])
        self.connects += other.connects
        self.requests += other.requests
        self.timed_out = self.timed_out or other.timed_out


def perform(conn: http.client.HTTPConnection, call: Call) -> tuple[int, bytes, str | None]:
    """Send one request; the status, the body and the Connection header."""
    if call.raw:
        conn.putrequest(call.method, call.path)
        for name, value in call.headers.items():
            conn.putheader(name, value)
        conn.endheaders()
    else:
        conn.request(call.method, call.path, body=call.body, headers=call.headers)
    response = conn.getresponse()
    body = response.read()
    return response.status, body, response.getheader("Connection")


def check_answer(kind: Kind, call: Call, status: int, body: bytes) -> str | None:
    """Why an answer with an expected status is still wrong, or None."""
    if call.method == "HEAD":
        return "HEAD answered with a body" if body else None
    if call.path == "/metrics" and status == 200:
        return None if body.startswith(b"# HELP ") else "metrics page malformed"
    try:
        document = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if status >= 400 and not (isinstance(document, dict) and "message" in document):
        return "error body without a message"
    if status in (502, 503, 504) and kind.name != "healthcheck" and \
            document.get("delivery") not in ("not_sent", "unknown"):
        return "delivery failure without a delivery field"
    return None


def client(port: int, plan: list[Kind], seed: int, deadline: float, tally: Tally) -> None:
    """Send ``plan`` in order over one keep-alive connection, reconnecting when closed."""
    rnd = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    try:
        for n, kind in enumerate(plan):
            if time.monotonic() > deadline:
                tally.timed_out = True
                return
            call = kind.make(rnd, n)
            if conn.sock is None:
                tally.connects += 1
            tally.requests += 1
            try:
                status, body, connection = perform(conn, call)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                label = f"{kind.name} {type(exc).__name__}"
                tally.unexpected[label] += 1
                if len(tally.examples) < 10:
                    tally.examples.append(f"{label}: {call.method} {call.path}: {exc}")
                continue
            tally.statuses[(kind.name, status)] += 1
            problem = None if status in kind.expected else f"status {status}"
            problem = problem or check_answer(kind, call, status, body)
            if problem:
                label = f"{kind.name} {problem}"
                tally.unexpected[label] += 1
                if len(tally.examples) < 10:
                    tally.examples.append(f"{label}: {call.method} {call.path} -> "
                                          f"{status} {body[:200]!r}")
            if connection and connection.lower() == "close":
                conn.close()  # http.client has done so already; be explicit
    finally:
        conn.close()


def run_load(port: int, total: int, connections: int, seed: int, deadline: float) -> Tally:
    """``total`` requests of the mix over ``connections`` concurrent keep-alive clients."""
    rnd = random.Random(seed)
    weights = [k.weight for k in KINDS]
    plans: list[list[Kind]] = [[] for _ in range(connections)]
    for i in range(total):
        plans[i % connections].append(rnd.choices(KINDS, weights)[0])
    tallies = [Tally() for _ in range(connections)]
    threads = [threading.Thread(target=client, args=(port, plans[i], seed * 1000 + i, deadline,
                                                     tallies[i]), name=f"soak-client-{i}")
               for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + SOCKET_TIMEOUT + 5)
    result = Tally()
    for tally in tallies:
        result.merge(tally)
    if any(thread.is_alive() for thread in threads):
        result.timed_out = True
    return result


# ---------------------------------------------------------------- the server ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def threads_of(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def rss_kb(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and server.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthcheck")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def settle_threads(pid: int, target: int | None, timeout: float) -> int:
    """Poll the thread count until it equals ``target`` (or, without one, holds still)."""
    end = time.monotonic() + timeout
    last, same = threads_of(pid), 0
    while time.monotonic() < end:
        time.sleep(0.05)
        now = threads_of(pid)
        if target is not None and now == target:
            return now
        same = same + 1 if now == last else 0
        last = now
        if target is None and same >= 10:  # unchanged for half a second
            return now
    return last


# ---------------------------------------------------------------------- main ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000, help="requests after the warm-up")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive client connections")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring idle")
    parser.add_argument("--rss-limit-mb", type=float, default=10.0, help="allowed RSS growth")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds the thread count has to come back to idle")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the run")
    parser.add_argument("--poll-interval", type=float, default=0.01,
                        help="SMSP_POLL_INTERVAL: how soon an opened circuit closes again")
    parser.add_argument("--seed", type=int, default=None, help="the mix's random seed")
    parser.add_argument("--smsp", default=os.environ.get("SMSP_PY",
                                                         os.path.join(REPO_ROOT, "smsp.py")),
                        help="the server module (default: $SMSP_PY or the repo's smsp.py)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print statuses per kind")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_limit
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    port = free_port()
    env = dict(os.environ, SMSP_MOCK_EMAIL_SERVICE="true", SMSP_API_KEY=API_KEY,
               SMSP_TIMEOUT="0.05", SMSP_POLL_INTERVAL=str(args.poll_interval),
               SMSP_POLL_INTERVAL_MAX="1", SMSP_LOG_OUTPUT_FORMAT="JSON_ONELINE",
               SMSP_MAX_BODY_BYTES=str(MAX_BODY), SMSP_WORKERS="1")
    env.pop("SMSP_PORT", None)
    stderr = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, args.smsp, "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=stderr)
    problems: list[str] = []
    idle_threads = end_threads = peak_threads = 0
    growth_mb = 0.0
    load = Tally()
    try:
        if not wait_healthy(port, server, 15):
            problems.append("the server did not become healthy")
            return 1
        warm = run_load(port, args.warmup, args.connections, seed + 1, deadline)
        if warm.unexpected:
            problems.append(f"warm-up: {sum(warm.unexpected.values())} unexpected answers")
            for example in warm.examples:
                print(f"soak: warm-up unexpected: {example}", flush=True)
        idle_threads = settle_threads(server.pid, None, args.settle)
        idle_rss = rss_kb(server.pid)
        print(f"soak: idle after {args.warmup} warm-up requests: {idle_threads} threads, "
              f"rss {idle_rss / 1024:.1f} MB; seed {seed}", flush=True)

        sampler_stop = threading.Event()
        peak = [idle_threads]

        def sample() -> None:
            while not sampler_stop.wait(0.2):
                try:
                    peak[0] = max(peak[0], threads_of(server.pid))
                except (OSError, KeyError, ValueError):
                    return
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load_started = time.monotonic()
        load = run_load(port, args.requests, args.connections, seed, deadline)
        elapsed = time.monotonic() - load_started
        sampler_stop.set()
        sampler.join()
        peak_threads = peak[0]
        if load.timed_out:
            problems.append(f"time limit of {args.time_limit:g} s exceeded")
        end_threads = settle_threads(server.pid, idle_threads, args.settle)
        growth_mb = (rss_kb(server.pid) - idle_rss) / 1024
        rate = load.requests / elapsed if elapsed else 0.0
        print(f"soak: {load.requests} requests in {elapsed:.1f} s ({rate:.0f}/s) over "
              f"{load.connects} connections opened; peak {peak_threads} server threads",
              flush=True)
        if args.verbose:
            by_kind: dict[str, list[str]] = collections.defaultdict(list)
            for (name, status), count in sorted(load.statuses.items()):
                by_kind[name].append(f"{status} x{count}")
            for kind in KINDS:
                print(f"soak:   {kind.name:<15} {', '.join(by_kind[kind.name])}",
                      flush=True)
        for label, count in sorted(load.unexpected.items()):
            print(f"soak: unexpected: {label} x{count}", flush=True)
        for example in load.examples:
            print(f"soak: e.g. {example}", flush=True)
        if load.requests != args.requests and not load.timed_out:
            problems.append(f"only {load.requests} of {args.requests} requests were sent")
        if load.unexpected:
            problems.append(f"{sum(load.unexpected.values())} unexpected answers")
        if end_threads != idle_threads:
            problems.append(f"{end_threads} threads {args.settle:g} s after the load, "
                            f"{idle_threads} when idle")
        if growth_mb >= args.rss_limit_mb:
            problems.append(f"RSS grew by {growth_mb:.1f} MB (limit {args.rss_limit_mb:g})")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
            problems.append("the server did not stop within 30 s of SIGTERM")
        if code != 0:
            problems.append(f"the server exited {code} after SIGTERM")
        stderr.seek(0)
        output = stderr.read().decode("utf-8", "replace").strip()
        if problems and output:
            print("soak: server stderr:\n" + output[-4000:], flush=True)
        if time.monotonic() > deadline:
            problems.append(f"time limit of {args.time_limit:g} s exceeded")
        for problem in dict.fromkeys(problems):
            print(f"soak: FAIL: {problem}", flush=True)
        verdict = "FAIL" if problems else "PASS"
        unexpected = sum(load.unexpected.values())
        print(f"soak: {load.requests} requests, {unexpected} unexpected, threads "
              f"{idle_threads}->{end_threads}, rss {growth_mb:+.1f} MB: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
