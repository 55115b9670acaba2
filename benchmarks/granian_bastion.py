"""Bastion's app, built as `bastion serve` builds it, for granian to serve (http_servers.py).

granian loads it as a factory: ``granian --interface asgi --factory granian_bastion:app``,
with BASTION_HOME naming an initialised home. Bastion's own connection protocol (the
connection cap, header and send timeouts, 413 before the body is read, cancellation of a
request whose client left) is uvicorn+httptools-specific and is not part of this run: it
measures the HTTP server alone under the same app.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from starlette.applications import Starlette

from bastion.api.app import create_app
from bastion.bootstrap import initialise
from bastion.config import Settings
from bastion.observability.logging import configure_logging
from bastion.observability.metrics import Metrics
from bastion.server import build_services


def app() -> Starlette:
    settings = Settings.load(home=Path(os.environ["BASTION_HOME"]), demo_models=False)
    configure_logging(settings.log_level)
    home = initialise(settings).home
    built = create_app(build_services(home, Metrics()))
    gc.collect()
    gc.freeze()
    return built
