"""A real SMTP server for the tests: aiosmtpd on 127.0.0.1, port 0, scripted per phase.

    with SMTPServer(certificate) as server:         # STARTTLS, AUTH required
        server.script["RCPT carol@example.net"] = "550 5.1.1 No such user"
        ...                                         # send through server.host, server.port
        server.commands                             # ["EHLO", "STARTTLS", "EHLO", "AUTH", ...]
        server.messages[0].message["Subject"]       # what it read up to the final dot

Without a script the server behaves as a submission relay should: it greets,
answers EHLO, speaks STARTTLS (``security="starttls"``, and refuses MAIL
before it) or implicit TLS (``"tls"``) with the throwaway certificate, checks
AUTH PLAIN and LOGIN against USERNAME and PASSWORD, answers 530 to MAIL, RCPT
and DATA before a successful AUTH (``auth=True``), refuses a declared SIZE
over ``size_limit`` with 552 at MAIL, and answers 250 to the final dot.

``script`` replaces the server's own answer at a phase: "greeting", "EHLO",
"STARTTLS", "AUTH", "MAIL", "RCPT" (or "RCPT <address>" for one recipient),
"DATA" (the answer to the DATA command), "final dot" (the answer once the
message is read, which is recorded first), "RSET" and "QUIT".  A value is a
reply line, HANG (never answer), CLOSE (drop the connection unanswered), or a
tuple of those done in order.  A scripted greeting is followed by a close.
Every hang ends when the client goes away or the server stops (``stop``
cancels it and joins the server's thread), so no test leaves one behind.
"""

import email.message
import email.policy
import re
import ssl
from dataclasses import dataclass
from email.parser import BytesParser
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

USERNAME = "relay-user"
PASSWORD = "relay-SECRET-pass"
HANG = "hang"
CLOSE = "close"

Action = str | tuple[str, ...]


@dataclass(frozen=True)
class Received:
    """One message the server read up to its final dot."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    content: bytes  # as the client wrote it, with the dot-stuffing undone
    helo: str
    tls: bool
    login: str | None

    @property
    def message(self) -> email.message.EmailMessage:
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.content)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    @property
    def header_block(self) -> bytes:
        """The top-level header lines, raw."""
        return self.content.split(b"\r\n\r\n", 1)[0]


class SMTPServer:
    """The server; ``start``/``stop`` or use it as a context manager.

    ``commands`` lists the verbs the server was sent, over every connection,
    in order, with "final dot" where it read a whole message; ``messages``
    the messages it read; ``logins`` the usernames whose AUTH succeeded.
    The server's thread fills them before it answers, so a client that has
    its answer can read them.
    """

    host = "127.0.0.1"

    def __init__(self, certificate: tuple[str, str] | None = None, *,
                 security: str = "starttls", auth: bool = True,
                 size_limit: int = 32 << 20) -> None:
        self.security = security
        self.auth = auth
        self.script: dict[str, Action] = {}
        self.commands: list[str] = []
        self.messages: list[Received] = []
        self.accepted: list[Received] = []  # the messages answered 2xx at the final dot
        self.logins: list[str] = []
        self._certificate = certificate
        context = None
        if security != "none":
            assert certificate is not None, "TLS needs the throwaway certificate"
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*certificate)
        starttls = security == "starttls"
        self._controller = _Controller(
            self, hostname=self.host, port=0, ready_timeout=10.0, server_hostname="smtp.test",
            ssl_context=context if security == "tls" else None,
            tls_context=context if starttls else None, require_starttls=starttls,
            auth_require_tls=starttls, authenticator=self._authenticate,
            data_size_limit=size_limit)

    @property
    def port(self) -> int:
        return self._controller.port

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's certificate."""
        assert self._certificate is not None
        return ssl.create_default_context(cafile=self._certificate[0])

    def start(self) -> "SMTPServer":
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> "SMTPServer":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def action(self, verb: str, arg: str | None) -> Action | None:
        if verb == "RCPT":
            found = re.search(r"<([^>]*)>", arg or "")
            if found and f"RCPT {found.group(1)}" in self.script:
                return self.script[f"RCPT {found.group(1)}"]
        return self.script.get(verb)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        good = auth_data == LoginPassword(USERNAME.encode(), PASSWORD.encode())
        if good:
            self.logins.append(USERNAME)
        # handled=False: on failure aiosmtpd answers its own 535 5.7.8
        return AuthResult(success=good, handled=False, auth_data=auth_data)


