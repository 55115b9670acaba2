"""Builds sandbox backends from the settings: the server's default and those models ask for."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from bastion.config import Settings
from bastion.errors import ConfigurationError
from bastion.sandboxes.base import MODEL_BACKENDS, SANDBOX_OPTION, Sandbox, check_sandbox_option
from bastion.sandboxes.bwrap import BwrapSandbox, WorkerLimits
from bastion.sandboxes.cgroups import CgroupLimits, detect
from bastion.sandboxes.docker import ContainerLimits, DockerSandbox
from bastion.sandboxes.uids import WorkerUids
from bastion.sandboxes.unconfined import SubprocessSandbox


def make_sandbox(
    settings: Settings, environ: Mapping[str, str] | None = None, *, backend: str | None = None
) -> Sandbox:
    """The sandbox backend the settings name (or `backend`); `environ` supplies
    PATH/PYTHONPATH for workers. "none" needs `unsafe_no_sandbox` too: it must never be
    chosen by accident. ConfigurationError if the backend is unknown or cannot run here."""
    name = backend or settings.sandbox
    if settings.unsafe_no_sandbox and backend is None:
        return SubprocessSandbox(environ)
    uids = worker_uids(settings) if name in MODEL_BACKENDS else None
    if name == "bwrap":
        cgroups, why_not = detect(
            CgroupLimits(
                memory_bytes=settings.worker_memory_bytes,
                cpus=settings.worker_cpus,
                processes=settings.worker_processes,
            )
        )
        if cgroups is None:
            logging.getLogger("bastion.sandboxes.cgroups").warning(
                "workers run without cgroup limits (memory, CPU, processes): %s; "
                "their rlimits still apply",
                why_not,
            )
        limits = WorkerLimits(
            address_space_bytes=settings.worker_address_space_bytes,
            open_files=settings.worker_open_files,
            processes=settings.worker_processes,
            file_bytes=settings.worker_file_bytes,
            tmp_bytes=settings.worker_tmp_bytes,
        )
        return BwrapSandbox(limits, environ=environ, cgroups=cgroups, uids=uids)
    if name == "docker":
        return DockerSandbox(
            ContainerLimits(
                memory_bytes=settings.worker_memory_bytes,
                cpus=settings.worker_cpus,
                processes=settings.worker_processes,
                open_files=settings.worker_open_files,
                file_bytes=settings.worker_file_bytes,
                tmp_bytes=settings.worker_tmp_bytes,
            ),
            environ=environ,
            uids=uids,
        )
    if name in ("none", "subprocess"):
        raise ConfigurationError(
            "BASTION_SANDBOX=none runs model code without isolation; it needs "
            "--unsafe-no-sandbox (or BASTION_UNSAFE_NO_SANDBOX=true) to say so."
        )
    raise ConfigurationError(f"Unknown sandbox backend {name!r}; known: bwrap, docker, none.")


def worker_uids(settings: Settings) -> WorkerUids | None:
    """The host uids a root gateway's workers run as; None when not root (workers then run
    as the gateway's own uid, which is not root either)."""
    if os.geteuid() != 0:
        return None
    return WorkerUids(settings.worker_uid_base, settings.worker_uid_count)


class Sandboxes:
    """The server's sandbox backend, and the others that models ask for by option.

    A model's ``sandbox`` option picks its backend; models without one use the default.
    Another backend is set up the first time a model asks for it (on a server without a
    sandbox too: a model may ask for more isolation, never for less); if it cannot run
    here, that model fails to load with the reason, and its next start tries again.
    """

    def __init__(
        self,
        default: Sandbox,
        settings: Settings | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.default = default
        self._settings = settings
        self._environ = environ
        self._others: dict[str, Sandbox] = {default.name: default}
        self._lock = threading.Lock()

    def for_options(self, options: Mapping[str, object]) -> Sandbox:
        """The backend for a model with these options; ConfigurationError if unavailable."""
        chosen = options.get(SANDBOX_OPTION)
        if chosen is None or chosen == self.default.name:
            return self.default
        check_sandbox_option(options)
        name = str(chosen)
        # Called from worker threads (setting a backend up blocks): one at a time.
        with self._lock:
            found = self._others.get(name)
            if found is None:
                if self._settings is None:
                    raise ConfigurationError(f"The {name} sandbox is not set up on this server.")
                found = make_sandbox(self._settings, self._environ, backend=name)
                found.check()
                self._others[name] = found
        return found

    def names(self) -> list[str]:
        """The backends set up so far, the default first."""
        return [self.default.name, *sorted(n for n in self._others if n != self.default.name)]
