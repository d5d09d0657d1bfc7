"""`hiddenstate serve`: wire the configuration to the loop and run it.

Start-up does every check that can fail before the first event: the model
loads and follows the contract, the broker answers, the input topic exists,
the output and dead-letter topics exist (created like the input topic if
missing). Any failure there is one clear line and a non-zero exit. After
that, SIGTERM or SIGINT asks the loop to finish its batch, flush, commit and
leave the group.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from dataclasses import replace
from types import FrameType

from prometheus_client import CollectorRegistry

from pipeline import changelog, logs
from pipeline.codec import PredictionEncoder
from pipeline.config import ServeConfig, load_config, name_only_changelog
from pipeline.delivery import Changes, CheckpointSchedule, Committer
from pipeline.delivery.at_least_once import AtLeastOnce
from pipeline.delivery.exactly_once import ExactlyOnce
from pipeline.errors import ConfigError, HiddenstateError, KafkaSetupError
from pipeline.formats import Encoder, open_formats
from pipeline.health import HealthServer, LoopState
from pipeline.live import Live, ensure_labels_topics
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.metrics import Metrics
from pipeline.pause import PauseWatch
from pipeline.processor import make_processor
from pipeline.rollout import Checkpoints, KafkaInputHistory
from pipeline.runtime import OrtStepModel
from pipeline.shadow import Shadow, check_shadow, make_shadow
from pipeline.streams_api import HEADERS
from pipeline.streams_server import StreamsServer
from pipeline.transport import (
    RebalanceCallback,
    Source,
    Transport,
    choose_transport,
    open_transport,
)
from pipeline.transport.base import (
    DELIVERY_TIMEOUT_S,
    RESTORE_STALL_TIMEOUT_S,
    TRANSACTION_CALL_TIMEOUT_S,
)
from pipeline.transport.topics import Topics
from pipeline.watchdog import Watchdog

log = logging.getLogger(__name__)


def loop_settings(config: ServeConfig) -> LoopSettings:
    """The loop's part of the serving configuration."""
    return LoopSettings(
        poll_timeout_s=config.kafka.poll_timeout_ms / 1000,
        max_poll_records=config.kafka.max_poll_records,
    )


def transaction_timeout_s(config: ServeConfig) -> float:
    """How long a transaction may stay open before the broker aborts it: what bounds the
    wait of every reader after a member crashed with one open (exactly-once predictions,
    restores of the changelog). An exactly-once transaction lasts a checkpoint interval,
    so twice that and some; never less than the 10 s Kafka Streams uses."""
    return max(10.0, 2 * config.delivery.checkpoint_interval_seconds + 5.0)


def member_identity(config: ServeConfig, metrics_port: int) -> str:
    """Who this member is across restarts, for its transactional ids: `--instance-id`
    when given; else the host name and the metrics port, which no two servers on one
    host share (the port is bound) and a restarted server keeps (under Kubernetes the
    host name is the pod's, stable in a StatefulSet). A stable id is what lets a
    restart fence its killed predecessor's open transaction at once."""
    if config.kafka.instance_id:
        return config.kafka.instance_id
    if config.observability.metrics_port == 0:
        log.warning(
            "--metrics-port 0 and no --instance-id: this member's transactional id changes "
            "at every restart, so a crashed predecessor's open transaction holds readers "
            "back until it times out (%.0f s); give --instance-id",
            transaction_timeout_s(config),
        )
    return f"{socket.gethostname()}-{metrics_port}"


def make_committer(
    config: ServeConfig,
    transport: Transport,
    identity: str,
    changes: Changes,
    metrics: Metrics,
    health: LoopState,
) -> Committer:
    """The committer of the configured guarantee, with its producers."""
    timeout_s = transaction_timeout_s(config)
    group = config.kafka.group_id
    delivery = config.delivery
    schedule = CheckpointSchedule(
        delivery.checkpoint_interval_seconds, delivery.checkpoint_interval_events, time.time
    )
    if delivery.guarantee == "exactly-once":
        sink = transport.transactional_sink(f"{group}-{identity}", timeout_s)
        return ExactlyOnce(sink, changes, schedule, metrics)
    outputs = transport.sink()
    states = transport.transactional_sink(f"{group}-{identity}-states", timeout_s)
    return AtLeastOnce(outputs, states, changes, schedule, metrics, health.beat)


