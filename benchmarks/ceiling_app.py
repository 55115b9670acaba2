"""The Python ceiling: the least a uvicorn + httptools + uvloop server can do per POST.

One Starlette route that answers a fixed small JSON body without reading the request, no
auth, no routing beyond one path. Bastion runs on the same stack, so the gap between this
and Bastion is what Bastion's own work costs.

Run (gateway.py does): python -m uvicorn ceiling_app:app --app-dir benchmarks --loop uvloop
--http httptools --no-access-log --log-level warning --no-server-header
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def answer(request: Request) -> JSONResponse:
    return JSONResponse({"output": 3})


app = Starlette(routes=[Route("/predict", answer, methods=["POST"])])
