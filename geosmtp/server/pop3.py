"""The gevent side of a POP3 session (RFC 1939): socket in, core, socket out.

One `POP3Session` per client, run in its own greenlet over the sans-I/O core
(`geosmtp/pop3/`), which makes every protocol decision. This shell acts on
the core's events: check a login (the same users, throttle and threadpool as
SMTP AUTH), lock and list the maildrop, stream a message from its Maildir
file, and delete the marked messages once the client has said QUIT.

The maildrop lock (`Maildir.lock`, a `flock` that other processes see too)
is held from a successful login to the end of the session, whatever ends it;
a connection that drops deletes nothing (RFC 1939 §6).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, ClassVar, cast

import gevent
from loguru import logger

from .. import logs
from ..config import IMPLICIT_TLS_ROLES
from ..pop3 import (
    AuthRequest,
    Listing,
    LoginFailure,
    POP3Connection,
    POP3Security,
    Retrieve,
    StartTLS,
    Update,
)
from ..pop3 import replies as R
from ..pop3.stuffing import MessageEncoder
from ..protocol import NEED_DATA, CloseConnection, ConnectionClosed, ReplyValue
from ..storage import StorageError
from ..storage.expunge import ExpungeIncomplete, expunge, finish_expunge
from ..storage.maildir import MaildropBusy, uid_for
from .shared import CONNECTION_RATE, CONNECTIONS, ERRORS
from .stream import READ_SIZE, StreamSession

if TYPE_CHECKING:
    from ..config import Listener
    from ..metrics import ListenerMetrics
    from ..protocol.sasl import Credentials
    from ..storage.maildir import Maildir, MaildropLock, StoredMessage
    from .host import Host


def _send_at_once(sock: socket.socket) -> None:
    """TCP_NODELAY: a reply made of several writes (RETR and TOP: the +OK
    line, the text in pieces, the final dot; LIST and UIDL) goes out whole.
    With Nagle's algorithm its last small write waited for the client's ACK
    of the ones before, which the client delays (40 ms at least on Linux):
    40 ms added to every RETR. Each write here is a whole line or more."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a test's socket pair): nothing to hold back
        pass


def build_core(host: Host, listener: Listener, peer: str) -> POP3Connection:
    """The POP3 core for a new client on `listener`, with the app's settings of the moment."""
    return POP3Connection(
        host.config.hostname,
        POP3Security(
            tls_available=host.tls_context is not None,
            tls_active=listener.role in IMPLICIT_TLS_ROLES,
            auth_plaintext=host.config.auth.allow_plaintext,
        ),
    )


