"""A real redis-server (or valkey-server) for the tests: 127.0.0.1, a free port, a password.

    with RedisServer() as server:
        server.url()                  # redis://smsp:<password>@127.0.0.1:<port>/0, an ACL user
        server.url(user=False)        # redis://:<password>@127.0.0.1:<port>/0, the default user
        server.command("GET", "k")    # the test's own admin connection, not smsp's client
        server.freeze(); server.thaw()  # SIGSTOP / SIGCONT
        server.kill(); server.start()   # SIGKILL, then a new server on the same port

Each server lives in a temporary directory of its own, removed by ``stop()``.  It keeps
nothing on disk unless ``appendonly=True`` (then every write is fsynced before it is
acknowledged, ``appendfsync always``, so a SIGKILL loses no acknowledged write).  With
``tls=(cert, key)`` it speaks TLS only.  Debian's ``redis-server`` package provides the
binary; ``make test`` installs it when it is missing, and Valkey's ``valkey-server`` when
the distribution has it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

from pathlib import Path
from typing import Any, Self

USER = "smsp"
# What the user smsp may do: the commands smsp sends and its scripts call, on its own
# keys.  deploy/redis.yaml gives smsp the same rules (test_redis.py holds them equal).
ACL_RULES = "~smsp:idem:* resetchannels -@all +set +get +del +time +eval +evalsha +ping"
BINARIES = ("redis-server", "valkey-server")


def available(binary: str) -> bool:
    return shutil.which(binary) is not None



class AdminError(Exception):
    """The server answered the admin connection with an error reply."""


class Admin:
    """A blocking RESP2 connection as the default user, reconnected after any failure.

    Written apart from smsp's client on purpose: the tests check that client with it.
    """

    def __init__(self, port: int, password: str, context: ssl.SSLContext | None) -> None:
        self._port = port
        self._password = password
        self._context = context
        self._sock: socket.socket | None = None
        self._file: Any = None

    def command(self, *args: str | bytes | int) -> Any:
        try:
            if self._sock is None:
                self._connect()
            return self._send(*args)
        except (OSError, EOFError):
            self.close()
            raise

    def _connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self._port), timeout=5)
        if self._context is not None:
            sock = self._context.wrap_socket(sock, server_hostname="127.0.0.1")
        self._sock, self._file = sock, sock.makefile("rb")
        self._send("AUTH", self._password)

    def _send(self, *args: str | bytes | int) -> Any:
        assert self._sock is not None
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise EOFError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise AdminError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._file.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise EOFError(f"unexpected reply {line!r}")

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
        self._sock = self._file = None


def _free_port() -> int:
    # Not testkit's: the bench imports this module without the test dependencies.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One server process; ``start()`` again after ``kill()`` keeps the port and password."""

    def __init__(self, binary: str = "redis-server", *, appendonly: bool = False,
                 tls: tuple[str, str] | None = None) -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} is not installed (make test installs it)")
        self.binary = path
        self.name = binary.split("-")[0]
        self.password = secrets.token_hex(12)
        self.user_password = secrets.token_hex(12)
        self.appendonly = appendonly
        self.tls = tls
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.dir = Path(tempfile.mkdtemp(prefix=f"smsp-{self.name}-"))
        context = None
        if tls is not None:
            context = ssl.create_default_context(cafile=tls[0])
        self.admin = Admin(0, self.password, context)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, *, user: bool = True, password: str | None = None, db: int = 0) -> str:
        """The URL smsp is given: as the ACL user smsp (ACL_RULES), or as the default user
        with the server's password alone (which may do anything)."""
        scheme = "rediss" if self.tls else "redis"
        name = USER if user else ""
        secret = password if password is not None else (
            self.user_password if user else self.password)
        return f"{scheme}://{name}:{secret}@127.0.0.1:{self.port}/{db}"

    def _config(self) -> str:
        lines = ["bind 127.0.0.1", "protected-mode yes", f"requirepass {self.password}",
                 f"user {USER} on >{self.user_password} {ACL_RULES}",
                 'save ""', f"dir {self.dir}", f"logfile {self.dir / 'server.log'}",
                 "daemonize no", f"appendonly {'yes' if self.appendonly else 'no'}",
                 "appendfsync always"]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            cert, key = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}",
                      f"tls-key-file {key}", f"tls-ca-cert-file {cert}", "tls-auth-clients no"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start on the port of the last run, or on a free one (retried if it is taken)."""
        for _ in range(5):
            fixed = self.port != 0
            self.port = self.port or _free_port()
            (self.dir / "server.conf").write_text(self._config())
            self.proc = subprocess.Popen([self.binary, str(self.dir / "server.conf")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self.admin._port = self.port
            if self._ready():
                return
            self.proc.kill()
            self.proc.wait(5)
            if fixed:
                break
            self.port = 0
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def _ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                return self.command("PING") == "PONG"
            except (OSError, EOFError, AdminError):
                time.sleep(0.02)  # not listening yet: start-up takes a few milliseconds
        return False

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def command(self, *args: str | bytes | int) -> Any:
        return self.admin.command(*args)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; a stopped (frozen) process dies too."""
        self.admin.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.frozen = False

    def stop(self) -> None:
        self.admin.close()
        if self.proc is not None and self.proc.poll() is None:
            if self.frozen:
                self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
