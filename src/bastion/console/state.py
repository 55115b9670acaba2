"""What the console keeps between requests, built once per app that serves it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.requests import Request

from bastion.api.services import Services
from bastion.console.credentials import oidc_client
from bastion.console.guard import PreSession
from bastion.console.rendering import Assets, Pages
from bastion.console.sessions import PendingSignIns, SessionStore
from bastion.identity.oidc import OidcClient

logger = logging.getLogger("bastion.console")


class Console:
    """The console's sessions, its sign-ins in progress, its provider client (None
    without single sign-on), templates and static files."""

    def __init__(
        self,
        services: Services,
        oidc: OidcClient | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = services.settings
        self.services = services
        self.sessions = SessionStore(
            idle_s=settings.console_idle_timeout_s,
            max_age_s=settings.console_session_max_s,
            clock=clock,
        )
        self.pending = PendingSignIns(clock=clock)
        self.pre_session = PreSession()
        self.oidc = oidc
        self.pages = Pages()
        self.assets = Assets()
        self._warned_plain_http = False

    @classmethod
    def of(cls, services: Services) -> Console:
        """The console of a server; ConfigurationError if its single sign-on settings
        do not hold."""
        return cls(services, oidc_client(services.sso, services.db))

    def warn_plain_http(self, request: Request) -> None:
        """Log, once, that sessions travel over plain HTTP (their cookie cannot be Secure)."""
        if self._warned_plain_http or request.url.scheme == "https":
            return
        self._warned_plain_http = True
        logger.warning(
            "the admin console is used over plain HTTP: its session cookie cannot be Secure "
            "and keys cross the network in the clear unless this is loopback (serve it over "
            "TLS: --tls-cert/--tls-key, see docs/tls.md)"
        )


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console
