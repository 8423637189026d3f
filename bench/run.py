"""Benchmark harness for smsp (``make bench`` runs ``python bench/run.py``).

Usage::

    python bench/run.py            # full run: ~10 s per measurement, ~5 minutes in all
    python bench/run.py --quick    # smoke run: ~2 s per measurement
    python bench/run.py --duration 20 --repeat 3 --scenarios 1,4

Needs ``wrk`` (``apt-get install wrk``), for scenario 2 the ``openssl`` command
and for scenario 6 ``redis-server``; it installs nothing. All traffic stays on
127.0.0.1. It starts every server itself (smsp.py, bench/bare_server.py,
bench/tls_fake_mailgun.py, redis-server) on free ports, drives them with wrk and
bench/post.lua (POST /email with a fixed JSON body, keep-alive), and always
terminates them before it exits.

Scenarios (each measurement is preceded by a short warm-up run):

1. Mock mode with default JSON_ONELINE access log vs the bare stdlib server
   (bench/bare_server.py), wrk -c50 -t2: requests/s, p50/p99 latency, server CPU
   seconds per 10,000 requests (utime+stime from /proc/<pid>/stat, whole process
   tree), and the proxy/bare ratios.
2. Real Mailgun mode against a local TLS fake Mailgun (self-signed cert trusted
   via SSL_CERT_FILE), SMSP_POOL_SIZE=16 vs 0, over 1 (wrk -c1 -t1) and 16
   (wrk -c16 -t2) client connections: sends accepted by the fake per second,
   TLS handshakes per send, and pooled/fresh ratios.
3. Memory and concurrency in mock mode: idle RSS right after start (as the
   image runs smsp: `python -m smsp` from bytecode compiled beforehand, by the
   same Python in a venv with no packages, so that no site-packages .pth file
   loads, as in the image; and as `python smsp.py`, for reference), RSS after
   100,000 requests (wrk stopped by a request budget), then 1,000 concurrent
   keep-alive connections (wrk -c1000 -t2): errors (socket errors + non-2xx +
   connections still waiting to be accepted once wrk's timeout has passed) and
   peak RSS (VmHWM).
4. SMSP_WORKERS=2 vs 1 in mock mode, wrk -c50 -t2: requests/s and CPU per
   10,000 requests over the process tree (parent + forked workers).
5. A rich message through the TLS fake Mailgun (pool 16), wrk -c4 -t2: 100 KB of
   HTML and a 1 MiB attachment (about 1.5 MB of JSON, sent on as multipart/form-data):
   sends accepted by the fake per second and smsp's peak RSS (VmHWM).
6. Keyed sends in mock mode, wrk -c50 -t2, every request with an Idempotency-Key
   of its own: the shared Redis store (a local redis-server started with the test
   suite's redis_server.py; needs `apt-get install redis-server`) beside the
   in-memory store, alternating, on the same run: requests/s and p50/p99.

It prints the machine, the command and ONE markdown table with each value, its
target and PASS/FAIL. It is a benchmark, not a test: it exits 0 whatever the
numbers, 1 if a scenario could not run at all, 2 if wrk or smsp.py is missing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
POST_LUA = BENCH_DIR / "post.lua"
BARE_SERVER = BENCH_DIR / "bare_server.py"
FAKE_MAILGUN = BENCH_DIR / "tls_fake_mailgun.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
API_KEY = "bench"
MG_DOMAIN = "bench.example.com"
MG_API_KEY = "key"
POLL_ADDRESS = "poll@example.com"
NOFILE_WANTED = 4096
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def log(msg: str) -> None:
    """Progress goes to stderr; the report goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc readers


def children_of(pid: int) -> list[int]:
    """Direct children of pid, over all its threads (/proc/<pid>/task/<tid>/children)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                kids.extend(int(x) for x in text.split())
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (bounded walk)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 4096:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children_of(p))
    return seen


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def tree_ticks(pid: int) -> dict[int, int]:
    return {p: cpu_ticks(p) for p in process_tree(pid)}


def cpu_delta_s(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two tree snapshots (processes new in `after` count fully)."""
    return sum(t - before.get(p, 0) for p, t in after.items()) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A kB value (VmRSS, VmHWM, ...) from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tree_rss_kb(pid: int) -> int:
    return sum(proc_status_kb(p, "VmRSS") for p in process_tree(pid))


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One server process started by the harness, in its own session (process group)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    tls_context: ssl.SSLContext | None = None
    cwd: Path = REPO_DIR
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        log(f"starting {self.name}: {shlex.join(self.cmd)}")
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        STARTED.append(self)

    def connection(self, timeout: float = 2.0) -> http.client.HTTPConnection:
        if self.tls_context is not None:
            return http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=timeout, context=self.tls_context
            )
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll GET /healthcheck until 200 (bounded by timeout)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} during start-up:\n"
                    + self.log_tail()
                )
            try:
                status, body = self.get("/healthcheck")
                if status == 200:
                    return
                last = f"HTTP {status} {body[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not ready after {timeout:.0f} s (last: {last}):\n" + self.log_tail()
        )

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in lines[-n:]) or "    (empty stderr)"

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        elif self.proc is not None:
            # The leader is gone; make sure no forked worker of its group survives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in STARTED:
            STARTED.remove(self)


