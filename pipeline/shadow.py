"""A second model in shadow: stepped on the same waves as the served one, with its own states.

    hiddenstate serve --model v1.onnx --shadow-model v2.onnx

Per wave, after the served model's step (`pipeline.processor`), the shadow takes
the same events and the same feature array: slots in its own `StateStore`, one
gather, one `model.step` (one onnxruntime call per model per wave), one scatter,
its predictions encoded for `--shadow-output-topic`, and the two models' outputs
compared into `hiddenstate_shadow_*` (`pipeline.metrics.RolloutMetrics`). Its
snapshots go to a changelog of its own, in the same checkpoint (and the same
transaction) as the served model's: `pipeline.rollout.Checkpoints`.

Its predictions go to the partition of their input event (the shadow output topic is
co-partitioned with the input, like the changelog): a stream's predictions stay in
one partition, in order, and no partitioner hashes each key again (kafka-python's
murmur2 runs in Python: about as much CPU as the rest of the record).

Warm and cold. The shadow may join a stream mid-way: it was started after the
stream's first events. Its state then did not see them, and the store records
how many it missed (`StateStore.missed`): such a stream is **cold**. A stream the
shadow has seen from its first event, or since its last reset, is **warm**: its
state is exactly what the shadow model would hold had it served the stream from
the start. The served model's step count says which is which, event by event:

- the served model starts the stream from zeros (a new stream, a reset, or one
  that was evicted and came back): the shadow starts from zeros too: warm;
- the shadow holds no state yet (its `step` is 0) but the served model had
  stepped the stream before: the shadow joins mid-stream, cold, having missed
  what the served state holds (its `step` - 1 after this event).

A cold stream stays cold until a reset, or until `--shadow-warmup-events`
replays its past events from the input topic (`pipeline.rollout`). The missed
count travels with the snapshot (`HSS2`, `pipeline.changelog`), so it survives
restarts and is what a promotion checks.

The two stores hold the same streams: the served store tells the shadow's which
streams it evicted (`StateStore.on_forget`), the loop drops a partition from both
(`Processor.drop_partition`), and a restore aligns them (`Shadow.align`).

With `--labels-topic`, the shadow's predictions go to a prediction ring of its own
(`Shadow.ring`, `pipeline.ring`) at the served model's step of each event, and the labels
judge them into `hiddenstate_online_*` of the shadow's identity (`pipeline.live`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np
from numpy.typing import NDArray

from pipeline.codec import Event
from pipeline.config import ServeConfig
from pipeline.errors import ConfigError
from pipeline.formats import Encoder
from pipeline.metrics import RolloutMetrics
from pipeline.model_spec import ModelSpec
from pipeline.records import OutputRecord
from pipeline.ring import PredictionRing
from pipeline.runtime import Outputs, StepModel
from pipeline.settings import who
from pipeline.state_store import Rows, StateStore
from pipeline.waves import plan_waves

log = logging.getLogger(__name__)

_ARGMAX_TASKS = ("classification", "next_token")


def check_shadow(
    primary: ModelSpec, shadow: ModelSpec, primary_path: str, shadow_path: str
) -> None:
    """`ConfigError` unless `shadow` can be stepped on `primary`'s events: the same
    features in the same order and dtype (and vocabulary), and another identity (the
    identity names the changelog)."""
    setting = who("shadow_model")
    if shadow.identity == primary.identity:
        raise ConfigError(
            f"{setting}: {shadow_path} is the same model as --model {primary_path} "
            f"(identity {shadow.identity}); shadow another version or training of it"
        )
    mine, theirs = primary.input, shadow.input
    if theirs.features != mine.features:
        missing = [f for f in mine.features if f not in theirs.features]
        extra = [f for f in theirs.features if f not in mine.features]
        detail = (
            f"missing {missing}, extra {extra}"
            if missing or extra
            else "the same names in another order"
        )
        raise ConfigError(
            f"{setting}: {shadow_path} ({shadow.identity}) takes the features "
            f"{list(theirs.features)}, --model {primary_path} ({primary.identity}) takes "
            f"{list(mine.features)} ({detail}); a shadow is stepped on the same events, so it "
            "must take the same features in the same order: export it with them"
        )
    if theirs.dtype != mine.dtype or theirs.vocabulary != mine.vocabulary:
        raise ConfigError(
            f"{setting}: {shadow_path} ({shadow.identity}) takes {theirs.dtype} input"
            f"{' over another vocabulary' if theirs.vocabulary != mine.vocabulary else ''}, "
            f"--model {primary_path} takes {mine.dtype}; a shadow must read the same events "
            "the same way"
        )


@dataclass(frozen=True)
class Comparison:
    """Which outputs of the two models are compared: those with the same name and shape;
    `argmax` those of them that are classes (both models classify)."""

    outputs: tuple[str, ...]
    argmax: tuple[str, ...]

    @classmethod
    def of(cls, primary: ModelSpec, shadow: ModelSpec) -> Comparison:
        theirs = {o.name: o.shape for o in shadow.outputs}
        outputs = tuple(o.name for o in primary.outputs if theirs.get(o.name) == o.shape)
        classes = primary.task in _ARGMAX_TASKS and shadow.task == primary.task
        return cls(outputs, outputs if classes else ())


class Shadow:
    """The shadow model, its states and its predictions; see the module docstring.

    `clock` gives wall time (last-seen of its streams), `timer` a monotonic reading for
    its step latency; both are there so that tests can move time by hand.
    """

    def __init__(
        self,
        model: StepModel,
        store: StateStore,
        encoder: Encoder,
        metrics: RolloutMetrics,
        comparison: Comparison,
        *,
        max_wave_size: int = 1024,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        gauge_interval_s: float = 1.0,
    ) -> None:
        self.model = model
        self.store = store
        self.comparison = comparison
        self._encoder = encoder
        self._metrics = metrics
        self._clock = clock
        self._timer = timer
        self._gauge_interval_s = gauge_interval_s
        self._last_gauge = float("-inf")
        self._max_wave = max_wave_size
        self._x_dtype = np.int64 if model.spec.input.dtype == "int64" else np.float32
        self._n_features = len(model.spec.input.features)
        # With --labels-topic, the ring its predictions are judged from (`pipeline.live`).
        self.ring: PredictionRing | None = None

    @property
    def spec(self) -> ModelSpec:
        """The shadow model's contract metadata."""
        return self.model.spec

    # ------------------------------------------------------------------ every wave

    def step_wave(
        self,
        events: Sequence[Event],
        x: NDArray[np.generic],
        partitions: Sequence[int],
        offsets: Sequence[int],
        served: Outputs,
        served_steps: NDArray[np.int64],
        served_held: NDArray[np.bool_],
        queued_seconds: float,
        now: float,
    ) -> list[OutputRecord]:
        """Step the shadow on a wave the served model just stepped (`served` its outputs,
        `served_steps` its step counts after the step, `served_held` whether it held each
        stream before the wave); returns the shadow's predictions."""
        store = self.store
        keys = [e.key for e in events]
        slots = store.acquire(keys, partitions, offsets, now)
        before = store.steps(slots)
        # Not by `served_steps == 1`: a zero placeholder the served model restored (a forced
        # promotion) also makes its first step here, and the shadow's state of it is real.
        fresh = ~served_held | np.fromiter(
            (e.reset for e in events), dtype=np.bool_, count=len(events)
        )
        if fresh.any():  # the served model starts these from zeros: so does the shadow
            store.reset_slots(slots[fresh])
        joined = (before == 0) & ~fresh
        if joined.any():  # mid-stream: it missed what the served model stepped before
            store.set_missed(slots[joined], served_steps[joined] - 1)
        started = self._timer()
        outputs, new_states = self.model.step(x, store.gather(slots))
        inference = self._timer() - started
        store.scatter(slots, new_states)
        if self.ring is not None:
            # At the served model's steps, not its own: a label names a step as the served
            # model counts it (its predictions carry it), and a cold stream's state has
            # taken fewer. So a label judges both models' predictions of the same event.
            self.ring.record(events, outputs, served_steps, now)
        records = self._encoder.encode_wave(
            events, outputs, store.steps(slots), queued_seconds, inference
        )
        if records and records[0].partition is None:  # an encoder that partitions by key
            records = [
                r._replace(partition=e.record.partition)
                for r, e in zip(records, events, strict=True)
            ]
        self._compare(served, outputs)
        metrics = self._metrics
        metrics.inference_seconds.observe(inference)
        metrics.predictions.inc(len(records))
        return records

    def _compare(self, served: Outputs, shadow: Outputs) -> None:
        metrics = self._metrics
        for name in self.comparison.outputs:
            a, b = served[name], shadow[name]
            rows = len(a)
            difference = np.abs(a.reshape(rows, -1) - b.reshape(rows, -1)).max(axis=1)
            metrics.abs_difference.observe_many(name, difference)
        for name in self.comparison.argmax:
            a, b = served[name], shadow[name]
            # The classes are the last axis; an output with more axes agrees where all do.
            same = (a.argmax(axis=-1) == b.argmax(axis=-1)).reshape(len(a), -1).all(axis=1)
            metrics.argmax_agreements.labels(name).inc(int(np.count_nonzero(same)))

    # ------------------------------------------------------------------ housekeeping

    def forget(self, keys: list[bytes]) -> None:
        """The served store evicted `keys`: forget them too (`StateStore.on_forget`)."""
        self.store.forget(keys)

    def drop_partition(self, partition: int) -> int:
        """Forget the streams of a partition given up (no tombstones); returns how many."""
        return self.store.drop_partition(partition)

    def publish(self, now: float, *, force: bool = False) -> None:
        """Set the warm and cold gauges, at most once per interval (the count scans the
        store's columns) unless `force`."""
        if not force and now - self._last_gauge < self._gauge_interval_s:
            return
        self._last_gauge = now
        cold, held = self.store.count_cold()
        self._metrics.streams.labels("warm").set(held - cold)
        self._metrics.streams.labels("cold").set(cold)

    # ------------------------------------------------------------------ at a restore

    def align(self, served: Rows, partitions: Collection[int]) -> Alignment:
        """After both stores restored `partitions`: make the shadow hold exactly the served
        model's streams there. Streams it lacks, or holds at an older offset (its changelog
        stopped while the served model went on), become cold placeholders: zero states that
        missed every event the served state holds, written at the next checkpoint. Streams
        only the shadow holds (the served model forgot them) are forgotten. `served` needs
        no states (`StateStore.rows(..., with_states=False)`)."""
        store = self.store
        mine = store.rows(partitions, with_states=False)
        theirs = dict.fromkeys(served.keys)
        gone = [key for key in mine.keys if key not in theirs]
        store.forget(gone)
        mine_at = dict(zip(mine.keys, mine.offsets.tolist(), strict=True))
        offsets = np.fromiter(
            map(mine_at.get, served.keys, repeat(-1)), dtype=np.int64, count=len(served.keys)
        )
        behind = np.flatnonzero(offsets < served.offsets)
        ahead = int(np.count_nonzero(offsets > served.offsets))
        position = served.steps + served.missed_or_zeros()
        now = self._clock()
        chunk = store.max_streams
        for start in range(0, len(behind), chunk):
            part = behind[start : start + chunk]
            slots = store.acquire(
                [served.keys[i] for i in part.tolist()],
                served.partitions[part],
                served.offsets[part],
                now,
            )
            store.reset_slots(slots)
            store.set_missed(slots, position[part])
        self.publish(now, force=True)
        return Alignment(placeholders=len(behind), forgotten=len(gone), served_behind=ahead)

    def replay(self, events: Sequence[Event], streams: Rows) -> int:
        """Warm up `streams` (rows of this store: cold streams, where the served model is):
        step them from zeros through their past `events`, in offset order, without
        predictions. A stream whose replayed events are all it has had since its start or
        last reset (its steps + missed) becomes warm; otherwise it stays cold, having missed
        the rest. Returns how many became warm."""
        store = self.store
        keys = streams.keys
        if not keys:
            return 0
        now = self._clock()
        store.reset_slots(store.acquire(keys, streams.partitions, streams.offsets, now))
        for wave in plan_waves([e.key for e in events], self._max_wave):
            chosen = [events[i] for i in wave]
            slots = store.acquire(
                [e.key for e in chosen],
                [e.record.partition for e in chosen],
                [e.record.offset for e in chosen],
                now,
            )
            for event in chosen:
                if event.reset:
                    store.reset(event.key)
            x = np.fromiter(
                chain.from_iterable([e.x for e in chosen]),
                dtype=self._x_dtype,
                count=len(chosen) * self._n_features,
            ).reshape(len(chosen), self._n_features)
            _, new_states = self.model.step(x, store.gather(slots))
            store.scatter(slots, new_states)
        # Where the served model is: the replay ended at its last event of each stream.
        slots = store.acquire(keys, streams.partitions, streams.offsets, now)
        position = streams.steps + streams.missed_or_zeros()
        missed = np.maximum(position - store.steps(slots), 0)
        store.set_missed(slots, missed)
        self._metrics.warmup_events.inc(len(events))
        self.publish(now, force=True)
        return int(np.count_nonzero(missed == 0))


