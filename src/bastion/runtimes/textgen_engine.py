"""Continuous batching for the text-generation runtime: many requests, one forward per step.

:class:`TextGenerationEngine` runs in its own daemon thread. :meth:`~TextGenerationEngine.submit`
only queues a request; between two decoding steps the thread checks the new requests
(the same :class:`~bastion.runtimes.base.RuntimeInputError` as ``generate()``, given to
``done``), ends the cancelled ones, admits waiting requests in arrival order while there is
room for all their ``n`` sequences (at most ``max_sequences`` in all; a request with more
choices than that runs alone once the batch is empty), reads each admitted prompt once (a
prefill of its own, shared by its ``n`` choices), and then decodes the next token of every
active sequence in one forward pass of the model. A sequence that ends (end token,
``max_tokens``, stop string) leaves the batch at once; its request is answered when its
last sequence ends.

KV cache: one batched ``DynamicCache`` kept across steps, its keys and values
``[rows, heads, width, head_dim]`` left-padded to a common width. Each row's real tokens are
its last ``length`` positions, so its padding mask is ``position >= width - length`` and its
next token's position id is ``length`` (RoPE was applied to the cached keys with their true
positions, so the padding does not shift them). A joining request's prompt cache is
left-padded (or the batch is) to the longer width, repeated once per choice and
concatenated; rows that leave are dropped with ``index_select``, and the left padding that all
remaining rows share is trimmed. When no row is padded the model gets neither a mask nor
position ids: the very call ``generate()`` makes. Caches the padding cannot describe (sliding
windows, linear attention, shared layers: any layer that is not a plain ``DynamicLayer``)
are decoded instead as a batch of one per sequence, still interleaved with the others.

Exact per sequence: every sequence is a :class:`~bastion.runtimes.textgen.SequenceState`,
the code ``generate()`` uses: its own generator (:func:`~bastion.runtimes.textgen.choice_seed`:
choice 0 uses the request's seed, choice ``i`` a SHA-256 derivation of the seed and ``i``),
the logits bias taken when the request starts and given the sequence's previous token, the
same sampling, end token, stop strings, ``max_tokens`` and streaming holdback. A cancelled
request (its token is checked before every step) gets the result ``generate()`` returns
when cancelled: the text so far, "stop" for unfinished choices, the tokens used.
:meth:`~TextGenerationEngine.close` answers what is left with
:class:`~bastion.runtimes.base.Cancelled`.

``done`` is called exactly once per request, from the engine thread. An exception from
``emit`` fails that request only (``done(exc)``); one from ``done`` is logged by its type;
one from the model's forward fails the requests of that forward. Texts are never logged.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bastion.runtimes.base import Cancelled, CancelToken, Done, EmitDelta
from bastion.runtimes.textgen import SequenceState, TextGenerationRuntime
from bastion.wire.protocol import Choice, Generate, GenerateResult

logger = logging.getLogger(__name__)

# How long close() waits for the engine thread (it ends after the step in progress).
CLOSE_TIMEOUT_S = 30.0


class _Job:
    """One request and where it stands."""

    def __init__(self, request: Generate, cancel: CancelToken, emit: EmitDelta, done: Done):
        self.request = request
        self.cancel = cancel
        self.emit = emit
        self.done = done
        self.prompt_ids: list[int] = []
        self.sequences: list[SequenceState] = []
        # (text, finish reason) of each choice, once it has ended.
        self.outcomes: list[tuple[str, str] | None] = [None] * max(request.n, 0)
        # Its sequences still counted in `active`.
        self.counted = max(request.n, 0)
        self.over = False
        # Its share of the engine's compute (its prompt check and prefill, each decoding
        # step's forward divided among that step's rows, its rows' sampling), and when it
        # was submitted and started (its wait for a place in the batch).
        self.compute_s = 0.0
        self.submitted = time.perf_counter()
        self.started: float | None = None

    @contextmanager
    def charged(self) -> Iterator[None]:
        """Charge the time the block takes to this request (also when it raises)."""
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.compute_s += time.perf_counter() - begun


@dataclass(slots=True)
class _Row:
    job: _Job
    index: int  # of its choice
    sequence: SequenceState


def _plain_layers(cache: DynamicCache) -> list[DynamicLayer] | None:
    """The layers of `cache` when left padding can describe it (each a full-attention
    DynamicLayer holding states), else None."""
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or type(layer) is not DynamicLayer:
            return None
        if layer.keys is None or layer.values is None:
            return None
        layers.append(layer)
    return layers or None


def _states(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None
    return keys, values


def _left_pad(states: torch.Tensor, amount: int) -> torch.Tensor:
    """`states` ([rows, heads, length, dim]) with `amount` zero positions before them."""
    return states if amount == 0 else F.pad(states, (0, 0, amount, 0))


@dataclass(slots=True)
class _Block:
    """A request joining the batch: its prompt's cache (one row, no padding), the cache's
    layers, the prompt's length and the rows that continue from it (one per choice)."""

    cache: DynamicCache
    layers: list[DynamicLayer]
    length: int
    rows: list[_Row]


