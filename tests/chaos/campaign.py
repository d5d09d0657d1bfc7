"""Run the fault campaign: scenarios x guarantees x transports, one report per run.

    python -m tests.chaos.campaign --full --out artifacts/chaos   # make chaos
    python -m tests.chaos.campaign --quick                         # what CI runs (tests/chaos)

Writes `campaign.json` (every run: faults, report, unexpected exits, hangs)
and `campaign.md` (the table docs/durability.md quotes) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from pipeline.testing import random_weights, write_onnx_step
from tests.chaos.broker import Broker, Topics
from tests.chaos.checker import Report, check, read_topic
from tests.chaos.faults import SCENARIOS, SESSION_TIMEOUT_S
from tests.chaos.producer import RecordingProducer, written
from tests.chaos.reference import reference
from tests.chaos.servers import REPO, ReplicaSet

STREAMS = 48
RATE = 300.0  # events/s, all streams together
PARTITIONS = 4
MODEL_NAME = "chaos-gru"


@dataclass(frozen=True)
class Run:
    scenario: str
    guarantee: str
    transport: str
    count: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.scenario}/{self.guarantee}/{self.transport}"


# CI: a kill loop, one pause and one broker restart under each guarantee, the two
# transports taking turns (both meet every scenario in the full campaign).
QUICK = [
    Run("kill-9", "at-least-once", "kafka-python", 10, 1),
    Run("kill-9", "exactly-once", "confluent", 10, 2),
    Run("pause", "at-least-once", "confluent", 1, 3),
    Run("pause", "exactly-once", "kafka-python", 1, 4),
    Run("broker-restart", "at-least-once", "kafka-python", 1, 5),
    Run("broker-restart", "exactly-once", "confluent", 1, 6),
]

# make chaos: every scenario under both guarantees and both transports, 50 faults each
# combination (kill -9 26, pauses 5, scale cycles 3 of 3 faults, broker 4, cuts 6).
FULL_COUNTS = {"kill-9": 26, "pause": 5, "scale": 3, "broker-restart": 4, "network-cut": 6}
FULL = [
    Run(scenario, guarantee, transport, count, seed)
    for seed, (scenario, count, guarantee, transport) in enumerate(
        (s, c, g, t)
        for s, c in FULL_COUNTS.items()
        for g in ("at-least-once", "exactly-once")
        for t in ("kafka-python", "confluent")
    )
]


def model(workdir: Path) -> Path:
    weights = random_weights("gru", n_features=3, hidden=8, layers=2, n_outputs=2, name=MODEL_NAME)
    return write_onnx_step(weights, workdir / "model.onnx")


def changelog_topic(topics: Topics) -> str:
    return f"{topics.input}.{MODEL_NAME}.changelog"


def server_args(broker: Broker, topics: Topics, run: Run, model_path: Path) -> list[str]:
    return [
        "--bootstrap-servers", broker.proxied_bootstrap,
        "--transport", run.transport,
        "--guarantee", run.guarantee,
        "--model", str(model_path),
        "--input-topic", topics.input,
        "--output-topic", topics.output,
        # Named, not derived: the checker reads this very topic (run_one).
        "--changelog-topic", changelog_topic(topics),
        "--session-timeout-ms", str(int(SESSION_TIMEOUT_S * 1000)),
        "--checkpoint-interval-seconds", "0.5",
        "--checkpoint-interval-events", "0",
        "--max-poll-records", "500",
    ]  # fmt: skip


def run_one(run: Run, broker: Broker, model_path: Path, logs: Path) -> dict[str, Any]:
    """One scenario, then the final restart, then the check."""
    started = time.monotonic()
    rng = random.Random(run.seed)
    topics = broker.create_topics(PARTITIONS)
    producer = RecordingProducer(broker.bootstrap, topics.input, STREAMS, RATE, seed=run.seed)
    logs.mkdir(parents=True, exist_ok=True)
    replicas = ReplicaSet(server_args(broker, topics, run, model_path), logs)
    exactly_once = run.guarantee == "exactly-once"
    try:
        producer.start()
        faults = SCENARIOS[run.scenario](broker, replicas, rng, run.count)
        time.sleep(3.0)
        producer.stop()
        replicas.scale(0)
        # The final restart: one fresh replica, one more event of every stream.
        replicas.start(0)
        _wait_ready(replicas, 0)
        before = len(producer.delivered)
        producer.send_round()
        final_round = {(e.partition, e.offset) for e in producer.delivered[before:]}
        # The log is the truth: what the servers read (`written` says why not the
        # producer's own record); delivered events missing from it are counted apart.
        events = written(read_topic(broker.bootstrap, topics.input, committed=False))
        not_in_log = producer.not_in_log(events)
        truths = reference(model_path, events)
        served = _wait_served(broker, topics, set(truths), exactly_once)
        replicas.stop(0)
    finally:
        replicas.close()
    report: Report = check(
        broker.bootstrap,
        topics,
        [changelog_topic(topics)],
        events,
        truths,
        exactly_once=exactly_once,
        final_round=final_round,
    )
    ok = (
        report.ok
        and not replicas.hangs
        and not not_in_log
        and (not exactly_once or report.duplicates == 0)
    )
    return {
        "run": asdict(run),
        "name": run.name,
        "ok": ok,
        "seconds": round(time.monotonic() - started, 1),
        "faults": [asdict(f) for f in faults],
        "served_within_bound": served,
        "report": report.as_dict(),
        "unexpected_exits": [asdict(e) for e in replicas.exits],
        "restarts": replicas.restarts,
        "hangs": replicas.hangs,
        "producer_failures": producer.failed,
        "acknowledged_without_offset": len(producer.unplaced),
        "written_though_failed": len(events)
        - (len(producer.delivered) + len(producer.unplaced) - not_in_log),
        "delivered_not_in_log": not_in_log,
    }


def _wait_ready(replicas: ReplicaSet, slot: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    port = replicas.replicas[slot].port
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    replicas.hangs.append(f"replica {slot} not ready {timeout_s:.0f} s after its start")


def _wait_served(
    broker: Broker, topics: Topics, sources: set[tuple[int, int]], committed: bool
) -> bool:
    """Until every delivered event has a prediction (bounded); the checker says which not."""
    deadline = time.monotonic() + 180.0
    while time.monotonic() < deadline:
        try:
            records = read_topic(broker.bootstrap, topics.output, committed=committed, timeout_s=60)
        except TimeoutError:
            records = []
        served = set()
        for message in records:
            source = json.loads(message.value())["source"]
            served.add((source["partition"], source["offset"]))
        if sources <= served:
            return True
        time.sleep(3.0)
    return False


def campaign(runs: list[Run], out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiddenstate-chaos-") as tmp:
        work = Path(tmp)
        home = work / "kafka"
        home.mkdir()
        jars = REPO / ".kafka" / "libs"
        if (jars / ".complete").exists():  # the dev broker's jars: no second download
            shutil.copytree(jars, home / "libs")
        broker = Broker(home)
        broker.start()
        try:
            model_path = model(work)
            for run in runs:
                print(f"chaos: {run.name} ({run.count}) ...", file=sys.stderr, flush=True)
                result = run_one(run, broker, model_path, out / "logs" / run.name.replace("/", "-"))
                results.append(result)
                print(f"chaos: {run.name}: {summary(result)}", file=sys.stderr, flush=True)
                (out / "campaign.json").write_text(json.dumps(results, indent=1) + "\n")
        finally:
            broker.close()
    (out / "campaign.md").write_text(markdown(results))
    return results


def summary(result: dict[str, Any]) -> str:
    r = result["report"]
    return (
        f"{'ok' if result['ok'] else 'FAILED'}: {len(result['faults'])} faults, "
        f"{r['events']} events, {r['lost']} lost, {r['duplicates']} duplicates, "
        f"{r['order_violations']} out of order, {r['wrong_values'] + r['wrong_steps']} wrong, "
        f"{r['stale_snapshots']} stale snapshots, {len(result['hangs'])} hangs, "
        f"{len(result['unexpected_exits'])} unexpected exits, {result['seconds']} s"
    )


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | guarantee | transport | faults | events | lost | duplicates "
        "| out of order | wrong values | stale snapshots | wrong after final restart "
        "| hangs | exits by the server |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    total = {"faults": 0, "events": 0}
    for result in results:
        r, run = result["report"], result["run"]
        total["faults"] += len(result["faults"])
        total["events"] += r["events"]
        duplicates = (
            f"{r['duplicates']} (committed)"
            if run["guarantee"] == "exactly-once"
            else str(r["duplicates"])
        )
        rows.append(
            f"| {run['scenario']} | {run['guarantee']} | {run['transport']} | "
            f"{len(result['faults'])} | {r['events']} | {r['lost']} | {duplicates} | "
            f"{r['order_violations']} | {r['wrong_values'] + r['wrong_steps']} | "
            f"{r['stale_snapshots'] + r['snapshots_matching_no_state']} | "
            f"{r['streams_wrong_after_final_restart']} | {len(result['hangs'])} | "
            f"{len(result['unexpected_exits'])} |"
        )
    foot = (
        f"\n{len(results)} runs, {total['faults']} faults, {total['events']} events; "
        f"{date.today().isoformat()}; `python -m tests.chaos.campaign --full`\n"
    )
    return head + "\n".join(rows) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.campaign", description=__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--full", action="store_true", help="every scenario x guarantee x transport")
    which.add_argument("--quick", action="store_true", help="the bounded campaign of CI")
    which.add_argument(
        "--only", help="one scenario/guarantee/transport, e.g. pause/exactly-once/confluent"
    )
    parser.add_argument(
        "--count", type=int, default=0, help="with --only: faults (default as --full)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "chaos")
    args = parser.parse_args(argv)
    if args.only:
        scenario, guarantee, transport = args.only.split("/")
        runs = [Run(scenario, guarantee, transport, args.count or FULL_COUNTS[scenario], 99)]
    else:
        runs = FULL if args.full else QUICK
    results = campaign(runs, args.out)
    print(markdown(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
