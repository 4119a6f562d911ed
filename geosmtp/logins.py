"""The login check, next to the users it guards: one for every protocol's
sessions (SMTP AUTH, POP3 USER/PASS and AUTH).

`Logins` holds the users (`auth.UserDB`), the failure throttle
(`auth.AuthThrottle`, its records shared by the workers) and the bound on
password checks running at once; the app composes it and the sessions reach it
through `server.host.Host.logins`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gevent.lock import BoundedSemaphore
from loguru import logger

from .auth import BUSY, AuthThrottle, UserDB
from .mail import Domains
from .server.host import Login
from .server.threads import Pulse

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .protocol.sasl import Credentials
    from .server.shared import SharedThrottleRecords

#: How often a login waiting for its client's running checks (`BUSY`) asks
#: again: a check that ends in another worker process does not wake it.
AUTH_RECHECK = 0.05


class Logins:
    """Checks logins against the users, under the failure throttle.

    `checks` password checks run at once in this process (each takes its
    hash's memory and a core); `run_blocking` runs one off the hub.
    """

    def __init__(
        self,
        metrics: Metrics,
        run_blocking: Callable[..., Any],
        *,
        checks: int = 1,
        records: SharedThrottleRecords | None = None,
    ) -> None:
        self.metrics = metrics
        self.run_blocking = run_blocking
        self.throttle = AuthThrottle(records=records)
        self.users = UserDB({}, Domains())
        #: Seconds a login may wait for its client's running checks.
        self.timeout = 300.0
        self.pulse = Pulse()  # a password check ended: waiting logins ask again
        self.password_checks = BoundedSemaphore(checks)

    def configure(self, config: Config, domains: Domains) -> None:
        """The users and the throttle's settings of `config`; the throttle keeps
        its record of failures across config changes."""
        self.users = UserDB({name: user.password for name, user in config.users.items()}, domains)
        self.throttle.max_failures = config.auth.max_failures
        self.throttle.base_delay = config.auth.failure_delay
        self.timeout = config.timeouts.command

    def check(self, session: str, peer: str, credentials: Credentials) -> Login:
        """Check a login from `peer` (SMTP AUTH, POP3 USER/PASS and AUTH alike) in
        the threadpool, under the failure throttle; the caller holds a failure's
        reply for `Login.delay` seconds.

        The check is counted before it runs (the threadpool yields), so parallel
        connections from one client get `max_failures` checks between them: a
        check that could go over the allowance waits for one of the client's
        running checks to end; a client at the limit is refused without a check.
        """
        throttle = self.throttle
        deadline = time.monotonic() + self.timeout
        attempt = throttle.reserve(peer)
        while attempt == BUSY and (left := deadline - time.monotonic()) > 0:
            # A check ending in this process pulses; one ending in another
            # worker does not, so ask again every AUTH_RECHECK seconds too.
            self.pulse.wait(min(left, AUTH_RECHECK))
            attempt = throttle.reserve(peer)
        if attempt is None or attempt == BUSY:
            self.metrics.auth_failure.inc()
            self.metrics.client_limit_refused("auth_failures")
            logger.warning(
                "session {}: [{}] authentication refused: too many failures", session, peer
            )
            return Login(None, throttled=True)
        user = None
        delay, disconnect = 0.0, False
        try:
            # One check per core at a time, server-wide: each takes its hash's memory (64 MiB
            # for the hashes `geosmtp passwd` makes) and a core; more at once
            # would only hold more memory for the same rate.
            with self.password_checks:
                user = self.run_blocking(self.users.verify, credentials.login, credentials.password)
        finally:
            # The outcome is counted (a check that never ended, as a failure),
            # then the client's waiting checks may ask again.
            if user is not None:
                throttle.succeeded(peer)
            else:
                delay, disconnect = throttle.failed(peer, attempt)
            self.pulse.pulse()
        if user is not None:
            self.metrics.auth_success.inc()
            logger.info(
                "session {}: [{}] authenticated as {} ({})",
                session,
                peer,
                user,
                credentials.mechanism,
            )
            return Login(user)
        self.metrics.auth_failure.inc()
        # The login name is part of the AUTH arguments: it is not logged either.
        logger.warning("session {}: [{}] authentication failed", session, peer)
        return Login(None, delay=delay, disconnect=disconnect)
