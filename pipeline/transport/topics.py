"""Start-up checks and creation of the topics the server reads and writes.

`Topics` always uses kafka-python's admin client, whichever transport serves:
it runs a handful of requests once, at start, so speed does not matter here,
and kafka-python is always installed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.errors import KafkaSetupError
from pipeline.transport.base import unreachable

log = logging.getLogger(__name__)

# How long a freshly created topic may take to show in the broker's metadata.
TOPIC_VISIBLE_TIMEOUT_S = 10.0


class Topics:
    """Start-up checks and creation of the topics the server reads and writes."""

    def __init__(self, client_kwargs: Mapping[str, Any]) -> None:
        """`client_kwargs` are kafka-python's (`KafkaConfig.client_kwargs()`)."""
        try:
            self._admin = KafkaAdminClient(**client_kwargs)
        except KafkaError as exc:
            raise unreachable(client_kwargs.get("bootstrap_servers"), exc) from exc

    def partitions(self, topic: str) -> int | None:
        """How many partitions `topic` has, or None if it does not exist."""
        for entry in self._admin.describe_topics([topic]):
            if entry["name"] == topic and entry["error_code"] == 0:
                return len(entry["partitions"])
        return None

    def require(self, topic: str, setting: str) -> int:
        """Partition count of an existing topic; `KafkaSetupError` naming the setting if missing."""
        count = self.partitions(topic)
        if count is None:
            raise KafkaSetupError(
                f"topic {topic!r} ({setting}) does not exist; create it "
                f"(e.g. `hiddenstate produce --topic {topic} ...` creates it) or fix the name"
            )
        return count

    def ensure(self, topic: str, partitions: int, config: Mapping[str, str] | None = None) -> int:
        """Create `topic` if missing; return its partition count."""
        existing = self.partitions(topic)
        if existing is not None:
            return existing
        try:
            self._admin.create_topics(
                [NewTopic(topic, partitions, -1, topic_configs=dict(config or {}))]
            )
            log.info("created topic %s with %d partitions", topic, partitions)
        except TopicAlreadyExistsError:
            pass  # another replica created it between our check and our request
        # The controller acknowledges the creation before the broker's metadata
        # cache has it (KRaft propagates it asynchronously): describe until it shows.
        deadline = time.monotonic() + TOPIC_VISIBLE_TIMEOUT_S
        while (count := self.partitions(topic)) is None:
            if time.monotonic() > deadline:
                raise KafkaSetupError(
                    f"topic {topic!r} was created but did not appear in the broker's "
                    f"metadata within {TOPIC_VISIBLE_TIMEOUT_S:.0f} s; check the broker's log "
                    "or create the topic by hand"
                )
            time.sleep(0.1)
        return count

    def topic_config(self, topic: str) -> dict[str, str]:
        """The topic's effective configuration (cleanup.policy, ...)."""
        result = self._admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
        entries = result.get("topic", {}).get(topic, {})
        return {name: str(entry["value"]) for name, entry in entries.items()}

    def close(self) -> None:
        self._admin.close()
