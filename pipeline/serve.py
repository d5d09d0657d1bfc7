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
from types import FrameType

from prometheus_client import CollectorRegistry

from pipeline import changelog, logs
from pipeline.config import ServeConfig, load_config
from pipeline.delivery import Changes, CheckpointSchedule, Committer
from pipeline.delivery.at_least_once import AtLeastOnce
from pipeline.delivery.exactly_once import ExactlyOnce
from pipeline.formats import open_formats
from pipeline.health import HealthServer, LoopState
from pipeline.live import Live, ensure_labels_topics
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.metrics import Metrics
from pipeline.pause import PauseWatch
from pipeline.processor import make_processor
from pipeline.runtime import OrtStepModel
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


def check_topics(config: ServeConfig, changelog_topic: str) -> int:
    """Fail unless the input topic exists; create output and dead-letter topics like
    it, and the changelog co-partitioned with it. Returns the partition count."""
    topics = Topics(config.kafka.client_kwargs())
    try:
        partitions = topics.require(config.topics.input_topic, "--input-topic")
        topics.ensure(config.topics.output_topic, partitions)
        topics.ensure(config.topics.dead_letter_topic, partitions)
        changelog.ensure_topic(topics, changelog_topic, partitions)
        if config.online.labels_topic:
            ensure_labels_topics(topics, config.online, partitions)
        return partitions
    finally:
        topics.close()


def run(config: ServeConfig) -> None:
    """Serve until SIGTERM/SIGINT. Raises `HiddenstateError` for start-up failures."""
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
    # Registry formats check the input schema and register the output schema now.
    decoder, encoder = open_formats(config, model.spec)
    changelog_topic = config.topics.changelog_for(model.spec.name)
    partitions = check_topics(config, changelog_topic)
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
    processor = make_processor(
        model, config, metrics, decoder=decoder, encoder=live.encoder(encoder)
    )
    served = live.processor(processor, transport)
    reader = transport.changelog_reader(
        max(RESTORE_STALL_TIMEOUT_S, 2 * transaction_timeout_s(config))
    )
    states = changelog.Changelog(changelog_topic, model.spec, processor.store, metrics, reader)
    exactly_once = config.delivery.guarantee == "exactly-once"

    @live.following
    def make_source(
        on_assigned: RebalanceCallback, on_revoked: RebalanceCallback, on_lost: RebalanceCallback
    ) -> Source:
        return transport.source(
            config.topics.input_topic,
            on_assigned,
            on_revoked,
            on_lost,
            read_committed=exactly_once,
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

        def request_stop(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if loop.stopping:
                log.warning("%s again: exiting at once, uncommitted", name)
                os._exit(128 + signum)
            log.info("%s: finishing the batch in hand, then stopping", name)
            loop.stop()
            watchdog.stopping()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # Everything built so far (modules, the model, the clients) lives as long as the
        # process: move it out of the garbage collector's sight. Otherwise each full
        # collection walks all of it, a 25-35 ms stop of the loop on the benchmark
        # (docs/benchmarks.md); frozen, a full collection takes well under a millisecond.
        gc.freeze()
        watchdog.start()
        try:
            loop.run()
        finally:
            watchdog.close()
    finally:
        pause.stop()
        live.close()
        if apart is not None:
            apart.stop()
        server.stop()


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
