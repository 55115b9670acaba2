"""Security alerts: rules over the event stream, with sliding windows and thresholds.

:class:`AlertRules` is an :class:`~bastion.audit.events.EventSink`. Each :class:`Rule`
names the event kinds it watches, conditions on their fields, the fields that group them
(a key id, a client address, a model) and how many occurrences within a sliding window make
an :class:`Alert`. A group that keeps going past its threshold fires once per cooldown (by
default its window), not once per event; the occurrences held back are counted in its next
alert.

``emit`` runs on the request path, in the event loop: it only matches and counts in memory
(one dict lookup for a kind no rule watches) and hands each alert to callbacks that must not
block either (the webhook notifier queues it for its own thread, see
:mod:`bastion.audit.webhooks`). Memory is bounded: a group keeps at most `threshold`
occurrences, and a rule at most `max_groups` groups (the least recently seen go first).

The defaults (:data:`DEFAULT_RULES`) can be replaced, extended or switched off by a rules
file in TOML or JSON (:func:`load_rules`; ``docs/alerts.md`` has the format).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import secrets
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.audit.events import (
    ACCESS_DENIED,
    AUDIT_VERIFY_FAILED,
    AUTH_FAILED,
    AUTH_THROTTLED,
    EVENT_KINDS,
    MODEL_INTEGRITY_FAILED,
    PROTECT_EXTRACTION_SUSPECTED,
    PROTECT_KEY_BLOCKED,
    PROTECT_KEY_THROTTLED,
    WORKER_CRASHED,
    Event,
)
from bastion.errors import ConfigurationError

logger = logging.getLogger("bastion.alerts")

Scalar = str | int | float | bool | None

SEVERITIES = ("info", "warning", "critical")
# The fields of an event a rule may test or group by; anything else is "detail.<name>".
EVENT_FIELDS = ("kind", "outcome", "actor", "tenant", "target")
DETAIL = "detail."

MAX_THRESHOLD = 100_000
MAX_WINDOW_S = 7 * 24 * 3600.0
MAX_GROUPS = 10_000
# What an alert carries of the event that fired it: metadata only, and not much of it.
_DETAIL_FIELDS_KEPT = 16
_DETAIL_TEXT_KEPT = 200
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def field_of(event: Event, name: str) -> Scalar:
    """The value of `name` ("actor", "detail.reason", ...) in `event`; None if absent."""
    if name.startswith(DETAIL):
        return event.detail.get(name[len(DETAIL) :])
    value: Scalar = getattr(event, name)
    return value


def _check_field(name: str) -> None:
    if name not in EVENT_FIELDS and not (name.startswith(DETAIL) and len(name) > len(DETAIL)):
        raise ValueError(
            f"unknown field {name!r}: use one of {', '.join(EVENT_FIELDS)} or detail.<name>"
        )


@dataclass(frozen=True, slots=True)
class Condition:
    """A test of one field: one of `equals`, or containing one of `contains` (text); with
    neither, the field must be present."""

    field: str
    equals: tuple[Scalar, ...] = ()
    contains: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_field(self.field)

    def holds(self, event: Event) -> bool:
        value = field_of(event, self.field)
        if value is None:
            return None in self.equals
        if self.equals and value not in self.equals:
            return False
        if self.contains:
            return isinstance(value, str) and any(part in value for part in self.contains)
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    """Fire when `threshold` occurrences of the matching events of one group fall within
    `window_s` seconds.

    An event matches if its kind is one of `kinds`, every condition of `when` holds and, if
    `when_any` is given, at least one of those. Its group is the values of the `group_by`
    fields (an event missing one is not counted); with no `group_by`, all events are one
    group. An event counts once, or as the integer in its `weight` field where it has one
    (auth.failed's summary of the failures held back in a flood carries their count).
    """

    name: str
    severity: str
    kinds: frozenset[str]
    threshold: int = 1
    window_s: float = 60.0
    group_by: tuple[str, ...] = ()
    when: tuple[Condition, ...] = ()
    when_any: tuple[Condition, ...] = ()
    weight: str | None = None
    # Seconds after an alert during which the same group does not fire again (None: window_s).
    cooldown_s: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError("a rule name is 1-64 of a-z, 0-9 and _, starting with a letter")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        if not self.kinds:
            raise ValueError("a rule needs at least one event kind")
        if not 1 <= self.threshold <= MAX_THRESHOLD:
            raise ValueError(f"threshold must lie between 1 and {MAX_THRESHOLD}")
        if not 0 < self.window_s <= MAX_WINDOW_S:
            raise ValueError(f"window_s must lie between 0 and {MAX_WINDOW_S:g} (7 days)")
        if self.cooldown_s is not None and not 0 <= self.cooldown_s <= MAX_WINDOW_S:
            raise ValueError(f"cooldown_s must lie between 0 and {MAX_WINDOW_S:g} (7 days)")
        for name in (*self.group_by, *([self.weight] if self.weight else [])):
            _check_field(name)

    @property
    def cooldown(self) -> float:
        return self.window_s if self.cooldown_s is None else self.cooldown_s

    def matches(self, event: Event) -> bool:
        return all(c.holds(event) for c in self.when) and (
            not self.when_any or any(c.holds(event) for c in self.when_any)
        )

    def group_of(self, event: Event) -> tuple[str, ...] | None:
        values = tuple(field_of(event, name) for name in self.group_by)
        if any(value is None for value in values):
            return None
        return tuple(str(value)[:_DETAIL_TEXT_KEPT] for value in values)

    def weight_of(self, event: Event) -> int:
        if self.weight is None:
            return 1
        value = field_of(event, self.weight)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_THRESHOLD)
        return 1


@dataclass(frozen=True, slots=True)
class Alert:
    """One firing of a rule for one group. Metadata only: never payloads or secrets."""

    id: str
    rule: str
    severity: str
    description: str
    group: Mapping[str, str]
    # Occurrences counted in the window when it fired (at least the threshold), and those
    # held back by the cooldown since this group's previous alert.
    count: int
    threshold: int
    window_s: float
    # Wall-clock (Unix) times of the earliest occurrence counted and of the last.
    first_at: float
    last_at: float
    suppressed: int
    # kind, outcome, actor, tenant, target, at and (trimmed) detail of the last event.
    event: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "description": self.description,
            "group": dict(self.group),
            "count": self.count,
            "threshold": self.threshold,
            "window_s": self.window_s,
            "first_at": round(self.first_at, 3),
            "last_at": round(self.last_at, 3),
            "suppressed": self.suppressed,
            "event": dict(self.event),
        }


def event_summary(event: Event) -> dict[str, Any]:
    """What an alert tells of its last event: the event's metadata, trimmed."""
    detail: dict[str, Scalar] = {}
    for name, value in list(event.detail.items())[:_DETAIL_FIELDS_KEPT]:
        if isinstance(value, str):
            value = value[:_DETAIL_TEXT_KEPT]
        elif not isinstance(value, int | float | bool) and value is not None:
            continue
        detail[str(name)[:64]] = value
    return {
        "kind": event.kind,
        "outcome": event.outcome,
        "actor": event.actor,
        "tenant": event.tenant,
        "target": event.target,
        "at": round(event.at, 3),
        "detail": detail,
    }


class _Group:
    """One group's recent occurrences: (time, weight), oldest first, and its cooldown."""

    __slots__ = ("fired_at", "hits", "suppressed", "total")

    def __init__(self) -> None:
        self.hits: deque[tuple[float, int]] = deque()
        self.total = 0
        self.fired_at: float | None = None
        self.suppressed = 0

    def count(self, now: float, weight: int, rule: Rule) -> bool:
        """Count an occurrence at `now`; True if the rule fires for this group now."""
        hits = self.hits
        cutoff = now - rule.window_s
        while hits and hits[0][0] <= cutoff:
            self.total -= hits.popleft()[1]
        hits.append((now, weight))
        self.total += weight
        # Once the newer occurrences reach the threshold on their own, an older one can no
        # longer change whether the rule fires (it leaves the window first): dropping it
        # keeps a group at most `threshold` entries, however long the burst.
        while len(hits) > 1 and self.total - hits[0][1] >= rule.threshold:
            self.total -= hits.popleft()[1]
        if self.total < rule.threshold:
            return False
        if self.fired_at is not None and now - self.fired_at < rule.cooldown:
            self.suppressed += weight
            return False
        return True


class AlertRules:
    """An event sink that turns matching events into alerts, handed to `notify`.

    Thread-safe: events come from the event loop and from threads. Each callback of
    `notify` must return at once (count a metric, queue a delivery); one that raises is
    logged and does not stop the others.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        notify: Sequence[Callable[[Alert], None]] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        self.rules = tuple(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("two alert rules have the same name")
        self._notify = tuple(notify)
        # Windows and cooldowns run on `clock` (monotonic: a step of the wall clock must
        # neither fire nor silence a rule); only the times an alert reports are wall-clock.
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_groups = max_groups
        self._by_kind: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for kind in rule.kinds:
                self._by_kind.setdefault(kind, []).append(rule)
        # Per rule: group -> its state, least recently seen first.
        self._groups: dict[str, dict[tuple[str, ...], _Group]] = {r.name: {} for r in self.rules}
        self._lock = threading.Lock()
        #: Groups forgotten to keep within `max_groups` (the least recently seen).
        self.evicted = 0

    def emit(self, event: Event) -> None:
        rules = self._by_kind.get(event.kind)
        if not rules:
            return
        fired: list[Alert] = []
        now = self._clock()
        with self._lock:
            for rule in rules:
                if not rule.matches(event):
                    continue
                key = rule.group_of(event)
                if key is None:
                    continue
                alert = self._count(rule, key, now, rule.weight_of(event), event)
                if alert is not None:
                    fired.append(alert)
        for alert in fired:
            self._fire(alert)

    def groups(self, rule: str) -> int:
        """How many groups `rule` holds now (for tests of its bounds)."""
        return len(self._groups[rule])

    def _count(
        self, rule: Rule, key: tuple[str, ...], now: float, weight: int, event: Event
    ) -> Alert | None:
        groups = self._groups[rule.name]
        state = groups.pop(key, None)
        if state is None:
            state = _Group()
            while len(groups) >= self._max_groups:
                del groups[next(iter(groups))]
                self.evicted += 1
        groups[key] = state  # (re)inserted last: the most recently seen
        if not state.count(now, weight, rule):
            return None
        suppressed, state.suppressed, state.fired_at = state.suppressed, 0, now
        wall = self._wall_clock()
        return Alert(
            id=secrets.token_hex(16),
            rule=rule.name,
            severity=rule.severity,
            description=rule.description,
            group=dict(zip(rule.group_by, key, strict=True)),
            count=state.total,
            threshold=rule.threshold,
            window_s=rule.window_s,
            first_at=wall - (now - state.hits[0][0]),
            last_at=wall,
            suppressed=suppressed,
            event=event_summary(event),
        )

    def _fire(self, alert: Alert) -> None:
        logger.warning(
            "security alert",
            extra={
                "alert": alert.rule,
                "severity": alert.severity,
                "group": dict(alert.group),
                "count": alert.count,
                "window_s": alert.window_s,
                "alert_id": alert.id,
            },
        )
        for notify in self._notify:
            try:
                notify(alert)
            except Exception:
                logger.exception("an alert callback failed", extra={"alert": alert.rule})


class RecentAlerts:
    """The alerts fired lately, newest first, in memory (the admin console shows them): a
    callback of :class:`AlertRules`, bounded to the last `size`. A restart forgets them;
    the events behind them are in the audit log."""

    def __init__(self, size: int = 200) -> None:
        self._alerts: deque[Alert] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, alert: Alert) -> None:
        with self._lock:
            self._alerts.appendleft(alert)

    def latest(self) -> list[Alert]:
        with self._lock:
            return list(self._alerts)


# ---------------------------------------------------------------------- the defaults

_AUTH_WEIGHT = "detail.count"

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(
        name="auth_failures_per_key",
        severity="warning",
        kinds=frozenset({AUTH_FAILED}),
        threshold=10,
        window_s=60.0,
        group_by=("actor",),
        weight=_AUTH_WEIGHT,
        description="Repeated failed sign-ins with one key id (a guessed or stolen id).",
    ),
    # auth.failed does not carry the client's address; the throttle of failed sign-ins
    # counts them per address and reports a lock-out (BASTION_AUTH_THROTTLE_FAILURES within
    # BASTION_AUTH_THROTTLE_WINDOW_S) with the address (an IPv6 /64) as its target.
    Rule(
        name="auth_failures_per_address",
        severity="warning",
        kinds=frozenset({AUTH_THROTTLED}),
        threshold=1,
        window_s=600.0,
        group_by=("target",),
        when=(Condition("detail.scope", equals=("address",)),),
        description="A client address was locked out after repeated failed sign-ins "
        "(key guessing).",
    ),
    # The throttle's other scope: wrong secrets for one existing key id, from any address
    # (a guesser spread over many addresses, each below its own threshold).
    Rule(
        name="auth_key_locked_out",
        severity="warning",
        kinds=frozenset({AUTH_THROTTLED}),
        threshold=1,
        window_s=600.0,
        group_by=("actor",),
        when=(Condition("detail.scope", equals=("key",)),),
        description="A key id was locked out after repeated wrong secrets, from one or "
        "many addresses (a targeted key).",
    ),
    Rule(
        name="auth_failures_burst",
        severity="warning",
        kinds=frozenset({AUTH_FAILED}),
        threshold=100,
        window_s=60.0,
        weight=_AUTH_WEIGHT,
        description="Many failed sign-ins across all keys and clients (credential spraying).",
    ),
    Rule(
        name="access_denied_repeated",
        severity="warning",
        kinds=frozenset({ACCESS_DENIED}),
        threshold=5,
        window_s=300.0,
        group_by=("actor",),
        description="One key repeatedly refused actions or models it does not hold "
        "(e.g. a tenant-admin key trying admin operations).",
    ),
    Rule(
        name="extraction_suspected",
        severity="warning",
        kinds=frozenset({PROTECT_EXTRACTION_SUSPECTED, PROTECT_KEY_THROTTLED, PROTECT_KEY_BLOCKED}),
        threshold=1,
        window_s=3600.0,
        group_by=("actor", "target"),
        description="The extraction monitor suspects a key of copying a model "
        "(alert, throttle or block level).",
    ),
    Rule(
        name="model_integrity_failed",
        severity="critical",
        kinds=frozenset({MODEL_INTEGRITY_FAILED}),
        threshold=1,
        window_s=3600.0,
        group_by=("target",),
        description="A model's files no longer match their digests or signature.",
    ),
    Rule(
        name="worker_killed_by_sandbox_limit",
        severity="warning",
        kinds=frozenset({WORKER_CRASHED}),
        threshold=1,
        window_s=600.0,
        group_by=("target",),
        when_any=(
            # The sandbox's exit note, e.g. "killed at its memory limit" (cgroup or Docker),
            Condition("detail.reason", contains=("killed at its",)),
            # or a signal the gateway did not send: SIGKILL (a memory limit, the kernel's
            # out-of-memory killer), SIGXFSZ and SIGXCPU (the file size and CPU rlimits).
            Condition("detail.signal", equals=("SIGKILL", "SIGXFSZ", "SIGXCPU")),
        ),
        description="A model's worker was killed by a limit of its sandbox.",
    ),
    Rule(
        name="worker_crash_loop",
        severity="warning",
        kinds=frozenset({WORKER_CRASHED}),
        threshold=3,
        window_s=600.0,
        group_by=("target",),
        description="A model's worker keeps crashing.",
    ),
    Rule(
        name="audit_verify_failed",
        severity="critical",
        kinds=frozenset({AUDIT_VERIFY_FAILED}),
        threshold=1,
        window_s=3600.0,
        description="The audit log failed its verification: it may have been tampered with.",
    ),
)


# ---------------------------------------------------------------------- rules files

_RULE_KEYS = {
    "name",
    "severity",
    "kinds",
    "threshold",
    "window_s",
    "group_by",
    "when",
    "when_any",
    "weight",
    "cooldown_s",
    "description",
}
_FILE_KEYS = {"defaults", "disabled", "rules"}


def load_rules(path: Path | str | None) -> tuple[Rule, ...]:
    """The default rules, changed by the rules file at `path` (TOML or JSON) if given.

    The file may set ``defaults = false`` (start from no rule), list default rules to drop
    in ``disabled``, and add rules in ``rules`` (one with a default's name replaces it).
    ConfigurationError if it cannot be read or is not valid."""
    if path is None:
        return DEFAULT_RULES
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # ValueError covers JSON's and TOML's decode errors; their message names the line.
        raise ConfigurationError(f"alert rules file {path}: {exc}") from exc
    try:
        return rules_from(data)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"alert rules file {path}: {exc}") from exc


def rules_from(data: Any) -> tuple[Rule, ...]:
    """The rules a parsed rules file describes (ValueError or TypeError if invalid)."""
    if not isinstance(data, dict):
        raise ValueError("the file must hold a table (TOML) or an object (JSON)")
    _only(data, _FILE_KEYS, "the file")
    defaults = data.get("defaults", True)
    if not isinstance(defaults, bool):
        raise ValueError("defaults must be true or false")
    rules = {r.name: r for r in DEFAULT_RULES} if defaults else {}
    for name in _strings(data.get("disabled", []), "disabled"):
        if rules.pop(name, None) is None:
            raise ValueError(f"disabled: there is no default rule {name!r}")
    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise ValueError("rules must be a list of tables")
    for index, entry in enumerate(entries):
        try:
            rule = _rule(entry)
        except (ValueError, TypeError) as exc:
            label = entry.get("name") if isinstance(entry, dict) else None
            raise ValueError(f"rule {label or index + 1}: {exc}") from None
        rules[rule.name] = rule
    return tuple(rules.values())


def _rule(entry: Any) -> Rule:
    if not isinstance(entry, dict):
        raise ValueError("a rule must be a table")
    _only(entry, _RULE_KEYS, "a rule")
    for required in ("name", "severity", "kinds"):
        if required not in entry:
            raise ValueError(f"{required} is required")
    weight = entry.get("weight")
    cooldown = entry.get("cooldown_s")
    rule = Rule(
        name=_text(entry["name"], "name"),
        severity=_text(entry["severity"], "severity"),
        kinds=frozenset(_strings(entry["kinds"], "kinds")),
        threshold=_integer(entry.get("threshold", 1), "threshold"),
        window_s=_seconds(entry.get("window_s", 60.0), "window_s"),
        group_by=tuple(_strings(entry.get("group_by", []), "group_by")),
        when=_conditions(entry.get("when", []), "when"),
        when_any=_conditions(entry.get("when_any", []), "when_any"),
        weight=None if weight is None else _text(weight, "weight"),
        cooldown_s=None if cooldown is None else _seconds(cooldown, "cooldown_s"),
        description=_text(entry.get("description", ""), "description"),
    )
    _check_kinds(rule.kinds)
    return rule


def _check_kinds(kinds: frozenset[str]) -> None:
    """ValueError for a kind Bastion never emits: a typo would silently disable the rule."""
    for kind in sorted(kinds):
        if kind not in EVENT_KINDS:
            close = difflib.get_close_matches(kind, sorted(EVENT_KINDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown event kind {kind!r}{hint}: the kinds are those of "
                "bastion.audit.events, listed in docs/alerts.md"
            )


def _conditions(value: Any, what: str) -> tuple[Condition, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of tables")
    found = []
    for item in value:
        if not isinstance(item, dict):
            raise ValueError(f"{what}: each condition is a table")
        _only(item, {"field", "equals", "contains"}, f"a condition of {what}")
        equals = item.get("equals", [])
        if not isinstance(equals, list) or not all(
            isinstance(v, str | int | float | bool) for v in equals
        ):
            raise ValueError(f"{what}: equals must be a list of values")
        found.append(
            Condition(
                field=_text(item.get("field"), f"{what}: field"),
                equals=tuple(equals),
                contains=tuple(_strings(item.get("contains", []), f"{what}: contains")),
            )
        )
    return tuple(found)


def _only(table: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"{what} has unknown keys: {', '.join(sorted(unknown))}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return value


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer")
    return value


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number (seconds)")
    return float(value)