def check_topics(
    config: ServeConfig,
    changelog_topic: str,
    shadow_topics: tuple[str, str] | None = None,
    model_name: str = "",
) -> int:
    """Fail unless the input topic exists; create output and dead-letter topics like
    it, and the changelog co-partitioned with it; likewise the shadow's output and
    changelog topics (`shadow_topics`). Returns the partition count."""
    topics = Topics(config.kafka.client_kwargs())
    try:
        partitions = topics.require(config.topics.input_topic, "--input-topic")
        topics.ensure(config.topics.output_topic, partitions)
        topics.ensure(config.topics.dead_letter_topic, partitions)
        if model_name and not config.topics.changelog_topic:
            _warn_of_a_name_only_changelog(topics, config, changelog_topic, model_name)
        changelog.ensure_topic(topics, changelog_topic, partitions)
        if config.online.labels_topic:
            ensure_labels_topics(topics, config.online, partitions)
        if shadow_topics is not None:
            output, shadow_changelog = shadow_topics
            count = topics.ensure(output, partitions)
            if count != partitions:
                raise KafkaSetupError(
                    f"shadow output topic {output!r} has {count} partitions, the input topic "
                    f"{partitions}: the shadow's prediction of an event of input partition p "
                    "goes to its partition p. Give it as many partitions, or name another "
                    "with --shadow-output-topic"
                )
            changelog.ensure_topic(topics, shadow_changelog, partitions)
        return partitions
    finally:
        topics.close()


def _warn_of_a_name_only_changelog(
    topics: Topics, config: ServeConfig, changelog_topic: str, model_name: str
) -> None:
    """hiddenstate 0.1 named the changelog after the model name alone: a server upgraded
    from it would start every stream from zeros without a word."""
    old = name_only_changelog(config.topics.input_topic, model_name)
    if topics.partitions(changelog_topic) is None and topics.partitions(old) is not None:
        log.warning(
            "the states in %s (named after the model name alone, as hiddenstate 0.1 did) are "
            "not used: each model identity now has a changelog of its own, %s, which starts "
            "empty. To keep serving from them, pass --changelog-topic %s",
            old,
            changelog_topic,
            old,
        )


def load_shadow(config: ServeConfig, model: OrtStepModel) -> OrtStepModel | None:
    """The `--shadow-model` in a session like the served model's, checked against it;
    None without one."""
    path = config.rollout.shadow_model
    if not path:
        return None
    shadow = OrtStepModel(
        path,
        device=config.runtime.device,
        intra_op_threads=config.runtime.intra_op_threads,
        inter_op_threads=config.runtime.inter_op_threads,
        spinning=config.runtime.spinning,
    )
    check_shadow(model.spec, shadow.spec, config.runtime.model, path)
    return shadow


