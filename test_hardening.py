"""Hostile clients cannot hold smsp (issue 9), over real sockets on 127.0.0.1.

Bounded TLS handshakes, answer writes, heads and memory; a log that never
blocks an answer or the shutdown; display names that stay names; HTTP parsed
as RFC 9112 asks; request ids that count nothing; and a drain that serves a
request which has arrived.
"""

import contextlib
import email.headerregistry
import email.utils
import fcntl
import http.client
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import smsp
from fakes import FakeMailgun
from testkit import (
    API_KEY,
    EMAIL,
    free_port,
    make_certificate,
    make_config,
    raw_exchange,
    running,
    status_of,
    wait_for,
)

MiB = 1 << 20
KiB = 1 << 10


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a TLS close without close_notify,
    or a reset, ends it too); a client-side timeout raises."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def body_of(raw: bytes) -> dict[str, Any]:
    return json.loads(raw.partition(b"\r\n\r\n")[2])



# ---------------------------------------------------------------------- TLS ---


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a throwaway certificate")
    return make_certificate(str(tmp_path_factory.mktemp("tls")))


def client_hello() -> bytes:
    """The first flight of a real TLS client, made in memory."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def https_status(port: int, cert: str) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                       context=ssl.create_default_context(cafile=cert))
    try:
        conn.request("GET", "/healthcheck")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize("sent", [0.0, 0.5], ids=["silent", "half-a-client-hello"])
def test_a_silent_or_partial_tls_handshake_is_closed_within_the_budget_and_frees_its_slot(
        certificate: tuple[str, str], sent: float) -> None:
    cert, key = certificate
    with running(make_config(tls_cert=cert, tls_key=key, client_timeout=1.0,
                             max_connections=2)) as server:
        hello = client_hello()
        clients = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                   for _ in range(2)]
        for client in clients:
            client.sendall(hello[:int(len(hello) * sent)])
        for client in clients:  # the server closes them: a client timeout would raise here
            assert read_until_closed(client) == b""
            client.close()
        wait_for(lambda: server.server.active_connections == 0)
        assert https_status(server.port, cert) == 200  # both slots were freed


@pytest.mark.parametrize("partial", [
    b"POST /ema",
    b"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode(),
    b"POST /email HTTP/1.1\r\nHost: x\r\nX-API-KEY: " + API_KEY.encode()
    + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"fromaddress\": ",
], ids=["half-request-line", "half-headers", "half-body"])
def test_a_stalled_request_over_tls_gets_the_same_json_408_as_over_plain_http(
        certificate: tuple[str, str], partial: bytes) -> None:
    cert, key = certificate
    with running(make_config(tls_cert=cert, tls_key=key, client_timeout=1.0)) as server:
        context = ssl.create_default_context(cafile=cert)
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(partial)
            answer = read_until_closed(tls)
        assert status_of(answer) == 408, answer
        assert b"\r\nConnection: close\r\n" in answer
        assert body_of(answer)["message"] == "request not received in time"
        wait_for(lambda: server.server.active_connections == 0)


# ------------------------------------------------------ writing an answer ---


def test_a_client_that_pipelines_and_never_reads_is_cut_off_and_its_slot_freed() -> None:
    with running(make_config(client_timeout=0.5, max_connections=1)) as server:
        threads_before = threading.active_count()
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        client.connect(("127.0.0.1", server.port))
        requests = b"GET /swagger.json HTTP/1.1\r\nHost: x\r\n\r\n" * 3000  # 45 MB of answers

        def pipeline() -> None:
            with contextlib.suppress(OSError):  # the server cuts it off mid-way
                client.sendall(requests)

        sender = threading.Thread(target=pipeline, daemon=True)
        sender.start()
        wait_for(lambda: server.server.active_connections == 1)
        wait_for(lambda: server.server.active_connections == 0)  # never read, yet let go
        wait_for(lambda: threading.active_count() <= threads_before + 1)  # + the sender
        sender.join(10)
        client.close()
        assert server.request("GET", "/healthcheck")[0] == 200  # the one slot is free


# ------------------------------------------------------------- head size ---


def test_a_head_over_64_kib_gets_431_as_it_arrives_not_once_it_ends() -> None:
    with running(make_config(client_timeout=10.0)) as server:
        pad = b"X-Pad: " + b"a" * 7000 + b"\r\n"
        head = b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n" + pad * 10
        assert len(head) > smsp.MAX_HEAD  # every line is short, the head never ends
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(head)
            answer = read_until_closed(client)  # no blank line sent: the 431 comes anyway
        assert status_of(answer) == 431, answer
        assert "65536 bytes" in body_of(answer)["message"]


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 431)])
def test_a_head_of_exactly_64_kib_is_served_and_one_byte_more_is_431(extra: int,
                                                                      status: int) -> None:
    with running(make_config()) as server:
        start = b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        pad = smsp.MAX_HEAD - len(start) - len(b"X-Pad: \r\n\r\n") + extra
        head = start + b"X-Pad: " + b"a" * pad + b"\r\n\r\n"
        assert len(head) == smsp.MAX_HEAD + extra
        assert status_of(raw_exchange(server.port, head)) == status


# ----------------------------------------------------- body bytes in flight ---


def email_head(length: int, *extra: str) -> bytes:
    lines = ["POST /email HTTP/1.1", "Host: x", f"X-API-KEY: {API_KEY}",
             "Content-Type: application/json", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_body_that_would_overrun_the_inflight_budget_gets_503_before_it_is_read() -> None:
    body = json.dumps(EMAIL).encode()
    config = make_config(max_body_bytes=len(body), max_inflight_body_bytes=len(body) + 10,
                         client_timeout=10.0)
    with running(config) as server:
        holder = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        holder.sendall(email_head(len(body)) + body[:-1])  # holds its bytes while it waits
        wait_for(lambda: server.service.app.bodies.held == len(body))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as other:
            other.sendall(email_head(11))  # 11 more bytes would overrun; no body sent
            answer = read_until_closed(other)
        assert status_of(answer) == 503, answer
        assert b"\r\nRetry-After: 1\r\n" in answer
        assert body_of(answer)["message"] == "overloaded"
        assert body_of(answer)["delivery"] == "not_sent"
        holder.sendall(body[-1:])
        assert json.loads(holder.recv(65536).partition(b"\r\n\r\n")[2])["status"] == "sent"
        holder.close()
        assert server.service.app.bodies.held == 0
        assert server.send()[0] == 200  # the budget is free again


def worst_case_rss(config: smsp.Config) -> int:
    """README, Reliability: the worst-case memory as a formula of the settings."""
    return (40 * MiB + config.idempotency_max * KiB + config.max_connections * 256 * KiB
            + 48 * config.max_inflight_body_bytes)


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * KiB for line in status if line.startswith("VmRSS:"))


def everything_read(port: int, connections: int) -> bool:
    """Whether ``connections`` server-side sockets on ``port`` are open with nothing left
    unread, and nothing is left unsent on the client side (from /proc/net/tcp)."""
    served, pending = 0, 0
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
            sent, unread = (int(q, 16) for q in fields[4].split(":"))
            if local == port and fields[3] == "01":  # ESTABLISHED
                served, pending = served + 1, pending + unread
            elif remote == port:
                pending += sent
    return served == connections and pending == 0


def hold_a_slot(port: int, max_body: int) -> socket.socket:
    """A connection sending a largest body but its last byte or, once the budget is full
    (503 instead of 100 Continue), one that holds a head of almost 64 KiB."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(email_head(max_body, "Expect: 100-continue"))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    if answer.startswith(b"HTTP/1.1 100 "):
        sock.sendall(b"a" * (max_body - 1))
        return sock
    assert status_of(answer) == 503, answer
    sock.close()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET / HTTP/1.1\r\nX-A: " + b"a" * 32000 + b"\r\nX-B: " + b"b" * 33000)
    return sock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rss_stays_under_the_documented_formula_with_the_body_budget_and_the_slots_full(
        ) -> None:
    held = 150
    env = {"SMSP_MAX_CONNECTIONS": str(held + 16), "SMSP_MAX_BODY_BYTES": str(MiB),
           "SMSP_MAX_INFLIGHT_BODY_BYTES": str(MiB), "SMSP_IDEMPOTENCY_MAX": "100",
           "SMSP_CLIENT_TIMEOUT": "120"}
    config = smsp.load_config({"SMSP_API_KEY": API_KEY, "SMSP_MOCK_EMAIL_SERVICE": "true",
                                   **env})
    with smsp_process(env, stdout=subprocess.DEVNULL) as (proc, port):
        clients = [hold_a_slot(port, MiB) for _ in range(held)]
        try:
            wait_for(lambda: everything_read(port, held), 60)
            assert rss_of(proc.pid) <= worst_case_rss(config)
        finally:
            for client in clients:
                client.close()