class POP3Session(StreamSession):
    def __init__(
        self,
        server: Host,
        sock: socket.socket,
        address: tuple,
        listener: Listener,
        metrics: ListenerMetrics,
        client_key: int = 0,
    ) -> None:
        super().__init__(server, sock, address, listener, metrics, client_key)
        _send_at_once(sock)
        self.conn: POP3Connection = cast(
            POP3Connection, server.protocols.build(listener, self.peer, server)
        )
        self.pm = server.metrics.pop3_listener(metrics.name)
        self.maildir: Maildir | None = None
        self.lock: MaildropLock | None = None
        self.messages: list[StoredMessage] = []
        self.user: str | None = None  # the mailbox logged in to (the login may say more)
        # What the session did, for the access log's logout line (as Dovecot's).
        self.retr = [0, 0]  # messages, octets sent
        self.top = [0, 0]
        self.deleted = 0
        self._commands_counted = 0

    # -------------------------------------------------------------- I/O

    def _timeout(self) -> float:
        """Before login, the command timeout; after it, the autologout timer
        (RFC 1939 §3: at least 10 minutes)."""
        timeouts = self.server.config.timeouts
        return timeouts.pop3_autologout if self.user is not None else timeouts.command

    def _sync_metrics(self) -> None:
        super()._sync_metrics()
        commands = self.conn.commands
        if commands != self._commands_counted:
            self.pm.commands.inc(commands - self._commands_counted)
            self._commands_counted = commands

    #: A client over its open connections (client_limits.max_connections, the
    #: one per-client limit POP3 is held to) hears the same for every limit.
    REFUSALS: ClassVar[dict[str, ReplyValue]] = {
        "stopping": R.STOPPING,
        "busy": R.TOO_MANY_CLIENTS,
        CONNECTIONS: R.TOO_MANY_FROM_ADDRESS,
        CONNECTION_RATE: R.TOO_MANY_FROM_ADDRESS,
        ERRORS: R.TOO_MANY_FROM_ADDRESS,
    }

    def info(self) -> dict:
        """What the admin API shows of this session (never message data or secrets)."""
        return {
            "id": self.id,
            "protocol": "pop3",
            "peer": self.peer,
            "port": self.peer_port,
            "listener": self.metrics.name,
            "state": self.conn.state.value,
            "age_seconds": self._age(),
            "user": self.user,
            "tls": self.conn.tls,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    # ------------------------------------------------------------ the loop

    CLOSING: ClassVar[dict[str, ReplyValue]] = {
        "timeout": R.AUTOLOGOUT,
        "shutdown": R.SHUTTING_DOWN,
        "kicked": R.KICKED,
        "error": R.INTERNAL_ERROR,
    }
    PROTOCOL = "pop3"

    def _serve(self) -> None:
        conn = self.conn
        if conn.tls:  # an implicit-TLS listener (pop3s): handshake before the greeting
            self._handshake()
        self._send(conn.greeting())
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                self._flush()
                conn.receive_data(self._read())
            elif type(event) is Retrieve:
                self._retrieve(event)
            elif type(event) is AuthRequest:
                self._login(event.credentials)
            elif type(event) is Update:
                self._update(event)
            elif type(event) is StartTLS:
                self._flush()
                self._handshake()
                conn.tls_started()
            elif type(event) is CloseConnection:
                self._flush()
                if self.outcome == "lost":  # else set where the close was decided
                    too_many = conn.bad_commands >= conn.max_bad_commands
                    self.outcome = "errors" if too_many else "quit"
                break
            elif type(event) is ConnectionClosed:
                logger.debug("pop3 session {} lost the client", self.id)
                self._flush()
                break
            else:
                raise RuntimeError(f"the POP3 core waits for a verdict in {conn.state}")

    def _ended(self) -> None:
        """Release the maildrop (never deleting anything here) and log the logout."""
        self._release()
        if self.user is not None:
            self._access(
                self.outcome,
                retr=f"{self.retr[0]}/{self.retr[1]}",
                top=f"{self.top[0]}/{self.top[1]}",
                dele=f"{self.deleted}/{len(self.messages)}",
            )

    # ------------------------------------------------------------ login

    def _login(self, credentials: Credentials) -> None:
        """Check the password, then lock and list the maildrop (RFC 1939 §4)."""
        conn = self.conn
        login = self.server.logins.check(self.id, self.peer, credentials)
        if login.throttled:
            self.pm.logins_failed.inc()
            self._access("auth-throttled")
            self.outcome = "errors"
            conn.login_failed(LoginFailure.TEMP, R.TOO_MANY_AUTH_FAILURES_TEXT)
            conn.close_with(R.TOO_MANY_AUTH_FAILURES)
            return
        if login.user is None:
            self.pm.logins_failed.inc()
            self._access("auth-failed")
            self._flush()
            gevent.sleep(login.delay)
            conn.login_failed(LoginFailure.AUTH)
            if login.disconnect:
                self.outcome = "errors"
                conn.close_with(R.TOO_MANY_AUTH_FAILURES)
            return
        user = login.user
        maildir = self.server.store.maildir(user)
        try:
            self.lock = maildir.lock()
        except MaildropBusy:
            self.pm.logins_failed.inc()
            self._access("in-use", user=user)
            conn.login_failed(LoginFailure.IN_USE)
            return
        except StorageError as exc:
            logger.error("pop3 session {}: cannot lock the maildrop of {}: {}", self.id, user, exc)
            self.pm.logins_failed.inc()
            conn.login_failed(LoginFailure.TEMP)
            return
        try:
            # Listing a big maildrop is many syscalls: off the hub.
            self.messages, listing = self.server.run_blocking(
                self._scan, maildir, self.server.config.fsync
            )
        except (StorageError, OSError) as exc:
            self._release()
            logger.error("pop3 session {}: cannot read the maildrop of {}: {}", self.id, user, exc)
            self.pm.logins_failed.inc()
            conn.login_failed(LoginFailure.TEMP)
            return
        self.maildir = maildir
        self.user = user
        self.pm.logins_ok.inc()
        conn.login_ok(listing)
        self._access("login", user=user, messages=len(listing))

    @staticmethod
    def _scan(maildir: Maildir, fsync: bool) -> tuple[list[StoredMessage], list[Listing]]:
        """The maildrop as POP3 numbers it: its messages and their listing,
        once an UPDATE a crash cut short is finished (`finish_expunge`).

        Sizes come from the `,W=` in the file names (written at delivery); a
        message delivered by another program without one is read once.
        """
        try:
            finish_expunge(maildir, fsync)
        except ExpungeIncomplete as exc:  # the journal stays; the login goes on
            logger.error("pop3: cannot finish an earlier UPDATE: {}", exc)
        messages = maildir.list()
        return messages, [Listing(maildir.virtual_size(m), uid_for(m)) for m in messages]

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -------------------------------------------------------- retrieval

    def _retrieve(self, event: Retrieve) -> None:
        """RETR or TOP: stream the file, CRLF line ends and dot-stuffed, in
        pieces (a message costs no more memory for being large).

        The file is opened and read in this greenlet, as the SMTP side writes
        its spool: a 64 KiB read from the page cache costs less than a trip to
        the threadpool (see `mailauth.stages`); a read from a cold disk holds
        the hub for that read."""
        assert self.maildir is not None
        message = self.messages[event.index]
        try:
            f = self.maildir.open(message)
        except StorageError as exc:
            # Removed or renamed by another program since the login.
            logger.warning("pop3 session {}: message {} is gone: {}", self.id, message.relpath, exc)
            self.conn.retrieve_result(False)
            return
        with f:
            self.conn.retrieve_result(True)
            self._flush()
            encoder = MessageEncoder(event.lines)
            sent = self.bytes_out
            while not encoder.done:
                chunk = f.read(READ_SIZE)
                if not chunk:
                    break
                out = encoder.feed(chunk)
                if out:
                    self._send(out)
            self._send(encoder.end())
            sent = self.bytes_out - sent
        self.pm.retrieved_bytes.inc(sent)
        if event.lines is None:
            self.retr[0] += 1
            self.retr[1] += sent
            self.pm.retrieved.inc()
            self._mark_seen(event.index)
        else:
            self.top[0] += 1
            self.top[1] += sent

    def _mark_seen(self, index: int) -> None:
        """A retrieved message is seen: `cur/<name>:2,S`, as Dovecot leaves it."""
        assert self.maildir is not None
        message = self.messages[index]
        if "S" in message.flags and message.subdir == "cur":
            return
        try:
            self.messages[index] = self.maildir.set_flags(message, message.flags + "S")
        except StorageError as exc:  # the flag is a courtesy: the session goes on
            logger.warning("pop3 session {}: cannot flag {}: {}", self.id, message.relpath, exc)

    # ----------------------------------------------------------- update

    def _update(self, event: Update) -> None:
        """The UPDATE state (RFC 1939 §6): remove the messages marked deleted,
        all or nothing across a crash (`storage.expunge`: a journal made
        durable first, so a kill -9 among the unlinks is finished at the next
        login). "+OK" only once every one is gone; "-ERR [SYS/TEMP]" when the
        journal could not be written (none removed) or some could not be
        removed (the journal stays: the next login tries them again)."""
        if not event.deleted:
            self.conn.update_result(True)
            return
        assert self.maildir is not None
        doomed = [self.messages[i] for i in event.deleted]
        failed = 0
        try:
            self.server.run_blocking(expunge, self.maildir, doomed, self.server.config.fsync)
        except ExpungeIncomplete as exc:
            failed = min(exc.failed, len(doomed))
        except StorageError as exc:
            logger.error("pop3 session {}: cannot journal the deletions: {}", self.id, exc)
            failed = len(doomed)
        self.deleted = len(doomed) - failed
        self.pm.deleted.inc(self.deleted)
        if failed:
            logger.error(
                "pop3 session {}: {} of {} messages could not be deleted",
                self.id,
                failed,
                len(doomed),
            )
        self.conn.update_result(not failed, failed)

    # ------------------------------------------------------- access log

    def _access(self, result: str, **extra: object) -> None:
        fields: dict = {
            "proto": "pop3",
            "session": self.id,
            "client": self.peer,
            "user": self.user,
            "tls": "yes" if self.conn.tls else None,
        }
        fields.update(extra)
        logs.access_log.write(logs.access_line(**fields, result=result))