class StopRequest:
    """SIGTERM and SIGINT from the first moment: a stop asked for during start-up lets the
    start finish and then stops the loop before its first poll (exit 0, nothing served),
    instead of the signal's default end halfway through; a second signal ends the process
    at once."""

    def __init__(self) -> None:
        self.asked = False
        self._loop: ServeLoop | None = None
        self._watchdog: Watchdog | None = None
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def attach(self, loop: ServeLoop, watchdog: Watchdog) -> None:
        """The loop to stop from now on (at once, if a stop was asked for already)."""
        self._loop, self._watchdog = loop, watchdog
        if self.asked:
            loop.stop()
            watchdog.stopping()

    def _request(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.asked:
            log.warning("%s again: exiting at once, uncommitted", name)
            os._exit(128 + signum)
        self.asked = True
        log.info("%s: finishing the batch in hand, then stopping", name)
        if self._loop is not None and self._watchdog is not None:
            self._loop.stop()
            self._watchdog.stopping()


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT. Raises `HiddenstateError` for start-up failures."""
    stop = StopRequest()
    transport = open_transport(config.kafka)  # a missing client library fails first
    log.info(
        "Kafka client %s (%s)", transport.name, choose_transport(config.kafka.transport).reason
    )
    model = OrtStepModel.from_config(config.runtime)
    if model.fallback:
        log.warning("--device auto: no CUDA execution provider here, serving on CPU")
    log.info(
        "model %s (%s, %d state bytes per stream) on %s",
        model.spec.identity,
        model.spec.task,
        model.spec.state_bytes,
        model.provider,
    )
    shadow_model = load_shadow(config, model)
    # Registry formats check the input schema and register the output schema now.
    decoder, encoder = open_formats(config, model.spec)
    changelog_topic = config.topics.changelog_for(model.spec)
    shadow_topics = None
    if shadow_model is not None:
        shadow_topics = (
            config.rollout.shadow_output_topic,
            config.rollout.shadow_changelog_for(config.topics.input_topic, shadow_model.spec),
        )
        if shadow_topics[1] == changelog_topic:
            raise ConfigError(
                f"--shadow-changelog-topic and --changelog-topic: both are {changelog_topic!r}; "
                "each model needs a changelog of its own"
            )
    partitions = check_topics(config, changelog_topic, shadow_topics, model.spec.name)
    log.info(
        "input topic %s has %d partitions; states checkpointed to %s; Kafka client %s",
        config.topics.input_topic,
        partitions,
        changelog_topic,
        transport.name,
    )

    metrics = Metrics(CollectorRegistry())
    metrics.set_model(
        model.spec, device=model.device, provider=model.provider, fallback=model.fallback
    )
    health = LoopState(config.observability.liveness_timeout_seconds)
    live = Live(config, model.spec, metrics)  # --labels-topic, --streams-api
    shadow = None
    if shadow_model is not None and shadow_topics is not None:
        shadow = open_shadow(config, model, shadow_model, metrics, shadow_topics[1])
        live.judge_shadow(shadow)  # with --labels-topic, its predictions are judged too
    processor = make_processor(
        model, config, metrics, decoder=decoder, encoder=live.encoder(encoder), shadow=shadow
    )
    served = live.processor(processor, transport)
    reader = transport.changelog_reader(
        max(RESTORE_STALL_TIMEOUT_S, 2 * transaction_timeout_s(config))
    )
    primary = changelog.Changelog(changelog_topic, model.spec, processor.store, metrics, reader)
    history = None
    if shadow is not None and config.rollout.shadow_warmup_events:
        # read_committed, as the source reads: the events the served model stepped.
        history = KafkaInputHistory(
            config.kafka.client_kwargs(), config.topics.input_topic, read_committed=True
        )
    states = Checkpoints(
        primary,
        processor.store,
        config.rollout,
        metrics.rollout,
        identity=model.spec.identity,
        shadow=shadow,
        shadow_changelog=None
        if shadow is None or shadow_topics is None
        else changelog.Changelog(shadow_topics[1], shadow.spec, shadow.store, metrics, reader),
        history=history,
        decoder=decoder,
    )

    @live.following
    def make_source(
        on_assigned: RebalanceCallback, on_revoked: RebalanceCallback, on_lost: RebalanceCallback
    ) -> Source:
        return transport.source(
            config.topics.input_topic,
            on_assigned,
            on_revoked,
            on_lost,
            # Both guarantees: aborted input is never served, and the committed offsets a
            # rewind reads back are the stable ones (OffsetFetch with require_stable,
            # KIP-447), not those of before a transaction's markers were written.
            read_committed=True,
        )

    streams = live.streams_app(partitions, served)
    online = config.online
    server = HealthServer(
        metrics.registry,
        health,
        config.observability.metrics_host,
        config.observability.metrics_port,
        streams=streams if not online.streams_api_port else None,
    ).start()
    log.info("metrics and health on http://%s:%d", config.observability.metrics_host, server.port)
    apart = None
    if streams is not None and online.streams_api_port:
        host = online.streams_api_host or config.observability.metrics_host
        apart = StreamsServer(streams, host, online.streams_api_port, headers=HEADERS).start()
    pause = PauseWatch(config.kafka.session_timeout_ms / 1000 / 2).start()
    try:
        identity = member_identity(config, server.port)
        committer = make_committer(config, transport, identity, states.changes, metrics, health)
        log.info(
            "delivery %s; transactions of member %s time out after %.0f s",
            config.delivery.guarantee,
            identity,
            transaction_timeout_s(config),
        )
        loop = ServeLoop(
            loop_settings(config), served, committer, make_source, metrics, health, states, pause
        )

        watchdog = Watchdog(
            health,
            timeout_s=config.observability.liveness_timeout_seconds + TRANSACTION_CALL_TIMEOUT_S,
            stop_timeout_s=DELIVERY_TIMEOUT_S + TRANSACTION_CALL_TIMEOUT_S,
        )
        stop.attach(loop, watchdog)
        # Everything built so far (modules, the model, the clients) lives as long as the
        # process: move it out of the garbage collector's sight. Otherwise each full
        # collection walks all of it, a 25-35 ms stop of the loop on the benchmark
        # (docs/benchmarks.md); frozen, a full collection takes well under a millisecond.
        gc.freeze()
        watchdog.start()
        try:
            loop.run()
        except Exception as error:
            # kafka-python raises what a rebalance callback raised (a restore that stalled,
            # a promotion refused) as the cause of a KafkaError of its own: report ours.
            cause = error.__cause__
            if isinstance(cause, HiddenstateError) and not isinstance(error, HiddenstateError):
                raise cause from None
            raise
        finally:
            watchdog.close()
    finally:
        if history is not None:
            history.close()
        pause.stop()
        live.close()
        if apart is not None:
            apart.stop()
        server.stop()


def open_shadow(
    config: ServeConfig,
    model: OrtStepModel,
    shadow_model: OrtStepModel,
    metrics: Metrics,
    changelog_topic: str,
) -> Shadow:
    """The shadow beside `model`: its predictions in the configured output format (a
    registry format registers the shadow's schema under its own topic) to
    `--shadow-output-topic`."""
    topic = config.rollout.shadow_output_topic
    encoder: Encoder = PredictionEncoder(shadow_model.spec, topic, by_source_partition=True)
    if config.formats.output_format != "json":
        shadow_config = replace(config, topics=replace(config.topics, output_topic=topic))
        _, encoder = open_formats(shadow_config, shadow_model.spec)
    shadow = make_shadow(
        shadow_model,
        model.spec,
        config,
        metrics.rollout,
        encoder,
        device=shadow_model.device,
        provider=shadow_model.provider,
    )
    log.info(
        "shadow model %s (%s, %d state bytes per stream) beside %s: predictions to %s, states "
        "to %s; outputs compared: %s%s",
        shadow_model.spec.identity,
        shadow_model.spec.task,
        shadow_model.spec.state_bytes,
        model.spec.identity,
        config.rollout.shadow_output_topic,
        changelog_topic,
        ", ".join(shadow.comparison.outputs) or "none",
        f" (argmax of {', '.join(shadow.comparison.argmax)})" if shadow.comparison.argmax else "",
    )
    return shadow


def main(argv: list[str]) -> int:
    """`hiddenstate serve`: every setting is a flag or a HIDDENSTATE_* variable (--help)."""
    config = load_config(argv, os.environ)
    logs.configure(config.observability.log_format, config.observability.log_level)
    if config.observability.log_format == "json":
        log.info("starting", extra={"config": config.redacted(), "sources": dict(config.sources)})
    else:
        log.info("starting with\n%s", config.describe())
    run(config)
    return 0
