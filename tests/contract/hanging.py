"""A hanging transaction, made on purpose: records of a transaction that its coordinator
never heard of on their partition, so no marker will ever end it (KIP-664).

Kafka 3.6+ refuses such a write (KIP-890's verification of transactional writes), but
only while `transaction.partition.verification.enable` is on: a write that reached the
partition before a broker had it, or a coordinator that lost its state, leaves the same.
So: verification off on the broker for the one write, and a kafka-python transactional
producer told that its partition is in the transaction already, which skips
AddPartitionsToTxn.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from kafka import KafkaProducer

VERIFICATION = "transaction.partition.verification.enable"


def write_hanging_transaction(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    """One record in a transaction open on `topic`[0] that its coordinator holds Empty."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker = str(next(iter(admin.list_topics(timeout=10).brokers)))
    _verification(admin, broker, False)
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, transactional_id=f"hanging-{uuid.uuid4().hex[:8]}"
        )
        producer.init_transactions()
        producer.begin_transaction()
        manager = producer._transaction_manager
        manager.maybe_add_partition_to_transaction = manager._partitions_in_transaction.add
        producer.send(topic, key=key, value=value, partition=0).get(timeout=30)
        producer.close(timeout=0)  # gone without a commit or an abort
    finally:
        _verification(admin, broker, True)


def _verification(admin: AdminClient, broker: str, on: bool) -> None:
    """Verification off (a dynamic override of the broker), or back to its default; until
    the broker says it applies (bounded)."""
    entry = ConfigEntry(
        VERIFICATION,
        "false",
        incremental_operation=AlterConfigOpType.DELETE if on else AlterConfigOpType.SET,
    )
    resource = ConfigResource("BROKER", broker, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        described = admin.describe_configs([ConfigResource("BROKER", broker)])
        configs = next(iter(described.values())).result(timeout=30)
        if configs[VERIFICATION].value == str(on).lower():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"broker {broker} still has {VERIFICATION}={not on} after 30 s")
        time.sleep(0.2)
