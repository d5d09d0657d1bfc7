"""Online accuracy from delayed truth: label events joined to the predictions they judge.

A label event is the truth for one earlier prediction of one stream, published later
(a transaction turned out to be fraud, the speaker was identified, the sensor's next
reading arrived) on `--labels-topic`, a topic co-partitioned with the input (same
partition count, same key). docs/events.md has the format:

    key:   the stream id, as on the input
    value: {"step": 17, "y": 3}          the truth for the stream's prediction of step 17
           {"offset": 1234, "y": [0.5]}  ... for the prediction of the input event at
                                          offset 1234 (of the stream's partition)

Per model, a `PredictionRing` keeps each stream's last `--label-horizon-steps`
predictions; a `Scorer` joins a batch of labels to them and adds to that model's
`hiddenstate_online_*` counters (`pipeline.metrics.OnlineMetrics`). A label event
never touches a hidden state.

`LabelledProcessor` wraps the processor the loop drives. After each batch it reads
what the labels reader (`pipeline.transport.follower`) has fetched and joins the
labels that are *due*: a label of partition p is due when the input of p has been
served up to the label's timestamp (a record of p at least as recent has been
served), or when the input of p is caught up (no lag). Kafka Streams joins
co-partitioned topics in timestamp order in the same way, and it is what makes a
lagging server (a backlog after a restart) judge its predictions instead of finding
the truth ahead of them. Labels that wait are bounded: a labels partition with
`max_waiting` of them is paused until its input catches up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from pipeline.codec import check_envelope, dead_letter
from pipeline.errors import BadEventError, ConfigError, DeliveryError, FlushTimeoutError
from pipeline.metrics import ModelScores, OnlineMetrics
from pipeline.model_spec import ModelSpec
from pipeline.records import BatchResult, InputRecord, OutputRecord
from pipeline.ring import JUDGED, RESULTS, PredictionRing
from pipeline.state_store import StateStore
from pipeline.transport import Sink
from pipeline.transport.follower import Follower

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 10.0
_EPSILON = 1e-12  # the smallest probability a log-loss is taken of (as `export.evaluate`)


@dataclass(frozen=True)
class Label:
    """A label event, read: which prediction it judges (a step >= 1 or a source offset
    >= 0, the other -1) and the truth as it arrived (`y`)."""

    key: bytes
    step: int
    offset: int
    y: Any
    record: InputRecord


def _parse(value: bytes) -> Any:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEventError(
            "undecodable", f"the value is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadEventError("not_json", f"the value is not JSON ({exc})") from exc
    except RecursionError as exc:
        raise BadEventError("not_json", "the value nests too deeply to parse") from exc


def _whole(value: Any) -> bool:
    return type(value) is int  # bool is not an int here: true is no step


def decode_label(record: InputRecord, max_bytes: int) -> Label:
    """Read one label event; `BadEventError` with one of `metrics.LABEL_REASONS`."""
    value = check_envelope(record, max_bytes)
    body = _parse(value)
    if type(body) is not dict:
        raise BadEventError("schema", f"a label must be a JSON object, got {type(body).__name__}")
    step, offset = body.get("step"), body.get("offset")
    if (step is None) == (offset is None):
        raise BadEventError(
            "schema",
            "a label names the prediction it judges by exactly one of 'step' (the stream's "
            "step, 1 for its first prediction) or 'offset' (the input event's offset)",
        )
    if step is not None and not (_whole(step) and step >= 1):
        raise BadEventError("schema", f"'step' must be an integer >= 1, got {step!r:.100}")
    if offset is not None and not (_whole(offset) and offset >= 0):
        raise BadEventError("schema", f"'offset' must be an integer >= 0, got {offset!r:.100}")
    if "y" not in body:
        raise BadEventError("schema", "the label has no 'y' (the truth)")
    return Label(
        key=record.key or b"",
        step=-1 if step is None else step,
        offset=-1 if offset is None else offset,
        y=body["y"],
        record=record,
    )


class Scorer:
    """Judges one model's predictions (kept in its `ring`) by labels, into its counters.

    Classification and next_token models are judged on their first output, the class
    probabilities: `y` is a class index (a JSON integer) or a class name (a JSON string,
    one of the output's labels). Regression models on their first output too: `y` is its
    values (a number for a one-value output, a list in the output's order, or an object
    by the output's label names).
    """

    def __init__(self, spec: ModelSpec, ring: PredictionRing, scores: ModelScores) -> None:
        output = spec.outputs[0]
        self.identity = spec.identity
        self.ring = ring
        self._task = spec.task
        self._scores = scores
        self._size = int(np.prod(output.shape, dtype=np.int64))
        self._labels = output.labels
        self._output = output.name
        if self._task != "regression" and len(output.shape) != 1:
            raise ConfigError(
                f"--labels-topic: the first output of {spec.identity}, {output.name!r}, has "
                f"shape {list(output.shape)}; judging a {self._task} model needs a 1-D output "
                "of class probabilities"
            )

    def target(self, y: Any) -> NDArray[np.float64]:
        """`y` as this model's truth: a class index, or the target values; `BadEventError`."""
        if self._task != "regression":
            return np.asarray([self._class(y)], dtype=np.float64)
        return self._values(y)

    def _class(self, y: Any) -> int:
        if _whole(y):
            if 0 <= y < self._size:
                return int(y)
            raise BadEventError(
                "unknown_class", f"class index {y} is outside [0, {self._size}) of {self._output!r}"
            )
        if type(y) is str:
            if self._labels is not None and y in self._labels:
                return self._labels.index(y)
            raise BadEventError(
                "unknown_class",
                f"{y!r:.100} is not a class name of {self._output!r}"
                + (f" ({', '.join(self._labels[:10])}, ...)" if self._labels else " (it has none)"),
            )
        raise BadEventError(
            "wrong_type", f"'y' must be a class index or a class name, got {y!r:.100}"
        )

    def _values(self, y: Any) -> NDArray[np.float64]:
        if type(y) is dict:
            names = self._labels or ()
            if len(names) != self._size or set(y) != set(names):
                raise BadEventError(
                    "target_count",
                    f"'y' as an object must name each of {list(names)} once, got {sorted(y)!r:.200}",
                )
            y = [y[name] for name in names]
        elif type(y) is not list:
            y = [y]
        if len(y) != self._size:
            raise BadEventError(
                "target_count", f"'y' has {len(y)} values, {self._output!r} has {self._size}"
            )
        for v in y:
            if type(v) is not int and type(v) is not float:
                raise BadEventError("wrong_type", f"target values must be numbers, got {v!r:.100}")
            if not math.isfinite(v):
                raise BadEventError("non_finite", f"target value {v!r} is not finite")
        return np.asarray(y, dtype=np.float64)

    def judge(self, labels: Sequence[Label], targets: NDArray[np.float64]) -> dict[str, int]:
        """Join `labels` (row `i` of `targets` is label `i`'s truth) to the ring and count
        them; returns how many had each result."""
        found = self.ring.find(
            [label.key for label in labels],
            [label.record.partition for label in labels],
            [label.step for label in labels],
            [label.offset for label in labels],
        )
        counts = np.bincount(found.result, minlength=len(RESULTS)).tolist()
        for result, count in zip(RESULTS, counts, strict=True):
            if count:
                self._scores.results[result].inc(count)
        judged = found.result == JUDGED
        if judged.any():
            predicted = found.values[judged, : self._size].astype(np.float64)
            truth = targets[judged]
            sums = self._scores.sums
            if self._task == "regression":
                error = predicted - truth
                sums["absolute_error"].inc(float(np.abs(error).mean(axis=1).sum()))
                sums["squared_error"].inc(float((error**2).mean(axis=1).sum()))
            else:
                classes = truth[:, 0].astype(np.int64)
                sums["correct"].inc(int((predicted.argmax(axis=1) == classes).sum()))
                given = predicted[np.arange(len(classes)), classes]
                sums["log_loss"].inc(float(-np.log(np.clip(given, _EPSILON, 1.0)).sum()))
        return dict(zip(RESULTS, counts, strict=True))


class BatchProcessor(Protocol):
    """What the loop drives (`pipeline.loop.BatchProcessor`)."""

    store: StateStore

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Serve one polled batch."""
        ...

    def drop_partition(self, partition: int) -> int:
        """Forget the streams of `partition` (every model's); returns how many."""
        ...


Lag = Callable[[], dict[int, int]]
"""Records behind the end of each input partition (`Source.lag`)."""


class LabelledProcessor:
    """The processor the loop drives, with labels read and judged after every batch.

    `follower` reads the labels topic (assigned by `assigned`/`revoked`, which the
    input's rebalance callbacks call); `scorers` judge each model's predictions (the
    primary's; a shadow's beside it); bad label events go to `dead_letter_topic` through
    `sink`, a producer of their own (they are no input records, so they are not part of
    the batch the committer makes durable). `watch(lag)` gives the input's lag, which
    says when a partition is caught up.
    """

    def __init__(
        self,
        inner: BatchProcessor,
        follower: Follower,
        scorers: Sequence[Scorer],
        metrics: OnlineMetrics,
        sink: Sink,
        dead_letter_topic: str,
        *,
        max_event_bytes: int,
        max_waiting: int = 10_000,
        max_records: int = 2000,
        lag_interval_s: float = 0.1,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self.store: StateStore = inner.store
        self._follower = follower
        self._scorers = tuple(scorers)
        self._metrics = metrics
        self._sink = sink
        self._dead_letter_topic = dead_letter_topic
        self._max_bytes = max_event_bytes
        self._max_waiting = max_waiting
        self._max_records = max_records
        self._lag_interval_s = lag_interval_s
        self._timer = timer
        self._lag: Lag | None = None
        self._last_lag = float("-inf")
        self._caught_up: set[int] = set()
        self._served_to: dict[int, int] = {}  # input partition -> newest timestamp served
        self._waiting: dict[int, deque[InputRecord]] = {}
        self._paused: set[int] = set()
        self._unsent = 0  # dead letters sent and not acknowledged yet
        self._last_warned: dict[str, float] = {}

    def watch(self, lag: Lag) -> None:
        """Where the input's lag comes from (the input source, once it exists)."""
        self._lag = lag

    # ------------------------------------------------------------------ assignment

    def assigned(self, partitions: Sequence[int]) -> None:
        """Input partitions were assigned: read their labels from now on."""
        self._follower.assign(partitions)
        for partition in partitions:
            self._waiting.setdefault(partition, deque())
            self._served_to.pop(partition, None)
            self._caught_up.discard(partition)

    def revoked(self, partitions: Sequence[int]) -> None:
        """Input partitions were revoked or lost: their labels are no longer read, and
        their streams' predictions are forgotten. Labels still waiting for their input
        are counted `unknown_step`: no replica will judge them (the next owner reads the
        labels published after its assignment)."""
        self._follower.unassign(partitions)
        dropped = 0
        for partition in partitions:
            dropped += len(self._waiting.pop(partition, ()))
            self._served_to.pop(partition, None)
            self._caught_up.discard(partition)
            self._paused.discard(partition)
            for scorer in self._scorers:
                scorer.ring.drop_partition(partition)
        if dropped:
            for scorer in self._scorers:
                self._count(scorer, "unknown_step", dropped)
            log.info("%d labels of revoked partitions %s were not judged", dropped, partitions)
        self._publish_waiting()

    # ------------------------------------------------------------------ every batch

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Serve the batch, then read and judge the labels that are due."""
        result = self._inner.process(records)
        if records:
            served = self._served_to
            # The last record of a partition in the batch: timestamps only grow within a
            # partition as producers stamp them; max() keeps an odd one from going back.
            for partition, stamp in {r.partition: r.timestamp_ms for r in records}.items():
                if stamp > served.get(partition, -1):
                    served[partition] = stamp
        self._pump(bool(records))
        return result

    def drop_partition(self, partition: int) -> int:
        """The states of `partition`, dropped by the loop (a revocation, or a rewind to the
        last commit). The predictions stay: a revocation forgets them in `revoked`, and
        after a rewind the same events are served again from the restored states."""
        return self._inner.drop_partition(partition)

    def close(self) -> None:
        """Send what is left of the dead letters (bounded), release the reader."""
        try:
            if self._unsent:
                self._sink.flush(5.0)
        except (FlushTimeoutError, DeliveryError) as error:
            log.warning("label dead letters not all acknowledged at the stop: %s", error)
        finally:
            self._sink.close()
            self._follower.close()

    def _pump(self, busy: bool) -> None:
        fetched = self._follower.poll(self._max_records)
        for record in fetched:
            queue = self._waiting.get(record.partition)
            if queue is not None:
                queue.append(record)
        due = self._due(busy)
        if due:
            self._join(due)
        self._flow_control()
        self._flush_dead_letters()
        self._publish_waiting()

    def _due(self, busy: bool) -> list[InputRecord]:
        due: list[InputRecord] = []
        waiting_behind: list[int] = []
        for partition, queue in self._waiting.items():
            served = self._served_to.get(partition, -1)
            while queue and queue[0].timestamp_ms <= served:
                due.append(queue.popleft())
            if queue:
                waiting_behind.append(partition)
        if waiting_behind:
            caught_up = self._caught_up_partitions(busy)
            for partition in waiting_behind:
                if partition in caught_up:
                    due.extend(self._waiting[partition])
                    self._waiting[partition].clear()
        return due

    def _caught_up_partitions(self, busy: bool) -> set[int]:
        """Input partitions without lag, asked of the source at most every
        `lag_interval_s` (and at once after an empty poll, when it is likely)."""
        now = self._timer()
        if self._lag is not None and (not busy or now - self._last_lag >= self._lag_interval_s):
            self._last_lag = now
            self._caught_up = {p for p, lag in self._lag().items() if lag == 0}
        return self._caught_up

    def _join(self, records: list[InputRecord]) -> None:
        labels: list[Label] = []
        targets: list[list[NDArray[np.float64]]] = [[] for _ in self._scorers]
        dead: list[OutputRecord] = []
        for record in records:
            try:
                label = decode_label(record, self._max_bytes)
                values = [scorer.target(label.y) for scorer in self._scorers]
            except BadEventError as error:
                dead.append(dead_letter(record, error, self._dead_letter_topic))
                self._metrics.malformed.labels(error.reason).inc()
                self._warn(record, error)
                continue
            labels.append(label)
            for column, value in zip(targets, values, strict=True):
                column.append(value)
        if labels:
            for scorer, column in zip(self._scorers, targets, strict=True):
                scorer.judge(labels, np.stack(column))
        if dead:
            self._sink.send(dead)
            self._unsent += len(dead)

    def _flow_control(self) -> None:
        full = {p for p, queue in self._waiting.items() if len(queue) >= self._max_waiting}
        if full - self._paused:
            self._follower.pause(sorted(full - self._paused))
        if self._paused - full:
            self._follower.resume(sorted(self._paused - full))
        self._paused = full

    def _flush_dead_letters(self) -> None:
        """Collect the acknowledgements of label dead letters without waiting for them;
        one Kafka gave up on is logged and lost (the label was counted malformed)."""
        if not self._unsent:
            return
        try:
            self._sink.flush(0.0)
            self._unsent = 0
        except FlushTimeoutError:
            pass  # still in flight: asked again after the next batch
        except DeliveryError as error:
            self._unsent = 0
            log.warning(
                "a label dead letter was not written to %s: %s", self._dead_letter_topic, error
            )

    def _publish_waiting(self) -> None:
        self._metrics.waiting.set(sum(len(queue) for queue in self._waiting.values()))

    def _count(self, scorer: Scorer, result: str, count: int) -> None:
        self._metrics.labels.labels(scorer.identity, result).inc(count)

    def _warn(self, record: InputRecord, error: BadEventError) -> None:
        now = self._timer()
        if now - self._last_warned.get(error.reason, float("-inf")) >= _LOG_INTERVAL_S:
            self._last_warned[error.reason] = now
            log.warning(
                "%s: label dead-lettered (%s): %s (more within %.0fs at debug level)",
                record.where,
                error.reason,
                error.detail,
                _LOG_INTERVAL_S,
            )
        else:
            log.debug("%s: label dead-lettered (%s): %s", record.where, error.reason, error.detail)