STARTED: list[Server] = []
HELPER_PIDS: list[int] = []  # other processes this run started (redis-server): not background


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    responses: int
    duration_s: float
    non2xx: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    unaccepted: int = 0  # most connections seen waiting in the listen queue after the timeout

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non2xx + self.unaccepted

    def error_text(self) -> str:
        return (
            f"{self.errors} (connect {self.connect}, read {self.read}, write {self.write}, "
            f"timeout {self.timeout}, non-2xx {self.non2xx}, not yet accepted {self.unaccepted})"
        )


def listen_backlog(port: int) -> int:
    """Connections waiting to be accepted on a listening TCP port (/proc/net/tcp, tcp6).

    For a socket in LISTEN state (st 0A) the rx_queue column is its accept queue.
    """
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                waiting += int(fields[4].split(":")[1], 16)
    return waiting


def system_busy_ticks() -> int:
    """Busy CPU ticks of the whole machine (user+nice+system+irq+softirq+steal), /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def children_cpu_s() -> float:
    """CPU seconds of this harness's reaped children (wrk runs, once waited for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Background:
    """CPU used during a wrk run by everything except the benchmark's own processes."""

    label: str
    cores: float


BACKGROUND: list[Background] = []


def run_wrk(
    url: str,
    connections: int,
    threads: int,
    duration_s: int,
    timeout_s: int,
    budget: int = 0,
    body_file: Path | None = None,
    key_prefix: str = "",
) -> WrkResult:
    """Run wrk with bench/post.lua; with budget > 0 stop once that many responses came back.

    ``body_file`` replaces post.lua's small JSON body with the file's bytes.  With a
    key_prefix every request carries an Idempotency-Key of its own (the prefix, the
    thread and a counter), so each is a keyed send, never a replay.

    A budget is split over the threads; each thread stops itself (wrk.thread:stop()) and
    says so on stderr, and once all have, wrk is sent SIGINT so it reports at once instead
    of sleeping out -d (which stays the upper bound). The machine's busy CPU during the run,
    less the CPU of wrk, of this harness and of every server it started, is recorded in
    BACKGROUND: other processes competing for the cores make the numbers unreliable.
    """
    busy0, kids0, self0 = system_busy_ticks(), children_cpu_s(), time.process_time()
    servers0 = {srv.pid: tree_ticks(srv.pid) for srv in STARTED if srv.proc is not None}
    servers0.update((pid, tree_ticks(pid)) for pid in HELPER_PIDS)
    wall0 = time.monotonic()
    # wrk counts a request that was never answered as one timeout per 2 s check at
    # most, so a client left in the listen queue for the whole run barely shows in its
    # errors: the queue is watched here, and what still waits after the timeout counts.
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    late = [0]
    stop = threading.Event()

    def watch_listen_queue() -> None:
        while not stop.wait(0.25):
            if time.monotonic() - wall0 >= timeout_s:
                late[0] = max(late[0], listen_backlog(port))

    watcher = threading.Thread(target=watch_listen_queue, daemon=True)
    watcher.start()
    try:
        result = _run_wrk(url, connections, threads, duration_s, timeout_s, budget, body_file,
                          key_prefix)
    finally:
        stop.set()
        watcher.join()
    result.unaccepted = late[0]
    wall = time.monotonic() - wall0
    servers_s = sum(cpu_delta_s(before, tree_ticks(pid)) for pid, before in servers0.items())
    ours = servers_s + (children_cpu_s() - kids0) + (time.process_time() - self0)
    other = (system_busy_ticks() - busy0) / CLK_TCK - ours
    BACKGROUND.append(Background(f"-c{connections} {url}", max(0.0, other) / wall))
    return result


