"""Does reading a stream over HTTP slow the serving loop? Capacity of `hiddenstate serve`
without the streams API, with it and no client, and with a client reading one stream
100 times a second, on a real broker.

    python bench/streams_api.py --bootstrap-servers 127.0.0.1:9092
    python bench/streams_api.py --runs 3 --backlog 1500000 --capacity-seconds 8   # reduced

A backlog of `--backlog` events over `--streams` streams is written once by librdkafka
(bench/load.py: the same events as bench/run.py). Each run serves it from its start with
a fresh consumer group, output topic and changelog, exactly as bench/run.py's capacity
step (its `Running`, the same model and flags): after `--warmup` seconds, the
predictions read back during `--capacity-seconds` give the sustained throughput, and the
server's CPU seconds (all threads, the HTTP server's included) over the same window the
CPU per event. The variants:

- `off`: no `--streams-api` (no prediction ring, nothing recorded);
- `on`: `--streams-api`, nobody asks;
- `polled`: `--streams-api` and a client (a process of its own) asking
  `GET /streams/<key>?state=1` of one served stream every 10 ms on the metrics port
  (100 a second, paced by the clock; each answer's time is recorded), a new connection
  each time, as `curl` would;
- `apart`: the same client on `--streams-api-port` (the API's own server), keeping its
  connection open, as a router would.

Runs are interleaved (off, on, polled, off, ...) so drift on the shared machine hits
every variant alike; medians are reported, and everything is written to `--out`.

`--core` measures the same three variants without Kafka, the serving core alone in one
thread as the loop runs it (`Processor.process` on polls of `--poll` JSON events over
`--streams` streams, bench/measure_core.py's shape and model), for rounds of
`--round-seconds` each, interleaved, `--rounds` per variant: what is left is the GIL the
HTTP server's thread takes from the loop, which a broker on the same cores would
otherwise blur.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import Reader, create_topic, delete_topics, fill, stream_key  # noqa: E402
from bench.model import build  # noqa: E402
from bench.run import (  # noqa: E402
    PARTITIONS,
    Running,
    Subject,
    cpu_seconds,
    environment,
    free_port,
    wait_for,
)

VARIANTS = ("off", "on", "polled", "apart")
RATE = 100.0  # requests a second


# The client, in a process of its own (so that neither its work nor the reader's delays
# the other): GET the URL RATE times a second for SECONDS, then the answers' times as JSON.
_CLIENT = """
import json, sys, time, urllib.request
import http.client, urllib.parse
url, rate, seconds, keep = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
parts = urllib.parse.urlsplit(url)
connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
times, failures, due = [], 0, time.monotonic()
end = due + seconds
while time.monotonic() < end:
    started = time.monotonic()
    try:
        if keep == "keep":
            connection.request("GET", parts.path + "?" + parts.query)
            connection.getresponse().read()
        else:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
    except OSError:
        failures += 1
        connection.close()
    times.append(time.monotonic() - started)
    due += 1.0 / rate
    time.sleep(max(0.0, due - time.monotonic()))