class _Batch:
    """Rows decoded together: one left-padded cache, the real length of each row."""

    def __init__(self, runtime: TextGenerationRuntime) -> None:
        self._runtime = runtime
        self.rows: list[_Row] = []
        self.lengths: list[int] = []
        self.width = 0
        self.cache: DynamicCache | None = None
        self._layers: list[DynamicLayer] = []

    @classmethod
    def alone(
        cls, runtime: TextGenerationRuntime, cache: DynamicCache, length: int, row: _Row
    ) -> _Batch:
        """A batch of one row over a cache that is never padded (nor merged)."""
        batch = cls(runtime)
        batch.cache, batch.rows, batch.lengths, batch.width = cache, [row], [length], length
        return batch

    def join(self, blocks: Sequence[_Block]) -> None:
        """Add the rows of `blocks`, left-padding every row to the longest."""
        width = max([self.width, *(block.length for block in blocks)])
        if self.cache is None:
            # Empty: take the first block's cache object; its states are replaced below.
            self.cache, self._layers = blocks[0].cache, blocks[0].layers
        for index, target in enumerate(self._layers):
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            if self.rows:
                own_keys, own_values = _states(target)
                keys.append(_left_pad(own_keys, width - self.width))
                values.append(_left_pad(own_values, width - self.width))
            for block in blocks:
                block_keys, block_values = _states(block.layers[index])
                rows, pad = len(block.rows), width - block.length
                keys.append(_left_pad(block_keys, pad).expand(rows, -1, -1, -1))
                values.append(_left_pad(block_values, pad).expand(rows, -1, -1, -1))
            target.keys, target.values = torch.cat(keys), torch.cat(values)
        for block in blocks:
            self.rows.extend(block.rows)
            self.lengths.extend([block.length] * len(block.rows))
        self.width = width

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices`, and trim the padding they all share."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.clear()
            return
        self.rows = [self.rows[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        selected = torch.tensor(indices, dtype=torch.long)
        trim = self.width - max(self.lengths)
        for layer in self._layers:
            keys, values = _states(layer)
            keys, values = keys.index_select(0, selected), values.index_select(0, selected)
            if trim:
                keys, values = keys[..., trim:, :], values[..., trim:, :]
            layer.keys, layer.values = keys, values
        self.width -= trim

    def clear(self) -> None:
        self.rows, self.lengths, self.width = [], [], 0
        self.cache, self._layers = None, []

    def forward(self) -> torch.Tensor:
        """Feed each row its next token; the last logits of each row, [rows, vocab]."""
        assert self.cache is not None
        inputs = torch.tensor([[row.sequence.next_input] for row in self.rows], dtype=torch.long)
        extra: dict[str, torch.Tensor] = {}
        if min(self.lengths) < self.width:
            starts = torch.tensor([self.width - length for length in self.lengths])
            positions = torch.arange(self.width + 1)
            extra["attention_mask"] = positions[None, :] >= starts[:, None]
            extra["position_ids"] = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        logits = self._runtime._forward(inputs, self.cache, **extra)
        self.lengths = [length + 1 for length in self.lengths]
        self.width += 1
        return logits


class TextGenerationEngine:
    """Continuous batching over a :class:`TextGenerationRuntime` (see the module doc)."""

    def __init__(self, runtime: TextGenerationRuntime, max_sequences: int) -> None:
        if max_sequences < 1:
            raise ValueError("max_sequences must be at least 1")
        self._runtime = runtime
        self._max_sequences = max_sequences
        self._wake = threading.Condition(threading.Lock())
        self._inbox: list[_Job] = []
        self._closing = False
        self._active = 0
        # Owned by the engine thread: the requests it took and has not answered yet, in
        # arrival order, and those of them waiting to start.
        self._live: dict[int, _Job] = {}
        self._waiting: deque[_Job] = deque()
        self._batch = _Batch(runtime)
        self._alone: list[_Batch] = []
        self._thread = threading.Thread(target=self._run, name="textgen-engine", daemon=True)
        self._thread.start()

    # The GenerationEngine protocol.

    def submit(self, request: Generate, cancel: CancelToken, emit: EmitDelta, done: Done) -> None:
        """Queue `request`; it joins the batch between two steps."""
        job = _Job(request, cancel, emit, done)
        with self._wake:
            if self._closing:
                raise RuntimeError("the generation engine is closed")
            self._inbox.append(job)
            self._active += job.counted
            self._wake.notify()

    @property
    def active(self) -> int:
        """Sequences being decoded or waiting to join."""
        with self._wake:
            return self._active

    def close(self) -> None:
        """Answer what is left with Cancelled and stop the thread (a bounded wait)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_TIMEOUT_S)

    # The engine thread.

    def _batches(self) -> list[_Batch]:
        return [batch for batch in (self._batch, *self._alone) if batch.rows]

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closing or self._inbox or self._waiting or self._batches()):
                        self._wake.wait()
                    if self._closing:
                        break
                    arrivals, self._inbox = self._inbox, []
                try:
                    self._step(arrivals)
                except BaseException as exc:
                    # A fault of the engine itself: fail what it holds, and go on.
                    logger.error(
                        "the generation engine failed a step",
                        extra={"exc_type": type(exc).__name__},
                    )
                    for job in list(self._live.values()):
                        self._finish(job, exc)
                    self._waiting.clear()
                    self._batch.clear()
                    self._alone = []
        with self._wake:
            left, self._inbox = self._inbox, []
        for job in [*self._live.values(), *left]:
            self._finish(job, Cancelled(len(job.prompt_ids)))
        self._waiting.clear()
        self._batch.clear()
        self._alone = []

    def _step(self, arrivals: list[_Job]) -> None:
        for job in arrivals:
            self._live[id(job)] = job
            before = job.compute_s
            try:
                with job.charged():
                    job.prompt_ids = self._runtime._checked_prompt(job.request)
            except BaseException as exc:
                self._finish(job, exc)
                continue
            # Its wait for a place starts once its prompt is checked.
            job.submitted += job.compute_s - before
            self._waiting.append(job)
        self._admit()
        self._end_cancelled()
        for batch in self._batches():
            self._decode(batch)
        self._prune()

    def _admit(self) -> None:
        """Start waiting requests, in order, while all their sequences fit."""
        blocks: list[_Block] = []
        occupied = sum(len(batch.rows) for batch in self._batches())
        while self._waiting:
            job = self._waiting[0]
            if occupied and occupied + job.request.n > self._max_sequences:
                break
            self._waiting.popleft()
            if job.cancel.cancelled:
                self._complete(job, cancelled=True)
                continue
            job.started = time.perf_counter()
            started = self._start(job)
            if started is None:
                continue
            cache, rows = started
            occupied += len(rows)
            length = len(job.prompt_ids)
            layers = _plain_layers(cache)
            if layers is not None:
                blocks.append(_Block(cache, layers, length, rows))
            else:
                caches = [cache, *(copy.deepcopy(cache) for _ in rows[1:])]
                self._alone.extend(
                    _Batch.alone(self._runtime, own, length, row)
                    for own, row in zip(caches, rows, strict=True)
                )
        if blocks:
            self._batch.join(blocks)

    def _start(self, job: _Job) -> tuple[DynamicCache, list[_Row]] | None:
        """Read the prompt and choose each choice's first token: the cache and the rows
        still decoding, or None when the request is over already."""
        runtime, request = self._runtime, job.request
        bias = runtime._logits_bias
        stops = runtime._stops(request)
        try:
            with job.charged():
                logits, cache = runtime._prefill(job.prompt_ids)
        except BaseException as exc:
            self._fail(job, exc, "the model failed to read a prompt")
            return None
        rows: list[_Row] = []
        try:
            for index in range(request.n):
                emit = partial(job.emit, index)
                # Charged before its end (which answers it) is handled.
                with job.charged():
                    sequence = runtime._sequence(request, job.prompt_ids, stops, index, bias, emit)
                    job.sequences.append(sequence)
                    sequence.advance(logits)
                if sequence.finished:
                    self._sequence_ended(job, index)
                else:
                    rows.append(_Row(job, index, sequence))
        except BaseException as exc:
            self._fail(job, exc, "a generation step failed")
            return None
        return (cache, rows) if rows and not job.over else None

    def _decode(self, batch: _Batch) -> None:
        """One step of `batch`: one forward, then each row's next token."""
        begun = time.perf_counter()
        try:
            logits = batch.forward()
        except BaseException as exc:
            # The cache may be half updated: the whole batch fails.
            logger.error("the model failed a decoding step", extra={"exc_type": type(exc).__name__})
            for job in {id(row.job): row.job for row in batch.rows}.values():
                self._finish(job, exc)
            batch.clear()
            return
        # The forward's time, shared equally by the rows it decoded.
        share = (time.perf_counter() - begun) / len(batch.rows)
        for row, row_logits in zip(batch.rows, logits, strict=True):
            job = row.job
            job.compute_s += share
            if job.over:
                continue
            try:
                with job.charged():
                    row.sequence.advance(row_logits)
                if row.sequence.finished:
                    self._sequence_ended(job, row.index)
            except BaseException as exc:
                self._fail(job, exc, "a generation step failed")

    def _end_cancelled(self) -> None:
        """Cancelled requests leave, answered with what they have so far."""
        for job in list(self._live.values()):
            if job.cancel.cancelled:
                self._complete(job, cancelled=True)
        if any(job.over for job in self._waiting):
            self._waiting = deque(job for job in self._waiting if not job.over)
        self._prune()

    def _prune(self) -> None:
        """Rows that ended, or whose request is over, leave their batch."""
        for batch in self._batches():
            batch.keep(
                [
                    index
                    for index, row in enumerate(batch.rows)
                    if not row.job.over and not row.sequence.finished
                ]
            )
        self._alone = [batch for batch in self._alone if batch.rows]

    def _sequence_ended(self, job: _Job, index: int) -> None:
        """A choice finished: stream its rest; answer its request when it was the last."""
        job.outcomes[index] = job.sequences[index].conclude(job.cancel.cancelled)
        self._uncount(job, 1)
        if all(outcome is not None for outcome in job.outcomes):
            self._complete(job, cancelled=False)

    def _complete(self, job: _Job, cancelled: bool) -> None:
        """Answer `job` with its choices (unfinished ones end as generate() ends them)."""
        request = job.request
        for index, outcome in enumerate(job.outcomes):
            if outcome is None:
                if index < len(job.sequences):
                    job.outcomes[index] = job.sequences[index].conclude(cancelled)
                else:
                    job.outcomes[index] = ("", "stop")
        choices = [
            Choice(index=index, text="" if request.stream else text, finish_reason=finish)
            for index, (text, finish) in enumerate(o for o in job.outcomes if o is not None)
        ]
        result = GenerateResult(
            id=request.id,
            choices=choices,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=sum(len(sequence.generated) for sequence in job.sequences),
            compute_s=job.compute_s,
            queue_s=(job.started or time.perf_counter()) - job.submitted,
        )
        self._finish(job, result)

    def _fail(self, job: _Job, exc: BaseException, what: str) -> None:
        logger.warning(what, extra={"exc_type": type(exc).__name__})
        self._finish(job, exc)

    def _uncount(self, job: _Job, sequences: int) -> None:
        sequences = min(sequences, job.counted)
        job.counted -= sequences
        with self._wake:
            self._active -= sequences

    def _finish(self, job: _Job, outcome: GenerateResult | BaseException) -> None:
        """Call `done` once; what it raises is logged by type only."""
        if job.over:
            return
        job.over = True
        self._live.pop(id(job), None)
        self._uncount(job, job.counted)
        try:
            job.done(outcome)
        except BaseException as exc:
            logger.error(
                "a generation's done callback failed", extra={"exc_type": type(exc).__name__}
            )
