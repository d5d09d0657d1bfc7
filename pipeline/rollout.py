"""Roll-outs: both models' changelogs as one checkpointer, the promotion check, the warm-up.

    checkpoints = Checkpoints(primary_changelog, store, config.rollout, metrics.rollout,
                              shadow=shadow, shadow_changelog=..., history=..., decoder=...)
    ServeLoop(..., committer(changes=checkpoints.changes), checkpointer=checkpoints)

The loop sees one `Checkpointer` (`pipeline.loop`):

- `changes()` returns the served model's changelog records, then the shadow's:
  both go into the same checkpoint, so both changelogs and the input offsets
  commit atomically (one transaction, under either guarantee);
- `restore(partitions)` restores both stores, then, in this order:
  1. **the promotion check**: streams restored for the served model that are
     cold (their states were written while it was a shadow that had joined
     them mid-stream) are counted; more than `--promotion-max-cold-fraction`
     of them refuses to serve (`PromotionRefusedError`, exit 1) unless
     `--force-promotion`; accepted ones stop counting as cold, and the next
     checkpoint writes them so;
  2. **alignment** (`Shadow.align`): the shadow holds exactly the served
     model's streams, cold placeholders for those it lacks;
  3. **warm-up** (`--shadow-warmup-events N`): for each cold stream of the
     shadow, its last events (up to N; all of them since the stream's start or
     last reset, where they are fewer) are read back from the input topic,
     within its retention (`InputHistory`), and the shadow steps through them.

The refusal happens before anything is written: a refused server exits with
nothing of its restore made durable, and the previous deployment serves on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from pipeline.changelog import Changelog
from pipeline.codec import Event
from pipeline.config import RolloutConfig
from pipeline.errors import BadEventError, HiddenstateError, RestoreStalledError
from pipeline.formats import Decoder
from pipeline.metrics import RolloutMetrics
from pipeline.records import InputRecord, OutputRecord
from pipeline.settings import flag_name, who
from pipeline.shadow import Shadow
from pipeline.state_store import Rows, StateStore
from pipeline.transport.base import unreachable

log = logging.getLogger(__name__)


class PromotionRefusedError(HiddenstateError):
    """Too many streams restored for the served model are cold: the promotion of a shadow
    that had not seen them from their start is refused (`--force-promotion` overrides)."""


class InputHistory(Protocol):
    """Reads past records of the input topic for the warm-up."""

    def bounds(self, partition: int) -> tuple[int, int]:
        """(first offset still retained, next offset) of `partition`."""
        ...

    def read(
        self, partition: int, start: int, end: int, progress: Callable[[], None]
    ) -> list[InputRecord]:
        """The records of `partition` at offsets `[start, end)`, in offset order; `progress()`
        is called as they arrive (the loop beats its liveness with it)."""
        ...


class Checkpoints:
    """The loop's `Checkpointer` for the served model and, optionally, its shadow."""

    def __init__(
        self,
        primary: Changelog,
        store: StateStore,
        settings: RolloutConfig,
        metrics: RolloutMetrics,
        *,
        identity: str,
        shadow: Shadow | None = None,
        shadow_changelog: Changelog | None = None,
        history: InputHistory | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        if (shadow is None) != (shadow_changelog is None):
            raise ValueError("a shadow needs its changelog, and a shadow changelog its shadow")
        if (
            settings.shadow_warmup_events
            and shadow is not None
            and (history is None or decoder is None)
        ):
            raise ValueError("the shadow's warm-up needs the input history and the decoder")
        self._primary = primary
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._identity = identity
        self._shadow = shadow
        self._shadow_changelog = shadow_changelog
        # What the warm-up reads the past events with, and decodes them with.
        self._warmup = None if history is None or decoder is None else (history, decoder)

    def changes(self) -> list[OutputRecord]:
        """The served model's changelog records, then the shadow's: one checkpoint."""
        records = self._primary.changes()
        if self._shadow_changelog is not None:
            records += self._shadow_changelog.changes()
        return records

    def restore(self, partitions: list[int], progress: Callable[[], None]) -> None:
        """Both models' states of `partitions`, the promotion check, the shadow aligned and
        warmed up; see the module docstring."""
        self._primary.restore(partitions, progress)
        if self._shadow_changelog is not None:
            self._shadow_changelog.restore(partitions, progress)
        self._check_promotion(partitions)
        shadow = self._shadow
        if shadow is None:
            return
        aligned = shadow.align(self._store.rows(partitions, with_states=False), partitions)
        if aligned.served_behind:
            log.warning(
                "%d streams of partitions %s: the states of %s are older than those of the "
                "shadow %s (its changelog stopped while another model served: a roll-back to a "
                "model that was dropped at a promotion); they continue from those older states",
                aligned.served_behind,
                partitions,
                self._identity,
                shadow.spec.identity,
            )
        if aligned.placeholders or aligned.forgotten:
            log.info(
                "shadow %s on partitions %s: %d streams it had not seen join cold, %d it held "
                "that %s does not are forgotten",
                shadow.spec.identity,
                partitions,
                aligned.placeholders,
                aligned.forgotten,
                self._identity,
            )
        if self._settings.shadow_warmup_events and self._warmup is not None:
            self._warm_up(shadow, partitions, progress, *self._warmup)
        cold, held = shadow.store.count_cold(partitions)
        log.info(
            "shadow %s on partitions %s: %d streams, %d warm, %d cold",
            shadow.spec.identity,
            partitions,
            held,
            held - cold,
            cold,
        )

    def _check_promotion(self, partitions: list[int]) -> None:
        cold, restored = self._store.count_cold(partitions)
        if not cold:
            return
        self._metrics.restored_cold_streams.inc(cold)
        limit = self._settings.promotion_max_cold_fraction
        fraction = cold / restored
        what = (
            f"{cold} of the {restored} streams restored for {self._identity} on input partitions "
            f"{partitions} are cold ({fraction:.1%}): their states were written while it was a "
            "shadow that joined them mid-stream, and miss their first events"
        )
        if fraction > limit and not self._settings.force_promotion:
            raise PromotionRefusedError(
                f"promotion refused: {what}. {who('promotion_max_cold_fraction')} allows "
                f"{limit:g} of them. Serve on with the previous model and this one as "
                "--shadow-model until its streams are warm (hiddenstate_shadow_streams), or with "
                f"{who('shadow_warmup_events')} large enough to replay them; or promote anyway "
                f"with {who('force_promotion')}=true"
            )
        accepted = self._store.accept_missed(partitions)
        log.warning(
            "promotion with cold streams: %s; %s (%d accepted, they continue from their "
            "cold states)",
            what,
            "forced by --force-promotion" if fraction > limit else f"within the limit {limit:g}",
            accepted,
        )

    def _warm_up(
        self,
        shadow: Shadow,
        partitions: list[int],
        progress: Callable[[], None],
        history: InputHistory,
        decoder: Decoder,
    ) -> None:
        started = time.monotonic()
        most = self._settings.shadow_warmup_events
        rows = shadow.store.rows(partitions, with_states=False)
        missed = rows.missed_or_zeros()
        position = rows.steps + missed
        wanted = np.minimum(position, most)
        # A replay restarts the stream from zeros: only where it reaches back further than
        # what the cold state has seen.
        chosen = np.flatnonzero((missed > 0) & (wanted > rows.steps))
        if not len(chosen):
            return
        warmed = replayed = 0
        for partition in sorted({int(p) for p in rows.partitions[chosen].tolist()}):
            mine = chosen[rows.partitions[chosen] == partition]
            streams = _subset(rows, mine)
            need = dict(zip(streams.keys, wanted[mine].tolist(), strict=True))
            upto = dict(zip(streams.keys, streams.offsets.tolist(), strict=True))
            found = recent_events(history, decoder, partition, need, upto, progress)
            events = sorted(
                (e for stream in found.values() for e in stream), key=lambda e: e.record.offset
            )
            warmed += shadow.replay(events, streams)
            replayed += len(events)
            progress()
        stay = len(chosen) - warmed
        log.info(
            "shadow %s warmed up on partitions %s: %d of %d cold streams warm after replaying "
            "%d past events in %.2f s%s",
            shadow.spec.identity,
            partitions,
            warmed,
            len(chosen),
            replayed,
            time.monotonic() - started,
            f"; {stay} stay cold: their first events are beyond "
            f"{flag_name('shadow_warmup_events')}={most} or the input topic's retention"
            if stay
            else "",
        )


def _subset(rows: Rows, chosen: Any) -> Rows:
    return Rows(
        keys=[rows.keys[i] for i in chosen.tolist()],
        partitions=rows.partitions[chosen],
        offsets=rows.offsets[chosen],
        steps=rows.steps[chosen],
        states=tuple(s[chosen] for s in rows.states),
        missed=rows.missed_or_zeros()[chosen],
    )


# The first look back reads this many records, each further one twice as many as the one
# before (the streams to warm up are interleaved with every other stream of the partition),
# up to the longest: what one read holds in memory at once, a few seconds of reading.
_FIRST_LOOK_BACK = 10_000
_LONGEST_LOOK_BACK = 500_000


def recent_events(
    history: InputHistory,
    decoder: Decoder,
    partition: int,
    need: Mapping[bytes, int],
    upto: Mapping[bytes, int],
    progress: Callable[[], None] = lambda: None,
) -> dict[bytes, list[Event]]:
    """The last `need[key]` events of each stream `key` of `partition` at offsets up to
    `upto[key]`, oldest first: the input topic read backwards from there, in spans that
    double, until every stream has its events or the retained start is reached (then a
    stream has fewer). Records that do not decode were dead-lettered, never stepped, and
    are skipped."""
    found: dict[bytes, list[Event]] = {key: [] for key in need}
    pending = {key for key, count in need.items() if count > 0}
    if not pending:
        return found
    low, high = history.bounds(partition)
    end = min(high, max(upto[key] for key in pending) + 1)
    span = min(max(_FIRST_LOOK_BACK, 2 * sum(need[key] for key in pending)), _LONGEST_LOOK_BACK)
    while pending and end > low:
        start = max(low, end - span)
        fresh: dict[bytes, list[Event]] = {}
        for record in history.read(partition, start, end, progress):
            key = record.key
            if key is None or key not in pending or record.offset > upto[key]:
                continue
            try:
                event = decoder.decode(record)
            except BadEventError:
                continue
            fresh.setdefault(key, []).append(event)
        for key, events in fresh.items():
            room = need[key] - len(found[key])
            found[key] = events[-room:] + found[key]
            if len(found[key]) >= need[key]:
                pending.discard(key)
        progress()
        end = start
        span = min(2 * span, _LONGEST_LOOK_BACK)
    return found


class KafkaInputHistory:
    """`InputHistory` over a kafka-python consumer that joins no group.

    kafka-python whichever transport serves, as for the start-up topic checks: it is
    always installed, and a warm-up reads once per assignment."""

    def __init__(
        self,
        client_kwargs: Mapping[str, Any],
        topic: str,
        *,
        read_committed: bool,
        stall_timeout_s: float = 120.0,
    ) -> None:
        self._topic = topic
        self._stall_timeout_s = stall_timeout_s
        try:
            self._consumer = KafkaConsumer(
                group_id=None,
                enable_auto_commit=False,
                # What the served model read: only committed events under exactly-once.
                isolation_level="read_committed" if read_committed else "read_uncommitted",
                max_poll_records=10_000,
                **client_kwargs,
            )
        except KafkaError as exc:
            raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc

    def bounds(self, partition: int) -> tuple[int, int]:
        tp = TopicPartition(self._topic, partition)
        low = self._consumer.beginning_offsets([tp])[tp]
        high = self._consumer.end_offsets([tp])[tp]
        return int(low), int(high)

    def read(
        self, partition: int, start: int, end: int, progress: Callable[[], None]
    ) -> list[InputRecord]:
        consumer = self._consumer
        tp = TopicPartition(self._topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        records: list[InputRecord] = []
        moved = time.monotonic()
        position = start
        while position < end:
            for batch in consumer.poll(timeout_ms=500).values():
                records += [InputRecord.from_kafka(r) for r in batch if r.offset < end]
            now_at = consumer.position(tp)
            if now_at > position:
                position, moved = now_at, time.monotonic()
                progress()
            elif time.monotonic() - moved > self._stall_timeout_s:
                raise RestoreStalledError(
                    f"warming up the shadow from {self._topic}[{partition}]: no progress for "
                    f"{self._stall_timeout_s:.0f} s at offset {position} of [{start}, {end}); "
                    "the broker is away"
                )
        return records

    def close(self) -> None:
        self._consumer.close()
