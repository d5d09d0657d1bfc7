"""Topic creation against an admin client that answers like a KRaft broker whose
metadata cache lags the controller (the broker itself is covered in tests/integration)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.errors import KafkaSetupError
from pipeline.transport import topics as topics_module


class LaggingAdmin:
    """Accepts a creation at once; shows the topic only after `lag` more describes."""

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self.created: dict[str, int] = {}
        self.describes = 0

    def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        self.describes += 1
        visible = self.describes > self.lag
        return [
            {"name": n, "error_code": 0, "partitions": [{}] * self.created[n]}
            if n in self.created and visible
            else {"name": n, "error_code": 3, "partitions": []}
            for n in names
        ]

    def create_topics(self, new_topics: list[Any]) -> None:
        for topic in new_topics:
            self.created[topic.name] = topic.num_partitions
            self.describes = 0


@pytest.fixture
def topics(monkeypatch: pytest.MonkeyPatch):
    def make(lag: int) -> topics_module.Topics:
        admin = LaggingAdmin(lag)
        monkeypatch.setattr(topics_module, "KafkaAdminClient", lambda **_: admin)
        return topics_module.Topics({})

    return make


def test_a_created_topic_is_returned_once_the_broker_metadata_shows_it(topics):
    assert topics(lag=2).ensure("events.changelog", 4) == 4


def test_a_created_topic_that_never_shows_is_an_error_naming_it(topics, monkeypatch):
    monkeypatch.setattr(topics_module, "TOPIC_VISIBLE_TIMEOUT_S", 0.0)
    with pytest.raises(
        KafkaSetupError, match=r"'events\.changelog' was created but did not appear"
    ):
        topics(lag=10**9).ensure("events.changelog", 4)