print(json.dumps({"times": times, "failures": failures}))
"""


class Poller:
    """Asks for one stream `RATE` times a second for `seconds`, from another process."""

    def __init__(self, url: str, seconds: float, keep: bool) -> None:
        self.seconds = seconds
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CLIENT,
                url,
                str(RATE),
                str(seconds),
                "keep" if keep else "new",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def result(self) -> dict[str, float]:
        out, _ = self.process.communicate(timeout=self.seconds + 30)
        found = json.loads(out)
        ordered = sorted(found["times"])
        return {
            "requests_per_second": len(ordered) / self.seconds,
            "request_p50_ms": 1e3 * ordered[len(ordered) // 2],
            "request_p99_ms": 1e3 * ordered[int(len(ordered) * 0.99)],
            "request_failures": found["failures"],
        }


def capacity(
    variant: str, backlog: str, args: argparse.Namespace, logs: Path, used: list[str]
) -> dict[str, float]:
    output = f"{backlog}.out-{uuid.uuid4().hex[:6]}"
    create_topic(args.bootstrap_servers, output, PARTITIONS)
    reader = Reader(args.bootstrap_servers, output, PARTITIONS, marker=None).start()
    apart_port = free_port()
    flags: tuple[str, ...] = () if variant == "off" else ("--streams-api",)
    if variant == "apart":
        flags += ("--streams-api-port", str(apart_port))
    subject = Subject(variant, args.transport, REPO, flags)
    running = Running(subject, args, backlog, output, logs / f"{variant}-{output}.log")
    poller = None
    try:
        wait_for(reader, 1, running, timeout=90)
        if variant in ("polled", "apart"):
            port = apart_port if variant == "apart" else running.metrics_port
            url = f"http://127.0.0.1:{port}/streams/{stream_key(0).decode()}?state=1"
            poller = Poller(url, args.warmup + args.capacity_seconds, keep=variant == "apart")
        time.sleep(args.warmup)
        count0, cpu0, t0 = reader.count, cpu_seconds(running.pid), time.monotonic()
        time.sleep(args.capacity_seconds)
        count1, cpu1, t1 = reader.count, cpu_seconds(running.pid), time.monotonic()
        asked = poller.result() if poller is not None else {}
        if count1 >= args.backlog:
            raise RuntimeError(f"{variant} drained the backlog: raise --backlog")
    finally:
        if poller is not None and poller.process.poll() is None:
            poller.process.kill()
        running.stop()
        reader.stop()
        used += [output, running.changelog]
    events = count1 - count0
    row = {
        "events_per_second": events / (t1 - t0),
        "cpu_us_per_event": (cpu1 - cpu0) / events * 1e6,
        "events_in_window": events,
    }
    return row | asked


def core(args: argparse.Namespace) -> dict[str, object]:
    """The serving core's events per second beside the streams API (see the module doc)."""
    import tempfile

    import numpy as np
    from prometheus_client import CollectorRegistry

    from pipeline.codec import PredictionEncoder
    from pipeline.config import ProcessingConfig, TopicsConfig
    from pipeline.health import HealthServer, LoopState
    from pipeline.metrics import Metrics
    from pipeline.processor import Processor
    from pipeline.records import InputRecord
    from pipeline.ring import PredictionRing, RecordingEncoder
    from pipeline.runtime import OrtStepModel
    from pipeline.state_store import StateStore
    from pipeline.streams_api import HEADERS, StreamsApi
    from pipeline.streams_server import StreamsServer
    from pipeline.testing import random_weights, write_onnx_step

    weights = random_weights("gru", n_features=8, hidden=64, layers=1, n_outputs=8, name="core")
    with tempfile.TemporaryDirectory() as tmp:
        model = OrtStepModel(write_onnx_step(weights, Path(tmp) / "core.onnx"))
    spec = model.spec
    rng = np.random.default_rng(0)
    rows = [
        json.dumps(r, separators=(",", ":")) for r in rng.normal(size=(4096, 8)).round(4).tolist()
    ]
    polls = 1200
    batches = [
        [
            InputRecord(
                "events",
                i % PARTITIONS,
                i // PARTITIONS,
                stream_key(i % args.streams),
                f'{{"x":{rows[i % 4096]},"ts":{1_764_000_000_000 + i}}}'.encode(),
                0,
            )
            for i in range(b * args.poll, (b + 1) * args.poll)
        ]
        for b in range(polls)
    ]
    current: dict[str, StreamsApi] = {}

    class Current:
        """The API of the round's store, for both servers."""

        def __call__(self, environ, start_response):  # type: ignore[no-untyped-def]
            return current["api"](environ, start_response)

        def answer(self, method: str, path: bytes, query: str) -> tuple[str, bytes]:
            return current["api"].answer(method, path, query)

    server = HealthServer(
        Metrics(CollectorRegistry()).registry, LoopState(), "127.0.0.1", 0, streams=Current()
    ).start()
    apart = StreamsServer(Current(), "127.0.0.1", 0, headers=HEADERS).start()
    key = stream_key(0).decode()
    urls = {
        "polled": f"http://127.0.0.1:{server.port}/streams/{key}?state=1",
        "apart": f"http://127.0.0.1:{apart.port}/streams/{key}?state=1",
    }
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    try:
        for round_ in range(args.rounds):
            for variant in VARIANTS:
                store = StateStore(spec.states, max_streams=max(args.streams, 1024))
                encoder = PredictionEncoder(spec, "predictions")
                ring = PredictionRing(spec, 1, max(args.streams, 1024))
                if variant != "off":
                    encoder = RecordingEncoder(encoder, ring, time.time)
                processor = Processor(
                    model,
                    store,
                    topics=TopicsConfig(input_topic="events", output_topic="predictions"),
                    processing=ProcessingConfig(max_wave_size=256),
                    encoder=encoder,
                )
                current["api"] = StreamsApi(
                    spec, store, ring, "events", PARTITIONS, lambda: frozenset(range(PARTITIONS))
                )
                for batch in batches[:2]:  # hot code paths, and the polled stream exists
                    processor.process(batch)
                poller = (
                    Poller(urls[variant], args.round_seconds + 1, keep=variant == "apart")
                    if variant in urls
                    else None
                )
                time.sleep(0.5 if poller else 0.0)  # the client's start is not measured
                events, started = 0, time.perf_counter()
                for batch in batches[2:]:
                    processor.process(batch)
                    events += len(batch)
                    if time.perf_counter() - started >= args.round_seconds:
                        break
                else:
                    raise RuntimeError("the polls ran out before the round ended: raise polls")
                row = {"events_per_second": events / (time.perf_counter() - started)}
                if poller is not None:
                    row |= poller.result()
                runs[variant].append(row)
                print(
                    f"round {round_ + 1} {variant:<6} {row['events_per_second']:>9,.0f} events/s"
                    + (
                        f"  {row['requests_per_second']:.0f} requests/s, p50 "
                        f"{row['request_p50_ms']:.1f} ms, p99 {row['request_p99_ms']:.1f} ms"
                        if poller is not None
                        else ""
                    ),
                    flush=True,
                )
    finally:
        server.stop()
        apart.stop()
    return {
        "benchmark": "the serving core (no Kafka) with the streams API off, on, and polled",
        "poll": args.poll,
        "streams": args.streams,
        "round_seconds": args.round_seconds,
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--transport", choices=("confluent", "kafka-python"), default="confluent")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=2_500_000)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--capacity-seconds", type=float, default=12.0)
    parser.add_argument("--max-streams", type=int, default=100_000)
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts/bench/model")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/bench/streams_api.json")
    parser.add_argument("--core", action="store_true", help="the serving core alone, no Kafka")
    parser.add_argument("--rounds", type=int, default=8, help="--core: rounds per variant")
    parser.add_argument("--round-seconds", type=float, default=3.0, help="--core: each round")
    parser.add_argument("--poll", type=int, default=500, help="--core: events per poll")
    args = parser.parse_args()
    if args.core:
        results = core(args)
        results |= {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": environment(args),
            "request_rate": RATE,
        }
        print_summary(results, args)
        return 0
    args.serve_args = []
    build(args.model_dir)
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    backlog = f"bench-streams-{uuid.uuid4().hex[:6]}"
    used: list[str] = [backlog]
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    try:
        create_topic(args.bootstrap_servers, backlog, PARTITIONS)
        seconds = fill(args.bootstrap_servers, backlog, args.streams, args.backlog)
        print(f"backlog of {args.backlog:,} events written in {seconds:.1f} s")
        for run in range(args.runs):
            for variant in VARIANTS:
                row = capacity(variant, backlog, args, logs, used)
                runs[variant].append(row)
                extra = (
                    f"  {row['requests_per_second']:.0f} requests/s, "
                    f"p50 {row['request_p50_ms']:.1f} ms, p99 {row['request_p99_ms']:.1f} ms"
                    if "requests_per_second" in row
                    else ""
                )
                print(
                    f"run {run + 1} {variant:<6} {row['events_per_second']:>9,.0f} events/s "
                    f"{row['cpu_us_per_event']:>6.1f} us CPU/event{extra}",
                    flush=True,
                )
    finally:
        delete_topics(args.bootstrap_servers, used)
    results = {
        "benchmark": "hiddenstate serve capacity with the streams API off, on, and polled",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "transport": args.transport,
        "model": "GRU, 1 layer, 64 hidden, 8 features -> 8 forecasts (bench/model.py)",
        "environment": environment(args),
        "streams": args.streams,
        "partitions": PARTITIONS,
        "backlog": args.backlog,
        "warmup_seconds": args.warmup,
        "capacity_seconds": args.capacity_seconds,
        "request_rate": RATE,
        "runs": runs,
    }
    print_summary(results, args)
    return 0


def print_summary(results: dict[str, object], args: argparse.Namespace) -> None:
    """Add the medians to `results`, write them to `--out`, print the table."""
    runs: dict[str, list[dict[str, float]]] = results["runs"]  # type: ignore[assignment]
    summary = {
        variant: {
            name + "_median": statistics.median(r[name] for r in rows)
            for name in rows[0]
            if name not in ("events_in_window", "request_failures")
        }
        for variant, rows in runs.items()
    }
    results["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    count = len(next(iter(runs.values())))
    print(f"\n| streams API | events/s (median of {count}) | CPU us / event | request p50 / p99 |")
    print("| --- | --- | --- | --- |")
    for variant, row in summary.items():
        latency = (
            f"{row['request_p50_ms_median']:.1f} / {row['request_p99_ms_median']:.1f} ms"
            if "request_p50_ms_median" in row
            else ""
        )
        cpu = f"{row['cpu_us_per_event_median']:.1f}" if "cpu_us_per_event_median" in row else ""
        print(f"| {variant} | {row['events_per_second_median']:,.0f} | {cpu} | {latency} |")
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
