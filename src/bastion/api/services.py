"""The services the routes use, built once at start (``server.build_services``) and typed
(routes get them with api/context.py's ``services_of``).

Inference routes reach the models through the gateway's request steps (and only through
api/admission.py); admin, health and listing routes use the service they need here, not
attributes of the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.audit.alerts import RecentAlerts
from bastion.config import Settings
from bastion.gateway.control import ControlPlane
from bastion.gateway.gateway import Gateway
from bastion.gateway.sso import SingleSignOn
from bastion.identity.service import IdentityService
from bastion.models.registry import ModelRegistry
from bastion.observability.metrics import Metrics
from bastion.quotas.store import QuotaStore
from bastion.quotas.usage import UsageMeter
from bastion.store.db import Database
from bastion.supervision.supervisor import Supervisor


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    db: Database
    gateway: Gateway
    control: ControlPlane
    identity: IdentityService
    registry: ModelRegistry
    quotas: QuotaStore
    supervisor: Supervisor
    meter: UsageMeter
    metrics: Metrics
    # The alerts fired lately (the console's security page).
    recent_alerts: RecentAlerts = field(default_factory=RecentAlerts)
    # Single sign-on: the provider's keys, claims mapping and API token verifier (None: off).
    sso: SingleSignOn | None = None
