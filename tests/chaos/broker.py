"""The campaign's own broker, which it stops and starts; the servers reach it through a proxy."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.devtools import local_kafka
from tests.chaos.proxy import Proxy
from tests.ports import free_ports


@dataclass
class Topics:
    """The topics of one run."""

    input: str
    output: str

    @property
    def dead_letter(self) -> str:
        return f"{self.input}.dead-letter"


class Broker:
    """A single-node KRaft broker in `home`: clients of the campaign connect directly
    (`bootstrap`), the servers through the proxy (`proxied_bootstrap`)."""

    def __init__(self, home: Path) -> None:
        proxy_port, behind, port, controller_port = free_ports(4)
        self.kafka = local_kafka.LocalKafka(
            home=home,
            port=port,
            controller_port=controller_port,
            proxied=(behind, proxy_port),
        )
        self.proxy = Proxy(proxy_port, behind).start()

    @property
    def bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def proxied_bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.listen_port}"

    def start(self) -> None:
        local_kafka.start(self.kafka, timeout=120.0)

    def stop(self) -> None:
        local_kafka.stop(self.kafka)

    def close(self) -> None:
        self.stop()
        self.proxy.stop()

    def create_topics(self, partitions: int) -> Topics:
        """Input and output topics with names no other run uses."""
        run = uuid.uuid4().hex[:8]
        topics = Topics(input=f"chaos-{run}", output=f"chaos-{run}.predictions")
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        names = [topics.input, topics.output, topics.dead_letter]
        futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        for future in futures.values():
            future.result(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            listed = admin.list_topics(timeout=10).topics
            if all(n in listed and len(listed[n].partitions) == partitions for n in names):
                return topics
            if time.monotonic() > deadline:
                raise KafkaException(f"topics {names} have no leaders after 30 s")
            time.sleep(0.2)
