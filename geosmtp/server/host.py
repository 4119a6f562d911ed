"""What the server's pieces need of the app that runs them.

The sessions, the listeners and the cluster channel are driven by the app
(`geosmtp.app.App` builds them and hands itself over), and they call back
into it: its config, services and checks. They know it by these protocols,
defined here, below the app, so that the app imports the server and never
the other way round. `Login` and `ConfigChange`, the answers they get, live
here for the same reason (`geosmtp.logins` and `geosmtp.app` make them).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Config, Listener
    from ..mail.limits import Extensions, Limits
    from ..metrics import Metrics
    from ..pipeline import Pipeline
    from ..protocol.sasl import Credentials
    from ..queue.runner import QueueRunner
    from ..smtp import RecipientPolicy, Security
    from ..storage import MaildirStore, Spool
    from .anvil import Anvil


@dataclass(frozen=True)
class Login:
    """The outcome of `Logins.check` (`Host.logins`)."""

    user: str | None  # the mailbox name logged in as, None when refused
    delay: float = 0.0  # seconds to hold the refusal (doubles with each failure)
    disconnect: bool = False  # that was the last failure allowed: close after the refusal
    throttled: bool = False  # too many failures already: refused without a check


@dataclass(frozen=True)
class ConfigChange:
    """What a change of configuration did."""

    changed: list[str]  # every dotted key whose value changed
    restart: list[str]  # of those, the ones kept at their running value until a restart
    config: dict | None = None  # the config that runs now, as a mapping


@dataclass(frozen=True)
class Runtime:
    """How the master and its workers build the app (given by the caller above
    them, the CLI): the server's processes run the app without importing it."""

    #: A config's secrets read, as root (`app.prepare`); ConfigError when unusable.
    prepare: Callable[[Config], Any]
    #: The config a change would run, and what changed (`app.plan_change`).
    plan_change: Callable[..., tuple[Config, ConfigChange]]
    #: In a new worker: build and start the app and its admin API for the
    #: worker's context and master link; (app, admin server or None).
    start_worker: Callable[[Any, Any], tuple[Any, Any]]
    #: The admin API's write and read tokens, read as root (`admin.server.admin_tokens`).
    admin_tokens: Callable[[Any], tuple[str, str | None]]


class Stress(Protocol):
    """Whether the server is under stress (`listeners.Listeners`)."""

    @property
    def stressed(self) -> bool: ...


class CoreBuilder(Protocol):
    """Builds the core of a listener's protocol (`protocols.Protocols.build`)."""

    def build(self, listener: Listener, peer: str, host: Host, **session: Any) -> Any: ...


class Logins(Protocol):
    """The login check (`geosmtp.logins.Logins`): the users and the throttle."""

    def check(self, session: str, peer: str, credentials: Credentials) -> Login: ...


class Host(Protocol):
    """What a session (SMTP, POP3) and the listeners ask of the app."""

    config: Config
    metrics: Metrics
    tls_context: ssl.SSLContext | None

    @property
    def listeners(self) -> Stress: ...  # read only: the app's is a `Listeners`

    anvil: Anvil
    spool: Spool
    store: MaildirStore
    pipeline: Pipeline
    #: CPU-heavy or blocking work (password checks), off the hub.
    run_blocking: Callable[..., Any]

    #: The login check every protocol's sessions use.
    @property
    def logins(self) -> Logins: ...
    #: The protocols of the listeners (`protocols.Protocols`): a session builds
    #: its core with it.
    @property
    def protocols(self) -> CoreBuilder: ...

    #: The SMTP core's settings of the moment.
    policy: RecipientPolicy
    limits: Limits
    extensions: Extensions

    def security(self, listener: Listener, peer: str) -> Security: ...

    def lmtp_client_allowed(self, peer: str) -> bool: ...


class ClusterHost(Protocol):
    """What the cluster channel (the other workers' requests) asks of the app."""

    metrics: Metrics
    queue: QueueRunner

    @property
    def by_id(self) -> dict[str, Any]: ...
