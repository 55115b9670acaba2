"""One immutable Settings object, read once at start and passed down.

Nothing in Bastion reads the environment except :meth:`Settings.load`, which the CLI calls
once per command.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast, get_args, get_type_hints

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
SECTIONS = (SERVER, REQUESTS, CONNECTIONS, SCHEDULING, WORKERS, E2E, KEYS, MODELS, SANDBOX)


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
    # SQLAlchemy URL of the database; by default SQLite in the home directory.
    database_url: str | None = _in(SERVER, None)
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
    # Runtimes beyond the built-in ones, as `name=python.module` pairs (comma-separated):
    # each module defines `load(source, options)` and must be importable by workers (on
    # PYTHONPATH, which the sandboxes mount read-only). For an operator's own runtimes,
    # and for the tests' hostile runtime; never settable through the API.
    extra_runtimes: str = _in(WORKERS, "")

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


def check_limit_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError unless each size-limit option present is a positive integer."""
    for name in LIMIT_OPTIONS:
        value = options.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 2**40
        ):
            raise ValueError(f"The {name} option must be a positive integer.")


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
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
