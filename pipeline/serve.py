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
from types import FrameType

from prometheus_client import CollectorRegistry

from pipeline import changelog, logs
from pipeline.config import ServeConfig, load_config
from pipeline.formats import open_formats
from pipeline.health import HealthServer, LoopState
from pipeline.loop import LoopSettings, ServeLoop
from pipeline.metrics import Metrics
from pipeline.processor import make_processor
from pipeline.runtime import OrtStepModel
from pipeline.transport import RebalanceCallback, Source, choose_transport, open_transport
from pipeline.transport.topics import Topics

log = logging.getLogger(__name__)


def loop_settings(config: ServeConfig) -> LoopSettings:
    """The loop's part of the serving configuration."""
    return LoopSettings(
        poll_timeout_s=config.kafka.poll_timeout_ms / 1000,
        max_poll_records=config.kafka.max_poll_records,
        checkpoint_interval_s=config.delivery.checkpoint_interval_seconds,
        checkpoint_interval_events=config.delivery.checkpoint_interval_events,
        exactly_once=config.delivery.guarantee == "exactly-once",
    )


def check_topics(config: ServeConfig, changelog_topic: str) -> int:
    """Fail unless the input topic exists; create output and dead-letter topics like
    it, and the changelog co-partitioned with it. Returns the partition count."""
    topics = Topics(config.kafka.client_kwargs())
    try:
        partitions = topics.require(config.topics.input_topic, "--input-topic")
        topics.ensure(config.topics.output_topic, partitions)
        topics.ensure(config.topics.dead_letter_topic, partitions)
        changelog.ensure_topic(topics, changelog_topic, partitions)
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
    processor = make_processor(model, config, metrics, decoder=decoder, encoder=encoder)
    states = changelog.Changelog(
        changelog_topic, model.spec, processor.store, metrics, transport.changelog_reader()
    )
    exactly_once = config.delivery.guarantee == "exactly-once"
    sink = transport.sink(_transactional_id(config) if exactly_once else None)

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

    server = HealthServer(
        metrics.registry,
        health,
        config.observability.metrics_host,
        config.observability.metrics_port,
    ).start()
    log.info("metrics and health on http://%s:%d", config.observability.metrics_host, server.port)
    try:
        loop = ServeLoop(
            loop_settings(config), processor, sink, make_source, metrics, health, states
        )

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
            loop.stop()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # Everything built so far (modules, the model, the clients) lives as long as the
        # process: move it out of the garbage collector's sight. Otherwise each full
        # collection walks all of it, a 25-35 ms stop of the loop on the benchmark
        # (docs/benchmarks.md); frozen, a full collection takes well under a millisecond.
        gc.freeze()
        loop.run()
    finally:
        server.stop()


def _transactional_id(config: ServeConfig) -> str:
    # Stable per instance so that a restarted pod fences its own zombie; with
    # no instance id, the host name (the pod name on Kubernetes) stands in.
    instance = config.kafka.instance_id or os.environ.get("HOSTNAME", "") or str(os.getpid())
    return f"{config.kafka.group_id}-{instance}"


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
