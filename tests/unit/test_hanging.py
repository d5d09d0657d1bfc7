"""What holds a stalled restore: which open transactions are hanging, and what is said.

The admin client here is a stand-in for the decisions only; the real one, against a
real hanging transaction, is in tests/contract (a restore that stops naming it).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import TopicAuthorizationFailedError

from pipeline.errors import RestoreStalledError
from pipeline.testing import ManualClock
from pipeline.transport.base import StallWatch
from pipeline.transport.hanging import (
    OpenTransaction,
    OpenTransactions,
    find_quietly,
    holding,
    is_hanging,
)


def producer(pid: int, start: int, epoch: int = 0) -> Any:
    return SimpleNamespace(
        producer_id=pid,
        producer_epoch=epoch,
        coordinator_epoch=-1,
        current_transaction_start_offset=start,
    )


class Admin:
    """Answers as a cluster would: each partition's open transactions, and the
    coordinator's state of each producer id."""

    def __init__(self, open_on: dict[int, list[Any]], states: dict[int, str]) -> None:
        self.open_on = open_on
        self.states = states

    def describe_producers(self, partitions: list[TopicPartition]) -> dict[Any, Any]:
        return {
            tp: SimpleNamespace(active_producers=self.open_on.get(tp.partition, []))
            for tp in partitions
        }

    def list_transactions(self, *, producer_id_filters: list[int]) -> dict[int, list[Any]]:
        rows = [
            SimpleNamespace(transactional_id=f"tx-{pid}", state=SimpleNamespace(value=state))
            for pid, state in self.states.items()
            if pid in producer_id_filters
        ]
        return {1: rows}

    def close(self) -> None:
        pass


def asking(admin: Admin) -> OpenTransactions:
    found = OpenTransactions({"bootstrap_servers": ["127.0.0.1:9"]})
    found.admin = lambda: admin  # type: ignore[method-assign]
    return found


@pytest.mark.parametrize("state", ["Ongoing", "PrepareCommit", "PrepareAbort", "PrepareEpochFence"])
def test_a_transaction_its_coordinator_still_tracks_is_not_hanging(state):
    assert not is_hanging(state)


@pytest.mark.parametrize("state", ["Empty", "CompleteCommit", "CompleteAbort", "Dead", None])
def test_a_transaction_its_coordinator_has_nothing_open_for_is_hanging(state):
    assert is_hanging(state)


def test_holding_names_the_transactions_open_at_or_before_each_readers_position():
    producers = {
        0: [producer(7, 182), producer(8, -1), producer(9, 190)],
        1: [producer(5, 3)],
    }
    assert holding("log", producers, {0: 182, 1: 40}) == [
        OpenTransaction("log", 0, 7, 0, 182),
        OpenTransaction("log", 1, 5, 0, 3),
    ]


def test_a_hanging_transaction_is_named_with_the_command_that_ends_it():
    admin = Admin({0: [producer(7, 182, epoch=2)]}, {7: "Empty"})
    (finding,) = asking(admin).find("log", {0: 182})
    assert finding.hanging
    said = str(finding)
    assert "hanging transaction of producer id 7 (epoch 2) holds log[0] from offset 182" in said
    assert "transactional id 'tx-7' is Empty" in said
    assert "abort --topic log --partition 0 --start-offset 182" in said


def test_a_transaction_its_coordinator_tracks_is_said_to_end_by_itself():
    admin = Admin({1: [producer(8, 40)]}, {8: "Ongoing"})
    (finding,) = asking(admin).find("log", {1: 40})
    assert (finding.hanging, str(finding).endswith("it ends by itself")) == (False, True)


def test_a_producer_no_coordinator_lists_holds_a_hanging_transaction():
    (finding,) = asking(Admin({2: [producer(11, 0)]}, {})).find("log", {2: 0})
    assert (finding.transactional_id, finding.hanging) == (None, True)
    assert "which no transaction coordinator lists" in str(finding)


def test_a_cluster_that_refuses_to_be_asked_is_said_not_raised():
    class Refusing(Admin):
        def describe_producers(self, partitions: list[TopicPartition]) -> dict[Any, Any]:
            raise TopicAuthorizationFailedError("no Read on the changelog")

    said = find_quietly(asking(Refusing({}, {})), "log", {0: 182})
    assert said.startswith("asking the cluster which transactions are open there failed")


class Probe:
    def __init__(self, says: str) -> None:
        self.says = says
        self.asked: list[dict[int, int]] = []

    def __call__(self, topic: str, positions: Any) -> str:
        self.asked.append(dict(positions))
        return self.says


def test_the_stall_watch_asks_its_probe_once_halfway_to_its_bound():
    clock, probe = ManualClock(), Probe("a transaction ... it ends by itself")
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    for _ in range(5):
        clock.advance(10.0)
        watch.check({0: 182}, {0: 194})
    assert probe.asked == [{0: 182}]


def test_progress_after_the_probe_lets_it_ask_again_at_the_next_stall():
    clock, probe = ManualClock(), Probe("...")
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    clock.advance(31.0)
    watch.check({0: 182}, {0: 194})
    watch.check({0: 190}, {0: 194})
    clock.advance(31.0)
    watch.check({0: 190}, {0: 194})
    assert probe.asked == [{0: 182}, {0: 190}]


def test_the_stall_error_says_what_the_probe_found():
    clock, probe = ManualClock(), Probe("a hanging transaction of producer id 7 ...")
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    clock.advance(31.0)
    watch.check({0: 182}, {0: 194})
    clock.advance(30.0)
    with pytest.raises(RestoreStalledError, match=r"\[0\] at 182 of 194.*producer id 7"):
        watch.check({0: 182}, {0: 194})
