"""Instructions per request: the cost of the request path, counted, not timed.

Usage::

    python bench/instructions.py                 # smsp.py and the bare server
    python bench/instructions.py --requests 1000 path/to/other/smsp.py bare

Each server named (a path to an smsp.py, or ``bare`` for bench/bare_server.py)
runs in mock mode under ``valgrind --tool=callgrind`` with instrumentation
off; after 200 warm-up requests it is switched on (``callgrind_control -i
on``) while a client sends ``--requests`` POST /email requests over
``--connections`` keep-alive connections (default 1), then off, and the
count is dumped.  The count repeats to within about 0.1 % whatever else the
machine is doing, unlike timings on a shared machine.  Valgrind runs one
thread at a time, so with many connections it counts their instructions but
not what threads waiting for the CPU or the GIL cost (bench/run.py measures
that).  Needs valgrind; it installs
nothing.  Prints one line per server: instructions per request.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BODY = (b'{"fromaddress":"a@example.com","toaddress":"b@example.com",'
        b'"subject":"hi","plaintextbody":"hello"}')
REQUEST = (b"POST /email HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"X-API-KEY: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(port: int, count: int, connections: int = 1) -> int:
    """Send ``count`` requests over ``connections`` keep-alive connections, each sending
    its next request once its answer is in; how many were answered 200."""
    selector = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    sent = answered = ok = 0
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(sock, selectors.EVENT_READ, bytearray())
            if sent < count:
                sock.sendall(REQUEST)
                sent += 1
        while answered < count:
            for key, _ in selector.select():
                sock, buffer = key.fileobj, key.data
                data = sock.recv(65536)  # type: ignore[union-attr]
                if not data:
                    raise SystemExit("the server closed a connection")
                buffer += data
                while (end := buffer.find(b"\r\n\r\n")) >= 0:
                    head = bytes(buffer[:end]).lower()
                    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(buffer) < end + 4 + length:
                        break
                    ok += head.startswith(b"http/1.1 200")
                    del buffer[:end + 4 + length]
                    answered += 1
                    if sent < count:
                        sock.sendall(REQUEST)  # type: ignore[union-attr]
                        sent += 1
    finally:
        for sock in socks:
            sock.close()
    return ok


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120  # a server starts slowly under valgrind
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server on port {port} did not start")


def count(server: str, requests: int, connections: int, workdir: Path) -> float:
    port = free_port()
    script = BENCH_DIR / "bare_server.py" if server == "bare" else Path(server)
    out = workdir / f"callgrind.{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSP_")}
    env.update(SMSP_MOCK_EMAIL_SERVICE="true", SMSP_API_KEY="bench",
               SMSP_LOG_OUTPUT_FORMAT="JSON_ONELINE", PYTHONHASHSEED="0")
    python = os.path.realpath(sys.executable)  # valgrind must start the interpreter itself
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         python, str(script), "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, process)
        send(port, 200)
        control = ["callgrind_control"]  # prints what it does on stderr
        subprocess.run([*control, "-i", "on", str(process.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        answered = send(port, requests, connections)
        for command in (["-i", "off"], ["-d"]):
            subprocess.run([*control, *command, str(process.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        process.terminate()
        process.wait(30)
    if answered != requests:
        raise SystemExit(f"{server}: only {answered} of {requests} requests answered 200")
    totals = [int(line.split()[1]) for dump in workdir.glob(f"callgrind.{port}*")
              for line in dump.read_text().splitlines() if line.startswith("totals:")]
    return max(totals) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("servers", nargs="*", default=[str(BENCH_DIR.parent / "smsp.py"), "bare"])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--connections", type=int, default=1)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install valgrind)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as workdir:
        for server in args.servers:
            per_request = count(server, args.requests, args.connections, Path(workdir))
            print(f"{server}: {per_request:,.0f} instructions per request "
                  f"({args.requests} requests, {args.connections} connection(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
