"""The gateway's side of end-to-end encryption: which OHTTP keys it publishes and accepts,
what it hands the workers, and the replay guard. It never opens a request.

The replay guard is this gateway's memory (:class:`ReplayGuard`), or, with several
gateways, Redis (:class:`RedisReplayGuard`), so that a request replayed to another gateway
is refused too.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.exceptions import RedisError

from bastion.config import Settings
from bastion.crypto import hpke, ohttp
from bastion.errors import InvalidRequest, LimiterUnavailable, ModelUnavailable
from bastion.gateway.ohttp_keys import ActiveKey, offered_kems
from bastion.quotas.redis import RedisLink
from bastion.wire.protocol import OhttpKey, OhttpSuite, SealingKeys

# A replay guard keeps an `enc` of up to this many bytes as it is, a longer one hashed.
_REPLAY_ID_BYTES = 32


class OhttpKeyProblem(InvalidRequest):
    """The request names a key id or algorithms this gateway does not accept (RFC 9458 §5.3)."""


class Replayed(InvalidRequest):
    """This encapsulated request was seen before (RFC 9458 §6.5)."""


class Replays(Protocol):
    """What the gateway asks of a replay guard."""

    def check(self, enc: bytes) -> None:
        """Record `enc`; raise Replayed if it was recorded within the window."""
        ...

    def forget(self, enc: bytes) -> None:
        """Forget a request that did not decrypt."""
        ...


def _replayed() -> Replayed:
    return Replayed("This encrypted request was already received.", code="ohttp_replay")


class ReplayGuard:
    """Remembers the `enc` of each encapsulated request for `ttl_s`; a repeat is refused.

    `enc` is the client's fresh ephemeral public key: two honest requests never share one,
    so a repeat within the window is a replay. Requests older than the window are refused
    by the worker for their stale Date, so forgetting `enc` afterwards is safe. The guard
    is bounded: when full, new requests are refused (fail closed) until entries expire.
    """

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        # Insertion order is expiry order: the TTL is the same for all entries.
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, enc: bytes) -> None:
        """Record `enc`; raise Replayed if it was recorded within the window."""
        now = self._clock()
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now:
                break
            seen.popitem(last=False)
        if enc in seen:
            raise _replayed()
        if len(seen) >= self._max_entries:
            raise ModelUnavailable(
                "Too many encrypted requests to check for replays; retry shortly.", retry_after_s=5
            )
        seen[enc] = now + self._ttl_s

    def forget(self, enc: bytes) -> None:
        """Forget a request that did not decrypt: it ran nothing, and keeping its `enc`
        would let anyone who saw it in flight block the genuine request with a forged copy."""
        self._seen.pop(enc, None)


def local_replay_guard(settings: Settings) -> ReplayGuard:
    """This gateway's own replay guard, as the settings size it."""
    return ReplayGuard(replay_window_s(settings), settings.ohttp_replay_cache_entries)


def replay_window_s(settings: Settings) -> float:
    """How long an `enc` is remembered: a request older than the Date window on either
    side is refused by the worker for its stale Date."""
    return 2 * settings.ohttp_date_window_s + 1.0


class RedisReplayGuard:
    """The replay guard that gateways share: one Redis key per `enc` seen (a digest of it),
    set only if absent and expiring after the window, so a repeat to any gateway within the
    window is refused. Redis's memory, not a count, bounds it (docs/scaling.md). When Redis
    does not answer, the link's failure policy applies: fail_closed refuses encrypted
    requests (503 ``limiter_unavailable``), fail_open checks this gateway's own guard."""

    def __init__(
        self, link: RedisLink, local: ReplayGuard, ttl_s: float, prefix: str = "bastion:"
    ) -> None:
        self._link = link
        self._local = local
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._prefix = f"{prefix}ohttp:"

    def _key(self, enc: bytes) -> str:
        return self._prefix + hashlib.sha256(enc).hexdigest()[:32]

    def check(self, enc: bytes) -> None:
        if self._link.available:
            try:
                fresh = self._link.client.set(self._key(enc), b"1", nx=True, px=self._ttl_ms)
            except RedisError as exc:
                self._link.failed(exc)
            else:
                if not fresh:
                    raise _replayed()
                return
        if not self._link.fail_open:
            raise LimiterUnavailable("Encrypted requests cannot be checked for replays now.")
        self._local.check(enc)

    def forget(self, enc: bytes) -> None:
        self._local.forget(enc)
        if self._link.available:
            try:
                self._link.client.delete(self._key(enc))
            except RedisError as exc:
                self._link.failed(exc)