# --------------------------------------------------------------- the log ---


def stalled_pipe() -> tuple[int, int]:
    """A pipe of one page that nobody reads, already full: (read end, write end)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"#" * 512)
    os.set_blocking(write_end, True)
    return read_end, write_end


def drain_pipe(read_end: int, until: bytes) -> bytes:
    """Read the pipe until ``until`` has come (the writer keeps writing meanwhile)."""
    data = b""
    while until not in data:
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready, f"no {until!r} in {data[-300:]!r}"
        data += os.read(read_end, 65536)
    return data


def test_log_writer_drops_past_its_queue_counts_them_and_says_so_once_the_pipe_drains(
        ) -> None:
    read_end, write_end = stalled_pipe()
    writer = smsp.LineWriter(write_end, interval=0.01, max_lines=10)
    try:
        for i in range(200):
            writer.write(f"line {i:03d}\n")
        dropped = writer.dropped
        assert dropped >= 200 - 2 * 10  # the queue, and a batch the flusher took from it
        data = drain_pipe(read_end, b"log_lines_dropped")
        notice = json.loads(data.rsplit(b"\n", 2)[-2])
        kept = [int(n) for n in re.findall(rb"line (\d{3})", data)]
        assert kept == sorted(kept) and len(kept) == 200 - dropped  # in order, the rest
        assert (notice["event"], notice["dropped"]) == ("log_lines_dropped", dropped)
    finally:
        writer.close(grace=5)
        os.close(read_end)
        os.close(write_end)


def test_log_writer_close_gives_up_on_a_stalled_reader_after_its_grace() -> None:
    read_end, write_end = stalled_pipe()
    writer = smsp.LineWriter(write_end, interval=0.01, grace=0.05)
    writer.write("stuck\n")
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join(10)
    stuck = closer.is_alive()
    os.close(read_end)  # the flusher's write fails from here on, and it ends
    closer.join(10)
    os.close(write_end)
    assert not stuck


def dropped_metric(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return float(re.search(r"^smsp_log_lines_dropped_total (\S+)$", text, re.M)[1])


def test_answers_never_wait_on_a_stalled_log_and_metrics_count_the_dropped_lines() -> None:
    read_end, write_end = stalled_pipe()
    writer = smsp.LineWriter(write_end, interval=0.01, max_lines=5)
    log = smsp.Logger("JSON_ONELINE", writer=writer)
    try:
        with running(make_config(), log=log) as server:
            conn = server.connect()
            for _ in range(30):  # one access line each, none of which stdout takes
                conn.request("GET", "/healthcheck")
                response = conn.getresponse()
                response.read()
                assert response.status == 200
            conn.close()
            shown = dropped_metric(server.port)
            assert 30 - 2 * 5 <= shown <= writer.dropped  # the queue, and a batch taken
            data = drain_pipe(read_end, b'"event":"log_lines_dropped"')
            assert b'"level":"warning"' in data.rsplit(b"\n", 2)[-2]
    finally:
        writer.close(grace=5)
        os.close(read_end)
        os.close(write_end)


@contextlib.contextmanager
def smsp_process(env: dict[str, str], **popen: Any) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                       int]]:
    """smsp.py in mock mode on a free port, ready to serve."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SMSP_")}
    base.update({"SMSP_API_KEY": API_KEY, "SMSP_MOCK_EMAIL_SERVICE": "true",
                 "SMSP_LOG_OUTPUT_FORMAT": "JSON_ONELINE", **env})
    proc = subprocess.Popen([sys.executable, smsp.__file__, "--host", "127.0.0.1", "--port",
                             str(port)], env=base, **popen)
    try:
        wait_for(lambda: healthy(port), 30)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def healthy(port: int) -> bool:
    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthcheck")
        return conn.getresponse().status == 200
    return False


