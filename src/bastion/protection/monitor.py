"""Extraction monitor: watches each key's stream of queries to a classifier and scores how
much it looks like an attempt to copy the model.

An extraction attacker needs many answers to inputs it chooses. Three signals, each
computed per (key, model) in the model's worker, where encrypted requests are opened too:

- **PRADA** (Juuti et al., EuroS&P 2019). For each query, the distance to the nearest
  earlier query of the same predicted class. A benign stream of real data gives distances
  that are close to normally distributed; synthetic probes (Jacobian-based augmentation,
  small steps around seeds) do not. The Shapiro-Wilk statistic W of the distances falls
  below the threshold :data:`PRADA_DELTA` for them.
- **Out-of-distribution queries**, which PRADA misses: random inputs and noise around the
  data look "normal" to PRADA, but not like the model's real inputs. A reference of those
  inputs is stored with the model when it is imported (:func:`build_reference`: the mean,
  principal directions and spread of a sample of real inputs, never the sample itself).
  Each query gets a Mahalanobis distance in the principal subspace plus its
  reconstruction error; above the reference's own 99.5th percentile it is an outlier. A
  CUSUM of the outlier indicator (benign rate :data:`OOD_BENIGN_RATE`, attack rate
  :data:`OOD_ATTACK_RATE`) rises quickly for a stream of outliers and drains for real data.
- **Coverage** (Kesarwani et al., ACSAC 2018, "extraction monitor"): the share of the
  reference's occupied cells (a grid on its three main directions) that the key has
  explored. A key that has seen most of the input space may have learned the model; this
  signal raises an alert at most, because heavy benign users also explore widely.

The risk of a key is the largest of ``1 - W`` over ``1 - PRADA_DELTA``, the CUSUM over its
block level, and the capped coverage: 1.0 is block-level evidence. The model's policy maps
risk to actions (:class:`MonitorPolicy`): alert, throttle, block. The thresholds were
calibrated on benign streams of real digits (benchmarks/extraction.py).

Memory is bounded: per key, at most :data:`GROWING_CAP` stored query vectors of at most
:data:`MAX_FEATURES` floats and :data:`DISTANCE_WINDOW` distances (about 70 KB); per model
worker, at most :data:`MAX_STREAMS` keys (least recently seen forgotten first). State
lives in the worker: a restarted worker starts every key afresh, while blocks persist in
the database. Each key is watched on its own: many colluding keys can spread an attack
below every key's threshold (see docs/model-protection.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# The reference a model's importer stores with its files, and the options of the monitor.
REFERENCE_FILE = "protect-reference.json"
REFERENCE_VERSION = 1
MONITOR_OPTION = "protect.monitor"
ALERT_OPTION = "protect.alert_at"
THROTTLE_OPTION = "protect.throttle_at"
BLOCK_OPTION = "protect.block_at"
THROTTLE_RATE_OPTION = "protect.throttle_rps"

# PRADA: W below this is an attack (calibrated on 50 benign digit streams, where the
# lowest W seen after 100 queries was 0.93; Juuti et al. report 0.90-0.96 per data set).
PRADA_DELTA = 0.90
# W at or above this is unremarkable (risk 0); between it and PRADA_DELTA risk rises to 1.
PRADA_NORMAL = 0.96
PRADA_MIN_DISTANCES = 100
# Shapiro-Wilk costs about 100 us on 1,000 values: tested every few queries.
PRADA_TEST_EVERY = 32
# Out-of-distribution CUSUM: benign and attack outlier rates, and the block level.
OOD_BENIGN_RATE = 0.05
OOD_ATTACK_RATE = 0.5
OOD_BLOCK_CUSUM = 30.0
OOD_QUANTILE = 0.995
# Coverage: the share of the reference's cells explored at which it alone raises an alert.
COVERAGE_ALERT = 0.95
COVERAGE_AXES = 3
COVERAGE_BINS = 6
# Bounds on memory and on how much is sent back to the gateway.
MAX_FEATURES = 64
GROWING_CAP = 256
DISTANCE_WINDOW = 1024
MAX_STREAMS = 1024
REPORT_EVERY = 50
# Value grids a reference may find its sample on (integers, 8-bit levels scaled to 0..1).
GRID_STEPS = (1.0, 0.5, 1 / 255, 1 / 256)
GRID_TOLERANCE = 1e-3
# Variance floor of the reference, relative to the mean variance.
VARIANCE_FLOOR = 1e-3
# Before this many queries, a key cannot be blocked (too little evidence either way).
MIN_QUERIES_TO_BLOCK = 50

DEFAULT_ALERT = 0.75
LEVELS = ("ok", "alert", "throttle", "block")


def features_of(inputs: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Rows of [batch, ...] inputs as float32 vectors of at most MAX_FEATURES values
    (longer rows are averaged over contiguous chunks)."""
    rows = np.asarray(inputs, dtype=np.float32).reshape(inputs.shape[0], -1)
    width = rows.shape[1]
    if width <= MAX_FEATURES:
        return rows
    edges = np.linspace(0, width, MAX_FEATURES + 1).astype(np.int64)
    pooled: np.ndarray[Any, Any] = np.add.reduceat(rows, edges[:-1], axis=1)
    return (pooled / np.diff(edges)).astype(np.float32)


