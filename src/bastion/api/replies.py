"""Turning worker replies into answers or errors."""

from __future__ import annotations

from typing import TypeVar

from bastion.errors import BastionError, InvalidRequest, ModelUnavailable
from bastion.wire.protocol import FromWorker, RequestFailed

R = TypeVar("R")


def raise_for_failure(reply: FromWorker) -> None:
    """Raise the client-facing error for a worker's refusal; do nothing otherwise."""
    if isinstance(reply, RequestFailed):
        if 400 <= reply.status < 500:
            raise InvalidRequest(reply.message, code=reply.code)
        if reply.status == 503:
            raise ModelUnavailable(reply.message, code=reply.code, retry_after_s=2)
        raise BastionError("The model failed to process the request.", code=reply.code)


def expect(reply: FromWorker, kind: type[R]) -> R:
    """The reply as `kind`, or the error the worker reported."""
    raise_for_failure(reply)
    if not isinstance(reply, kind):
        raise BastionError("The worker sent an unexpected reply.", code="worker_protocol")
    return reply
