"""The alert rules over the event stream: defaults, sliding windows, cooldown, bounds, files."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from bastion.audit import events
from bastion.audit.alerts import (
    DEFAULT_RULES,
    Alert,
    AlertRules,
    Condition,
    Rule,
    load_rules,
)
from bastion.audit.events import (
    ACCESS_DENIED,
    AUDIT_VERIFY_FAILED,
    AUTH_FAILED,
    AUTH_THROTTLED,
    KEY_CREATED,
    MODEL_INTEGRITY_FAILED,
    MODEL_LOADED,
    OHTTP_REFUSED,
    PROTECT_EXTRACTION_SUSPECTED,
    PROTECT_KEY_BLOCKED,
    SERVER_STARTED,
    WORKER_CRASHED,
    WORKER_RESTARTED,
    Event,
)
from bastion.errors import ConfigurationError


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# A script is a list of (seconds to advance before, event).
Script = list[tuple[float, Event]]


def failed(key: str | None, reason: str = "bad_secret", **detail: str | int | float) -> Event:
    return Event(
        kind=AUTH_FAILED, outcome="failure", actor=key, detail={"reason": reason, **detail}
    )


def throttled(scope: str, **where: str) -> Event:
    return Event(
        kind=AUTH_THROTTLED,
        outcome="failure",
        detail={"scope": scope, "failures": 10, "retry_after_s": 1},
        **where,  # type: ignore[arg-type]
    )


def crashed(model: str, reason: str = "the worker's connection closed") -> Event:
    return Event(
        kind=WORKER_CRASHED,
        outcome="failure",
        target=model,
        detail={"reason": reason, "exit_code": 1, "pid": 4242, "restarts": 0},
    )


def play(script: Script, rules: tuple[Rule, ...] = DEFAULT_RULES) -> list[Alert]:
    clock = Clock()
    alerts: list[Alert] = []
    sink = AlertRules(rules, [alerts.append], clock=clock, wall_clock=clock)
    for advance, event in script:
        clock.now += advance
        sink.emit(event)
    return alerts


# One scripted attack per default rule: each makes its rule fire (and no other rule).
ATTACKS: dict[str, Script] = {
    # A stolen key id tried with secrets that do not match, ten times in a minute.
    "auth_failures_per_key": [(5.0, failed("0123456789abcdef")) for _ in range(10)],
    # Made-up keys from one client address, until the throttle locks the address out.
    "auth_failures_per_address": [
        *[(1.0, failed(f"{i:016x}", "unknown_key")) for i in range(9)],
        (1.0, throttled("address", target="203.0.113.9")),
    ],
    # Wrong secrets for one key id from many addresses, until the throttle locks it out.
    "auth_key_locked_out": [
        *[(1.0, failed("0123456789abcdef")) for _ in range(5)],
        (1.0, throttled("key", actor="0123456789abcdef")),
    ],
    # Spraying: twenty failures one by one, then the flood's summary (no key id).
    "auth_failures_burst": [
        *[(0.1, failed(f"{i:016x}", "unknown_key")) for i in range(20)],
        (10.0, failed(None, "unknown_key", count=80, window_s=10.0)),
    ],
    # A tenant-admin key trying admin operations.
    "access_denied_repeated": [
        (
            10.0,
            Event(
                kind=ACCESS_DENIED,
                outcome="failure",
                actor="feedfacecafebeef",
                tenant="acme",
                detail={"action": "admin"},
            ),
        )
        for _ in range(5)
    ],
    "extraction_suspected": [
        (
            0.0,
            Event(
                kind=PROTECT_KEY_BLOCKED,
                outcome="failure",
                actor="0123456789abcdef",
                tenant="acme",
                target="digits",
                detail={"risk": 1.4, "queries": 900},
            ),
        )
    ],
    "model_integrity_failed": [
        (
            0.0,
            Event(
                kind=MODEL_INTEGRITY_FAILED,
                outcome="failure",
                target="digits",
                detail={"reason": "model.onnx: digest mismatch"},
            ),
        )
    ],
    "worker_killed_by_sandbox_limit": [
        (0.0, crashed("tiny-chat", "the worker's connection closed: killed at its memory limit"))
    ],
    "worker_crash_loop": [(60.0, crashed("tiny-chat")) for _ in range(3)],
    "audit_verify_failed": [
        (
            0.0,
            Event(kind=AUDIT_VERIFY_FAILED, outcome="failure", detail={"reason": "root mismatch"}),
        )
    ],
}

# What a working server sees: events of every kind the rules watch, but below their
# thresholds, spread out, or of other groups.
BENIGN: Script = [
    (0.0, Event(kind=SERVER_STARTED, detail={"host": "127.0.0.1", "port": 8000})),
    (1.0, Event(kind=KEY_CREATED, actor="admin", target="0123456789abcdef")),
    (1.0, Event(kind=MODEL_LOADED, target="digits")),
    # A client with a revoked key retrying now and then: ten failures, 61 s apart.
    *[(61.0, failed("0123456789abcdef", "revoked")) for _ in range(10)],
    # Nine typos in a minute, for each of two keys, from two addresses.
    *[(1.0, failed("1111111111111111", address="198.51.100.1")) for _ in range(9)],
    *[(1.0, failed("2222222222222222", address="198.51.100.2")) for _ in range(9)],
    # Missing and malformed headers (no key id) now and then.
    *[(2.0, failed(None, "missing")) for _ in range(10)],
    *[
        (
            30.0,
            Event(kind=ACCESS_DENIED, outcome="failure", actor="3333333333333333", detail={}),
        )
        for _ in range(4)
    ],
    # Two crashes of one model, one of another, none at a limit.
    (5.0, crashed("tiny-chat")),
    (5.0, Event(kind=WORKER_RESTARTED, target="tiny-chat")),
    (300.0, crashed("tiny-chat")),
    (5.0, crashed("digits", "no heartbeat for 15 s")),
    (1.0, Event(kind=OHTTP_REFUSED, outcome="failure", detail={"reason": "ohttp_replay"})),
]


def test_every_default_rule_has_an_attack_script() -> None:
    assert set(ATTACKS) == {rule.name for rule in DEFAULT_RULES}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_each_default_rule_fires_on_its_attack_and_no_other(name: str) -> None:
    alerts = play(ATTACKS[name])
    assert [a.rule for a in alerts] == [name]
    rule = next(r for r in DEFAULT_RULES if r.name == name)
    (alert,) = alerts
    assert alert.severity == rule.severity
    assert alert.count >= rule.threshold == alert.threshold
    assert alert.first_at <= alert.last_at
    assert set(alert.group) == set(rule.group_by)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_attacks_fire_amid_benign_traffic(name: str) -> None:
    alerts = play([*BENIGN, (3600.0, Event(kind=SERVER_STARTED)), *ATTACKS[name]])
    assert [a.rule for a in alerts] == [name]


def test_benign_traffic_fires_nothing() -> None:
    assert play(BENIGN) == []


def test_the_alert_names_its_group_and_carries_the_last_events_metadata() -> None:
    (alert,) = play(ATTACKS["auth_failures_per_key"])
    assert alert.group == {"actor": "0123456789abcdef"}
    assert alert.count == 10
    assert alert.last_at - alert.first_at == pytest.approx(45.0)
    assert alert.event["kind"] == AUTH_FAILED
    assert alert.event["detail"] == {"reason": "bad_secret"}
    body = alert.as_dict()
    assert json.loads(json.dumps(body)) == body
    assert len(alert.id) == 32


def test_the_last_events_detail_is_trimmed() -> None:
    rule = Rule(name="r", severity="info", kinds=frozenset({"x"}))
    detail: dict[str, str | int | float | bool | None] = {f"f{i}": i for i in range(40)}
    detail["f0"] = "x" * 5000
    (alert,) = play([(0.0, Event(kind="x", detail=detail))], (rule,))
    assert len(alert.event["detail"]) == 16
    assert alert.event["detail"]["f0"] == "x" * 200


# ---------------------------------------------------------------- windows and cooldown

BURST = Rule(
    name="burst",
    severity="warning",
    kinds=frozenset({AUTH_FAILED}),
    threshold=3,
    window_s=60.0,
    group_by=("actor",),
)


def test_the_window_slides() -> None:
    # Two, then a third 60 s after the first: the first has left the window.
    assert play([(0.0, failed("k")), (30.0, failed("k")), (30.0, failed("k"))], (BURST,)) == []
    # ... but a third within 60 s of the other two fires.
    script = [(0.0, failed("k")), (30.0, failed("k")), (30.0, failed("k")), (29.0, failed("k"))]
    (alert,) = play(script, (BURST,))
    assert alert.count == 3
    assert alert.last_at - alert.first_at == pytest.approx(59.0)


def test_groups_are_counted_apart() -> None:
    assert play([(1.0, failed(key)) for key in "abab"], (BURST,)) == []
    assert [a.group for a in play([(1.0, failed(k)) for k in "ababa"], (BURST,))] == [
        {"actor": "a"}
    ]


def test_an_ongoing_burst_fires_once_per_window_per_group() -> None:
    # One failure a second for five minutes: one alert a minute, not one per failure.
    alerts = play([(1.0, failed("k")) for _ in range(300)], (BURST,))
    assert len(alerts) == 5
    gaps = [b.last_at - a.last_at for a, b in itertools.pairwise(alerts)]
    assert gaps == [60.0] * 4
    # Each later alert counts what the cooldown held back since the one before.
    assert [a.suppressed for a in alerts] == [0, 59, 59, 59, 59]
    # Another group is not held back by this one's cooldown.
    both = play([(1.0, failed(k)) for k in "aaabbb"], (BURST,))
    assert [a.group["actor"] for a in both] == ["a", "b"]


def test_the_cooldown_can_be_set_apart_from_the_window() -> None:
    rule = Rule(
        name="once_an_hour",
        severity="critical",
        kinds=frozenset({MODEL_INTEGRITY_FAILED}),
        window_s=60.0,
        cooldown_s=3600.0,
    )
    event = Event(kind=MODEL_INTEGRITY_FAILED, target="m")
    alerts = play([(600.0, event) for _ in range(12)], (rule,))
    assert len(alerts) == 2
    assert alerts[1].suppressed == 5


def test_the_summary_of_held_back_failures_counts_as_its_count() -> None:
    rule = next(r for r in DEFAULT_RULES if r.name == "auth_failures_burst")
    assert play([(0.0, failed(None, count=99))], (rule,)) == []
    (alert,) = play([(0.0, failed(None, count=99)), (1.0, failed("k"))], (rule,))
    assert alert.count == 100


def test_an_event_without_the_group_field_is_not_counted_by_that_rule() -> None:
    assert play([(1.0, failed(None)) for _ in range(50)], (BURST,)) == []
    # The throttle's summary of the lock-outs it held back in a flood names no address.
    summary = Event(kind=AUTH_THROTTLED, detail={"scope": "address", "count": 30})
    assert play([(0.0, summary)]) == []
    # A key's lock-out is no address's (it has a rule of its own).
    fired = play([(0.0, throttled("key", actor="0123456789abcdef"))])
    assert [a.rule for a in fired] == ["auth_key_locked_out"]
    assert play([(0.0, throttled("key"))]) == []


# ---------------------------------------------------------------- conditions


def test_conditions_test_fields_all_and_any() -> None:
    rule = Rule(
        name="admin_denied",
        severity="warning",
        kinds=frozenset({ACCESS_DENIED}),
        when=(Condition("tenant", equals=("acme",)),),
        when_any=(
            Condition("detail.action", equals=("admin",)),
            Condition("detail.action", contains=("keys",)),
        ),
    )

    def denied(tenant: str, action: str) -> Event:
        return Event(kind=ACCESS_DENIED, tenant=tenant, actor="k", detail={"action": action})

    assert rule.matches(denied("acme", "admin"))
    assert rule.matches(denied("acme", "admin.keys"))
    assert not rule.matches(denied("acme", "embeddings"))
    assert not rule.matches(denied("other", "admin"))
    present = Condition("detail.address")
    assert present.holds(failed("k", address="x")) and not present.holds(failed("k"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Bad Name"}, "rule name"),
        ({"severity": "urgent"}, "severity"),
        ({"kinds": frozenset()}, "event kind"),
        ({"threshold": 0}, "threshold"),
        ({"window_s": 0.0}, "window_s"),
        ({"group_by": ("address",)}, "unknown field"),
        ({"weight": "detail."}, "unknown field"),
    ],
)
def test_rules_are_checked(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "ok", "severity": "info", "kinds": frozenset({"x"})}
    with pytest.raises(ValueError, match=message):
        Rule(**{**fields, **changes})  # type: ignore[arg-type]


# ---------------------------------------------------------------- bounds and safety


def test_memory_is_bounded_per_group_and_per_rule() -> None:
    clock = Clock()
    sink = AlertRules((BURST,), clock=clock, max_groups=100)
    for i in range(10_000):
        clock.now += 0.001
        sink.emit(failed("k"))
        sink.emit(failed(f"{i:016x}"))
    # A group holds at most `threshold` occurrences however long its burst ...
    state = sink._groups["burst"][("k",)]
    assert len(state.hits) <= BURST.threshold
    # ... and a rule at most max_groups groups, the least recently seen forgotten first.
    assert sink.groups("burst") == 100
    assert sink.evicted == 10_001 - 100
    assert ("k",) in sink._groups["burst"]


def test_a_failing_callback_does_not_stop_the_others_nor_the_caller() -> None:
    seen: list[Alert] = []

    def broken(alert: Alert) -> None:
        raise RuntimeError("boom")

    sink = AlertRules(DEFAULT_RULES, [broken, seen.append], clock=Clock())
    sink.emit(Event(kind=AUDIT_VERIFY_FAILED, outcome="failure"))
    assert [a.rule for a in seen] == ["audit_verify_failed"]


def test_alerts_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="bastion.alerts"):
        play(ATTACKS["model_integrity_failed"])
    (record,) = [r for r in caplog.records if r.name == "bastion.alerts"]
    assert record.getMessage() == "security alert"
    assert record.__dict__["alert"] == "model_integrity_failed"
    assert record.__dict__["group"] == {"target": "digits"}


def test_a_worker_killed_by_a_limits_signal_fires_the_sandbox_rule() -> None:
    rule = next(r for r in DEFAULT_RULES if r.name == "worker_killed_by_sandbox_limit")

    def death(exit_code: int, signal: str | None, by_gateway: bool = False) -> Event:
        detail = {"reason": "the worker's connection closed", "exit_code": exit_code}
        return Event(
            kind=WORKER_CRASHED,
            outcome="failure",
            target="tiny-chat",
            detail={**detail, "signal": signal, "killed_by_gateway": by_gateway},
        )

    for exit_code, name in [(-9, "SIGKILL"), (-25, "SIGXFSZ"), (-24, "SIGXCPU")]:
        assert len(play([(0.0, death(exit_code, name))], (rule,))) == 1, name
    # Not a worker that exits by itself, crashes, or that the gateway killed (heartbeats).
    assert play([(0.0, death(3, None))], (rule,)) == []
    assert play([(0.0, death(-11, "SIGSEGV"))], (rule,)) == []
    assert play([(0.0, death(-9, None, by_gateway=True))], (rule,)) == []


def test_an_extraction_suspicion_fires_at_any_level() -> None:
    events = [
        Event(kind=kind, actor="k", target="m")
        for kind in (PROTECT_EXTRACTION_SUSPECTED, PROTECT_KEY_BLOCKED)
    ]
    # One alert an hour per key and model, whichever level it reached first.
    assert len(play([(0.0, e) for e in events])) == 1


# ---------------------------------------------------------------- rules files

RULES_TOML = """
disabled = ["auth_failures_burst"]

