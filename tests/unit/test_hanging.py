"""Hanging transactions behind a stalled restore: which are, what is done, what is said.

The admin client here is a stand-in for the decisions only; the real one, against a
real hanging transaction, is in tests/contract (a restore that aborts it and reads on).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import ClusterAuthorizationFailedError

from pipeline.errors import RestoreStalledError
from pipeline.testing import ManualClock
from pipeline.transport.base import StallWatch
from pipeline.transport.hanging import (
    HangingTransactions,
    OpenTransaction,
    holding,
    is_hanging,
    resolve_quietly,
)


def producer(pid: int, start: int, epoch: int = 0) -> Any:
    return SimpleNamespace(
        producer_id=pid,
        producer_epoch=epoch,
        coordinator_epoch=-1,
        current_transaction_start_offset=start,
    )


class Admin:
    """Answers as a cluster would: the partition's open transactions, the coordinator's
    state of each producer id; records the aborts, which end the transaction."""

    def __init__(self, open_on: dict[int, list[Any]], states: dict[int, str]) -> None:
        self.open_on = open_on
        self.states = states
        self.aborted: list[tuple[int, int]] = []

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

    def abort_transaction(self, spec: Any) -> None:
        partition = spec.topic_partition.partition
        self.aborted.append((partition, spec.producer_id))
        self.open_on[partition] = [
            p for p in self.open_on[partition] if p.producer_id != spec.producer_id
        ]

    def close(self) -> None:
        pass


def resolver(admin: Admin) -> HangingTransactions:
    hanging = HangingTransactions({"bootstrap_servers": ["127.0.0.1:9"]})
    hanging.admin = lambda: admin  # type: ignore[method-assign]
    return hanging


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
        OpenTransaction("log", 0, 7, 0, -1, 182),
        OpenTransaction("log", 1, 5, 0, -1, 3),
    ]


def test_resolve_aborts_a_hanging_transaction_and_leaves_a_tracked_one_alone():
    admin = Admin({0: [producer(7, 182)], 1: [producer(8, 40)]}, {7: "Empty", 8: "Ongoing"})
    findings = resolver(admin).resolve("log", {0: 182, 1: 40})
    assert admin.aborted == [(0, 7)]
    assert [(f.transaction.producer_id, f.hanging, f.aborted) for f in findings] == [
        (7, True, True),
        (8, False, False),
    ]
    assert "aborted the hanging transaction of producer id 7" in str(findings[0])
    assert "it ends by itself" in str(findings[1])


def test_resolve_aborts_a_transaction_of_a_producer_no_coordinator_lists():
    admin = Admin({2: [producer(11, 0)]}, {})
    (finding,) = resolver(admin).resolve("log", {2: 0})
    assert (admin.aborted, finding.transactional_id) == ([(2, 11)], None)


class Probe:
    def __init__(self, says: str, aborted: bool) -> None:
        self.says, self.aborted = says, aborted
        self.asked: list[dict[int, int]] = []

    def __call__(self, topic: str, positions: Any) -> tuple[str, bool]:
        self.asked.append(dict(positions))
        return self.says, self.aborted


def test_the_stall_watch_asks_its_probe_once_halfway_to_its_bound():
    clock, probe = ManualClock(), Probe("a transaction ... it ends by itself", aborted=False)
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    for _ in range(5):
        clock.advance(10.0)
        watch.check({0: 182}, {0: 194})
    assert probe.asked == [{0: 182}]


def test_an_abort_by_the_probe_starts_the_wait_afresh():
    clock, probe = ManualClock(), Probe("aborted the hanging transaction ...", aborted=True)
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    clock.advance(31.0)
    watch.check({0: 182}, {0: 194})  # probed: aborted
    clock.advance(50.0)
    watch.check({0: 182}, {0: 194})  # 50 s since the abort: within the bound


def test_the_stall_error_says_what_the_probe_found():
    clock, probe = ManualClock(), Probe("a hanging transaction of producer id 7 ...", False)
    watch = StallWatch("log", 60.0, probe, clock)
    watch.check({0: 182}, {0: 194})
    clock.advance(31.0)
    watch.check({0: 182}, {0: 194})
    clock.advance(30.0)
    with pytest.raises(RestoreStalledError, match=r"\[0\] at 182 of 194.*producer id 7"):
        watch.check({0: 182}, {0: 194})


def test_a_cluster_that_refuses_to_be_asked_is_said_not_raised():
    class Refusing(Admin):
        def describe_producers(self, partitions: list[TopicPartition]) -> dict[Any, Any]:
            raise ClusterAuthorizationFailedError("no ClusterAction")

    said, aborted = resolve_quietly(resolver(Refusing({}, {})), "log", {0: 182})
    assert (aborted, said.startswith("looking for hanging transactions failed")) == (False, True)