class SealingState:
    """The OHTTP key set in force: published configuration, accepted ids, worker message."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        *,
        replays: Replays | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._accepted: dict[int, tuple[ohttp.KeyConfig, float | None]] = {}
        self._version = 0
        #: The body of /.well-known/ohttp-gateway (application/ohttp-keys).
        self.published = b""
        #: What every worker must hold; None until keys are loaded.
        self.worker_keys: SealingKeys | None = None
        #: The earliest time (Unix) a previous key's grace period ends; None if none.
        self.next_retirement: float | None = None
        self.replays: Replays = replays if replays is not None else local_replay_guard(settings)

    def update(self, keys: Sequence[ActiveKey]) -> SealingKeys:
        """Take the key set read from the store; returns the message for the workers."""
        settings = self._settings
        self._version += 1
        # Only the KEMs the settings offer (a key of another stays in the database, unused),
        # in the store's order: the preferred KEM's current key first.
        offered = offered_kems(settings)
        keys = [k for k in keys if k.info.kem_id in offered]
        current = [k.key.config() for k in keys if k.info.state == "current"]
        self.published = ohttp.encode_key_configs(current)
        self._accepted = {
            k.key.key_id: (
                k.key.config(),
                k.info.retire_at.timestamp() if k.info.retire_at is not None else None,
            )
            for k in keys
        }
        retirements = [not_after for _, not_after in self._accepted.values() if not_after]
        self.next_retirement = min(retirements) if retirements else None
        self.worker_keys = SealingKeys(
            version=self._version,
            keys=[
                OhttpKey(
                    key_id=k.key.key_id,
                    kem_id=k.key.private_key.kem_id,
                    private_key=k.key.private_key.to_bytes(),
                    suites=[OhttpSuite(kdf_id=kdf, aead_id=aead) for kdf, aead in k.key.suites],
                    not_after=self._accepted[k.key.key_id][1],
                )
                for k in keys
            ],
            date_window_s=settings.ohttp_date_window_s,
            request_limits=settings.request_limits,
            size_limits=settings.size_limits,
        )
        return self.worker_keys

    def check_request(self, data: bytes) -> ohttp.RequestHeader:
        """Parse the request's header (no decryption), check its key and suite, and that it
        is not a replay. Raises the error the client gets, unencrypted."""
        try:
            header = ohttp.parse_request_header(data)
        except ohttp.UnsupportedSuite:
            raise OhttpKeyProblem(
                "The request uses an unsupported key configuration.", code="ohttp_key"
            ) from None
        except ohttp.OhttpError:
            raise InvalidRequest(
                "The request is not a valid encapsulated request.", code="ohttp_malformed"
            ) from None
        # parse_request_header knows the KEM: an unknown one was refused above.
        if self._settings.ohttp_require_pq and not hpke.is_post_quantum(header.kem_id):
            raise OhttpKeyProblem(
                "This server accepts only post-quantum (ML-KEM) key configurations: fetch "
                "its configuration again.",
                code="ohttp_key",
            )
        accepted = self._accepted.get(header.key_id)
        if accepted is None:
            raise OhttpKeyProblem("The request's key identifier is unknown.", code="ohttp_key")
        config, not_after = accepted
        if not_after is not None and not_after <= self._clock():
            raise OhttpKeyProblem("The request's key has been retired.", code="ohttp_key")
        if header.kem_id != config.kem_id or (header.kdf_id, header.aead_id) not in config.suites:
            raise OhttpKeyProblem(
                "The request uses algorithms its key does not support.", code="ohttp_key"
            )
        self.replays.check(replay_id(header.enc))
        return header


def replay_id(enc: bytes) -> bytes:
    """What the replay guards remember of a request's `enc`: itself when short (an X25519
    key), else its SHA-256 (a post-quantum `enc` has over a thousand bytes)."""
    return bytes(enc) if len(enc) <= _REPLAY_ID_BYTES else hashlib.sha256(enc).digest()
