"""Every metric hiddenstate exports, declared here and nowhere else.

One prefix (`hiddenstate_`), Prometheus naming (base units, `_total`,
`_seconds`, `_bytes`, `_info`), bounded labels only: never a stream id.
All metrics live on the `CollectorRegistry` passed in, so each test can use
a fresh one and the server one of its own (no global default registry). The
same registry also carries prometheus-client's process and platform
collectors (`process_*`: RSS, CPU seconds, start time, open files;
`python_info`), which the default registry would have and a custom one lacks.

Histograms are `BatchHistogram`s: the same exposition as prometheus-client's
`Histogram`, but one call can record a whole wave (`observe(value, count)`,
`observe_many(values)`), because observing event by event costs about a
microsecond each, as much as a stream's share of an onnxruntime call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily, Metric

from pipeline import __version__
from pipeline.codec import REASONS
from pipeline.model_spec import ModelSpec

PREFIX = "hiddenstate_"
EVICTION_CAUSES = ("lru", "ttl")
SNAPSHOT_KINDS = ("state", "tombstone")
# Why a changelog snapshot was not applied: another model identity or state
# spec (a model roll-out), or bytes that are not a snapshot at all.
DISCARD_REASONS = ("incompatible_model", "malformed")
# What a rebalance did to this consumer: partitions given to it, taken back in
# order (revoked: it checkpoints first), or taken away without notice (lost:
# it was evicted from the group, nothing may be written for them).
REBALANCE_KINDS = ("assigned", "revoked", "lost")
# Sub-millisecond steps up to slow, multi-second stalls.
LATENCY_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Event time to acknowledged prediction includes producer delay and consumer lag.
END_TO_END_BUCKETS = (
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
WAVE_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096 streams
CHECKPOINT_BUCKETS = (1e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# |shadow - served| of one output: from float32 noise (two exports of one model) up to
# predictions in raw units that disagree by orders of magnitude.
DIFFERENCE_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 100.0)
# Whether a shadow's state has seen its stream from the first event (or last reset).
WARMTH = ("warm", "cold")


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: `0.005`, `1.0`, `+Inf`."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class BatchHistogram:
    """A label-free Prometheus histogram that records many observations per call."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = np.array([*sorted(buckets), float("inf")], dtype=np.float64)
        self._counts = np.zeros(len(self._bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # /metrics is served from another thread
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """Record `value` `count` times (e.g. the queued time shared by a whole wave)."""
        if count <= 0 or value != value:  # NaN has no bucket
            return
        bucket = int(np.searchsorted(self._bounds, value, side="left"))
        with self._lock:
            self._counts[bucket] += count
            self._sum += value * count

    def observe_many(self, values: ArrayLike) -> None:
        """Record every value of `values` in one vectorised pass."""
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[~np.isnan(array)]
        if not len(array):
            return
        counts = np.bincount(
            np.searchsorted(self._bounds, array, side="left"), minlength=len(self._bounds)
        )
        with self._lock:
            self._counts += counts
            self._sum += float(array.sum())

    def describe(self) -> list[Metric]:
        """The metric family without samples: how the registry learns the name."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=())]

    def collect(self) -> Iterable[Metric]:
        """The cumulative buckets, count and sum, as the text exposition needs them."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        family = HistogramMetricFamily(self._name, self._documentation, labels=())
        buckets = [
            (_le(bound), count)
            for bound, count in zip(self._bounds.tolist(), cumulative, strict=True)
        ]
        family.add_metric([], buckets, total)
        yield family


class Metrics:
    """The server's metrics; components get this object and update what they own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        p = PREFIX
        # -- counters
        self.events = Counter(
            p + "events", "Input records polled (valid or not).", registry=registry
        )
        self.predictions = Counter(
            p + "predictions", "Prediction records produced.", registry=registry
        )
        self.dead_letters = Counter(
            p + "dead_letters",
            "Input records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.evictions = Counter(
            p + "evictions",
            "Streams forgotten from memory, by cause (lru = stream cap, ttl = idle).",
            ["cause"],
            registry=registry,
        )
        self.replayed_events_skipped = Counter(
            p + "replayed_events_skipped",
            "Replayed input records whose stream state already held them (after a restore).",
            registry=registry,
        )
        self.snapshots_written = Counter(
            p + "snapshots_written",
            "State snapshots (and tombstones, kind=tombstone) written to the changelog.",
            ["kind"],
            registry=registry,
        )
        self.restored_streams = Counter(
            p + "restored_streams",
            "Stream states loaded from the changelog on partition assignment.",
            registry=registry,
        )
        self.snapshots_discarded = Counter(
            p + "snapshots_discarded",
            "Changelog snapshots not applied: of another model or state spec, or unreadable.",
            ["reason"],
            registry=registry,
        )
        self.rebalances = Counter(
            p + "rebalances",
            "Rebalance callbacks that moved partitions, by kind (assigned, revoked, lost).",
            ["kind"],
            registry=registry,
        )
        self.commit_failures = Counter(
            p + "commit_failures",
            "Checkpoints not committed: the broker refused the transaction (this member was "
            "evicted) or did not finish it in time; the work since the last commit is thrown "
            "away and the partitions rewound (hiddenstate_rewinds_total).",
            registry=registry,
        )
        self.delivery_errors = Counter(
            p + "delivery_errors",
            "Flushes that found an output record Kafka refused for good (after the "
            "producer's delivery timeout); the server then stops uncommitted.",
            registry=registry,
        )
        self.rewinds = Counter(
            p + "rewinds",
            "Times uncommitted work was thrown away (a refused or aborted checkpoint, a lost "
            "partition, a stand-still past the session timeout) and the partitions held went "
            "back to their last commit.",
            registry=registry,
        )
        # -- histograms
        self.inference_seconds = BatchHistogram(
            p + "inference_seconds",
            "Duration of one onnxruntime call (one wave).",
            LATENCY_BUCKETS,
            registry,
        )
        self.queued_seconds = BatchHistogram(
            p + "queued_seconds",
            "Time an event waited in its polled batch before its wave ran.",
            LATENCY_BUCKETS,
            registry,
        )
        self.end_to_end_seconds = BatchHistogram(
            p + "end_to_end_seconds",
            "Event time to acknowledged prediction.",
            END_TO_END_BUCKETS,
            registry,
        )
        self.wave_size = BatchHistogram(
            p + "wave_size", "Streams stepped in one onnxruntime call.", WAVE_SIZE_BUCKETS, registry
        )
        self.restore_seconds = BatchHistogram(
            p + "restore_seconds",
            "Duration of one changelog restore (all newly assigned partitions).",
            CHECKPOINT_BUCKETS,
            registry,
        )
        self.checkpoint_seconds = BatchHistogram(
            p + "checkpoint_seconds",
            "Duration of one checkpoint (snapshots acknowledged, offsets committed).",
            CHECKPOINT_BUCKETS,
            registry,
        )
        # -- gauges
        self.active_streams = Gauge(
            p + "active_streams", "Streams whose state is in memory.", registry=registry
        )
        self.state_store_bytes = Gauge(
            p + "state_store_bytes",
            "Bytes of the state slabs and per-stream columns (a shadow model's included).",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            p + "consumer_lag",
            "Records behind the log end, by assigned input partition.",
            ["partition"],
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            p + "assigned_partitions",
            "Input partitions assigned to this consumer.",
            registry=registry,
        )
        self.restore_remaining_records = Gauge(
            p + "restore_remaining_records",
            "Changelog records left to read before serving.",
            registry=registry,
        )
        self.device_fallback = Gauge(
            p + "device_fallback",
            "1 when --device auto found no CUDA and runs on CPU.",
            registry=registry,
        )
        self.model = Info(p + "model", "The model being served.", registry=registry)
        self.build = Info(p + "build", "The hiddenstate release serving.", registry=registry)
        self.build.info({"version": __version__})
        self.online = OnlineMetrics(registry)  # hiddenstate_online_*: below
        # A shadow model beside the served one, and promotions (pipeline.shadow).
        self.rollout = RolloutMetrics(registry)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        # Every label value exists from the start, so rate() sees the first increment.
        for reason in REASONS:
            self.dead_letters.labels(reason)
        for cause in EVICTION_CAUSES:
            self.evictions.labels(cause)
        for kind in SNAPSHOT_KINDS:
            self.snapshots_written.labels(kind)
        for reason in DISCARD_REASONS:
            self.snapshots_discarded.labels(reason)
        for kind in REBALANCE_KINDS:
            self.rebalances.labels(kind)

    def set_model(self, spec: ModelSpec, *, device: str, provider: str, fallback: bool) -> None:
        """Publish what is served and where (`hiddenstate_model_info`, `..._device_fallback`)."""
        self.model.info(
            {
                "name": spec.name,
                "version": spec.version,
                "identity": spec.identity,
                "task": spec.task,
                "cell": spec.cell,
                "device": device,
                "provider": provider,
            }
        )
        self.device_fallback.set(1 if fallback else 0)

    def count_eviction(self, cause: str, count: int) -> None:
        """Count evictions; the state store's `on_evict` callback."""
        self.evictions.labels(cause).inc(count)

    def count_rebalance(self, kind: str) -> None:
        """Count one rebalance callback that moved partitions: `assigned`, `revoked`, `lost`."""
        if kind not in REBALANCE_KINDS:
            raise ValueError(
                f"unknown rebalance kind {kind!r}: expected one of {', '.join(REBALANCE_KINDS)}"
            )
        self.rebalances.labels(kind).inc()

    def count_commit_failure(self) -> None:
        """Count a checkpoint that was not committed (refused, or not finished in time)."""
        self.commit_failures.inc()

    def count_delivery_error(self) -> None:
        """Count a flush that found an output record Kafka gave up on."""
        self.delivery_errors.inc()

    def observe_end_to_end(self, event_times_ms: Sequence[int], acked_at: float) -> None:
        """Record event time -> acknowledgement for predictions acknowledged at `acked_at`
        (seconds since the epoch). Called by the Kafka loop once the producer has acks."""
        if event_times_ms:
            times = np.asarray(event_times_ms, dtype=np.float64)
            self.end_to_end_seconds.observe_many(acked_at - times / 1000.0)

    def set_lag(self, partition: int, lag: int) -> None:
        """Record the lag of one assigned input partition."""
        self.consumer_lag.labels(str(partition)).set(lag)

    def forget_partition(self, partition: int) -> None:
        """Drop the lag series of a revoked partition (its new owner reports it)."""
        with contextlib.suppress(KeyError):  # never reported: nothing to drop
            self.consumer_lag.remove(str(partition))


# How a label event fared against one model's recent predictions (`pipeline.ring`):
# it judged one, it came after the prediction left the ring, or no such prediction is
# held here.
LABEL_RESULTS = ("judged", "late", "unknown_step")
# Why a label event could not be read (it is dead-lettered with the reason).
LABEL_REASONS = (
    "missing_key",
    "missing_value",
    "oversized",
    "undecodable",
    "not_json",
    "schema",
    "wrong_type",
    "non_finite",
    "unknown_class",
    "target_count",
)
# Which sums a task's judged predictions add to: the most probable class and the
# log-loss of the label's probability, or the absolute and squared errors.
TASK_SUMS = {
    "classification": ("correct", "log_loss"),
    "next_token": ("correct", "log_loss"),
    "regression": ("absolute_error", "squared_error"),
}


class OnlineMetrics:
    """`hiddenstate_online_*`: how well each served model does on the truth that arrives
    later (`--labels-topic`, `pipeline.labels`), per model identity. Counters and sums
    only, so that Prometheus computes accuracy, log-loss, MAE and RMSE over any window:

        accuracy = rate(correct_total) / rate(labels_total{result="judged"})
        log-loss = rate(log_loss_total) / rate(labels_total{result="judged"})
        MAE      = rate(absolute_error_total) / rate(labels_total{result="judged"})
        RMSE     = sqrt(rate(squared_error_total) / rate(labels_total{result="judged"}))
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        p = PREFIX + "online_"
        self.labels = Counter(
            p + "labels",
            "Label events joined against a model's recent predictions, by model identity and "
            "result: judged (it judged the prediction of its step), late (that prediction was "
            "more than --label-horizon-steps steps ago), unknown_step (no such prediction is "
            "held here: not predicted yet, another replica's stream, an earlier run).",
            ["identity", "result"],
            registry=registry,
        )
        self.correct = Counter(
            p + "correct",
            "Judged predictions whose most probable class was the label (classification and "
            "next_token models).",
            ["identity"],
            registry=registry,
        )
        self.log_loss = Counter(
            p + "log_loss",
            "Sum of -ln(probability given to the label) over judged predictions, in nats, each "
            "probability clipped at 1e-12 (classification and next_token models).",
            ["identity"],
            registry=registry,
        )
        self.absolute_error = Counter(
            p + "absolute_error",
            "Sum over judged predictions of the mean absolute error across the targets, in the "
            "targets' raw units (regression models).",
            ["identity"],
            registry=registry,
        )
        self.squared_error = Counter(
            p + "squared_error",
            "Sum over judged predictions of the mean squared error across the targets, in the "
            "targets' raw units squared (regression models).",
            ["identity"],
            registry=registry,
        )
        self.malformed = Counter(
            p + "malformed_labels",
            "Label events that could not be read, by reason; each is dead-lettered.",
            ["reason"],
            registry=registry,
        )
        self.waiting = Gauge(
            p + "labels_waiting",
            "Label events read but not joined yet: they wait until the input of their "
            "partition has been served up to their time.",
            registry=registry,
        )
        for reason in LABEL_REASONS:
            self.malformed.labels(reason)

    def register(self, identity: str, task: str) -> ModelScores:
        """The counters of one model (every series created at 0, so rate() sees the first
        increment); a shadow model registers its own identity beside the primary's."""
        if task not in TASK_SUMS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_SUMS)}")
        return ModelScores(
            identity=identity,
            results={result: self.labels.labels(identity, result) for result in LABEL_RESULTS},
            sums={name: getattr(self, name).labels(identity) for name in TASK_SUMS[task]},
        )


