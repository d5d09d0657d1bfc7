"""The pure core: a polled batch of records in, prediction and dead-letter records out.

No I/O happens here. The Kafka loop around it does, per poll:

    result = processor.process(records)       # never raises for bad input
    produce(result.outputs); flush(); await acks
    metrics.observe_end_to_end(result.event_times_ms, time.time())
    commit(result.next_offsets)

Inside `process`: decode every record (bad ones become dead letters with a
reason), plan waves (each stream at most once per wave, offset order kept),
then per wave: slots from the state store, one gather, one `model.step`, one
scatter, and the prediction records. Call it with an empty batch when a poll
returns nothing, so that idle streams are still evicted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import chain

import numpy as np
from prometheus_client import CollectorRegistry

from pipeline.codec import Event, EventDecoder, PredictionEncoder, dead_letter
from pipeline.config import ProcessingConfig, ServeConfig, TopicsConfig
from pipeline.errors import BadEventError
from pipeline.formats import Decoder, Encoder
from pipeline.metrics import Metrics
from pipeline.records import BatchResult, InputRecord, OutputRecord
from pipeline.runtime import StepModel
from pipeline.shadow import Shadow
from pipeline.state_store import StateStore
from pipeline.waves import plan_waves

log = logging.getLogger(__name__)

_BAD_EVENT_LOG_INTERVAL = 10.0  # seconds between warnings for one reason; the rest at debug
# Fills the slots of the prediction list before the waves do (every slot is filled).
_NO_PREDICTION = OutputRecord("", None, None)


class Processor:
    """Steps every stream of a batch through `model`, keeping states in `store`.

    `clock` gives wall time in seconds (idle TTL, last-seen); `timer` a
    monotonic reading for the latencies (queued, inference). Both are there
    so that tests can move time by hand. `shadow` is stepped on every wave after
    `model` (`pipeline.shadow`); its store must be told of `store`'s evictions
    (`make_processor` wires it).
    """

    def __init__(
        self,
        model: StepModel,
        store: StateStore,
        *,
        topics: TopicsConfig,
        processing: ProcessingConfig,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        ttl_check_interval: float = 1.0,
        decoder: Decoder | None = None,
        encoder: Encoder | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.model = model
        self.shadow = shadow
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
        spec = model.spec
        # JSON unless the formats (`pipeline.formats.open_formats`) say otherwise.
        self._decoder = decoder or EventDecoder(spec.input, processing.max_event_bytes)
        self._encoder = encoder or PredictionEncoder(spec, topics.output_topic)
        self._dead_letter_topic = topics.dead_letter_topic or f"{topics.input_topic}.dead-letter"
        self._max_wave = processing.max_wave_size
        self._x_dtype = np.int64 if spec.input.dtype == "int64" else np.float32
        self._n_features = len(spec.input.features)
        self._clock = clock
        self._timer = timer
        self._ttl_check_interval = ttl_check_interval
        self._last_ttl_check = float("-inf")
        self._last_warned: dict[str, float] = {}

    def process(self, records: Sequence[InputRecord]) -> BatchResult:
        """Serve one polled batch. Bad records become dead letters; valid ones in
        the same batch are unaffected. Predictions come back in input order."""
        started = self._timer()
        now = self._clock()
        metrics = self.metrics
        result = BatchResult()
        self._evict_idle(now)
        if not records:
            self._publish_store_size()  # idle eviction may have shrunk it
            return result
        metrics.events.inc(len(records))
        # A source returns each partition's records in offset order, so the last
        # record of a partition has its highest offset.
        result.next_offsets.update({(r.topic, r.partition): r.offset + 1 for r in records})
        events: list[Event] = []
        decode = self._decoder.decode
        for record in records:
            try:
                events.append(decode(record))
            except BadEventError as error:
                result.dead_letters.append(dead_letter(record, error, self._dead_letter_topic))
                metrics.dead_letters.labels(error.reason).inc()
                self._log_bad(record, error, now)
        events = self._without_replays(events)
        waves = plan_waves([e.key for e in events], self._max_wave)
        shadowed = result.shadow_predictions
        if len(waves) == 1:  # every stream once, in input order: the common case
            result.predictions = self._step_wave(events, started, now, shadowed)
        elif waves:
            predictions: list[OutputRecord] = [_NO_PREDICTION] * len(events)
            for wave in waves:
                wave_events = [events[i] for i in wave]
                for i, prediction in zip(
                    wave, self._step_wave(wave_events, started, now, shadowed), strict=True
                ):
                    predictions[i] = prediction
            result.predictions = predictions
        result.event_times_ms = [e.event_time_ms for e in events]
        metrics.predictions.inc(len(result.predictions))
        self._publish_store_size()
        return result

    def drop_partition(self, partition: int) -> int:
        """Forget the streams of a partition given up, the shadow's too (no tombstones: the
        next owner restores them); returns how many the served model held."""
        if self.shadow is not None:
            self.shadow.drop_partition(partition)
        return self.store.drop_partition(partition)

    def _publish_store_size(self) -> None:
        self.metrics.active_streams.set(len(self.store))
        nbytes = self.store.nbytes
        if self.shadow is not None:
            nbytes += self.shadow.store.nbytes  # what memory is sized by: both models' states
            self.shadow.publish(self._clock())
        self.metrics.state_store_bytes.set(nbytes)

    def _without_replays(self, events: list[Event]) -> list[Event]:
        """Drop events the restored states already hold.

        After a crash between writing snapshots and committing offsets, the
        changelog is ahead of the committed offset: stepping those events again
        would step a stream twice. Their predictions were acknowledged before the
        snapshot was written, so skipping them loses nothing.
        """
        if not events:
            return events
        applied = self.store.already_applied(
            [e.key for e in events],
            [e.record.partition for e in events],
            [e.record.offset for e in events],
        )
        if not applied.any():
            return events
        self.metrics.replayed_events_skipped.inc(int(applied.sum()))
        return [e for e, done in zip(events, applied.tolist(), strict=True) if not done]

    def _step_wave(
        self,
        events: Sequence[Event],
        batch_started: float,
        now: float,
        shadowed: list[OutputRecord],
    ) -> list[OutputRecord]:
        """One gather, one model step, one scatter for streams that are all distinct; the
        shadow's predictions of the wave are appended to `shadowed`."""
        store = self.store
        keys = [e.key for e in events]
        partitions = [e.record.partition for e in events]
        offsets = [e.record.offset for e in events]
        # Which streams the served model starts from zeros here: the shadow starts them so too.
        held = None if self.shadow is None else store.held(keys)
        slots = store.acquire(keys, partitions, offsets, now)
        for event in events:
            if event.reset:
                store.reset(event.key)
        x = np.fromiter(
            chain.from_iterable([e.x for e in events]),
            dtype=self._x_dtype,
            count=len(events) * self._n_features,
        ).reshape(len(events), self._n_features)
        states = store.gather(slots)
        wave_started = self._timer()
        outputs, new_states = self.model.step(x, states)
        inference = self._timer() - wave_started
        store.scatter(slots, new_states)
        queued = wave_started - batch_started
        steps = store.steps(slots)
        records = self._encoder.encode_wave(events, outputs, steps, queued, inference)
        if self.shadow is not None and held is not None:
            shadowed += self.shadow.step_wave(
                events, x, partitions, offsets, outputs, steps, held, queued, now
            )
        self.metrics.inference_seconds.observe(inference)
        self.metrics.wave_size.observe(len(events))
        self.metrics.queued_seconds.observe(queued, count=len(events))
        return records

    def _evict_idle(self, now: float) -> None:
        # Scanning the slot columns costs O(capacity): once per interval is plenty.
        if now - self._last_ttl_check >= self._ttl_check_interval:
            self._last_ttl_check = now
            self.store.evict_idle(now)

    def _log_bad(self, record: InputRecord, error: BadEventError, now: float) -> None:
        # A producer gone wrong sends thousands of bad events: warn once per reason
        # per interval, keep the rest at debug level (the metric counts them all).
        last = self._last_warned.get(error.reason, float("-inf"))
        if now - last >= _BAD_EVENT_LOG_INTERVAL:
            self._last_warned[error.reason] = now
            log.warning(
                "%s: dead-lettered (%s): %s (more %s events within %.0fs are logged at debug level)",
                record.where,
                error.reason,
                error.detail,
                error.reason,
                _BAD_EVENT_LOG_INTERVAL,
            )
        else:
            log.debug("%s: dead-lettered (%s): %s", record.where, error.reason, error.detail)


def make_processor(
    model: StepModel,
    config: ServeConfig,
    metrics: Metrics,
    *,
    clock: Callable[[], float] = time.time,
    decoder: Decoder | None = None,
    encoder: Encoder | None = None,
    shadow: Shadow | None = None,
) -> Processor:
    """A processor and its state store, wired to `metrics`, from the serving config;
    `decoder` and `encoder` from `pipeline.formats.open_formats` (default: JSON); `shadow`
    (`pipeline.shadow.make_shadow`) forgets what the store evicts."""
    store = StateStore(
        model.spec.states,
        max_streams=config.store.max_streams,
        idle_ttl_seconds=config.store.idle_ttl_seconds,
        on_evict=metrics.count_eviction,
        on_forget=None if shadow is None else shadow.forget,
    )
    return Processor(
        model,
        store,
        topics=config.topics,
        processing=config.processing,
        metrics=metrics,
        clock=clock,
        decoder=decoder,
        encoder=encoder,
        shadow=shadow,
    )