def _run_wrk(
    url: str,
    connections: int,
    threads: int,
    duration_s: int,
    timeout_s: int,
    budget: int,
    body_file: Path | None = None,
    key_prefix: str = "",
) -> WrkResult:
    per_thread = -(-budget // threads) if budget > 0 else 0
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        f"{timeout_s}s",
        "--latency",
        "-s",
        str(POST_LUA),
        f"{url}/email",
    ]
    if per_thread or key_prefix:
        cmd += ["--", str(per_thread), key_prefix]
    env = {**os.environ, "SMSP_BENCH_BODY_FILE": str(body_file)} if body_file else None
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    err_lines: list[str] = []

    def watch_stderr() -> None:
        assert proc.stderr is not None
        done = 0
        for line in proc.stderr:
            if "smsp-bench: budget reached" in line:
                done += 1
                if done >= threads and proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            else:
                err_lines.append(line)

    out_chunks: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        out_chunks.append(proc.stdout.read())

    readers = [
        threading.Thread(target=watch_stderr, daemon=True),
        threading.Thread(target=read_stdout, daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=duration_s + timeout_s + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"wrk did not finish: {shlex.join(cmd)}") from None
    finally:
        for reader in readers:
            reader.join(timeout=5)
    out = "".join(out_chunks)
    line = next((x for x in out.splitlines() if x.startswith("SMSP_BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed (exit {proc.returncode}): {shlex.join(cmd)}\n{out}{''.join(err_lines)}"
        )
    d = json.loads(line.split(" ", 1)[1])
    return WrkResult(
        requests=d["requests"],
        responses=d["responses"],
        duration_s=d["duration_us"] / 1e6,
        non2xx=d["non2xx"],
        connect=d["connect"],
        read=d["read"],
        write=d["write"],
        status=d["status"],
        timeout=d["timeout"],
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
    )


@dataclass
class Measured:
    wrk: WrkResult
    cpu_s: float

    @property
    def cpu_per_10k(self) -> float:
        return self.cpu_s / self.wrk.requests * 10_000 if self.wrk.requests else float("nan")


def measure(
    server: Server, cfg: Config, connections: int, threads: int, key_prefix: str = ""
) -> Measured:
    """Warm up, then one wrk run with the server tree's CPU read around it.

    With a key_prefix the requests are keyed sends (warm-up and run use distinct keys).
    """
    if cfg.warmup > 0:
        run_wrk(
            server.url, connections, threads, cfg.warmup, cfg.timeout,
            key_prefix=key_prefix and f"{key_prefix}-warm",
        )
    before = tree_ticks(server.pid)
    result = run_wrk(
        server.url, connections, threads, cfg.duration, cfg.timeout, key_prefix=key_prefix
    )
    after = tree_ticks(server.pid)
    m = Measured(result, cpu_delta_s(before, after))
    log(
        f"  {server.name} -c{connections}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms,"
        f" p99 {result.p99_ms:.2f} ms, CPU {m.cpu_per_10k:.2f} s/10k, errors {result.errors}"
    )
    return m


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    scenario: str
    metric: str
    value: str
    target: str = ""
    result: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    failed_to_run: list[str] = field(default_factory=list)

    def info(self, scenario: str, metric: str, value: str) -> None:
        self.rows.append(Row(scenario, metric, value))

    def check(self, scenario: str, metric: str, value: str, target: str, ok: bool) -> None:
        self.rows.append(Row(scenario, metric, value, target, "PASS" if ok else "FAIL"))

    def error(self, scenario: str, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.rows.append(Row(scenario, "could not run", first.replace("|", "/"), "", "ERROR"))
        self.failed_to_run.append(f"{scenario}: {exc}")

    def table(self) -> str:
        header = ("Scenario", "Metric", "Value", "Target", "Result")
        body = [(r.scenario, r.metric, r.value, r.target, r.result) for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]

        def fmt(cells: tuple[str, ...]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([fmt(header), sep, *(fmt(b) for b in body)])


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


# --------------------------------------------------------------------------- config


@dataclass
class Config:
    smsp: Path
    python: str
    duration: int
    warmup: int
    timeout: int
    rss_requests: int
    c1000_duration: int
    repeat: int
    workdir: Path
    quick: bool

    def base_env(self) -> dict[str, str]:
        """The caller's environment without any SMSP_* or SSL_CERT_FILE setting."""
        return {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("SMSP_") and k != "SSL_CERT_FILE"
        }

    def smsp_server(self, name: str, env: dict[str, str]) -> Server:
        port = free_port()
        return Server(
            name=name,
            cmd=[self.python, str(self.smsp), "--host", "127.0.0.1", "--port", str(port)],
            env={**self.base_env(), **env},
            port=port,
            log_path=self.workdir / f"{name.replace(' ', '_')}.stderr",
        )

    def bare_python(self) -> str:
        """This Python in a venv of its own with no packages: site-packages holds no .pth
        file then, as in the image (a sandbox may add one that imports packages at start)."""
        venv = self.workdir / "bare-venv"
        if not venv.exists():
            subprocess.run([self.python, "-m", "venv", "--without-pip", str(venv)],
                           env=self.base_env(), check=True)
        return str(venv / "bin" / "python")

    def smsp_module_server(self, name: str, env: dict[str, str]) -> Server:
        """smsp as the Dockerfile runs it: bytecode compiled first, then `python -m smsp`,
        by a Python whose site-packages is empty, as the image's is."""
        port = free_port()
        app = self.workdir / "app"  # a copy, as in the image's /app: no .pyc in the checkout
        app.mkdir(exist_ok=True)
        shutil.copy(self.smsp, app / self.smsp.name)
        python = self.bare_python()
        subprocess.run(
            [python, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash",
             str(app / self.smsp.name)],
            env=self.base_env(), check=True,
        )
        return Server(
            name=name,
            cmd=[python, "-m", self.smsp.stem, "--host", "127.0.0.1", "--port", str(port)],
            env={**self.base_env(), "PYTHONDONTWRITEBYTECODE": "1", **env},
            port=port,
            log_path=self.workdir / f"{name.replace(' ', '_')}.stderr",
            cwd=app,
        )

    def bare_server(self) -> Server:
        port = free_port()
        return Server(
            name="bare",
            cmd=[self.python, str(BARE_SERVER), "--host", "127.0.0.1", "--port", str(port)],
            env=self.base_env(),
            port=port,
            log_path=self.workdir / "bare.stderr",
        )

    def mock_env(self, **extra: str) -> dict[str, str]:
        return {
            "SMSP_MOCK_EMAIL_SERVICE": "true",
            "SMSP_API_KEY": API_KEY,
            "SMSP_LOG_OUTPUT_FORMAT": "JSON_ONELINE",
            **extra,
        }


# --------------------------------------------------------------------------- scenarios


def scenario_1(cfg: Config, rep: Report) -> None:
    """Mock-mode proxy vs the bare stdlib JSON server, wrk -c50 -t2."""
    sc = "1 mock vs bare"
    log(f"scenario 1: mock-mode smsp vs bare stdlib server ({cfg.repeat} round(s))")
    bare = cfg.bare_server()
    proxy = cfg.smsp_server("smsp mock", cfg.mock_env())
    bare_runs: list[Measured] = []
    proxy_runs: list[Measured] = []
    with running(bare), running(proxy):
        for _ in range(cfg.repeat):
            bare_runs.append(measure(bare, cfg, 50, 2))
            proxy_runs.append(measure(proxy, cfg, 50, 2))

    def med(runs: list[Measured], key: Callable[[Measured], float]) -> float:
        return statistics.median(key(r) for r in runs)

    note = f" (median of {cfg.repeat})" if cfg.repeat > 1 else ""
    for label, runs in (("bare", bare_runs), ("smsp", proxy_runs)):
        rep.info(sc, f"{label} requests/s{note}", f"{med(runs, lambda m: m.wrk.rps):,.0f}")
        rep.info(
            sc,
            f"{label} latency p50 / p99",
            f"{med(runs, lambda m: m.wrk.p50_ms):.2f} ms / "
            f"{med(runs, lambda m: m.wrk.p99_ms):.2f} ms",
        )
        rep.info(
            sc, f"{label} server CPU s per 10k req", f"{med(runs, lambda m: m.cpu_per_10k):.3f}"
        )
        errors = sum(m.wrk.errors for m in runs)
        non2xx = sum(m.wrk.non2xx for m in runs)
        detail = f" ({errors - non2xx} socket, {non2xx} non-2xx)" if errors else ""
        rep.check(sc, f"{label} errors", f"{errors}{detail}", "0", errors == 0)
    rps_ratio = ratio(med(proxy_runs, lambda m: m.wrk.rps), med(bare_runs, lambda m: m.wrk.rps))
    cpu_ratio = ratio(
        med(proxy_runs, lambda m: m.cpu_per_10k), med(bare_runs, lambda m: m.cpu_per_10k)
    )
    rep.check(sc, "smsp/bare requests/s", f"{rps_ratio:.2f}x", ">= 0.95x", rps_ratio >= 0.95)
    rep.check(sc, "smsp/bare CPU per request", f"{cpu_ratio:.2f}x", "<= 1.10x", cpu_ratio <= 1.10)


def fake_sends(snapshot: dict[str, object]) -> int:
    """Sends accepted by the fake, not counting the proxy's own poll messages."""
    by_to = snapshot.get("by_to")
    polls = 0
    if isinstance(by_to, dict):
        polls = sum(int(n) for to, n in by_to.items() if POLL_ADDRESS in str(to))
    return int(str(snapshot["accepted"])) - polls


def tls_fake_mailgun(cfg: Config) -> tuple[Server, Path]:
    """The TLS fake Mailgun (not started yet) and the certificate that smsp must trust."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed for the fake Mailgun's certificate")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    sys.dont_write_bytecode = True  # leave no bench/__pycache__ in the work tree
    from tls_fake_mailgun import generate_cert  # bench-local module

    cert, _key = generate_cert(cfg.workdir / "tls")
    client_ctx = ssl.create_default_context(cafile=str(cert))
    fake_port = free_port()
    fake = Server(
        name="fake mailgun",
        cmd=[
            cfg.python,
            str(FAKE_MAILGUN),
            "--host",
            "127.0.0.1",
            "--port",
            str(fake_port),
            "--cert-dir",
            str(cfg.workdir / "tls"),
            "--api-key",
            MG_API_KEY,
        ],
        env=cfg.base_env(),
        port=fake_port,
        log_path=cfg.workdir / "fake_mailgun.stderr",
        tls_context=client_ctx,
    )
    return fake, cert


def fake_count(fake: Server) -> dict[str, object]:
    """The fake Mailgun's tallies (GET /count)."""
    status, body = fake.get("/count")
    if status != 200:
        raise RuntimeError(f"fake Mailgun /count answered {status}")
    data: dict[str, object] = json.loads(body)
    return data


def mailgun_env(fake: Server, cert: Path, pool: int) -> dict[str, str]:
    """smsp in real mode with Mailgun alone, at the fake, trusting its certificate."""
    return {
        "SMSP_PROVIDERS": "mailgun",
        "SMSP_MG_BASE_URL": fake.url,
        "SMSP_MG_DOMAIN": MG_DOMAIN,
        "SMSP_MG_API_KEY": MG_API_KEY,
        "SMSP_POLL_MESSAGE_ADDRESS": POLL_ADDRESS,
        "SMSP_API_KEY": API_KEY,
        "SSL_CERT_FILE": str(cert),
        "SMSP_POOL_SIZE": str(pool),
    }


def scenario_2(cfg: Config, rep: Report) -> None:
    """Real Mailgun mode through a local TLS fake: pooled (16) vs fresh (0) connections."""
    sc = "2 TLS pool"
    log("scenario 2: real mode via TLS fake Mailgun, SMSP_POOL_SIZE=16 vs 0")
    fake, cert = tls_fake_mailgun(cfg)

    def snapshot() -> dict[str, object]:
        return fake_count(fake)

    sends_per_s: dict[tuple[int, int], float] = {}
    with running(fake):
        for pool in (16, 0):
            proxy = cfg.smsp_server(f"smsp pool={pool}", mailgun_env(fake, cert, pool))
            with running(proxy):
                for conns, threads in ((1, 1), (16, 2)):
                    if cfg.warmup > 0:
                        run_wrk(proxy.url, conns, threads, cfg.warmup, cfg.timeout)
                    before = snapshot()
                    res = run_wrk(proxy.url, conns, threads, cfg.duration, cfg.timeout)
                    after = snapshot()
                    sends = fake_sends(after) - fake_sends(before)
                    shakes = int(str(after["handshakes"])) - int(str(before["handshakes"]))
                    rate = sends / res.duration_s
                    sends_per_s[(pool, conns)] = rate
                    log(
                        f"  pool={pool} -c{conns}: {rate:,.0f} sends/s accepted, "
                        f"{res.rps:,.0f} req/s, {shakes} handshakes, errors {res.errors}"
                    )
                    label = f"pool={pool} c={conns}"
                    rep.info(
                        sc,
                        f"{label} sends accepted/s",
                        f"{rate:,.0f} (p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms, "
                        f"{shakes / sends if sends else float('nan'):.2f} handshakes/send)",
                    )
                    rep.check(
                        sc,
                        f"{label} errors",
                        res.error_text() if res.errors else "0",
                        "0",
                        res.errors == 0,
                    )
    for conns, target in ((1, 3.0), (16, 2.0)):
        r = ratio(sends_per_s[(16, conns)], sends_per_s[(0, conns)])
        rep.check(
            sc, f"pooled/fresh sends/s, {conns} conn", f"{r:.2f}x", f">= {target:.0f}x", r >= target
        )


def scenario_3(cfg: Config, rep: Report) -> None:
    """Idle RSS, RSS after N requests, then 1,000 concurrent keep-alive connections."""
    sc = "3 memory/1000 conns"
    n = cfg.rss_requests
    log(f"scenario 3: idle RSS, RSS after {n:,} requests, 1000 connections")
    with running(cfg.bare_server()) as bare:
        bare_idle_kb = tree_rss_kb(bare.pid)
        bare_big = run_wrk(bare.url, 1000, 2, cfg.c1000_duration, cfg.timeout)
        log(f"  bare -c1000: {bare_big.rps:,.0f} req/s, errors {bare_big.error_text()}")
    # As the image runs it (Dockerfile): `python -m smsp` from bytecode compiled beforehand.
    # `python smsp.py` compiles the file at start, and CPython keeps the script's syntax
    # tree (about 6 MB) until the script ends, which for a server is never.
    with running(cfg.smsp_module_server("smsp -m (as the image)", cfg.mock_env())) as m:
        module_idle_kb = tree_rss_kb(m.pid)
    proxy = cfg.smsp_server("smsp mock (memory)", cfg.mock_env())
    with running(proxy):
        idle_kb = tree_rss_kb(proxy.pid)
        cap = max(cfg.duration, min(600, n // 500 + 30))
        res = run_wrk(proxy.url, 50, 2, cap, cfg.timeout, budget=n)
        time.sleep(0.5)
        after_kb = tree_rss_kb(proxy.pid)
        log(
            f"  idle {mb(idle_kb)}, after {res.requests:,} requests in {res.duration_s:.1f} s: "
            f"{mb(after_kb)}"
        )
        big = run_wrk(proxy.url, 1000, 2, cfg.c1000_duration, cfg.timeout)
        peak_kb = sum(proc_status_kb(p, "VmHWM") for p in process_tree(proxy.pid))
        end_kb = tree_rss_kb(proxy.pid)
        log(
            f"  -c1000: {big.rps:,.0f} req/s, p99 {big.p99_ms:.1f} ms, errors {big.error_text()},"
            f" peak RSS {mb(peak_kb)}"
        )
    rep.info(sc, "bare_server idle RSS (interpreter floor, this machine's site-packages)",
             mb(bare_idle_kb))
    rep.check(
        sc,
        "idle RSS as the image runs it (`python -m smsp`, bytecode compiled at build, "
        "no site-packages)",
        mb(module_idle_kb),
        "< 25 MB",
        module_idle_kb < 25 * 1024,
    )
    rep.info(sc, "idle RSS as `python smsp.py` (keeps the script's syntax tree)", mb(idle_kb))
    growth = after_kb - idle_kb
    rep.check(
        sc,
        f"RSS after {res.requests:,} req (growth)",
        f"{mb(after_kb)} (+{growth / 1024:.1f} MB)",
        "growth < 10 MB" + (" (quick: fewer req)" if n < 100_000 else ""),
        growth < 10 * 1024,
    )
    rep.info(
        sc,
        "c1000 requests/s, p50 / p99",
        f"{big.rps:,.0f}, {big.p50_ms:.1f} ms / {big.p99_ms:.1f} ms",
    )
    rep.check(
        sc,
        f"c1000 errors (socket incl. >{cfg.timeout} s, non-2xx, not accepted by {cfg.timeout} s)",
        big.error_text(),
        "0",
        big.errors == 0,
    )
    rep.info(
        sc,
        "bare_server c1000 req/s, p99, errors (reference)",
        f"{bare_big.rps:,.0f}, {bare_big.p99_ms:.1f} ms, {bare_big.error_text()}",
    )
    rep.check(
        sc,
        "c1000 peak RSS (VmHWM)",
        f"{mb(peak_kb)} (now {mb(end_kb)})",
        "< 150 MB",
        peak_kb < 150 * 1024,
    )


def scenario_4(cfg: Config, rep: Report) -> None:
    """SMSP_WORKERS=2 vs 1 in mock mode."""
    sc = "4 workers"
    log("scenario 4: SMSP_WORKERS=2 vs 1 (mock mode)")
    runs: dict[int, Measured] = {}
    for workers in (1, 2):
        proxy = cfg.smsp_server(f"smsp workers={workers}", cfg.mock_env(SMSP_WORKERS=str(workers)))
        with running(proxy):
            time.sleep(0.3)  # let the parent fork its workers
            procs = len(process_tree(proxy.pid))
            runs[workers] = m = measure(proxy, cfg, 50, 2)
        rep.info(
            sc,
            f"workers={workers} requests/s ({procs} processes)",
            f"{m.wrk.rps:,.0f} (p99 {m.wrk.p99_ms:.2f} ms, CPU {m.cpu_per_10k:.3f} s/10k req)",
        )
        rep.check(
            sc,
            f"workers={workers} errors",
            m.wrk.error_text() if m.wrk.errors else "0",
            "0",
            m.wrk.errors == 0,
        )
    rep.info(sc, "workers 2/1 requests/s", f"{ratio(runs[2].wrk.rps, runs[1].wrk.rps):.2f}x")


def rich_body(path: Path) -> int:
    """Write the scenario 5 request (100 KB of HTML, a 1 MiB attachment); its size."""
    html = "<html><body>" + "<p>Thank you for your order.</p>\n" * 3200 + "</body></html>"
    document = {
        "fromaddress": "Shop <orders@example.com>",
        "toaddress": "b@example.com",
        "subject": "Your receipt",
        "plaintextbody": "Thank you for your order.",
        "htmlbody": html[:100_000],
        "attachments": [{"filename": "receipt.pdf", "content_type": "application/pdf",
                         "content": base64.b64encode(os.urandom(1 << 20)).decode()}],
    }
    data = json.dumps(document).encode()
    path.write_bytes(data)
    return len(data)


def scenario_5(cfg: Config, rep: Report) -> None:
    """100 KB of HTML and a 1 MiB attachment through the TLS fake Mailgun."""
    sc = "5 HTML + 1 MiB attachment"
    log("scenario 5: rich messages (100 KB HTML, 1 MiB attachment) via TLS fake Mailgun")
    fake, cert = tls_fake_mailgun(cfg)
    body = cfg.workdir / "rich.json"
    size = rich_body(body)
    proxy = cfg.smsp_server("smsp rich", mailgun_env(fake, cert, 16))
    with running(fake), running(proxy):
        if cfg.warmup > 0:
            run_wrk(proxy.url, 4, 2, cfg.warmup, cfg.timeout, body_file=body)
        before = fake_sends(fake_count(fake))
        res = run_wrk(proxy.url, 4, 2, cfg.duration, cfg.timeout, body_file=body)
        sends = fake_sends(fake_count(fake)) - before
        peak_kb = sum(proc_status_kb(p, "VmHWM") for p in process_tree(proxy.pid))
    rate = sends / res.duration_s
    log(f"  {rate:,.1f} sends/s, p99 {res.p99_ms:.0f} ms, peak RSS {mb(peak_kb)}, "
        f"errors {res.errors}")
    rep.info(sc, f"sends accepted/s, c=4 ({size / 1e6:.2f} MB requests)",
             f"{rate:,.1f} (p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms)")
    rep.info(sc, "smsp peak RSS (VmHWM)", mb(peak_kb))
    rep.check(sc, "errors", res.error_text() if res.errors else "0", "0", res.errors == 0)


def redis_helper() -> type:
    """The test suite's redis-server launcher (redis_server.py at the repository root)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    sys.dont_write_bytecode = True  # leave no __pycache__ in the work tree
    from redis_server import RedisServer  # repository-local module

    return RedisServer


def scenario_6(cfg: Config, rep: Report) -> None:
    """A keyed send (a new Idempotency-Key each) with the Redis store vs the in-memory one."""
    sc = "6 keyed sends"
    log(f"scenario 6: keyed sends, Redis store vs in-memory ({cfg.repeat} round(s))")
    with redis_helper()() as redis:
        HELPER_PIDS.append(redis.proc.pid)
        memory = cfg.smsp_server("smsp keyed (memory)", cfg.mock_env())
        shared = cfg.smsp_server(
            "smsp keyed (redis)", cfg.mock_env(SMSP_IDEMPOTENCY_URL=redis.url())
        )
        runs: dict[str, list[Measured]] = {"memory": [], "redis": []}
        with running(memory), running(shared):
            for n in range(cfg.repeat):
                runs["memory"].append(measure(memory, cfg, 50, 2, key_prefix=f"m{n}"))
                runs["redis"].append(measure(shared, cfg, 50, 2, key_prefix=f"r{n}"))
        keys = redis.command("DBSIZE")
        HELPER_PIDS.remove(redis.proc.pid)
    note = f" (median of {cfg.repeat})" if cfg.repeat > 1 else ""
    rps: dict[str, float] = {}
    for label, measured in runs.items():
        rps[label] = statistics.median(m.wrk.rps for m in measured)
        p50 = statistics.median(m.wrk.p50_ms for m in measured)
        p99 = statistics.median(m.wrk.p99_ms for m in measured)
        rep.info(
            sc,
            f"{label} store: requests/s, p50 / p99{note}",
            f"{rps[label]:,.0f}, {p50:.2f} ms / {p99:.2f} ms",
        )
        errors = sum(m.wrk.errors for m in measured)
        rep.check(sc, f"{label} store errors", str(errors), "0", errors == 0)
    rep.info(sc, "redis/memory requests/s", f"{ratio(rps['redis'], rps['memory']):.2f}x")
    rep.info(sc, "keys left in Redis (one per keyed send)", f"{keys:,}")


SCENARIOS: dict[str, Callable[[Config, Report], None]] = {
    "1": scenario_1,
    "2": scenario_2,
    "3": scenario_3,
    "4": scenario_4,
    "5": scenario_5,
    "6": scenario_6,
}
SCENARIO_NAMES = {
    "1": "1 mock vs bare",
    "2": "2 TLS pool",
    "3": "3 memory/1000 conns",
    "4": "4 workers",
    "5": "5 HTML + 1 MiB attachment",
    "6": "6 keyed sends",
}


# --------------------------------------------------------------------------- main


def machine_info() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout + out.stderr).strip().splitlines()[0]
    return [
        f"- nproc: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        f"- CPU: {model}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- python: {platform.python_version()} ({sys.executable})",
        f"- wrk: {wrk_version}",
    ]


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def background_summary(nproc: int) -> str:
    """How much CPU other processes took while wrk ran: the numbers' reliability."""
    if not BACKGROUND:
        return "- background CPU during wrk runs: (no wrk run)"
    cores = [b.cores for b in BACKGROUND]
    worst = max(BACKGROUND, key=lambda b: b.cores)
    text = (
        f"- background CPU (processes not started by this run) during wrk runs: "
        f"median {statistics.median(cores):.2f}, max {worst.cores:.2f} of {nproc} cores"
    )
    if worst.cores > 0.25:
        text += (
            " -- WARNING: the machine was not idle; absolute numbers are unreliable "
            "(ratios from alternating runs less so)"
        )
    return text


def raise_nofile() -> None:
    """Let wrk and the servers (which inherit it) hold 1,000+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark smsp against a bare stdlib server and a local TLS fake Mailgun."
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s per measurement, 1 s warm-up, 20,000-request RSS check",
    )
    p.add_argument(
        "--duration",
        type=int,
        default=None,
        help="seconds per measured wrk run (default 10, --quick 2)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="seconds of warm-up before each measurement (default 2, --quick 1)",
    )
    p.add_argument(
        "--c1000-duration",
        type=int,
        default=None,
        help="seconds for the 1,000-connection run (default: --duration)",
    )
    p.add_argument(
        "--rss-requests",
        type=int,
        default=None,
        help="requests before the RSS-growth reading (default 100000, --quick 20000)",
    )
    p.add_argument("--timeout", type=int, default=5, help="wrk per-request timeout, s (default 5)")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds of scenario 1, bare and smsp alternating, medians (default 3, --quick 1)",
    )
    p.add_argument(
        "--scenarios", default="1,2,3,4,5,6", help="comma-separated subset of 1,2,3,4,5,6"
    )
    p.add_argument("--smsp", type=Path, default=REPO_DIR / "smsp.py", help="path to smsp.py")
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.c1000_duration is None:
        args.c1000_duration = args.duration
    if args.rss_requests is None:
        args.rss_requests = 20_000 if args.quick else 100_000
    bad = [s for s in args.scenarios.split(",") if s.strip() not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s): {', '.join(bad)}")
    if min(args.duration, args.c1000_duration, args.timeout, args.repeat) < 1:
        p.error("--duration, --c1000-duration, --timeout and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed. Install it with `apt-get install wrk` "
            "(Debian/Ubuntu; `apt-get update` first), then rerun.",
            file=sys.stderr,
        )
        return 2
    smsp = args.smsp.resolve()
    if not smsp.is_file():
        print(f"bench: {smsp} not found; nothing to benchmark.", file=sys.stderr)
        return 2
    raise_nofile()
    load_start = loadavg()
    report = Report()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smsp-bench-") as tmp:
        cfg = Config(
            smsp=smsp,
            python=args.python,
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
            rss_requests=args.rss_requests,
            c1000_duration=args.c1000_duration,
            repeat=args.repeat,
            workdir=Path(tmp),
            quick=args.quick,
        )
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            for key in (s.strip() for s in args.scenarios.split(",")):
                try:
                    SCENARIOS[key](cfg, report)
                except Exception as exc:  # reported; the run goes on
                    log(f"scenario {key} could not run: {exc}")
                    report.error(SCENARIO_NAMES[key], exc)
        finally:
            for server in STARTED.copy():
                server.stop()
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - t0
    print("## smsp benchmark\n")
    print("Machine:")
    print("\n".join(machine_info()))
    print(f"- load average (1/5/15 min): {load_start} at start, {loadavg()} at end")
    print(background_summary(os.cpu_count() or 1))
    print(
        f"\nCommand: `python {shlex.join(sys.argv)}` (ran {elapsed:.0f} s; "
        f"{args.duration} s per measurement, {args.warmup} s warm-up)\n"
    )
    print(report.table())
    if report.failed_to_run:
        print("\nCould not run:")
        for item in report.failed_to_run:
            print("- " + item.replace("\n", "\n  "))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