# ---------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Reference:  # not slotted: caches its edges as lists
    """Statistics of a model's real inputs: see :func:`build_reference`."""

    mean: np.ndarray[Any, Any]
    # Principal directions (rows) and the variance along each (floored).
    components: np.ndarray[Any, Any]
    variances: np.ndarray[Any, Any]
    threshold: float
    # The step every real input value is a multiple of (an 8-bit image's levels, the 0-16
    # counts of digits), 0 if none: a query off that grid was not read from real data.
    step: float
    # Coverage grid: bin edges along the first few directions, and how many cells the
    # reference sample itself occupies.
    edges: np.ndarray[Any, Any]
    cells: int

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    @functools.cached_property
    def _edge_lists(self) -> list[list[float]]:
        edges: list[list[float]] = self.edges.tolist()
        return edges

    def project(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        result: np.ndarray[Any, Any] = (rows - self.mean) @ self.components.T
        return result

    @functools.cached_property
    def _inverse_variances(self) -> np.ndarray[Any, Any]:
        inverse: np.ndarray[Any, Any] = (1.0 / self.variances).astype(np.float32)
        return inverse

    def outlier_scores(self, projected: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Squared Mahalanobis distance of projected rows."""
        result: np.ndarray[Any, Any] = np.einsum(
            "ij,ij,j->i", projected, projected, self._inverse_variances
        )
        return result

    def off_grid(self, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Rows with a value that is not a multiple of the reference's step."""
        if not self.step:
            return np.zeros(rows.shape[0], dtype=bool)
        scaled = rows * (1.0 / self.step)
        scaled -= np.rint(scaled)
        off: np.ndarray[Any, Any] = np.abs(scaled, out=scaled).max(axis=1) > GRID_TOLERANCE
        return off

    def outliers(self, rows: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], list[int]]:
        """Which rows are out of distribution, and the coverage cell of each."""
        projected = self.project(rows)
        far = self.outlier_scores(projected) > self.threshold
        return far | self.off_grid(rows), self.cell_ids(projected)

    def cell_ids(self, projected: np.ndarray[Any, Any]) -> list[int]:
        """The coverage grid cell of each projected row."""
        if projected.shape[0] == 1:
            # One row (the usual request): plain Python is faster than numpy here.
            cell = 0
            for edges, value in zip(self._edge_lists, projected[0].tolist(), strict=False):
                cell = cell * (COVERAGE_BINS + 1) + bisect.bisect_left(edges, value)
            return [cell]
        ids = np.zeros(projected.shape[0], dtype=np.int64)
        for axis in range(self.edges.shape[0]):
            bins = np.searchsorted(self.edges[axis], projected[:, axis])
            ids = ids * (COVERAGE_BINS + 1) + bins
        result: list[int] = ids.tolist()
        return result

    def to_json(self) -> bytes:
        document = {
            "version": REFERENCE_VERSION,
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "variances": self.variances.tolist(),
            "threshold": self.threshold,
            "step": self.step,
            "edges": self.edges.tolist(),
            "cells": self.cells,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Reference:
        """ValueError if `data` is not a reference this version reads."""
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("version") != REFERENCE_VERSION:
                raise ValueError("unknown reference version")
            reference = cls(
                mean=np.asarray(document["mean"], dtype=np.float32),
                components=np.asarray(document["components"], dtype=np.float32),
                variances=np.asarray(document["variances"], dtype=np.float32),
                threshold=float(document["threshold"]),
                step=float(document.get("step", 0.0)),
                edges=np.asarray(document["edges"], dtype=np.float32),
                cells=int(document["cells"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"The protection reference is not valid: {exc}") from None
        features = reference.mean.shape
        if (
            reference.mean.ndim != 1
            or reference.components.shape != features * 2
            or reference.variances.shape != features
            or reference.edges.ndim != 2
            or reference.edges.shape[0] > features[0]
            or not (reference.variances > 0).all()
            or not np.isfinite(reference.components).all()
            or not reference.threshold > 0
            or not 0 <= reference.step < 1e6
            or reference.cells < 1
        ):
            raise ValueError("The protection reference is not valid: inconsistent shapes.")
        return reference


def _fit(rows: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], ...]:
    """Mean, principal directions (all of them) and floored variances of `rows`."""
    mean = rows.mean(axis=0)
    # All d directions are needed; with n >= d rows the thin decomposition has them (and
    # never builds an n x n matrix).
    _, singular, vt = np.linalg.svd(rows - mean, full_matrices=rows.shape[0] < rows.shape[1])
    spread = np.zeros(rows.shape[1])
    spread[: singular.shape[0]] = singular**2 / max(rows.shape[0] - 1, 1)
    # Directions the real inputs never vary along (a pixel always blank) get a small
    # floor: any query that moves along them is far out.
    floor = max(float(spread.mean()) * VARIANCE_FLOOR, 1e-9)
    return mean, vt, np.maximum(spread, floor)


def _grid_step(rows: np.ndarray[Any, Any]) -> float:
    """The largest common step of the sample's values among GRID_STEPS, or 0."""
    for step in GRID_STEPS:
        scaled = rows / step
        if float(np.abs(scaled - np.rint(scaled)).max()) <= GRID_TOLERANCE / 10:
            return step
    return 0.0


def build_reference(samples: np.ndarray[Any, Any]) -> Reference:
    """The reference of a sample of a model's real inputs ([n, ...], n >= 50): what the
    monitor compares queries with. It keeps statistics only, not the samples."""
    rows = features_of(np.asarray(samples)).astype(np.float64)
    if rows.shape[0] < 50:
        raise ValueError("A reference needs at least 50 sample inputs.")
    if not np.isfinite(rows).all():
        raise ValueError("The reference samples contain NaN or infinite values.")
    # The outlier threshold is an honest quantile: each half is scored by a fit of the
    # other half, as fresh real inputs would be.
    order = np.random.default_rng(0).permutation(rows.shape[0])
    halves = (order[: rows.shape[0] // 2], order[rows.shape[0] // 2 :])
    held_out = []
    for fit_on, score_on in (halves, halves[::-1]):
        mean, vt, variances = _fit(rows[fit_on])
        held_out.append((((rows[score_on] - mean) @ vt.T) ** 2 / variances).sum(axis=1))
    threshold = float(np.quantile(np.concatenate(held_out), OOD_QUANTILE))
    mean, vt, variances = _fit(rows)
    projected = (rows - mean) @ vt[:COVERAGE_AXES].T
    quantiles = np.linspace(0, 1, COVERAGE_BINS + 1)[1:-1]
    edges = np.stack([np.quantile(projected[:, a], quantiles) for a in range(projected.shape[1])])
    reference = Reference(
        mean=mean.astype(np.float32),
        components=vt.astype(np.float32),
        variances=variances.astype(np.float32),
        threshold=threshold,
        step=_grid_step(rows),
        edges=edges.astype(np.float32),
        cells=1,
    )
    occupied = len(set(reference.cell_ids(projected.astype(np.float32))))
    return dataclasses.replace(reference, cells=occupied)


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True, slots=True)
class MonitorPolicy:
    """Which risk levels lead to which action (None: never)."""

    enabled: bool = True
    alert_at: float | None = DEFAULT_ALERT
    throttle_at: float | None = None
    block_at: float | None = 1.0
    throttle_rps: float = 1.0

    def level(self, risk: float, queries: int) -> str:
        if not self.enabled:
            return "ok"
        if self.block_at is not None and risk >= self.block_at and queries >= MIN_QUERIES_TO_BLOCK:
            return "block"
        if self.throttle_at is not None and risk >= self.throttle_at:
            return "throttle"
        if self.alert_at is not None and risk >= self.alert_at:
            return "alert"
        return "ok"

    def describe(self) -> dict[str, Any]:
        return {
            "monitor": "on" if self.enabled else "off",
            "alert_at": self.alert_at,
            "throttle_at": self.throttle_at,
            "block_at": self.block_at,
            "throttle_rps": self.throttle_rps,
        }


def _threshold(options: Mapping[str, Any], name: str, default: float | None) -> float | None:
    raw = options.get(name)
    if raw is None:
        return default
    if isinstance(raw, str) and raw.strip().lower() in ("off", "never", "none"):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is a risk level (a number, e.g. 0.5) or off.") from None
    if not 0 < value <= 10 or math.isnan(value):
        raise ValueError(f"{name} must be above 0 and at most 10.")
    return value


def monitor_policy_of(options: Mapping[str, Any]) -> MonitorPolicy:
    """The model's monitor policy from its options; ValueError if one is not valid."""
    default = MonitorPolicy()
    enabled_raw = str(options.get(MONITOR_OPTION, "on")).strip().lower()
    if enabled_raw not in ("on", "off"):
        raise ValueError(f"{MONITOR_OPTION} is on or off.")
    rate_raw = options.get(THROTTLE_RATE_OPTION, default.throttle_rps)
    try:
        rate = float(rate_raw)
    except (TypeError, ValueError):
        raise ValueError(f"{THROTTLE_RATE_OPTION} is a number of requests per second.") from None
    if not 0 < rate <= 1e6 or math.isnan(rate):
        raise ValueError(f"{THROTTLE_RATE_OPTION} must be above 0.")
    return MonitorPolicy(
        enabled=enabled_raw == "on",
        alert_at=_threshold(options, ALERT_OPTION, default.alert_at),
        throttle_at=_threshold(options, THROTTLE_OPTION, default.throttle_at),
        block_at=_threshold(options, BLOCK_OPTION, default.block_at),
        throttle_rps=rate,
    )


# ---------------------------------------------------------------- per-key state


@dataclass(frozen=True, slots=True)
class RiskReport:
    """What the worker tells the gateway about one key (never any input)."""

    caller: str
    tenant: str
    risk: float
    level: str
    queries: int
    signals: dict[str, float]


class _Stream:
    """One key's history with one model (bounded; see the module docstring)."""

    __slots__ = (
        "added",
        "added_sq",
        "added_sum",
        "cells",
        "count",
        "cusum",
        "distances",
        "features",
        "growing",
        "level",
        "outliers",
        "queries",
        "shapiro_w",
        "sizes",
        "tenant",
        "unreported",
        "untested",
    )

    def __init__(self, tenant: str, features: int) -> None:
        self.tenant = tenant
        self.features = features
        # PRADA's growing set, per predicted class: rows (capacity doubles) and how many.
        self.growing: dict[int, np.ndarray[Any, Any]] = {}
        self.sizes: dict[int, int] = {}
        self.count = 0
        # Distances of the queries added to the growing set (PRADA's threshold).
        self.added = 0
        self.added_sum = 0.0
        self.added_sq = 0.0
        self.distances: deque[float] = deque(maxlen=DISTANCE_WINDOW)
        self.shapiro_w = 1.0
        self.untested = 0
        self.queries = 0
        self.outliers = 0
        self.cusum = 0.0
        self.cells: set[int] = set()
        self.level = "ok"
        self.unreported = 0


class ExtractionMonitor:
    """Scores each key's queries to one model; see the module docstring."""

    def __init__(self, policy: MonitorPolicy, reference: Reference | None) -> None:
        self.policy = policy
        self.reference = reference
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._up = math.log(OOD_ATTACK_RATE / OOD_BENIGN_RATE)
        self._down = math.log((1 - OOD_ATTACK_RATE) / (1 - OOD_BENIGN_RATE))
        # Coverage alone raises an alert at most, never a block.
        alert = policy.alert_at if policy.alert_at is not None else DEFAULT_ALERT
        if policy.block_at is not None:
            alert = min(alert, 0.99 * policy.block_at)
        self._coverage_cap = alert

    def reset(self, caller: str) -> None:
        """Forget a key's history (an admin cleared it)."""
        self._streams.pop(caller, None)

    def observe(
        self,
        caller: str,
        tenant: str,
        inputs: np.ndarray[Any, Any],
        predicted: np.ndarray[Any, Any],
        policy: MonitorPolicy | None = None,
    ) -> RiskReport | None:
        """Account one request's rows (`inputs` [batch, ...], `predicted` classes [batch]);
        a report when the key's level changed, or every REPORT_EVERY queries. `policy`:
        the caller's own (its tenant's or key's overrides), else the model's."""
        policy = policy or self.policy
        if not policy.enabled or inputs.shape[0] == 0:
            return None
        rows = features_of(inputs)
        stream = self._stream(caller, tenant, rows.shape[1])
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            # NaN or infinite values are nothing a real input holds: outliers, kept out
            # of the distances (where one NaN would silence PRADA).
            for _ in range(int((~finite).sum())):
                self._count_outlier(stream, True)
            stream.queries += int((~finite).sum())
            stream.unreported += int((~finite).sum())
            rows, predicted = rows[finite], np.asarray(predicted)[finite]
        reference = self.reference
        if reference is not None and reference.features == rows.shape[1]:
            outliers, cells = reference.outliers(rows)
            for outlier in outliers.tolist():
                self._count_outlier(stream, outlier)
            stream.cells.update(cells)
        for row, label in zip(rows, predicted.tolist(), strict=False):
            self._observe_prada(stream, row, int(label))
        stream.queries += rows.shape[0]
        stream.unreported += rows.shape[0]
        risk = self._risk(stream)
        level = policy.level(risk, stream.queries)
        if level == stream.level and stream.unreported < REPORT_EVERY:
            return None
        stream.level, stream.unreported = level, 0
        return self._report(caller, stream, risk)

    def _stream(self, caller: str, tenant: str, features: int) -> _Stream:
        stream = self._streams.get(caller)
        if stream is not None and stream.features == features:
            self._streams.move_to_end(caller)
            return stream
        # A new key, or one whose inputs changed shape: a fresh history.
        self._streams.pop(caller, None)
        while len(self._streams) >= MAX_STREAMS:
            self._streams.popitem(last=False)
        stream = self._streams[caller] = _Stream(tenant, features)
        return stream

    def _count_outlier(self, stream: _Stream, outlier: bool) -> None:
        stream.outliers += outlier
        stream.cusum = max(0.0, stream.cusum + (self._up if outlier else self._down))

    def _observe_prada(self, stream: _Stream, row: np.ndarray[Any, Any], label: int) -> None:
        size = stream.sizes.get(label, 0)
        if size == 0:
            self._grow(stream, row, label, None)
            return
        diff = stream.growing[label][:size] - row
        nearest = math.sqrt(float(np.einsum("ij,ij->i", diff, diff).min()))
        if nearest == 0.0:
            # The same input again (a retry, a cache-less client) teaches nothing new.
            return
        stream.distances.append(nearest)
        if stream.added < 2 or nearest > _mean_minus_std(stream):
            self._grow(stream, row, label, nearest)
        stream.untested += 1
        if len(stream.distances) >= PRADA_MIN_DISTANCES and stream.untested >= PRADA_TEST_EVERY:
            stream.untested = 0
            stream.shapiro_w = _shapiro_w(np.fromiter(stream.distances, dtype=np.float64))

    @staticmethod
    def _grow(stream: _Stream, row: np.ndarray[Any, Any], label: int, d: float | None) -> None:
        if stream.count >= GROWING_CAP:
            return
        size = stream.sizes.get(label, 0)
        rows = stream.growing.get(label)
        if rows is None or rows.shape[0] == size:
            grown = np.empty((max(8, 2 * size), stream.features), dtype=np.float32)
            grown[:size] = rows[:size] if rows is not None else grown[:0]
            rows = stream.growing[label] = grown
        rows[size] = row
        stream.sizes[label] = size + 1
        stream.count += 1
        if d is not None:
            stream.added += 1
            stream.added_sum += d
            stream.added_sq += d * d

    def _prada(self, stream: _Stream) -> float:
        if len(stream.distances) < PRADA_MIN_DISTANCES:
            return 0.0
        return max(0.0, (PRADA_NORMAL - stream.shapiro_w) / (PRADA_NORMAL - PRADA_DELTA))

    def _coverage(self, stream: _Stream) -> float:
        if self.reference is None:
            return 0.0
        return min(1.0, len(stream.cells) / self.reference.cells)

    def _risk(self, stream: _Stream) -> float:
        coverage = self._coverage(stream) / COVERAGE_ALERT * self._coverage_cap
        return max(
            self._prada(stream),
            stream.cusum / OOD_BLOCK_CUSUM,
            min(self._coverage_cap, coverage),
        )

    def _report(self, caller: str, stream: _Stream, risk: float) -> RiskReport:
        signals = {
            "prada_w": round(stream.shapiro_w, 4),
            "prada": round(self._prada(stream), 4),
            "ood": round(stream.cusum / OOD_BLOCK_CUSUM, 4),
            "outlier_share": round(stream.outliers / max(stream.queries, 1), 4),
            "coverage": round(self._coverage(stream), 4),
        }
        return RiskReport(
            caller, stream.tenant, round(risk, 4), stream.level, stream.queries, signals
        )

    def snapshot(self) -> list[RiskReport]:
        """Every key's current score (for tests and diagnostics)."""
        return [
            self._report(caller, stream, self._risk(stream))
            for caller, stream in self._streams.items()
        ]


def _mean_minus_std(stream: _Stream) -> float:
    """Mean minus standard deviation of the distances of the growing set's members."""
    mean = stream.added_sum / stream.added
    variance = max(stream.added_sq / stream.added - mean * mean, 0.0)
    return mean - math.sqrt(variance)


def _shapiro_w(values: np.ndarray[Any, Any]) -> float:
    from scipy.stats import shapiro

    if float(values.max() - values.min()) == 0.0:
        # Constant distances (the same query again and again) are as far from normal as
        # it gets; scipy warns and returns 1.
        return 0.0
    return float(shapiro(values).statistic)


def load_reference(data: bytes | None) -> Reference | None:
    return None if data is None else Reference.from_json(data)
