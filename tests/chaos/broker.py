"""The campaign's own broker, which it kills and starts again; the servers reach it through a proxy."""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.devtools import local_kafka
from pipeline.devtools.home import alive
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

    def crash(self) -> None:
        """kill -9, as a node that fails: no controlled shutdown. A graceful stop of this
        single node takes the leadership of every partition away first, and Kafka's
        transaction coordinator then skips the markers of a transaction it commits
        meanwhile (a partition without a leader counts as deleted: KAFKA-5202), which
        leaves it hanging on every partition it wrote: a broker defect no client can
        repair (docs/durability.md, "The fault campaign")."""
        pid = local_kafka.running_pid(self.kafka)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the broker (pid {pid}) still runs 30 s after kill -9")
            time.sleep(0.1)
        self.kafka.pid_file.unlink(missing_ok=True)

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
