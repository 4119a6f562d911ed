"""Listening sockets, the connection cap, and the graceful stop.

One `gevent.server.StreamServer` per configured listener, each serving the
session class of its protocol (`protocols.Protocols`, by the listener's role).
Sessions run in a `gevent.pool.Group`; the cap is checked as each
connection's greenlet starts, so a client over it gets the protocol's
"too busy" reply at once instead of waiting in the backlog (gevent's `Pool`
as `spawn` would stop accepting instead, and cannot be resized live).

The graceful stop (`stop`): the listening sockets close first; with the
master's copies closed too (`server.master.Master.stop`), a new client's
connection is refused by the kernel, not answered. Open sessions get the
grace period, then are asked to stop at a safe point (`421 4.3.2`, at their
next read; a delivery in progress finishes first); only those still running
after `STOP_WAIT` more seconds are killed.

Under stress (open connections, in all workers, at `stress.threshold`
percent of `max_clients`), a wait for a command is cut to
`stress.command_timeout` (`_watch_stress`).

Behind a load balancer (issue 22), a listener with `proxy_protocol` reads
the PROXY header (`protocol.proxy`) before anything else, the connection
counted against `max_clients` but not yet against the client's limits: a
balancer outside `proxy_trusted`, a malformed header or none within
`timeouts.proxy_header` closes the connection before any greeting, with a
log line; else the header's client address is the session's from then on
(`_proxied`), for the client's limits and everything the session does.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import gevent
from gevent import monkey
from gevent import socket as gsocket
from gevent.pool import Group
from gevent.server import StreamServer
from loguru import logger

from ..config import Listener
from ..logs import LineBudget, held_back
from ..metrics import PROXY_REFUSALS, ListenerMetrics
from ..protocol.proxy import MAX_LENGTH, ProxyError, ProxyHeader, parse
from .shared import ConnectionCounter, LocalConnections

#: What a client of a UNIX socket is called (its `peer`): it has no address.
UNIX_PEER = "unix"

if TYPE_CHECKING:
    from .host import Host
    from .protocols import Protocols, ServerProtocol, Session

#: Once the grace period is over and every session was asked to stop, how long
#: they get to reach a safe point (a delivery in progress finishes first) ...
STOP_WAIT = 5.0
#: ... and how long greenlets still running after that get to die when killed.
KILL_WAIT = 5.0
#: Seconds between two looks at the load, for stress (`Listeners.check_stress`).
STRESS_CHECK = 0.5
#: Seconds between two "refused" lines of one worker (over max_clients, or
#: stopping): a flood of refused clients writes a line a minute, with a count.
REFUSAL_LOG_INTERVAL = 60.0
#: Lines a worker writes for connections closed on a proxy_protocol listener
#: (no header, a malformed one, an untrusted sender), for each reason
#: (metrics.PROXY_REFUSALS): PROXY_LOG_BURST at once, then one every
#: PROXY_LOG_INTERVAL seconds, with a count of those held back
#: (`logs.LineBudget`).
PROXY_LOG_BURST = 10
PROXY_LOG_INTERVAL = 6.0


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def read_proxy_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """The PROXY header at the start of `sock`, within `timeout` seconds.

    Each read peeks first and takes only the header's octets, so that not one
    octet of the protocol after it is taken from the socket: the session reads
    them as from any other client, and an implicit-TLS handshake finds its
    ClientHello whole. ProxyError when it is no header (or the connection
    ends before one), TimeoutError when none comes in time.
    """
    deadline = time.monotonic() + timeout
    before = sock.gettimeout()
    try:
        return _read_header(sock, deadline)
    finally:
        sock.settimeout(before)


def _read_header(sock: socket.socket, deadline: float) -> ProxyHeader:
    taken = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        seen = sock.recv(MAX_LENGTH - len(taken), socket.MSG_PEEK)
        if not seen:
            raise ProxyError("the connection ended before a whole header")
        header = parse(taken + seen)
        # A header begun (None): all that was seen is header; else its rest.
        want = len(seen) if header is None else header.length - len(taken)
        while want > 0:  # peeked, so there: one recv nearly always takes it
            chunk = sock.recv(want)
            if not chunk:
                raise ProxyError("the connection ended before a whole header")
            taken += chunk
            want -= len(chunk)
        if header is not None:
            return header


def trusted(host: str, networks: Iterable[Network]) -> bool:
    """`host` (a socket's address: an IPv6 zone is dropped, an IPv4-mapped
    IPv6 address is its IPv4 one) is inside one of `networks`."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: one descriptor per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


#: The standard library's socket class, not gevent's: the master binds with it
#: and never runs a gevent loop (workers wrap the descriptors they inherit).
_Socket = monkey.get_original("socket", "socket")


def bind(address: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket; IPv6 sockets are V6ONLY so that `127.0.0.1` and
    `::1` on one port coexist. OSError names the address."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = _Socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on [{address}]:{port}: {exc.strerror}") from None
    return sock