@dataclass(frozen=True)
class ModelScores:
    """One model's online counters: labels by result, and the sums of its task by name
    (`TASK_SUMS`)."""

    identity: str
    results: dict[str, Counter]
    sums: dict[str, Counter]


class LabelledBatchHistogram:
    """A `BatchHistogram` with one label: one set of buckets per label value, all of them
    in one family. Label values exist once `labels(value)` was called."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._bounds = np.array([*sorted(buckets), float("inf")], dtype=np.float64)
        self._children: dict[str, tuple[np.ndarray[Any, np.dtype[np.int64]], list[float]]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, value: str) -> None:
        """Make the series of `value` exist (at zero)."""
        with self._lock:
            self._children.setdefault(value, (np.zeros(len(self._bounds), np.int64), [0.0]))

    def observe_many(self, value: str, values: ArrayLike) -> None:
        """Record every value of `values` under label `value`, in one vectorised pass."""
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[~np.isnan(array)]
        if not len(array):
            return
        counts = np.bincount(
            np.searchsorted(self._bounds, array, side="left"), minlength=len(self._bounds)
        )
        self.labels(value)
        with self._lock:
            child_counts, total = self._children[value]
            child_counts += counts
            total[0] += float(array.sum())

    def describe(self) -> list[Metric]:
        """The metric family without samples: how the registry learns the name."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=(self._label,))]

    def collect(self) -> Iterable[Metric]:
        """One histogram per label value, in one family."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=(self._label,))
        with self._lock:
            children = {k: (np.cumsum(c).tolist(), t[0]) for k, (c, t) in self._children.items()}
        for value, (cumulative, total) in sorted(children.items()):
            buckets = [
                (_le(bound), count)
                for bound, count in zip(self._bounds.tolist(), cumulative, strict=True)
            ]
            family.add_metric([value], buckets, total)
        yield family


class RolloutMetrics:
    """A shadow model stepped beside the served one (`hiddenstate_shadow_*`), and what a
    promotion restored (`pipeline.shadow`). The families exist always; their series once a
    shadow is set (`set_shadow`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = PREFIX + "shadow_"
        self.model = Info(
            p + "model", "The shadow model stepped beside the served one.", registry=registry
        )
        self.predictions = Counter(
            p + "predictions", "Prediction records of the shadow model produced.", registry=registry
        )
        self.abs_difference = LabelledBatchHistogram(
            p + "abs_difference",
            "Per event and output: the largest absolute difference between the shadow's and "
            "the served model's values of that output.",
            "output",
            DIFFERENCE_BUCKETS,
            registry,
        )
        self.argmax_agreements = Counter(
            p + "argmax_agreements",
            "Events whose shadow and served classification outputs have the same argmax "
            "(divide by hiddenstate_shadow_abs_difference_count).",
            ["output"],
            registry=registry,
        )
        self.streams = Gauge(
            p + "streams",
            "Streams the shadow holds, by warmth: warm = seen from the stream's first event (or "
            "last reset), cold = joined mid-stream.",
            ["warmth"],
            registry=registry,
        )
        self.inference_seconds = BatchHistogram(
            p + "inference_seconds",
            "Duration of one onnxruntime call of the shadow model (one wave).",
            LATENCY_BUCKETS,
            registry,
        )
        self.warmup_events = Counter(
            p + "warmup_events",
            "Past input events the shadow replayed to warm up streams it joined mid-stream.",
            registry=registry,
        )
        self.restored_cold_streams = Counter(
            PREFIX + "restored_cold_streams",
            "Streams restored for the served model whose states missed the first events of "
            "their stream (written while it was a shadow): counted at a promotion.",
            registry=registry,
        )

    def set_shadow(
        self,
        spec: ModelSpec,
        *,
        device: str,
        provider: str,
        compared: Sequence[str],
        argmax: Sequence[str],
    ) -> None:
        """Publish the shadow model and make its series exist: `compared` outputs (same
        name and shape in both models), `argmax` those of them compared as classes."""
        self.model.info(
            {
                "name": spec.name,
                "version": spec.version,
                "identity": spec.identity,
                "task": spec.task,
                "cell": spec.cell,
                "device": device,
                "provider": provider,
            }
        )
        for output in compared:
            self.abs_difference.labels(output)
        for output in argmax:
            self.argmax_agreements.labels(output)
        for warmth in WARMTH:
            self.streams.labels(warmth)