class _Controller(Controller):
    def __init__(self, harness: SMTPServer, **kwargs: Any) -> None:
        super().__init__(_Handler(harness), **kwargs)
        self.harness = harness

    def factory(self) -> SMTP:
        return _ScriptedSMTP(self.handler, self.harness, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: aiosmtpd's start-up probe must use the port it got.
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self, harness: SMTPServer) -> None:
        self.harness = harness

    async def handle_DATA(self, server: "_ScriptedSMTP", session: Session,
                          envelope: Envelope) -> str:
        harness = self.harness
        login = session.auth_data.login.decode() if session.authenticated else None
        harness.messages.append(Received(
            str(envelope.mail_from), tuple(envelope.rcpt_tos), tuple(envelope.mail_options),
            bytes(envelope.original_content or b""), str(session.host_name),
            harness.security == "tls" or session.ssl is not None, login))
        harness.commands.append("final dot")
        action = harness.script.get("final dot")
        if action is None:
            harness.accepted.append(harness.messages[-1])
            return "250 2.0.0 OK queued"
        if isinstance(action, str) and action.startswith("2"):
            harness.accepted.append(harness.messages[-1])
        if isinstance(action, str) and action not in (HANG, CLOSE):
            return action
        await server.act(action)
        await server.forever()
        return ""  # never reached: forever() ends only by cancellation


class _ScriptedSMTP(SMTP):
    """aiosmtpd's server, with each command first looked up in the harness's script."""

    def __init__(self, handler: _Handler, harness: SMTPServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.harness = harness

    async def forever(self) -> None:
        await self.loop.create_future()  # cancelled when the client leaves or the server stops

    async def act(self, action: Action) -> None:
        for step in (action,) if isinstance(action, str) else action:
            if step == HANG:
                await self.forever()
            elif step == CLOSE:
                assert self.transport is not None
                self.transport.close()
                await self.forever()
            else:
                await self.push(step)

    async def _handle_client(self) -> None:
        action = self.harness.script.get("greeting")
        if action is None:
            await super()._handle_client()
            return
        try:
            await self.act(action)
        finally:  # also when cancelled: aiosmtpd closes only in its own loop
            if self.transport is not None:
                self.transport.close()

    async def _command(self, verb: str, arg: str | None, method: Any) -> None:
        self.harness.commands.append(verb)
        action = self.harness.action(verb, arg)
        if action is not None:
            await self.act(action)
        elif verb in ("MAIL", "RCPT", "DATA") and self.harness.auth and \
                not (self.session and self.session.authenticated):
            await self.push("530 5.7.0 Authentication required")
        else:
            await method(arg)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._command("EHLO", arg, super().smtp_EHLO)

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self._command("STARTTLS", arg, super().smtp_STARTTLS)

    async def smtp_AUTH(self, arg: str) -> None:
        await self._command("AUTH", arg, super().smtp_AUTH)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._command("MAIL", arg, super().smtp_MAIL)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._command("RCPT", arg, super().smtp_RCPT)

    async def smtp_DATA(self, arg: str) -> None:
        await self._command("DATA", arg, super().smtp_DATA)

    async def smtp_RSET(self, arg: str) -> None:
        await self._command("RSET", arg, super().smtp_RSET)

    async def smtp_QUIT(self, arg: str) -> None:
        await self._command("QUIT", arg, super().smtp_QUIT)



class FaultPeer:
    """The SMTP server as the fault-injection table sees a provider's fake.

    ``script`` takes mappings of phase to action (merged into the server's
    script); ``hits`` counts MAIL commands (a transaction begun); ``accepted``
    holds the messages answered 2xx at the final dot; ``requests`` every
    message read.  ``url`` names the relay, as the fakes' URLs do.
    """

    def __init__(self, server: SMTPServer) -> None:
        self.server = server
        self.url = f"smtp://{server.host}:{server.port}"

    def script(self, *phases: dict[str, Action]) -> None:
        for phase in phases:
            self.server.script.update(phase)

    @property
    def hits(self) -> int:
        return self.server.commands.count("MAIL")

    @property
    def requests(self) -> list[Received]:
        return list(self.server.messages)

    @property
    def accepted(self) -> list[Received]:
        return list(self.server.accepted)
