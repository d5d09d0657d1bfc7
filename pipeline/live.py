"""What `--labels-topic` and `--streams-api` add to `hiddenstate serve`, wired in one place.

    live = Live(config, model.spec, metrics)                  # nothing at all when both are off
    encoder = live.encoder(encoder)                           # predictions into the ring
    processor = make_processor(model, config, metrics, encoder=encoder)
    live.judge_shadow(shadow)                                 # a shadow's predictions: a ring too
    served = live.processor(processor, transport)             # labels read after each batch
    make_source = live.following(make_source)                 # the labels reader follows the input
    app = live.streams_app(partitions)                        # GET /streams, /streams/{key}

Nothing here changes how events are served: the ring sees each wave's predictions
through the encoder (`pipeline.ring.RecordingEncoder`), the labels are read and judged
after the batch (`pipeline.labels.LabelledProcessor`), and the assignment reaches the
labels reader through the input's rebalance callbacks, after the loop's own. A shadow
model (`--shadow-model`) records its predictions in a ring of its own, and the same
labels judge them into the counters of its identity: the two models' live accuracy side
by side, on the same events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pipeline.config import OnlineConfig, ServeConfig
from pipeline.errors import KafkaSetupError
from pipeline.formats import Encoder
from pipeline.labels import BatchProcessor, LabelledProcessor, Scorer
from pipeline.metrics import Metrics
from pipeline.model_spec import ModelSpec
from pipeline.ring import PredictionRing, RecordingEncoder
from pipeline.shadow import Shadow
from pipeline.streams_api import StreamsApi
from pipeline.transport import RebalanceCallback, Source, Transport
from pipeline.transport.follower import open_follower
from pipeline.transport.topics import Topics

log = logging.getLogger(__name__)

SourceFactory = Callable[[RebalanceCallback, RebalanceCallback, RebalanceCallback], Source]


def ensure_labels_topics(topics: Topics, online: OnlineConfig, partitions: int) -> None:
    """Create the labels topic (and its dead-letter topic) like the input if missing;
    refuse a labels topic that is not co-partitioned with the input."""
    count = topics.ensure(online.labels_topic, partitions)
    if count != partitions:
        raise KafkaSetupError(
            f"labels topic {online.labels_topic!r} has {count} partitions, the input topic "
            f"{partitions}: the labels of a stream read from input partition p must be in "
            "labels partition p (same partition count, same key). Give it as many partitions, "
            "or use another --labels-topic"
        )
    topics.ensure(online.labels_dead_letter_topic, partitions)


class Live:
    """The prediction ring, the labels and the streams API of one served model."""

    def __init__(
        self,
        config: ServeConfig,
        spec: ModelSpec,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._spec = spec
        self._metrics = metrics
        self._clock = clock
        online = config.online
        self.labels_on = bool(online.labels_topic)
        # Without labels the streams API needs only each stream's last prediction.
        self.ring = (
            PredictionRing(
                spec,
                online.label_horizon_steps if self.labels_on else 1,
                config.store.max_streams,
            )
            if self.labels_on or online.streams_api
            else None
        )
        self._labels: LabelledProcessor | None = None
        self._shadow: Shadow | None = None
        self._assigned: set[int] = set()

    @property
    def assigned(self) -> frozenset[int]:
        """The input partitions held now, as the rebalance callbacks said."""
        return frozenset(self._assigned)

    def encoder(self, inner: Encoder) -> Encoder:
        """`inner`, recording every wave's predictions in the ring when there is one."""
        return inner if self.ring is None else RecordingEncoder(inner, self.ring, self._clock)

    def judge_shadow(self, shadow: Shadow | None) -> None:
        """With labels on, give `shadow` a ring of its own so that the labels judge its
        predictions too (call before `processor`). A label means the same to both models
        only if they share the task and the first output (its shape and class names):
        otherwise the shadow is not judged, and the log says why."""
        if shadow is None or not self.labels_on:
            return
        mine, theirs = self._spec.outputs[0], shadow.spec.outputs[0]
        differ = [
            what
            for what, same in (
                ("task", self._spec.task == shadow.spec.task),
                ("the shape of the first output", mine.shape == theirs.shape),
                ("class names", mine.labels == theirs.labels),
            )
            if not same
        ]
        if differ:
            log.warning(
                "the labels judge %s only, not the shadow %s: they differ in %s, so a label "
                "does not mean the same to both",
                self._spec.identity,
                shadow.spec.identity,
                " and ".join(differ),
            )
            return
        horizon = self._config.online.label_horizon_steps
        shadow.ring = PredictionRing(shadow.spec, horizon, self._config.store.max_streams)
        self._shadow = shadow
        log.info(
            "the labels judge the shadow %s too (%d bytes per stream for its predictions)",
            shadow.spec.identity,
            PredictionRing.bytes_per_stream(shadow.spec, horizon),
        )

    def processor(self, inner: BatchProcessor, transport: Transport) -> BatchProcessor:
        """`inner`, or with labels on, `inner` followed by the labels after each batch."""
        if not self.labels_on or self.ring is None:
            return inner
        online = self._config.online
        scorers = [
            Scorer(
                self._spec,
                self.ring,
                self._metrics.online.register(self._spec.identity, self._spec.task),
            )
        ]
        shadow = self._shadow
        if shadow is not None and shadow.ring is not None:
            scores = self._metrics.online.register(shadow.spec.identity, shadow.spec.task)
            scorers.append(Scorer(shadow.spec, shadow.ring, scores))
        self._labels = LabelledProcessor(
            inner,
            open_follower(transport.name, self._config.kafka, online.labels_topic),
            scorers,
            self._metrics.online,
            transport.sink(),
            online.labels_dead_letter_topic,
            max_event_bytes=self._config.processing.max_event_bytes,
        )
        log.info(
            "labels from %s judge the last %d predictions of each stream (%d bytes per stream); "
            "bad ones go to %s",
            online.labels_topic,
            online.label_horizon_steps,
            PredictionRing.bytes_per_stream(self._spec, online.label_horizon_steps),
            online.labels_dead_letter_topic,
        )
        return self._labels

    def following(self, make_source: SourceFactory) -> SourceFactory:
        """`make_source` with callbacks that, after the loop's own, hand the assignment to
        the labels reader and forget the predictions of partitions given up."""
        if self.ring is None:
            return make_source

        def build(
            on_assigned: RebalanceCallback,
            on_revoked: RebalanceCallback,
            on_lost: RebalanceCallback,
        ) -> Source:
            def assigned(partitions: list[int]) -> None:
                on_assigned(partitions)
                self._assigned = self._assigned | set(partitions)  # rebound: read by HTTP
                if self._labels is not None:
                    self._labels.assigned(partitions)

            def given_up(callback: RebalanceCallback) -> RebalanceCallback:
                def run(partitions: list[int]) -> None:
                    callback(partitions)
                    self._assigned = self._assigned - set(partitions)
                    if self._labels is not None:
                        self._labels.revoked(partitions)  # drops the ring's streams too
                    elif self.ring is not None:
                        for partition in partitions:
                            self.ring.drop_partition(partition)

                return run

            source = make_source(assigned, given_up(on_revoked), given_up(on_lost))
            if self._labels is not None:
                self._labels.watch(source.lag)
            return source

        return build

    def streams_app(self, store_partitions: int, processor: BatchProcessor) -> StreamsApi | None:
        """The streams API over `processor`'s store, or None when `--streams-api` is off."""
        if not self._config.online.streams_api or self.ring is None:
            return None
        return StreamsApi(
            self._spec,
            processor.store,
            self.ring,
            self._config.topics.input_topic,
            store_partitions,
            lambda: self.assigned,
        )

    def close(self) -> None:
        """Release the labels reader and its dead-letter producer."""
        if self._labels is not None:
            self._labels.close()