def stuck_writing_stdout(pid: int) -> bool:
    """Whether a thread of ``pid`` sleeps in write(1, ...) on a full pipe (from /proc)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{task}/syscall") as syscall, \
                    open(f"/proc/{pid}/task/{task}/wchan") as wchan:
                if syscall.read().startswith("1 0x1 ") and "pipe_write" in wchan.read():
                    return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_sigterm_with_a_stalled_stdout_exits_within_the_shutdown_grace() -> None:
    with smsp_process({"SMSP_SHUTDOWN_GRACE": "0.5"}, stdout=subprocess.PIPE) as (proc, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def answered() -> int:
            conn.request("GET", "/healthcheck?" + "x" * 150)  # a long access line
            response = conn.getresponse()
            response.read()
            return response.status

        wait_for(lambda: answered() == 200 and stuck_writing_stdout(proc.pid), 60)
        assert [answered() for _ in range(50)] == [200] * 50  # the log is stuck, answers not
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # without the grace it would wait on stdout forever


# ----------------------------------------------------------- display names ---


ADDRESSES = [
    ("c@evil.example <b@example.com>", "c@evil.example", "b@example.com"),
    ("Bob Smith <bob@example.org>", "Bob Smith", "bob@example.org"),
    ("Alice <alice@example.com>", "Alice", "alice@example.com"),
    ("J. R. Doe <jr@example.com>", "J. R. Doe", "jr@example.com"),
    ("Zoë Ünicode <z@example.com>", "Zoë Ünicode", "z@example.com"),
    ("René c@evil.example <r@example.org>", "René c@evil.example", "r@example.org"),
    ("To: x@evil.example (x) <a@example.com>", "To: x@evil.example (x)", "a@example.com"),
    ("[list] a:b <a@example.com>", "[list] a:b", "a@example.com"),
    ("=?utf-8?q?evil?= <a@example.com>", "=?utf-8?q?evil?=", "a@example.com"),
    ("Two  spaces <a@example.com>", "Two  spaces", "a@example.com"),
    ("plain@example.com", "", "plain@example.com"),
]


def read_back(header_text: str) -> tuple[str, str]:
    """The one address in ``header_text`` as an RFC 5322 reader sees it: (name, address)."""
    pairs = email.utils.getaddresses([header_text])
    assert len(pairs) == 1, pairs
    parsed = email.headerregistry.HeaderRegistry()("to", header_text)  # decodes RFC 2047
    [address] = parsed.addresses
    assert address.addr_spec == pairs[0][1]
    return address.display_name, address.addr_spec


@pytest.mark.parametrize(("given", "name", "address"), ADDRESSES,
                         ids=[a[0] for a in ADDRESSES])
def test_every_address_sent_to_mailgun_reads_back_as_one_address_with_its_name(
        proxy: Any, mailgun: FakeMailgun, given: str, name: str, address: str) -> None:
    status, _, _ = proxy.send({**EMAIL, "fromaddress": given, "toaddress": given})
    assert status == 200
    fields = {k: v[0] for k, v in urllib.parse.parse_qs(mailgun.requests[-1].body.decode()).items()}
    for field in ("from", "to"):
        assert read_back(fields[field]) == (name, address)
        if re.fullmatch(r"[A-Za-z]+(?: [A-Za-z]+)*", name):  # plain atoms stay unquoted
            assert fields[field] == given


# --------------------------------------------------------- RFC 9112 parsing ---


def exchange(port: int, head: bytes) -> bytes:
    return raw_exchange(port, head + b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(("value", "status"), [
    (b"a\x00b", 400), (b"a\rb", 400), (b"a\x01b", 400), (b"a\x0bb", 400), (b"a\x7fb", 400),
    (b"a\x1fb", 400), (b"a\tb", 200), (b"caf\xe9", 200),
], ids=["NUL", "bare-CR", "SOH", "VT", "DEL", "US", "HTAB-is-fine", "obs-text-is-fine"])
def test_control_characters_but_htab_in_a_header_value_are_400(value: bytes,
                                                               status: int) -> None:
    with running(make_config()) as server:
        head = b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-Note: " + value + b"\r\n\r\n"
        answer = exchange(server.port, head)
        assert status_of(answer) == status, answer
        if status == 400:
            assert "control character" in body_of(answer)["message"]


@pytest.mark.parametrize("length", ["1048577", "9" * 30, "9" * 5000, "0" * 5000 + "1048577"])
def test_a_content_length_of_digits_over_the_limit_is_413_never_500(length: str) -> None:
    with running(make_config(max_body_bytes=MiB)) as server:
        answer = raw_exchange(server.port, email_head(0).replace(
            b"Content-Length: 0", f"Content-Length: {length}".encode()))
        assert status_of(answer) == 413, answer[:200]
        assert not server.lines.events("internal_error")


def test_many_leading_zeros_do_not_make_a_content_length_too_long() -> None:
    body = json.dumps(EMAIL).encode()
    with running(make_config()) as server:
        head = email_head(len(body)).replace(b"Content-Length: ", b"Content-Length: " + b"0" * 5000)
        assert status_of(raw_exchange(server.port, head + body)) == 200


def test_an_absolute_form_target_is_served_as_its_path() -> None:
    body = json.dumps(EMAIL).encode()
    with running(make_config()) as server:
        target = f"http://127.0.0.1:{server.port}/email".encode()
        head = email_head(len(body)).replace(b"POST /email ", b"POST " + target + b" ")
        answer = raw_exchange(server.port, head + body)
        assert status_of(answer) == 200 and body_of(answer)["status"] == "sent"
        query = b"GET HTTPS://example.com/healthcheck?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
        assert status_of(exchange(server.port, query)) == 200


def test_http11_without_host_is_400_and_http10_without_host_is_served() -> None:
    with running(make_config()) as server:
        answer = raw_exchange(server.port, b"GET /healthcheck HTTP/1.1\r\n\r\n")
        assert status_of(answer) == 400 and "Host" in body_of(answer)["message"]
        assert status_of(raw_exchange(server.port, b"GET /healthcheck HTTP/1.0\r\n\r\n")) == 200


@pytest.mark.parametrize("line", [
    b"GET\t/healthcheck HTTP/1.1", b"GET /healthcheck\tHTTP/1.1", b"GET\x0b/healthcheck HTTP/1.1",
    b"GET\x85/healthcheck HTTP/1.1", b"GET /healthcheck\xa0HTTP/1.1", b"GET  /healthcheck HTTP/1.1",
    b"GET /healthcheck HTTP/1.1 ", b" GET /healthcheck HTTP/1.1", b"GET /health\tcheck HTTP/1.1",
    b"GET /health\xa0check HTTP/1.1",
], ids=["tab", "tab-before-version", "VT", "NEL", "NBSP", "two-spaces", "trailing-space",
        "leading-space", "tab-in-target", "NBSP-in-target"])
def test_anything_but_single_spaces_between_the_request_line_parts_is_400(line: bytes) -> None:
    with running(make_config()) as server:
        answer = raw_exchange(server.port, line + b"\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 400, answer


@pytest.mark.parametrize("version", [b"HTTP/1.2", b"HTTP/01.1", b"HTTP/0.9", b"HTTP/3.0"])
def test_versions_other_than_http10_and_http11_are_505(version: bytes) -> None:
    with running(make_config()) as server:
        answer = raw_exchange(server.port, b"GET /healthcheck " + version + b"\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 505, answer


def test_a_stray_crlf_after_a_post_body_does_not_lose_the_pipelined_request() -> None:
    body = json.dumps(EMAIL).encode()
    with running(make_config()) as server:
        second = b"\r\n\r\nGET /healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = raw_exchange(server.port, email_head(len(body)) + body + second)
        statuses = [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
        assert statuses == [200, 200], answer


@pytest.mark.parametrize(("depth", "status"), [(32, 200), (33, 400), (982, 400)])
def test_json_nested_past_32_levels_is_400_even_in_an_ignored_field(depth: int,
                                                                    status: int) -> None:
    nested = "[" * (depth - 1) + "]" * (depth - 1)  # inside the top-level object
    body = json.dumps(EMAIL)[:-1].encode() + b', "ignored": ' + nested.encode() + b"}"
    with running(make_config()) as server:
        for key in (None, f"deep-{depth}"):  # a key's fingerprint re-encodes the document
            extra = () if key is None else (f"Idempotency-Key: {key}",)
            answer = raw_exchange(server.port, email_head(len(body), *extra) + body)
            assert status_of(answer) == status, answer[-300:]
            if status == 400:
                assert "nested too deeply" in body_of(answer)["message"]
        assert not server.lines.events("internal_error")


# ---------------------------------------------------------------- request ids ---


def test_consecutive_request_ids_share_no_counter_like_part() -> None:
    import uuid

    ids = smsp.IdGenerator()
    made = [ids() for _ in range(2000)]
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in made)
    for earlier, later in itertools.pairwise(made):
        assert earlier[:8] != later[:8]  # no shared prefix
        assert abs(int(later[-12:], 16) - int(earlier[-12:], 16)) > 1 << 16  # no counter tail


# ------------------------------------------------------------------ shutdown ---


def test_a_request_that_arrived_before_the_drain_is_served_though_its_thread_is_late() -> None:
    with running(make_config()) as server:
        srv = server.server
        started, go = threading.Event(), threading.Event()
        accepted: list[socket.socket] = []
        original = srv.process_request_thread

        def late_thread(request: socket.socket, address: Any) -> None:  # as under CPU load
            accepted.append(request)
            started.set()
            go.wait(10)
            original(request, address)

        srv.process_request_thread = late_thread  # type: ignore[method-assign]
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert started.wait(10)
        srv.process_request_thread = original  # type: ignore[method-assign]
        assert select.select(accepted, [], [], 10)[0]  # the request is there, unread
        srv.shutdown()
        srv.server_close()  # SIGTERM: no more connections
        left: list[int] = []
        drain = threading.Thread(target=lambda: left.append(srv.drain(10)))
        drain.start()
        wait_for(lambda: srv.draining)
        go.set()
        answer = read_until_closed(client)
        drain.join(10)
        assert status_of(answer) == 200, answer
        assert left == [0]
