"""The protocols a listener can speak, each registered once.

A `ServerProtocol` ties a protocol's name to the listener roles that speak it,
its session class (the gevent shell, `StreamSession`'s subclass) and the
builder of its sans-I/O core. The app composes one `Protocols` registry
(`app.protocols`); the listeners find the session class of a listener's role
in it, and a session builds its core with `build(listener, peer, host)`, so
that a session class shared by two protocols (LMTP's is SMTP's, subclassed)
gets the core of its listener's role.

Adding a protocol is one core (a package beside `geosmtp/smtp/`), one session
class, and one `ServerProtocol` registered with its roles (which the config's
`Role` names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import socket

    from ..config import Listener
    from ..metrics import ListenerMetrics
    from ..protocol import SansIOConnection
    from .host import Host

#: A core builder: (the app, the listener, the client's address, what the
#: session adds, such as the SMTP client's rates) -> the core for one client,
#: with the app's settings of the moment.
CoreBuilder = Callable[..., "SansIOConnection"]


class Session(Protocol):
    """What the listeners need of a protocol's session class."""

    id: str
    peer: str
    PROTOCOL: str

    def __init__(
        self,
        app: Host,
        sock: socket.socket,
        address: tuple,
        listener: Listener,
        lm: ListenerMetrics,
        client_key: int = 0,
    ) -> None: ...

    @staticmethod
    def refusal(stopping: bool) -> bytes:
        """What a client over the cap (or arriving during a stop) is told."""
        ...

    @staticmethod
    def limit_refusal(limit: str) -> bytes:
        """What a client over a per-client limit (`shared.CONNECTIONS`, ...) is told."""
        ...

    def expire(self, now: float, timeout: float) -> None:
        """Under stress: end the session (its timeout reply) if it has waited
        for a command longer than `timeout`."""
        ...

    def run(self) -> None: ...
    def shutdown(self) -> None: ...
    def kick(self) -> None: ...
    def info(self) -> dict: ...


@dataclass(frozen=True)
class ServerProtocol:
    """One protocol a listener can speak."""

    name: str  # the session's PROTOCOL: "smtp", "pop3"
    roles: tuple[str, ...]  # the listener roles that speak it (`config.Role`)
    session: type[Session]
    build: CoreBuilder
    #: The client is held to every per-client limit (connection rate, the
    #: error budget, message and recipient rates), not only to its open
    #: connections (`anvil.Anvil.connect`).
    all_client_limits: bool = False


class Protocols:
    """The registry: protocols by name and by role."""

    def __init__(self, *protocols: ServerProtocol) -> None:
        self.by_name: dict[str, ServerProtocol] = {}
        self.by_role: dict[str, ServerProtocol] = {}
        for protocol in protocols:
            self.register(protocol)

    def register(self, protocol: ServerProtocol) -> None:
        """Add `protocol`; ValueError when its name or one of its roles is taken."""
        if protocol.name in self.by_name:
            raise ValueError(f"protocol {protocol.name} is registered already")
        taken = [role for role in protocol.roles if role in self.by_role]
        if taken:
            raise ValueError(f"role {taken[0]} is {self.by_role[taken[0]].name}'s already")
        self.by_name[protocol.name] = protocol
        for role in protocol.roles:
            self.by_role[role] = protocol

    def of(self, listener: Listener) -> ServerProtocol:
        """The protocol `listener` speaks (KeyError for a role none speaks)."""
        return self.by_role[listener.role]

    def build(self, listener: Listener, peer: str, host: Host, **session: Any) -> SansIOConnection:
        """The core for a new client from `peer` on `listener`, with `host`'s
        settings of the moment; `session` is what the session adds (SMTP: `rates`)."""
        return self.by_role[listener.role].build(host, listener, peer, **session)