# issue 21: LMTP in, on a UNIX socket
def bind_unix(
    path: str, mode: int, backlog: int, owner: tuple[int, int] | None = None
) -> socket.socket:
    """A listening UNIX socket at `path` with permissions `mode` (and `owner`,
    uid and gid, when given), its folder made if missing. A socket file left
    by a server that is gone is replaced; one that a server still answers on,
    or a file that is not a socket, is an OSError naming the path."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, 0o755, exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"cannot listen on {path}: not a socket")
        probe = _Socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nothing listens there
        else:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {path}: in use")
        finally:
            probe.close()
    sock = _Socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Made with no permissions, then given `mode`: never open to anyone between.
        old = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if owner is not None:
            os.chown(path, *owner)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
    return sock


class Listeners:
    """Every listener of the server, the sessions they run, and the cap on them."""

    def __init__(
        self,
        app: Host,
        protocols: Protocols,
        connections: ConnectionCounter | None = None,
    ) -> None:
        self.app = app
        # The count the cap is checked against: this process's, or one the
        # worker processes share (`shared.SharedState`).
        self.connections = LocalConnections() if connections is None else connections
        self.protocols = protocols  # the session class of each listener's role
        self.group: Group = Group()
        self.by_id: dict[str, Session] = {}  # open sessions: the cap, stop, the admin API
        self.servers: list[StreamServer] = []
        self.stopping = False
        #: Under stress (see `check_stress`): waits for a command are short.
        self.stressed = False
        self._stress_watch: gevent.Greenlet | None = None
        self._refusal_lines = LineBudget(1, REFUSAL_LOG_INTERVAL)
        #: One budget per reason: a flood of one kind hides no other kind.
        self._proxy_lines = {
            reason: LineBudget(PROXY_LOG_BURST, PROXY_LOG_INTERVAL) for reason in PROXY_REFUSALS
        }

    def start(self, bound: list[tuple[Listener, socket.socket]]) -> None:
        """Serve each listener on its socket (bound by the master, `bind`)."""
        app = self.app
        for listener, raw in bound:
            sock = gsocket.socket(fileno=raw.detach())
            if listener.path is not None:  # issue 21: a UNIX socket (lmtp)
                host, port = str(listener.path), 0
                lm = app.metrics.listener(f"{listener.role}:{listener.path}")
            else:
                host, port = sock.getsockname()[:2]
                lm = app.metrics.listener(f"{listener.role}:[{listener.address}]:{port}")
            protocol = self.protocols.of(listener)
            server = StreamServer(sock, self._handler(protocol, listener, lm))
            if app.config.worker_count > 1 and not app.config.reuse_port:
                # One socket the workers share: take one connection per wake-up.
                # gevent's default (100 at a time) let whichever worker woke first
                # take a whole burst of connects, and the other cores sat idle.
                server.max_accept = 1
            server.start()
            self.servers.append(server)
            where = host if listener.path is not None else f"[{host}]:{port}"
            logger.debug("serving {} ({})", where, listener.role)
        self._stress_watch = gevent.spawn(self._watch_stress)

    def _handler(
        self, protocol: ServerProtocol, listener: Listener, lm: ListenerMetrics
    ) -> Callable[[socket.socket, tuple], None]:
        session_class = protocol.session
        proxied = listener.proxy_protocol
        if proxied:  # each reason's count shows from the start, at 0
            for reason in PROXY_REFUSALS:
                lm.metrics.proxy_refusals.labels(lm.name, reason)
        proxy_trusted = [ipaddress.ip_network(n, strict=False) for n in listener.proxy_trusted]

        def handle(client: socket.socket, address: tuple) -> None:
            if not address:  # issue 21: a UNIX socket's client has no address
                address = (UNIX_PEER, 0)
            # Checked and counted with no switch in between (and across the
            # workers under the shared count's lock), so the cap is exact.
            connections = self.connections
            if self.stopping or not connections.try_open(self.app.config.max_clients):
                lm.refused.inc()
                self._refuse(client, address, session_class.refusal(self.stopping))
                return
            try:
                if proxied:  # issue 22: the client is the one the header names
                    address = self._proxied(client, address, lm, proxy_trusted)
                    if not address:
                        return
                    if self.stopping:
                        self._refuse(client, address, session_class.refusal(True))
                        return
                # Then the client's own limits (client_limits), logged by the anvil.
                anvil = self.app.anvil
                key, over = (
                    (0, None)  # issue 21: a UNIX socket's clients are guarded by its mode
                    if address[0] == UNIX_PEER
                    else anvil.connect(address[0], protocol.all_client_limits)
                )
                if over is not None:
                    self._refuse(client, address, session_class.limit_refusal(over), log=False)
                    return
                try:
                    session = session_class(self.app, client, address, listener, lm, key)
                    self.by_id[session.id] = session
                    if not proxied:  # a proxied one is in it from its header on
                        self.group.add(gevent.getcurrent())  # type: ignore[arg-type]  # a Greenlet
                    lm.connections.inc()
                    lm.current.inc()
                    try:
                        session.run()
                    finally:
                        lm.current.dec()
                        del self.by_id[session.id]
                finally:
                    anvil.disconnect(key)
            finally:
                connections.closed()

        return handle

    def _proxied(
        self, client: socket.socket, address: tuple, lm: ListenerMetrics, networks: list[Network]
    ) -> tuple:
        """The client's address from the PROXY header (the balancer's own for a
        LOCAL or UNKNOWN header); () when the connection was closed instead:
        the balancer is not trusted, or its header is malformed or missing."""
        if not trusted(address[0], networks):
            return self._not_proxied(client, address, lm, "untrusted", "not in proxy_trusted")
        self.group.add(gevent.getcurrent())  # type: ignore[arg-type]  # the stop waits for it
        try:
            header = read_proxy_header(client, self.app.config.timeouts.proxy_header)
        except ProxyError as exc:
            return self._not_proxied(client, address, lm, "malformed", str(exc))
        except TimeoutError:
            return self._not_proxied(client, address, lm, "timeout", "no header in time")
        except OSError as exc:
            return self._not_proxied(client, address, lm, "error", f"socket error: {exc}")
        if header.source is None:
            return address
        logger.debug(
            "proxy: [{}]:{} for [{}]:{} (v{})", *address[:2], *header.source, header.version
        )
        return header.source

    def _not_proxied(
        self, client: socket.socket, address: tuple, lm: ListenerMetrics, reason: str, why: str
    ) -> tuple:
        """Close a connection on a proxy_protocol listener before any greeting,
        counted by `reason` (metrics.PROXY_REFUSALS), with a WARNING line
        while the budget lasts; ()."""
        client.close()
        lm.proxy_refused(reason)
        held = self._proxy_lines[reason].take()
        if held is not None:
            logger.warning(
                "proxy: closed [{}]:{} on {}: {}{}", *address[:2], lm.name, why, held_back(held)
            )
        return ()

    def _refuse(
        self, client: socket.socket, address: tuple, reply: bytes, log: bool = True
    ) -> None:
        """Over the cap: answer and close (RFC 5321 §3.1), never leave it hanging."""
        try:
            client.setblocking(False)
            client.send(reply)
        except OSError:
            pass
        finally:
            client.close()
        if log:
            self._log_refusal(address[0], reply)

    def _log_refusal(self, host: str, reply: bytes) -> None:
        """One WARNING line, then none for REFUSAL_LOG_INTERVAL: the next one
        says how many were refused unlogged in between (the metric counts all)."""
        held = self._refusal_lines.take()
        if held is not None:
            text = reply.decode("ascii", "replace").strip()
            logger.warning("refused [{}]: {}{}", host, text, held_back(held))

    # ------------------------------------------------------------ stress

    def _watch_stress(self) -> None:
        """Every STRESS_CHECK seconds: is the server under stress (open
        connections, in all workers, at `stress.threshold` percent of
        max_clients or more)? Then sessions waiting for a command get
        `stress.command_timeout` (`stressed`, read at each wait), and those
        already waiting longer are ended as timed out."""
        while True:
            gevent.sleep(STRESS_CHECK)
            try:
                self.check_stress()
            except Exception:  # a bug: logged, and the watch goes on
                logger.exception("stress check failed")

    def check_stress(self) -> None:
        """One look at the load (see `_watch_stress`)."""
        config = self.app.config
        threshold = config.stress.threshold
        total = self.connections.total()
        stressed = threshold > 0 and total * 100 >= threshold * config.max_clients
        if stressed != self.stressed:
            self.stressed = stressed
            self.app.metrics.stress.set(int(stressed))
            if self.connections.mark_stress(stressed):  # once for the whole server
                if stressed:
                    logger.warning(
                        "stress: {} of max_clients {} connections open (stress.threshold "
                        "{}%): command timeout {}s",
                        total,
                        config.max_clients,
                        threshold,
                        config.stress.command_timeout,
                    )
                else:
                    logger.info(
                        "stress over: {} of max_clients {} connections open",
                        total,
                        config.max_clients,
                    )
        if stressed:
            now = time.monotonic()
            timeout = config.stress.command_timeout
            for session in list(self.by_id.values()):
                session.expire(now, timeout)

    def close(self) -> None:
        """Stop accepting; open sessions go on."""
        for server in self.servers:
            server.close()
        if self._stress_watch is not None:
            self._stress_watch.kill(block=False)
            self._stress_watch = None

    def stop(self, grace: float) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then stop the rest.

        Sessions are asked to stop at a safe point (`Session.shutdown`: a reply,
        then close, at their next read; a delivery in progress finishes first).
        Only those that still run after `STOP_WAIT` more seconds are killed.
        A connection accepted before the listeners closed is served like the
        open ones: with workers sharing a socket, a reload's retiring worker
        may have taken one a moment before, and must not turn it away with
        "shutting down" while the server goes on.
        """
        self.close()
        gevent.sleep(0)  # the handlers of connections already accepted start (and count)
        self.stopping = True
        if self.group:
            logger.info("stopping: waiting up to {}s for {} sessions", grace, len(self.group))
            self.group.join(timeout=grace)
        for session in list(self.by_id.values()):
            session.shutdown()
        self.group.join(timeout=STOP_WAIT)
        if self.group:
            self.group.kill(block=True, timeout=KILL_WAIT)
