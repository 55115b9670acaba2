"""One gateway's connection to Redis, and whether Redis answers.

A :class:`RedisLink` is one client (a small connection pool, short timeouts, no retries: a
retried script could apply twice, and a request must not wait for a dead server) shared by
everything in the gateway process that keeps state in Redis. The first call that fails
starts an *outage*: one warning in the log (never the URL, which holds the password), and
from then on callers do not try Redis at all (each try could cost the event loop a
timeout) until a probe in the background gets an answer again. What callers do meanwhile
is the failure policy, `fail_closed` (refuse: 503 ``limiter_unavailable``) or `fail_open`
(fall back to this gateway's own memory).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

logger = logging.getLogger("bastion.redis")

FAIL_CLOSED = "fail_closed"
FAIL_OPEN = "fail_open"
POLICIES = (FAIL_CLOSED, FAIL_OPEN)

# How often Redis is asked whether it answers again, during an outage.
PROBE_INTERVAL_S = 0.5


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One run of a Lua script: its text (and SHA-1, by which Redis knows it), keys, args."""

    script: Script
    keys: Sequence[str]
    args: Sequence[str | int | float]


class Script:
    """A Lua script, known to Redis by its SHA-1 once loaded."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> ScriptCall:
        return ScriptCall(self, keys, args)


class RedisLink:
    """A Redis client and the state of its link; see the module docstring. Thread-safe."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        policy: str = FAIL_CLOSED,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"the failure policy is one of {', '.join(POLICIES)}")
        self.client = client
        self.fail_open = policy == FAIL_OPEN
        self._probe_interval_s = probe_interval_s
        self._lock = threading.Lock()
        self._available = True
        self._down_since = 0.0
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        # The scripts loaded into Redis, by SHA-1.
        self._scripts: dict[str, Script] = {}
        #: Outages seen since start (each logged once).
        self.outages = 0

    @classmethod
    def connect(cls, url: str, *, timeout_s: float, policy: str = FAIL_CLOSED) -> RedisLink:
        """A link to the Redis at `url` (redis://, rediss:// or unix://; the password in it
        stays in the client). Nothing is sent yet."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=32,
            client_name="bastion",
        )
        return cls(client, policy=policy)

    @property
    def available(self) -> bool:
        """False during an outage: from a failed call until Redis answers a probe."""
        return self._available

    def check(self) -> bool:
        """Ask Redis now (at start); an outage begins if it does not answer."""
        try:
            self.client.ping()
        except RedisError as exc:
            self.failed(exc)
            return False
        return True

    def failed(self, exc: BaseException) -> None:
        """A call to Redis failed: an outage begins, if one has not already."""
        with self._lock:
            if not self._available or self._closed.is_set():
                return
            self._available = False
            self._down_since = time.monotonic()
            self.outages += 1
            # fail_open: this gateway's own limits and replay cache apply meanwhile;
            # fail_closed: requests that need them are refused (503 limiter_unavailable).
            logger.warning(
                "Redis does not answer; its failure policy applies until it does",
                extra={
                    "exc_type": type(exc).__name__,
                    "policy": FAIL_OPEN if self.fail_open else FAIL_CLOSED,
                },
            )
            self._prober = threading.Thread(
                target=self._probe, name="bastion-redis-probe", daemon=True
            )
            self._prober.start()

    def run(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run `calls` in order, in one round trip; each result, or the ResponseError of a
        script that failed. RedisError if Redis cannot be reached (the caller decides what
        that means: see `failed`).

        Every script is loaded before its first run, so that a pipeline never runs some of
        its calls and skips others; a Redis that restarted (and so knows none) gets them all
        again and the calls are sent again, in order."""
        new = [call.script for call in calls if call.script.sha not in self._scripts]
        if new:
            self._load([*self._scripts.values(), *new])
        results = self._send(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            self._load(list(self._scripts.values()))
            again = self._send([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    def _load(self, scripts: Sequence[Script]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for script in scripts:
            pipe.script_load(script.text)
        pipe.execute()
        with self._lock:
            self._scripts.update((script.sha, script) for script in scripts)

    def _send(self, calls: Sequence[ScriptCall]) -> list[Any]:
        if len(calls) == 1:
            call = calls[0]
            try:
                return [
                    self.client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                ]
            except NoScriptError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        return pipe.execute(raise_on_error=False)

    def close(self) -> None:
        """Stop probing and close the connections."""
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=5)
        self.client.close()

    def _probe(self) -> None:
        while not self._closed.wait(self._probe_interval_s):
            try:
                self.client.ping()
            except RedisError:
                continue
            with self._lock:
                self._available = True
                down_s = time.monotonic() - self._down_since
            logger.info("Redis answers again", extra={"outage_s": round(down_s, 1)})
            return