[[rules]]
name = "auth_failures_per_key"
severity = "critical"
kinds = ["auth.failed"]
threshold = 3
window_s = 30
group_by = ["actor"]

[[rules]]
name = "admin_escalation"
severity = "critical"
kinds = ["auth.denied"]
threshold = 2
window_s = 600
group_by = ["actor"]
description = "A key tried admin operations."
when_any = [
  { field = "detail.action", equals = ["admin"] },
  { field = "detail.action", contains = ["keys"] },
]
"""


def test_a_toml_rules_file_replaces_adds_and_disables(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(RULES_TOML)
    rules = {r.name: r for r in load_rules(path)}
    defaults = {r.name for r in DEFAULT_RULES}
    assert set(rules) == defaults - {"auth_failures_burst"} | {"admin_escalation"}
    assert rules["auth_failures_per_key"].threshold == 3
    assert rules["auth_failures_per_key"].severity == "critical"
    escalation = rules["admin_escalation"]
    assert escalation.when_any[1] == Condition("detail.action", contains=("keys",))
    denied = Event(kind=ACCESS_DENIED, actor="k", detail={"action": "admin"})
    assert [a.rule for a in play([(1.0, denied), (1.0, denied)], tuple(rules.values()))] == [
        "admin_escalation"
    ]


def test_a_json_rules_file_may_start_from_no_rule(tmp_path: Path) -> None:
    path = tmp_path / "alerts.json"
    path.write_text(
        json.dumps(
            {
                "defaults": False,
                "rules": [{"name": "loaded", "severity": "info", "kinds": [MODEL_LOADED]}],
            }
        )
    )
    (rule,) = load_rules(path)
    assert rule == Rule(name="loaded", severity="info", kinds=frozenset({MODEL_LOADED}))


def test_no_file_means_the_defaults() -> None:
    assert load_rules(None) == DEFAULT_RULES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules = 3", "rules must be a list"),
        ('disabled = ["nope"]', "no default rule 'nope'"),
        ("typo = 1", "unknown keys: typo"),
        ('[[rules]]\nname = "x"\nseverity = "info"', "rule x: kinds is required"),
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["a"]\nthreshhold = 2',
            "unknown keys: threshhold",
        ),
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["a"]\nthreshold = "2"',
            "threshold must be an integer",
        ),
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["a"]\ngroup_by = ["who"]',
            "unknown field 'who'",
        ),
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["a"]\n'
            'when = [{ field = "actor", matches = "k" }]',
            "unknown keys: matches",
        ),
        ("not toml [", "alert rules file"),
        # A kind Bastion never emits (a typo) would silently make the rule a dead one.
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["auth.faild"]',
            r"rule x: unknown event kind 'auth.faild' \(did you mean 'auth.failed'\?\)",
        ),
        (
            '[[rules]]\nname = "x"\nseverity = "info"\nkinds = ["auth.failed", "auth.*"]',
            "rule x: unknown event kind 'auth.\\*'",
        ),
    ],
)
def test_a_bad_rules_file_is_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_rules(path)


def test_a_missing_rules_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="alert rules file"):
        load_rules(tmp_path / "absent.toml")


def test_the_rules_know_every_kind_bastion_emits() -> None:
    constants = {
        value
        for name, value in vars(events).items()
        if name.isupper() and isinstance(value, str) and name != "EVENT_KINDS"
    }
    assert constants == events.EVENT_KINDS
    for rule in DEFAULT_RULES:
        assert rule.kinds <= events.EVENT_KINDS, rule.name


# ---------------------------------------------------------------- clocks


def test_windows_and_cooldowns_run_on_the_monotonic_clock_and_alerts_report_wall_time() -> None:
    monotonic, wall = Clock(500.0), Clock(1_700_000_000.0)
    alerts: list[Alert] = []
    sink = AlertRules((BURST,), [alerts.append], clock=monotonic, wall_clock=wall)
    sink.emit(failed("k"))
    # The wall clock is set back an hour (NTP, an operator): the window does not move.
    monotonic.now += 10.0
    wall.now += 10.0 - 3600.0
    sink.emit(failed("k"))
    monotonic.now += 10.0
    wall.now += 10.0
    sink.emit(failed("k"))
    (alert,) = alerts
    assert alert.last_at == wall.now
    assert alert.first_at == wall.now - 20.0
    # Set forward a day: the cooldown (the window) still holds the next one back.
    wall.now += 86_400.0
    monotonic.now += 1.0
    sink.emit(failed("k"))
    assert len(alerts) == 1
    assert AlertRules(DEFAULT_RULES)._clock is time.monotonic