@dataclass(frozen=True)
class Alignment:
    """What `Shadow.align` changed: cold placeholders made, streams only the shadow held
    (forgotten), and streams whose served state is older than the shadow's."""

    placeholders: int
    forgotten: int
    served_behind: int


def make_shadow(
    model: StepModel,
    primary: ModelSpec,
    config: ServeConfig,
    metrics: RolloutMetrics,
    encoder: Encoder,
    *,
    device: str = "cpu",
    provider: str = "",
    clock: Callable[[], float] = time.time,
) -> Shadow:
    """The shadow of `primary`, its store sized like the served one (both hold the same
    streams), wired to `metrics`; `encoder` writes to the shadow output topic."""
    comparison = Comparison.of(primary, model.spec)
    # No idle TTL or LRU of its own: the served store's evictions are the shadow's too.
    store = StateStore(model.spec.states, max_streams=config.store.max_streams)
    metrics.set_shadow(
        model.spec,
        device=device,
        provider=provider,
        compared=comparison.outputs,
        argmax=comparison.argmax,
    )
    if not comparison.outputs:
        log.warning(
            "the shadow %s has no output of the same name and shape as %s's (%s against %s): "
            "its predictions are written, but not compared",
            model.spec.identity,
            primary.identity,
            [o.name for o in model.spec.outputs],
            [o.name for o in primary.outputs],
        )
    return Shadow(
        model,
        store,
        encoder,
        metrics,
        comparison,
        max_wave_size=config.processing.max_wave_size,
        clock=clock,
    )
