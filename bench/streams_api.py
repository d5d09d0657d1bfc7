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

`--request-cost` measures the CPU the serving process spends per request (every thread;
nothing else runs in it), `--requests` of them per run, `--runs` runs, for the metrics
port's server and for the API's own: the figure that says what a polling client costs
a replica whatever else shares the machine.

`--core` measures without Kafka: the serving core alone in one thread as the loop runs
it (`Processor.process` on polls of `--poll` JSON events over `--streams` streams,
bench/measure_core.py's shape and model, the streams API on), in `--pairs` pairs of
`--phase-seconds` phases: the client (another process) asks during the first phase of
each pair and waits during the second. The ratio of events served in the two phases of
a pair, whose median is reported, cancels what a busy shared machine does over
seconds; what is left is the GIL and the CPU the HTTP server's thread takes from the
loop. Once on the metrics port (a new connection per request, as `curl`) and once on the
API's own port (the connection kept, as a router). `--pin 0,1` puts the core on CPU 0
and the client on CPU 1, as a client in another pod would be.
"""

from __future__ import annotations

import argparse
import json
import os
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


# The paired client of --core: from T0 on, it asks RATE times a second during the even
# phases of PHASE seconds and waits during the odd ones, for PAIRS pairs.
_PAIRED_CLIENT = """
import http.client, json, sys, time, urllib.parse, urllib.request
url, rate, t0, phase, pairs, keep = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
parts = urllib.parse.urlsplit(url)
connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
times, failures = [], 0
time.sleep(max(0.0, t0 - time.time()))
due = time.time()
while time.time() < t0 + 2 * pairs * phase:
    if int((time.time() - t0) // phase) % 2 == 0:
        started = time.perf_counter()
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
        times.append(time.perf_counter() - started)
    due += 1.0 / rate
    time.sleep(max(0.0, due - time.time()))
print(json.dumps({"times": times, "failures": failures}))
"""


def core(args: argparse.Namespace) -> dict[str, object]:
    """The serving core's events per second with and without a client, in paired phases
    (see the module doc)."""
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

    server_cpu, client_cpu = args.pin if args.pin else (None, None)
    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})  # the loop and the HTTP thread share one core
    weights = random_weights("gru", n_features=8, hidden=64, layers=1, n_outputs=8, name="core")
    with tempfile.TemporaryDirectory() as tmp:
        model = OrtStepModel(write_onnx_step(weights, Path(tmp) / "core.onnx"))
    spec = model.spec
    rng = np.random.default_rng(0)
    values = [
        f'{{"x":{json.dumps(r, separators=(",", ":"))},"ts":1764000000000}}'.encode()
        for r in rng.normal(size=(4096, 8)).round(4).tolist()
    ]
    keys = [stream_key(i) for i in range(args.streams)]
    store = StateStore(spec.states, max_streams=max(args.streams, 1024))
    ring = PredictionRing(spec, 1, max(args.streams, 1024))
    processor = Processor(
        model,
        store,
        topics=TopicsConfig(input_topic="events", output_topic="predictions"),
        processing=ProcessingConfig(max_wave_size=256),
        encoder=RecordingEncoder(PredictionEncoder(spec, "predictions"), ring, time.time),
    )
    api = StreamsApi(spec, store, ring, "events", PARTITIONS, lambda: frozenset(range(PARTITIONS)))
    offset = 0

    def serve_one_poll() -> int:
        # Records are made here, as a source makes them; offsets keep growing so that
        # the replay guard never skips one.
        nonlocal offset
        base = offset
        offset += args.poll
        batch = [
            InputRecord(
                "events",
                i % PARTITIONS,
                i // PARTITIONS,
                keys[i % args.streams],
                values[i % 4096],
                0,
            )
            for i in range(base, base + args.poll)
        ]
        processor.process(batch)
        return len(batch)

    metrics_port = HealthServer(
        Metrics(CollectorRegistry()).registry, LoopState(), "127.0.0.1", 0, streams=api
    ).start()
    apart = StreamsServer(api, "127.0.0.1", 0, headers=HEADERS).start()
    key = stream_key(0).decode()
    servers = {
        "metrics port, a new connection each": (metrics_port.port, "new"),
        "own port, kept alive": (apart.port, "keep"),
    }
    results: dict[str, object] = {}
    try:
        for _ in range(20):  # hot code paths, and every stream exists
            serve_one_poll()
        for name, (port, keep) in servers.items():
            url = f"http://127.0.0.1:{port}/streams/{key}?state=1"
            t0 = time.time() + 1.0
            client = subprocess.Popen(
                [
                    sys.executable, "-c", _PAIRED_CLIENT, url, str(RATE), str(t0),
                    str(args.phase_seconds), str(args.pairs), keep,
                ],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=None
                if client_cpu is None
                else (lambda: os.sched_setaffinity(0, {client_cpu})),
            )  # fmt: skip
            marks: list[tuple[float, int]] = []
            served = 0
            while time.time() < t0:
                serve_one_poll()
            end = t0 + 2 * args.pairs * args.phase_seconds
            while (now := time.time()) < end:
                served += serve_one_poll()
                marks.append((now, served))
            answers = json.loads(client.communicate(timeout=30)[0])
            times = np.array([t for t, _ in marks])
            counts = np.array([c for _, c in marks])
            edges = t0 + args.phase_seconds * np.arange(2 * args.pairs + 1)
            at = np.interp(edges, times, counts)
            per_phase = np.diff(at) / args.phase_seconds
            ratios = per_phase[0::2] / per_phase[1::2]
            ordered = sorted(answers["times"])
            results[name] = {
                "events_per_second_quiet_median": float(np.median(per_phase[1::2])),
                "events_per_second_polled_median": float(np.median(per_phase[0::2])),
                "polled_over_quiet_median": float(np.median(ratios)),
                "polled_over_quiet_pairs": [round(float(r), 3) for r in ratios],
                "requests_per_second": len(ordered) / (args.pairs * args.phase_seconds),
                "request_p50_ms": 1e3 * ordered[len(ordered) // 2],
                "request_p99_ms": 1e3 * ordered[int(len(ordered) * 0.99)],
                "request_failures": answers["failures"],
            }
            row = results[name]
            print(
                f"{name}: {row['events_per_second_quiet_median']:,.0f} events/s quiet, "
                f"{row['events_per_second_polled_median']:,.0f} polled; polled/quiet "
                f"{row['polled_over_quiet_median']:.3f} (median of {args.pairs} pairs); "
                f"{row['requests_per_second']:.0f} requests/s, p50 {row['request_p50_ms']:.1f} ms, "
                f"p99 {row['request_p99_ms']:.1f} ms",
                flush=True,
            )
    finally:
        metrics_port.stop()
        apart.stop()
    return {
        "benchmark": "the serving core (no Kafka) with a client polling one stream, paired phases",
        "poll": args.poll,
        "streams": args.streams,
        "phase_seconds": args.phase_seconds,
        "pairs": args.pairs,
        "servers": results,
    }


_COUNTED_CLIENT = """
import http.client, sys, urllib.parse, urllib.request
url, count, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parts = urllib.parse.urlsplit(url)
connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
for _ in range(count):
    if keep == "keep":
        connection.request("GET", parts.path + "?" + parts.query)
        connection.getresponse().read()
    else:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
"""


def request_cost(args: argparse.Namespace) -> dict[str, object]:
    """CPU seconds the serving process spends per request (all its threads; the loop
    idle), for each server and connection style: what a polling client takes from a
    replica, whatever else the machine does."""
    import resource

    import numpy as np
    from prometheus_client import CollectorRegistry

    from pipeline.codec import Event
    from pipeline.health import HealthServer, LoopState
    from pipeline.metrics import Metrics
    from pipeline.ring import PredictionRing
    from pipeline.state_store import StateStore
    from pipeline.streams_api import HEADERS, StreamsApi
    from pipeline.streams_server import StreamsServer
    from pipeline.testing import event_record, random_weights

    spec = random_weights("gru", n_features=8, hidden=64, n_outputs=8, name="core").spec
    store = StateStore(spec.states, max_streams=16)
    ring = PredictionRing(spec, 1, 16)
    key = stream_key(0)
    slots = store.acquire([key], [0], [5], time.time())
    store.scatter(slots, [np.random.rand(1, *s.shape).astype(np.float32) for s in spec.states])
    record = event_record(key, {"x": [0.0] * 8}, offset=5)
    ring.record(
        [Event(key, [0.0] * 8, 1, False, record)],
        {"y": np.random.rand(1, 8).astype(np.float32)},
        np.array([1]),
        time.time(),
    )
    api = StreamsApi(spec, store, ring, "events", PARTITIONS, lambda: frozenset(range(PARTITIONS)))
    metrics_port = HealthServer(
        Metrics(CollectorRegistry()).registry, LoopState(), "127.0.0.1", 0, streams=api
    ).start()
    apart = StreamsServer(api, "127.0.0.1", 0, headers=HEADERS).start()
    path = f"/streams/{key.decode()}?state=1"
    cases = {
        "metrics port, a new connection each": (metrics_port.port, "new"),
        "own port, a new connection each": (apart.port, "new"),
        "own port, kept alive": (apart.port, "keep"),
    }
    results: dict[str, object] = {}
    try:
        for name, (port, keep) in cases.items():
            url = f"http://127.0.0.1:{port}{path}"
            runs = []
            for _ in range(args.runs):
                before = resource.getrusage(resource.RUSAGE_SELF)
                subprocess.run(
                    [sys.executable, "-c", _COUNTED_CLIENT, url, str(args.requests), keep],
                    check=True,
                )
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                runs.append(cpu / args.requests * 1e6)
            results[name] = {"cpu_us_per_request_median": statistics.median(runs), "runs": runs}
            share = statistics.median(runs) * RATE / 1e4
            print(
                f"{name}: {statistics.median(runs):.0f} us of CPU per request "
                f"(median of {args.runs}); at {RATE:.0f} a second {share:.1f}% of a core",
                flush=True,
            )
    finally:
        metrics_port.stop()
        apart.stop()
    return {"benchmark": "CPU per streams API request", "requests": args.requests, "cases": results}


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
    parser.add_argument("--pairs", type=int, default=30, help="--core: pairs of phases")
    parser.add_argument("--phase-seconds", type=float, default=0.5, help="--core: each phase")
    parser.add_argument(
        "--pin",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        help="--core: SERVER_CPU,CLIENT_CPU: the core on one CPU, the client on another "
        "(on a shared machine the client's own CPU would otherwise count against the loop)",
    )
    parser.add_argument("--poll", type=int, default=500, help="--core: events per poll")
    parser.add_argument(
        "--request-cost", action="store_true", help="CPU per request of each server, no Kafka"
    )
    parser.add_argument("--requests", type=int, default=2000, help="--request-cost: per run")
    args = parser.parse_args()
    if args.request_cost:
        results = request_cost(args)
        results |= {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": environment(args),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n-> {args.out}")
        return 0
    if args.core:
        results = core(args)
        results |= {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": environment(args),
            "request_rate": RATE,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n-> {args.out}")
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
