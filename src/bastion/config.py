"""One immutable Settings object, read once at start and passed down.

Nothing in Bastion reads the environment except :meth:`Settings.load`, which the CLI calls
once per command.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast, get_args, get_type_hints

from bastion.errors import ConfigurationError
from bastion.wire.protocol import LIMIT_OPTIONS, RequestLimits, SizeLimits

DEFAULT_HOME = Path(".bastion")
MiB = 1024 * 1024

# The sections settings are grouped in (docs/configuration.md lists them so).
SERVER = "server"
REQUESTS = "requests"
CONNECTIONS = "connections"
SCHEDULING = "scheduling"
WORKERS = "workers"
E2E = "end-to-end encryption"
KEYS = "key ring"
MODELS = "models"
SANDBOX = "sandbox"
TRANSPORT = "transport"
CLUSTER = "cluster"
AUDIT = "audit log"
ALERTS = "alerts"
AUTHENTICATION = "authentication"
SECTIONS = (
    SERVER,
    TRANSPORT,
    AUDIT,
    ALERTS,
    REQUESTS,
    CONNECTIONS,
    AUTHENTICATION,
    SCHEDULING,
    WORKERS,
    E2E,
    KEYS,
    MODELS,
    SANDBOX,
    CLUSTER,
)


def _in(section: str, default: Any, *, secret: bool = False) -> Any:
    """A setting of `section`; a secret one is never shown in reprs or logs."""
    return field(default=default, repr=not secret, metadata={"section": section})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a Bastion process needs to know, fixed at start."""

    home: Path = _in(SERVER, DEFAULT_HOME)  # noqa: RUF009 - a field specifier, like field()
    host: str = _in(SERVER, "127.0.0.1")
    port: int = _in(SERVER, 8000)
    # Largest request body accepted, checked before the body is read in full.
    max_body_bytes: int = _in(REQUESTS, 1 * MiB)
    # Largest `n` (choices per request) a chat or completion request may ask for.
    max_choices: int = _in(REQUESTS, 4)
    # Largest `max_tokens` a request may ask for.
    max_tokens_limit: int = _in(REQUESTS, 4096)
    # Open Inference Protocol inputs: the largest batch (first dimension, or number of
    # BYTES items) and the most elements per request; and the largest answer body the
    # gateway builds (JSON of a big tensor is many times its raw size). Each can be set
    # per model with the options max_batch, max_input_elements and max_answer_bytes.
    oip_max_batch: int = _in(REQUESTS, 2048)
    oip_max_elements: int = _in(REQUESTS, 4 * 1024 * 1024)
    max_answer_bytes: int = _in(REQUESTS, 64 * MiB)
    # How long a request may wait for its answer before the client gets 504 (one deadline
    # for the whole request, however many calls to the model it makes).
    request_timeout_s: float = _in(REQUESTS, 60.0)
    # Connections: the most open at once (more are closed at once), how long a client may
    # take to send a request's headers (also a kept-alive connection's next request), to
    # send its body (408), and to read the answer (a client that stops reading is cut off,
    # and what was held for it freed); how long an idle kept-alive connection stays open.
    max_connections: int = _in(CONNECTIONS, 2048)
    header_timeout_s: float = _in(CONNECTIONS, 10.0)
    body_timeout_s: float = _in(CONNECTIONS, 30.0)
    send_timeout_s: float = _in(CONNECTIONS, 30.0)
    keepalive_timeout_s: float = _in(CONNECTIONS, 5.0)
    # Throttle of failed authentication (docs/threat-model.md): this many failures within
    # the window, from one client address (IPv6: its /64) or with wrong secrets for one key
    # id, lock it out for the initial back-off, doubled by each further failure up to the
    # maximum: its failures get 429 with Retry-After instead of 401. A request with a valid
    # key is never refused. 0 failures: no throttle.
    auth_throttle_failures: int = _in(AUTHENTICATION, 10)
    auth_throttle_window_s: float = _in(AUTHENTICATION, 60.0)
    auth_throttle_backoff_initial_s: float = _in(AUTHENTICATION, 1.0)
    auth_throttle_backoff_max_s: float = _in(AUTHENTICATION, 900.0)
    # Single sign-on (docs/sso.md), on when the issuer and audience are set: JWT bearer
    # tokens of this OpenID Connect issuer (https; its discovery document names its keys,
    # re-read every jwks_ttl_s) are accepted beside API keys, signed with one of the
    # algorithms (comma-separated, asymmetric only), with the leeway for clock skew. The
    # tenant is the tenant claim's value (a dotted name reaches into nested claims), or
    # with a pattern (a regular expression with one group) what the group matches in that
    # claim's values; the role is the role claim's value, or looked up in the role map
    # ("value=role,value=role"; roles admin, tenant-admin, consumer).
    jwt_issuer: str | None = _in(AUTHENTICATION, None)
    jwt_audience: str | None = _in(AUTHENTICATION, None)
    jwt_algorithms: str = _in(AUTHENTICATION, "RS256,ES256,EdDSA")
    jwt_leeway_s: float = _in(AUTHENTICATION, 30.0)
    jwt_jwks_ttl_s: float = _in(AUTHENTICATION, 300.0)
    jwt_tenant_claim: str = _in(AUTHENTICATION, "bastion_tenant")
    jwt_tenant_pattern: str = _in(AUTHENTICATION, "")
    jwt_role_claim: str = _in(AUTHENTICATION, "bastion_role")
    jwt_role_map: str = _in(AUTHENTICATION, "")
    # The console's sign-in at the same issuer (authorization code + PKCE): its client id,
    # its secret given itself or as a file holding it (neither: a public client), and the
    # console's callback URL as registered at the provider.
    oidc_client_id: str | None = _in(AUTHENTICATION, None)
    oidc_client_secret: str | None = _in(AUTHENTICATION, None, secret=True)
    oidc_client_secret_file: str | None = _in(AUTHENTICATION, None)
    oidc_redirect_url: str | None = _in(AUTHENTICATION, None)
    # The admin console's sessions (docs/console.md): one ends after this long without a
    # request, and in any case this long after its sign-in.
    console_idle_timeout_s: float = _in(AUTHENTICATION, 1800.0)
    console_session_max_s: float = _in(AUTHENTICATION, 8 * 3600.0)
    # Requests each model's worker holds at once; the rest wait in the model's fair queue
    # (weighted fair queuing across tenants), which holds at most `queue_size` requests.
    # 0 (the default) adapts it per model (bastion.quotas.window): the fewest that keep the
    # worker busy, at least the model's batch size, at most `model_window_max` (or twice
    # the batch size). A positive value fixes it; 1 gives the fairest latencies.
    model_concurrency: int = _in(SCHEDULING, 0)
    model_window_max: int = _in(SCHEDULING, 8)
    queue_size: int = _in(SCHEDULING, 256)
    # How long sealed records of watermarked classifier answers are kept (for
    # `bastion protect verify`), in days.
    watermark_retention_days: float = _in(SERVER, 30.0)
    # The tamper-evident audit log (docs/audit.md): records older than the retention are
    # pruned with a signed note (180 days: the EU AI Act's six months); a checkpoint is
    # signed every N records or T seconds; the whole log is verified on a schedule.
    # Off only for measurements (benchmarks/audit.py): then nothing is recorded and the
    # server warns at start.
    audit_enabled: bool = _in(AUDIT, True)
    audit_retention_days: float = _in(AUDIT, 180.0)
    audit_checkpoint_every: int = _in(AUDIT, 256)
    audit_checkpoint_interval_s: float = _in(AUDIT, 10.0)
    audit_verify_interval_s: float = _in(AUDIT, 6 * 3600.0)
    # The log's name in its checkpoints (c2sp.org/tlog-checkpoint origin), fixed when the
    # log's key is made; by default "bastion/audit/<random id>".
    audit_origin: str = _in(AUDIT, "")
    # Security alerts (docs/alerts.md): a rules file (TOML, or JSON by its .json suffix)
    # that changes the default rules; the webhook alerts are POSTed to (http or https),
    # signed with HMAC-SHA-256 by a secret given itself or as a file holding it (one).
    # `bastion serve` refuses to start if any of them is not valid.
    alert_rules: str | None = _in(ALERTS, None)
    # A secret: its path or query may hold the receiver's token, its user part a password.
    alert_webhook_url: str | None = _in(ALERTS, None, secret=True)
    alert_webhook_secret: str | None = _in(ALERTS, None, secret=True)
    alert_webhook_secret_file: str | None = _in(ALERTS, None)
    # Redis (docs/scaling.md), for several gateways: the rate limits, concurrency slots and
    # daily budgets they share, and the OHTTP replay cache (None: both in this process's
    # memory). A redis://, rediss:// or unix:// URL; a secret (it may hold the password).
    # When Redis does not answer: fail_closed refuses what needs it (503
    # limiter_unavailable), fail_open applies this gateway's own limits until it answers.
    # Key names start with the prefix; each call waits at most the timeout; a request's
    # concurrency slot is a lease of this life, renewed while it runs (a dead gateway's
    # slots come back after it).
    redis_url: str | None = _in(SERVER, None, secret=True)
    redis_failure_policy: str = _in(SERVER, "fail_closed")
    redis_key_prefix: str = _in(SERVER, "bastion:")
    redis_timeout_s: float = _in(SERVER, 0.5)
    redis_lease_ttl_s: float = _in(SERVER, 30.0)
    # How often metered usage (requests, tokens, compute seconds) is written to the database.
    usage_flush_interval_s: float = _in(SERVER, 5.0)
    # How often the gateway re-reads keys, tenants and models from the database.
    refresh_interval_s: float = _in(SERVER, 1.0)
    heartbeat_interval_s: float = _in(WORKERS, 1.0)
    # A worker that sends no heartbeat for this long is killed and restarted.
    heartbeat_timeout_s: float = _in(WORKERS, 15.0)
    restart_backoff_initial_s: float = _in(WORKERS, 0.5)
    restart_backoff_max_s: float = _in(WORKERS, 30.0)
    # On SIGTERM, in-flight requests get this long to finish before workers stop.
    drain_timeout_s: float = _in(SERVER, 30.0)
    # How long a worker may take to load its model before it counts as failed.
    load_timeout_s: float = _in(WORKERS, 300.0)
    log_level: str = _in(SERVER, "info")
    # Register and load the built-in demo models on first start.
    demo_models: bool = _in(SERVER, True)
    # SQLAlchemy URL of the database; by default SQLite in the home directory. PostgreSQL:
    # postgresql+psycopg://USER@HOST:PORT/NAME (docs/database.md); a secret, since it may
    # hold a password (better left out of it: libpq reads PGPASSWORD and ~/.pgpass).
    database_url: str | None = _in(SERVER, None, secret=True)
    # PostgreSQL only: the connections each process keeps open, how many more it may open
    # under load, how long a request waits for a free one before it is refused (503),
    # how long opening one may take, and after how long one is replaced.
    database_pool_size: int = _in(SERVER, 5)
    database_max_overflow: int = _in(SERVER, 10)
    database_pool_timeout_s: float = _in(SERVER, 10.0)
    database_connect_timeout_s: int = _in(SERVER, 5)
    database_pool_recycle_s: float = _in(SERVER, 1800.0)
    # The KEMs of the OHTTP keys the server publishes and accepts, preferred first: the
    # post-quantum hybrid (mlkem768-x25519, X-Wing), ML-KEM-768 alone (mlkem768), and the
    # classical x25519 that older clients need.
    ohttp_kems: str = _in(E2E, "mlkem768-x25519,x25519")
    # Accept only post-quantum key configurations: classical ones are neither published nor
    # accepted (a client that sends one is told to fetch the configuration again).
    ohttp_require_pq: bool = _in(E2E, False)
    # After `bastion ohttp rotate`, the previous OHTTP key is still accepted this long.
    ohttp_grace_period_s: float = _in(E2E, 24 * 3600.0)
    # An encrypted request's inner Date may be this far from the server's clock; the same
    # encapsulated request is refused if seen again within twice this window.
    ohttp_date_window_s: float = _in(E2E, 60.0)
    # Most encapsulated-request ids remembered for replay detection; beyond it, new OHTTP
    # requests are refused (503) rather than accepted unchecked.
    ohttp_replay_cache_entries: int = _in(E2E, 1_000_000)
    # Who holds the key-encryption key of the key ring: "local" (derived from the master
    # key) or "transit" (HashiCorp Vault / OpenBao Transit).
    kek_provider: str = _in(KEYS, "local")
    transit_url: str | None = _in(KEYS, None)
    transit_key: str = _in(KEYS, "bastion")
    transit_mount: str = _in(KEYS, "transit")
    # A secret: never shown in reprs or logs.
    transit_token: str | None = _in(KEYS, None, secret=True)
    # Trust policy for model bundles: with require_publisher, a bundle loads only if it
    # carries a signature by one of these publishers' public keys (PEM files, separated
    # by the OS path separator).
    require_publisher: bool = _in(MODELS, False)
    trusted_publisher_keys: str | None = _in(MODELS, None)
    # Limits of `bastion models import`: largest file, largest model, most files, and
    # ONNX operator domains accepted beyond the standard ones (comma-separated).
    import_max_file_bytes: int = _in(MODELS, 64 * 1024 * MiB)
    import_max_total_bytes: int = _in(MODELS, 512 * 1024 * MiB)
    import_max_files: int = _in(MODELS, 10_000)
    import_onnx_domains: str = _in(MODELS, "")
    # How workers are isolated: "bwrap" (bubblewrap, the default) or "none" (plain
    # subprocesses), which also needs unsafe_no_sandbox (`serve --unsafe-no-sandbox`).
    sandbox: str = _in(SANDBOX, "bwrap")
    unsafe_no_sandbox: bool = _in(SANDBOX, False)
    # Hard limits of each sandboxed worker (0: none of that kind).
    worker_address_space_bytes: int = _in(SANDBOX, 32 * 1024 * 1024 * MiB)
    worker_open_files: int = _in(SANDBOX, 4096)
    worker_processes: int = _in(SANDBOX, 512)
    worker_file_bytes: int = _in(SANDBOX, 1024 * MiB)
    worker_tmp_bytes: int = _in(SANDBOX, 256 * MiB)
    # cgroup limits of each sandboxed worker, where the host allows them (0: none).
    worker_memory_bytes: int = _in(SANDBOX, 8 * 1024 * MiB)
    worker_cpus: float = _in(SANDBOX, 0.0)
    # A root gateway runs each worker as a host uid of its own from base + 1 … base +
    # count (no /etc/passwd entry needed); base itself is the workers' shared group, which
    # may read the bundles they serve. Never root, never shared by two workers at once.
    worker_uid_base: int = _in(SANDBOX, 1_900_000_000)
    worker_uid_count: int = _in(SANDBOX, 4096)
    # A cluster that places model workers on its nodes (docs/scaling.md): "ray://HOST:PORT"
    # (Ray Client; this process needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH like
    # every Ray process). Unset: workers run on this host. Set: every model's workers run
    # on Ray nodes, each in that node's own sandbox (cluster_node_sandbox), and dial back
    # to this gateway's worker port, HOST:PORT where it listens (worker_listen) and the
    # HOST:PORT they dial (worker_advertise; default: worker_listen), over mutual TLS 1.3
    # with the cluster CA (`bastion init --cluster`); each replica's certificate is valid
    # for replica_cert_lifetime_s.
    cluster: str | None = _in(CLUSTER, None)
    worker_listen: str | None = _in(CLUSTER, None)
    worker_advertise: str | None = _in(CLUSTER, None)
    cluster_node_sandbox: str = _in(CLUSTER, "bwrap")
    replica_cert_lifetime_s: float = _in(CLUSTER, 86_400.0)
    # Runtimes beyond the built-in ones, as `name=python.module` pairs (comma-separated):
    # each module defines `load(source, options)` and must be importable by workers (on
    # PYTHONPATH, which the sandboxes mount read-only). For an operator's own runtimes,
    # and for the tests' hostile runtime; never settable through the API.
    extra_runtimes: str = _in(WORKERS, "")
    # TLS on the gateway's listeners: a PEM certificate (chain) and its private key, both
    # or neither (`serve --tls-cert/--tls-key`; `bastion init --self-signed` writes a
    # development pair). TLS 1.2 and 1.3 only, forward-secret AEAD ciphers. The key file
    # must not be readable by every user (docs/tls.md).
    tls_cert: str | None = _in(TRANSPORT, None)
    tls_key: str | None = _in(TRANSPORT, None)
    # A listener of its own for the admin API, HOST:PORT or PORT (then on 127.0.0.1)
    # (`serve --admin-listen`): the public listener then answers admin routes 404.
    admin_listen: str | None = _in(TRANSPORT, None)
    # A PEM file of the CA(s) whose client certificates the admin listener requires
    # (mutual TLS; `serve --admin-client-ca`). Needs TLS and admin_listen.
    admin_tls_client_ca: str | None = _in(TRANSPORT, None)
    # Origins (scheme://host[:port], comma-separated) whose web pages may call the
    # inference API (/v1, /v2) from a browser. None by default: no CORS headers at all.
    cors_origins: str = _in(TRANSPORT, "")

    def listeners(self) -> ListenerSettings:
        """The TLS files, admin listener and CORS origins, checked; ConfigurationError if
        they do not fit together (the files themselves are read by bastion.tls)."""
        cert, key = self.tls_cert or None, self.tls_key or None
        if (cert is None) != (key is None):
            raise ConfigurationError(
                "TLS needs both a certificate and its key (--tls-cert and --tls-key, or "
                "BASTION_TLS_CERT and BASTION_TLS_KEY); only one was given."
            )
        tls = (Path(cert), Path(key)) if cert is not None and key is not None else None
        admin = _host_port(self.admin_listen) if self.admin_listen else None
        client_ca = Path(self.admin_tls_client_ca) if self.admin_tls_client_ca else None
        if client_ca is not None and admin is None:
            raise ConfigurationError(
                "A client CA (BASTION_ADMIN_TLS_CLIENT_CA) is for the admin listener: "
                "set BASTION_ADMIN_LISTEN (--admin-listen) too."
            )
        if client_ca is not None and tls is None:
            raise ConfigurationError(
                "Client certificates (BASTION_ADMIN_TLS_CLIENT_CA) need TLS: set "
                "BASTION_TLS_CERT and BASTION_TLS_KEY (--tls-cert, --tls-key) too."
            )
        if admin is not None and admin == (self.host, self.port):
            raise ConfigurationError("The admin listener needs an address of its own.")
        origins = tuple(_origin(o) for o in self.cors_origins.split(",") if o.strip())
        return ListenerSettings(
            tls=tls, admin=admin, admin_client_ca=client_ca, cors_origins=origins
        )

    def single_sign_on(self) -> SsoSettings | None:
        """The single sign-on settings, parsed, or None when it is off; ConfigurationError
        if they do not fit together. (bastion.identity checks algorithms, roles and URLs
        again when it is built from them, and raises ValueError.)"""
        issuer, audience = self.jwt_issuer or None, self.jwt_audience or None
        client_id = self.oidc_client_id or None
        if issuer is None:
            if audience is not None or client_id is not None:
                raise ConfigurationError(
                    "Single sign-on needs the issuer: set BASTION_JWT_ISSUER too."
                )
            return None
        if audience is None and client_id is None:
            raise ConfigurationError(
                "Single sign-on needs BASTION_JWT_AUDIENCE (for API bearer tokens), "
                "BASTION_OIDC_CLIENT_ID (for the console's sign-in) or both."
            )
        if audience is not None and audience == client_id:
            raise ConfigurationError(
                "BASTION_JWT_AUDIENCE must differ from BASTION_OIDC_CLIENT_ID: otherwise the "
                "console's ID tokens would open the API."
            )
        algorithms = tuple(a.strip() for a in self.jwt_algorithms.split(",") if a.strip())
        if not algorithms or any(
            a.lower() == "none" or a.upper().startswith("HS") for a in algorithms
        ):
            raise ConfigurationError(
                "BASTION_JWT_ALGORITHMS: asymmetric algorithms only (such as RS256, ES256, "
                "EdDSA), comma-separated; never none or HMAC."
            )
        role_map: dict[str, str] = {}
        for entry in self.jwt_role_map.split(","):
            if entry.strip():
                value, sep, role = (part.strip() for part in entry.rpartition("="))
                if not sep or not value or not role:
                    raise ConfigurationError(
                        "BASTION_JWT_ROLE_MAP: each entry is value=role, comma-separated."
                    )
                role_map[value] = role
        secret = self.oidc_client_secret or None
        if client_id is not None:
            if secret is not None and self.oidc_client_secret_file:
                raise ConfigurationError(
                    "Give the OIDC client secret itself or as a file, not both "
                    "(BASTION_OIDC_CLIENT_SECRET, BASTION_OIDC_CLIENT_SECRET_FILE)."
                )
            if self.oidc_client_secret_file:
                try:
                    secret = Path(self.oidc_client_secret_file).read_text().strip() or None
                except OSError as exc:
                    raise ConfigurationError(
                        "BASTION_OIDC_CLIENT_SECRET_FILE cannot be read."
                    ) from exc
            if not self.oidc_redirect_url:
                raise ConfigurationError(
                    "The console's sign-in needs its callback URL: set BASTION_OIDC_REDIRECT_URL."
                )
        return SsoSettings(
            issuer=issuer,
            audience=audience,
            algorithms=algorithms,
            leeway_s=self.jwt_leeway_s,
            jwks_ttl_s=self.jwt_jwks_ttl_s,
            tenant_claim=self.jwt_tenant_claim,
            tenant_pattern=self.jwt_tenant_pattern or None,
            role_claim=self.jwt_role_claim,
            role_map=role_map,
            client_id=client_id,
            client_secret=secret if client_id is not None else None,
            redirect_url=self.oidc_redirect_url if client_id is not None else None,
        )

    def runtime_modules(self) -> dict[str, str]:
        """The extra runtimes: name -> module (ValueError if malformed)."""
        found: dict[str, str] = {}
        for entry in self.extra_runtimes.split(","):
            if not entry.strip():
                continue
            name, sep, module = (part.strip() for part in entry.partition("="))
            if not sep or not name or not _MODULE.fullmatch(module):
                raise ValueError(
                    "BASTION_EXTRA_RUNTIMES: each entry is name=python.module, comma-separated."
                )
            found[name] = module
        return found

    def publisher_keys(self) -> list[bytes]:
        """The trusted publishers' public keys (PEM), read from their files."""
        if not self.trusted_publisher_keys:
            return []
        return [Path(p).read_bytes() for p in self.trusted_publisher_keys.split(os.pathsep) if p]

    @property
    def db_path(self) -> Path:
        return self.home / "bastion.db"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def master_key_path(self) -> Path:
        return self.home / "master.key"

    @property
    def admin_key_path(self) -> Path:
        return self.home / "admin.key"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_body_bytes=self.max_body_bytes,
            max_tokens_limit=self.max_tokens_limit,
            max_choices=self.max_choices,
        )

    @property
    def size_limits(self) -> SizeLimits:
        """The size limits of a model without options of its own."""
        return SizeLimits(
            max_batch=self.oip_max_batch,
            max_input_elements=self.oip_max_elements,
            max_answer_bytes=self.max_answer_bytes,
        )

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `BASTION_*` environment variables and explicit overrides.

        Explicit overrides (from CLI flags) win over the environment; `None` means "not given".
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            raw = env.get(variable.name)
            if raw is not None and raw != "":
                try:
                    values[name] = variable.read(raw)
                except ValueError as exc:
                    raise ValueError(f"{variable.name}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        # Absolute from here on: workers run in directories of their own, so a path
        # relative to the directory Bastion was started from would not resolve there.
        values["home"] = Path(values.get("home", DEFAULT_HOME)).expanduser().absolute()
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """How the gateway listens, checked (Settings.listeners)."""

    # (certificate, key) PEM files, or None: plain HTTP.
    tls: tuple[Path, Path] | None
    # The admin listener's (host, port), or None: one listener serves every route.
    admin: tuple[str, int] | None
    admin_client_ca: Path | None
    cors_origins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SsoSettings:
    """Single sign-on, parsed (Settings.single_sign_on): what bastion.identity's
    TokenPolicy, ClaimsMapping, JwksCache and OidcClientConfig are built from."""

    issuer: str
    # The audience API bearer tokens must name (None: none are accepted).
    audience: str | None
    algorithms: tuple[str, ...]
    leeway_s: float
    jwks_ttl_s: float
    tenant_claim: str
    tenant_pattern: str | None
    role_claim: str
    role_map: Mapping[str, str]
    # The console's client (None: no console sign-in).
    client_id: str | None
    client_secret: str | None = field(repr=False)
    redirect_url: str | None


def _host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or PORT (then on 127.0.0.1); ConfigurationError if malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        valid = port.isdigit() and 0 < int(port) < 65536
        if ":" in host:
            valid = valid and bracketed and ipaddress.IPv6Address(host) is not None
        else:
            valid = valid and not bracketed and _HOST.fullmatch(host) is not None
    except ValueError:
        valid = False
    if not valid:
        raise ConfigurationError(
            f"BASTION_ADMIN_LISTEN (--admin-listen) must be HOST:PORT, [IPv6]:PORT or PORT, "
            f"not {text!r}."
        )
    return host, int(port)


def _origin(text: str) -> str:
    """An origin as browsers send it (lowercase, no default port); ConfigurationError if
    it is not scheme://host[:port]."""
    origin = text.strip().lower()
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        raise ConfigurationError(
            f"BASTION_CORS_ORIGINS: {text.strip()!r} is not an origin: scheme://host[:port] "
            "(http or https; no path, no wildcard), comma-separated."
        )
    scheme, port = match["scheme"], match["port"]
    if port is not None and int(port) == {"http": 80, "https": 443}[scheme]:
        origin = origin.rsplit(":", 1)[0]
    return origin


def check_limit_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless each size-limit option present is a positive integer."""
    for name in LIMIT_OPTIONS:
        value = options.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 2**40
        ):
            raise ValueError(f"The {name} option must be a positive integer.")


#: The model option that says how many workers serve it.
REPLICAS_OPTION = "replicas"
#: The most replicas a model may have on one gateway: each holds the whole model in memory.
MAX_REPLICAS = 64
#: The model options that say what each replica needs of a cluster node (a number of CPUs
#: and of GPUs, and memory: bastion.cluster.ray hands them to Ray's scheduler).
RESOURCE_OPTIONS = ("cpus", "gpus", "memory")
_MEMORY_UNITS = {
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "b": 1,
    "": 1,
}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)")


def replica_count(options: Mapping[str, object]) -> int:
    """How many workers a model with these options runs; raises ConfigurationError unless
    its `replicas` option, if any, is an integer from 1 to MAX_REPLICAS."""
    value = options.get(REPLICAS_OPTION)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
        raise ConfigurationError(
            f"The {REPLICAS_OPTION} option must be an integer from 1 to {MAX_REPLICAS}; "
            f"got {str(value)[:40]!r}."
        )
    return value


def parse_memory(value: object) -> int:
    """Bytes from a positive number or a text such as "512MiB", "2GiB", "1.5G", "4096";
    ConfigurationError if it is none of these."""
    amount = -1.0
    unit = ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount = float(value)
    elif isinstance(value, str):
        found = _SIZE.fullmatch(value.strip())
        if found is not None:
            amount, unit = float(found.group(1)), found.group(2).lower()
    if unit not in _MEMORY_UNITS or not 0 < amount < math.inf or amount * _MEMORY_UNITS[unit] < 1:
        raise ConfigurationError(
            f"The memory option must be a size such as 2GiB or a number of bytes; "
            f"got {str(value)[:40]!r}."
        )
    return int(amount * _MEMORY_UNITS[unit])


def _resource_count(name: str, value: object) -> float:
    """A number of CPUs or GPUs (a number or its text, fractions allowed) of at least 0."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if not 0 <= number < math.inf:
        raise ConfigurationError(
            f"The {name} option must be a number of at least 0; got {str(value)[:40]!r}."
        )
    return number


def check_replica_options(options: Mapping[str, object]) -> None:
    """Raise ConfigurationError unless the options that say how a model's replicas run,
    those present, are valid: `replicas` (1 to MAX_REPLICAS), `cpus` and `gpus` (numbers
    of at least 0) and `memory` (a size such as 2GiB, or bytes)."""
    replica_count(options)
    for name in ("cpus", "gpus"):
        if name in options:
            _resource_count(name, options[name])
    if "memory" in options:
        parse_memory(options["memory"])


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _caster(kind: Any) -> Callable[[str], Any]:
    """How a BASTION_* value becomes a field of type `kind`."""
    if kind is bool:
        return _parse_bool
    if kind in (int, float, str, Path):
        return cast(Callable[[str], Any], kind)
    if set(get_args(kind)) == {str, type(None)}:
        return str
    raise TypeError(f"no environment form for a setting of type {kind!r}")


@dataclass(frozen=True, slots=True)
class EnvironmentVariable:
    """One BASTION_* variable: the setting it sets, its section and how it is read."""

    name: str
    setting: str
    section: str
    read: Callable[[str], Any]


def _environment() -> dict[str, EnvironmentVariable]:
    hints = get_type_hints(Settings)
    return {
        f.name: EnvironmentVariable(
            name=f"BASTION_{f.name.upper()}",
            setting=f.name,
            section=f.metadata["section"],
            read=_caster(hints[f.name]),
        )
        for f in fields(Settings)
    }


# Every setting, its environment variable and section: derived from Settings itself, so a
# new setting cannot be forgotten here.
ENVIRONMENT = _environment()
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
# An origin: scheme, host (a name, or an IPv6 address in brackets), port; nothing else.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://([a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(:(?P<port>[0-9]{1,5}))?"
)
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
