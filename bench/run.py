"""The benchmark: `hiddenstate serve` against the hand-written baseline, on a real broker.

    python bench/run.py                      # what `make bench` runs
    python bench/run.py --quick              # a short run of a few minutes (one run)

Subjects (`--subject LABEL:KIND[:TREE]`, repeatable; default: baseline,
kafka-python, confluent, passthrough):

- `baseline`: bench/baseline.py, the per-event consumer a user would write
  (kafka-python, PyTorch, one forward call and one produce per event);
- `kafka-python` / `confluent`: the real CLI, `python -m pipeline.cli serve
  --transport ...`, at-least-once, changelog on, defaults otherwise;
- `kafka-python+shadow` / `confluent+shadow`: the same, with `--shadow-model`: a
  second model of the same size (bench/model.py `build_shadow`) stepped beside it,
  its predictions to `<output>.shadow` (the reader reads the served ones);
- `passthrough`: bench/passthrough.py, librdkafka consuming, producing the same
  bytes and committing, no decoding and no model: the throughput ceiling of the
  machine; every subject's throughput is also given as a share of it;
- `floor`: no server, the reader reads the events themselves (every sweep also
  runs such a reader beside its subject, see 2.);
- TREE (optional): run `pipeline` from another source tree (a `git archive`
  of an older commit), to measure a change before and after in one run.

Every subject runs as a subprocess; the load generator and the reader use
librdkafka (bench/load.py) for every subject alike. Per run and subject:

1. **Capacity**: a shared backlog of `--backlog` events over `--streams`
   streams is served from its start (a fresh consumer group, output and
   changelog topic each time); after `--warmup` seconds of serving, the
   predictions read back during `--capacity-seconds` give the sustained
   throughput, and the server's CPU seconds (utime + stime from
   /proc/PID/stat, all threads) over the same window give CPU per 1,000
   events. Peak RSS is the process's VmHWM.
2. **Latency sweep (the latency probe)**: a fresh topic; the subject is
   started and waits in its group (and, for `hiddenstate serve`, until
   /readyz: restored); then a paced load rises through the fixed `--rates`
   (100, 200, 1,000, 10,000 events/s, those below 90% of the subject's
   capacity) and the `--sweep` shares of its median capacity (25/50/75%,
   measured in step 1 of this invocation), each stage `--stage-seconds` long
   (longer where needed for `--min-stage-events`). End-to-end latency is
   measured **at a reader**: the time a prediction was fetched minus its
   event's `ts` (the wall clock when the load generator handed the event to
   its producer): event time -> prediction acknowledged and readable. Beside
   it, during the same sweep, a second reader reads the **input** topic: the
   floor (what a plain reader of the events sees, the latency no server can
   beat); each stage reports p50/p99/p99.9 of both and the difference, the
   latency the subject adds (`print_added_table`, the `-added` plot). The
   first second of each stage is left out.
3. **Memory per stream** (`--memory-streams`, per subject kind): a running
   subject gets one event for each of N new streams; (RSS after - RSS
   before) / N. For `hiddenstate serve` also the store's own gauge
   (`hiddenstate_state_store_bytes`).

Runs are interleaved (run 1 of every subject, then run 2, ...), so drift on
the shared machine hits every subject alike; medians are reported. Writes
JSON (every run and the medians) and a PNG plot of latency against offered
load. Everything shares the machine's cores with the broker: read the
numbers as "on this machine, broker included".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load import Reader, create_topic, delete_topics, fill  # noqa: E402
from bench.model import build, build_shadow  # noqa: E402

PARTITIONS = 4
# Topics are deleted when the whole benchmark ends, not after each run: the broker
# deletes their segment files a minute later, and that disk work would land in the
# middle of a later measurement.
_USED_TOPICS: list[str] = []


def used(*topics: str) -> None:
    _USED_TOPICS.extend(topics)


KINDS = (
    "baseline",
    "kafka-python",
    "confluent",
    "kafka-python+shadow",
    "confluent+shadow",
    "floor",
    "passthrough",
)


@dataclass(frozen=True)
class Subject:
    """One thing to measure: the baseline, or `hiddenstate serve` with a transport."""

    label: str
    kind: str  # one of KINDS; "floor": no server, the reader reads the events themselves
    tree: Path = REPO
    flags: tuple[str, ...] = ()  # extra flags of this subject's command

    @classmethod
    def parse(cls, text: str) -> Subject:
        """`LABEL[:KIND[:TREE[:FLAGS]]]`, e.g. `ckpt0:confluent::--checkpoint-interval-events 0`."""
        parts = text.split(":", 3)
        label = parts[0]
        kind = parts[1] if len(parts) > 1 else label
        if kind not in KINDS:
            raise SystemExit(f"--subject {text}: kind must be one of {', '.join(KINDS)}")
        tree = Path(parts[2]).resolve() if len(parts) > 2 and parts[2] else REPO
        flags = tuple(parts[3].split()) if len(parts) > 3 else ()
        return cls(label, kind, tree, flags)

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"

    @property
    def is_floor(self) -> bool:
        return self.kind == "floor"

    @property
    def is_passthrough(self) -> bool:
        return self.kind == "passthrough"

    @property
    def is_server(self) -> bool:
        """`hiddenstate serve` (with /readyz, /metrics and a changelog)."""
        return not (self.is_baseline or self.is_floor or self.is_passthrough)

    @property
    def marker(self) -> bytes:
        """What the reader finds the event time behind in this subject's output records:
        the floor reads the events, the passthrough writes them back unchanged."""
        return b'"ts":' if self.is_floor or self.is_passthrough else b'"event_time_ms":'

    @property
    def has_shadow(self) -> bool:
        return self.kind.endswith("+shadow")

    @property
    def transport(self) -> str:
        """The `--transport` of a `hiddenstate serve` subject."""
        return self.kind.removesuffix("+shadow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field: str) -> int:
    """A memory line of /proc/PID/status (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Running:
    """One subject process serving `topic` into `output`."""

    def __init__(
        self,
        subject: Subject,
        args: argparse.Namespace,
        topic: str,
        output: str,
        log: Path,
        extra: list[str] | None = None,
    ) -> None:
        self.subject = subject
        self.group = f"bench-{uuid.uuid4().hex[:8]}"
        self.changelog = f"{topic}.{self.group}.changelog"
        # A shadow's topics are the run's own too: no states carried over between runs.
        self.shadow_topics = (
            [f"{output}.shadow", f"{topic}.{self.group}.shadow.changelog"]
            if subject.has_shadow
            else []
        )
        self.metrics_port = free_port()
        if subject.is_passthrough:
            command = [
                sys.executable,
                str(REPO / "bench" / "passthrough.py"),
                "--group-id",
                self.group,
                *subject.flags,
            ]
        elif subject.is_baseline:
            command = [
                sys.executable,
                str(REPO / "bench" / "baseline.py"),
                "--model-dir",
                str(args.model_dir),
                "--group-id",
                self.group,
                *subject.flags,
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "pipeline.cli",
                "serve",
                "--model",
                str(args.model_dir / "model.onnx"),
                # Named always (the default is auto, which picks confluent where it is
                # installed); older trees without the flag served with kafka-python only.
                *(
                    []
                    if not (subject.tree / "pipeline" / "transport").is_dir()
                    else ["--transport", subject.transport]
                ),
                *(
                    [
                        "--shadow-model",
                        str(args.model_dir / "shadow.onnx"),
                        "--shadow-changelog-topic",
                        self.shadow_topics[1],
                    ]
                    if subject.has_shadow
                    else []
                ),
                "--group-id",
                self.group,
                "--changelog-topic",
                self.changelog,
                "--metrics-port",
                str(self.metrics_port),
                "--metrics-host",
                "127.0.0.1",
                "--max-streams",
                str(args.max_streams),
                *args.serve_args,
                *subject.flags,
                *(extra or []),
            ]
        command += [
            "--bootstrap-servers",
            args.bootstrap_servers,
            "--input-topic",
            topic,
            "--output-topic",
            output,
        ]
        env = dict(os.environ, PYTHONPATH=str(subject.tree))
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=subject.tree, env=env
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.subject.label} exited with {self.process.returncode}; log {self._log.name}"
            )

    def wait_in_group(self, bootstrap: str, timeout: float = 90) -> None:
        """Until the consumer group is stable with every partition assigned."""
        admin = AdminClient({"bootstrap.servers": bootstrap})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                group = admin.describe_consumer_groups([self.group])[self.group].result(timeout=5)
                assigned = sum(len(m.assignment.topic_partitions) for m in group.members)
                if str(group.state).endswith("STABLE") and assigned >= PARTITIONS:
                    return
            except Exception:  # the group does not exist yet
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.subject.label}: not in its group after {timeout:.0f} s")

    def wait_ready(self, timeout: float = 90) -> None:
        """`hiddenstate serve` only: until /readyz says 200 (assigned and restored)."""
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or 503 while restoring
            time.sleep(0.2)
        raise TimeoutError(f"{self.subject.label}: not ready after {timeout:.0f} s")

    def metric(self, name: str) -> float | None:
        """One unlabelled sample from /metrics (hiddenstate serve only)."""
        if not self.subject.is_server:
            return None
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


def wait_for(reader: Reader, count: int, running: Running, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while reader.count < count:
        running.check()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{running.subject.label}: {reader.count} of {count} predictions after {timeout} s"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- capacity


class StalledError(Exception):
    """A subject that served nothing for a minute after its start."""


def capacity_run(subject: Subject, args: argparse.Namespace, backlog: str, logs: Path) -> dict:
    """Serve the backlog from its start; retried (and counted) if the subject stalls at
    start: kafka-python's consumer (the baseline's) sometimes joined its group and then
    fetched nothing for minutes; the stacks of such a stall go to the run's log."""
    for attempt in range(3):
        try:
            row = _capacity_once(subject, args, backlog, logs)
            row["stalled_starts_retried"] = attempt
            return row
        except StalledError as stall:
            print(f"{subject.label}: {stall}; retrying", file=sys.stderr)
    raise RuntimeError(f"{subject.label} stalled at start three times")


def _capacity_once(subject: Subject, args: argparse.Namespace, backlog: str, logs: Path) -> dict:
    bootstrap = args.bootstrap_servers
    output = f"{backlog}.out-{uuid.uuid4().hex[:6]}"
    create_topic(bootstrap, output, PARTITIONS)
    reader = Reader(bootstrap, output, PARTITIONS, marker=subject.marker).start()
    log = logs / f"capacity-{output}.log"
    running = Running(subject, args, backlog, output, log)
    try:
        try:
            wait_for(reader, 1, running, timeout=60)
        except TimeoutError as exc:
            stacks = subprocess.run(
                [str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(running.pid)],
                capture_output=True,
                text=True,
            )
            with log.open("a") as out:
                out.write(f"\n--- stalled: {exc}\n{stacks.stdout}{stacks.stderr}")
            raise StalledError(f"nothing served in 60 s (stacks in {log})") from exc
        time.sleep(args.warmup)
        count0, cpu0, t0 = reader.count, cpu_seconds(running.pid), time.monotonic()
        time.sleep(args.capacity_seconds)
        count1, cpu1, t1 = reader.count, cpu_seconds(running.pid), time.monotonic()
        hwm = memory_kib(running.pid, "VmHWM")
        if count1 >= args.backlog:
            raise RuntimeError(f"{subject.label} drained the backlog: raise --backlog")
    finally:
        running.stop()
        reader.stop()
        used(output, *([running.changelog, *running.shadow_topics] if subject.is_server else []))
    events = count1 - count0
    return {
        "events_per_second": events / (t1 - t0),
        "cpu_seconds_per_1000_events": (cpu1 - cpu0) / events * 1000,
        "cpu_cores_busy": (cpu1 - cpu0) / (t1 - t0),
        "peak_rss_mib": hwm / 1024,
        "events_in_window": events,
    }


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class Stage:
    """One rate of a sweep: a fixed rate, or a share of the subject's capacity."""

    rate: int
    fraction_of_capacity: float
    fixed: bool


def stages_for(
    subject: Subject,
    args: argparse.Namespace,
    capacity: dict[str, float],
    subjects: list[Subject],
) -> list[Stage]:
    """The rising rates a subject is swept at: the fixed `--rates` below 90% of its
    capacity and the `--sweep` shares of it. The passthrough gets the fixed rates only
    (it is the throughput ceiling; its latency shows what one more hop costs), the floor
    every rate any other subject gets, so that each has the floor beside it."""
    if subject.is_floor:
        others = [s for s in subjects if not (s.is_floor or s.is_passthrough)]
        found = {
            stage.rate: stage for other in others for stage in stages_for(other, args, capacity, [])
        }
        for rate in args.rates:
            found.setdefault(rate, Stage(rate, float("nan"), True))
        rates = sorted(found)
        return [Stage(r, found[r].fraction_of_capacity, found[r].fixed) for r in rates]
    mine = capacity[subject.label]
    stages = {r: Stage(r, r / mine, True) for r in args.rates if r < 0.9 * mine}
    if not subject.is_passthrough:
        for fraction in args.sweep:
            rate = round(fraction * mine)
            stages[rate] = Stage(rate, fraction, False)
    return [stages[r] for r in sorted(stages)]


def latency_sweep(
    subject: Subject, args: argparse.Namespace, plan: list[Stage], logs: Path
) -> list[dict]:
    """One rising-rate sweep; per stage the reader's latency percentiles and, for
    `hiddenstate serve`, those of its own end-to-end histogram over the same stage."""
    bootstrap = args.bootstrap_servers
    topic = f"bench-sweep-{uuid.uuid4().hex[:8]}"
    output = topic if subject.is_floor else f"{topic}.out"
    create_topic(bootstrap, topic, PARTITIONS)
    if not subject.is_floor:
        create_topic(bootstrap, output, PARTITIONS)
    reader = Reader(bootstrap, output, PARTITIONS, marker=subject.marker).start()
    # The floor side by side: a plain reader of the input topic during the same sweep,
    # so that each stage's added latency is measured against the same moments of the
    # shared machine.
    beside = None if subject.is_floor else Reader(bootstrap, topic, PARTITIONS, b'"ts":').start()
    running = None
    scraper = None
    rates = [stage.rate for stage in plan]
    schedule = [[rates[0], 2.0]] + [
        [rate, max(args.stage_seconds, 1 + args.min_stage_events / rate)] for rate in rates
    ]
    sampler = None
    try:
        if not subject.is_floor:
            running = Running(subject, args, topic, output, logs / f"sweep-{topic}.log")
            running.wait_in_group(bootstrap)
            if subject.is_server:
                # Assigned is not serving yet: the changelog restore runs first.
                running.wait_ready()
                scraper = Scraper(running).start()
        sampler = CpuSampler(running.pid if running is not None else None).start()
        load = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "load.py"),
                "pace",
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                topic,
                "--streams",
                str(args.streams),
                "--schedule",
                json.dumps(schedule),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(load.stdout.strip().splitlines()[-1])
        deadline = time.monotonic() + 120
        while reader.count < report["sent"] or (beside and beside.count < report["sent"]):
            if running is not None:
                running.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{subject.label}: {reader.count} of {report['sent']} read")
            time.sleep(0.05)
    finally:
        if scraper is not None:
            scraper.stop()
        if sampler is not None:
            sampler.stop()
        if running is not None:
            running.stop()
            used(
                output,
                *([running.changelog, *running.shadow_topics] if subject.is_server else []),
            )
        reader.stop()
        if beside is not None:
            beside.stop()
        used(topic, f"{topic}.dead-letter")
    if beside is not None:
        floor_times = np.asarray(beside.event_times, dtype=np.float64)
        floor_latency = np.asarray(beside.arrivals) - floor_times
    arrivals = np.asarray(reader.arrivals)
    event_times = np.asarray(reader.event_times, dtype=np.float64)
    produced = np.asarray(reader.produced, dtype=np.float64)
    latency = arrivals - event_times
    stages: list[dict] = []
    begin = report["started_ms"]
    for i, (rate, seconds) in enumerate(schedule):
        end = begin + seconds * 1000
        if i > 0:  # stage 0 is the warm-up
            mask = (event_times >= begin + 1000) & (event_times < end)
            values = latency[mask]
            q = np.percentile(values, [50, 95, 99, 99.9]) if len(values) else [np.nan] * 4
            stage = {
                "offered_events_per_second": rate,
                "fraction_of_capacity": plan[i - 1].fraction_of_capacity,
                "fixed_rate": plan[i - 1].fixed,
                "served_events_per_second": len(values) / ((end - begin - 1000) / 1000),
                "samples": len(values),
                "p50_ms": float(q[0]),
                "p95_ms": float(q[1]),
                "p99_ms": float(q[2]),
                "p999_ms": float(q[3]),
                "max_ms": float(values.max()) if len(values) else float("nan"),
            }
            if beside is not None:
                floor = floor_latency[(floor_times >= begin + 1000) & (floor_times < end)]
                if len(floor):
                    fq = np.percentile(floor, [50, 99, 99.9])
                    for (_, key), value in zip(QUANTILES, fq, strict=True):
                        stage["floor_" + key] = float(value)
                        stage["added_" + key] = stage[key] - float(value)
            if len(values):
                # The prediction's own timestamp is when the server handed it to its
                # producer: the latency before that, and from there to the reader.
                stage["p99_to_produce_ms"] = float(
                    np.percentile((produced - event_times)[mask], 99)
                )
                stage["p99_after_produce_ms"] = float(
                    np.percentile((arrivals - produced)[mask], 99)
                )
            if sampler is not None:
                stage.update(sampler.cores(begin + 1000, end))
            if scraper is not None:
                stage.update(scraper.quantiles(begin + 1000, end))
            stages.append(stage)
        begin = end
    return stages


class CpuSampler:
    """The machine's busy CPU (/proc/stat) and the subject's own CPU, twice a second, so
    that each stage can say how busy the two cores were and who was busy."""

    def __init__(self, pid: int | None) -> None:
        self._pid = pid
        self._samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            idle = fields[3] + fields[4]  # idle + iowait
            try:
                own = cpu_seconds(self._pid) if self._pid else 0.0
            except OSError:
                own = 0.0
            self._samples.append(
                (time.time() * 1000, (sum(fields) - idle) / tick, sum(fields) / tick, own)
            )
            if self._stop.wait(0.5):
                return

    def cores(self, begin_ms: float, end_ms: float) -> dict[str, float]:
        inside = [s for s in self._samples if begin_ms <= s[0] <= end_ms]
        if len(inside) < 2:
            return {}
        (t0, busy0, total0, own0), (t1, busy1, total1, own1) = inside[0], inside[-1]
        cores = os.cpu_count() or 1
        result = {"machine_cores_busy": (busy1 - busy0) / (total1 - total0) * cores}
        if self._pid:
            result["subject_cores_busy"] = (own1 - own0) / ((t1 - t0) / 1000)
        return result


class Scraper:
    """Reads the server's `hiddenstate_end_to_end_seconds` histogram twice a second,
    so that each stage's own quantiles can be estimated from the bucket deltas."""

    def __init__(self, running: Running) -> None:
        self._url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        self._samples: list[tuple[float, dict[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        prefix = 'hiddenstate_end_to_end_seconds_bucket{le="'
        while not self._stop.wait(0.5):
            try:
                with urllib.request.urlopen(self._url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            buckets = {}
            for line in text.splitlines():
                if line.startswith(prefix):
                    bound, _, count = line[len(prefix) :].partition('"} ')
                    buckets[float(bound)] = float(count)
            self._samples.append((time.time() * 1000, buckets))

    def quantiles(self, begin_ms: float, end_ms: float) -> dict[str, float]:
        """p50/p95/p99 (ms) of what the server observed between two times, linearly
        interpolated inside the histogram's buckets (1, 2.5, 5, 10, 25, 50 ms ...)."""
        inside = [b for t, b in self._samples if begin_ms <= t <= end_ms]
        if len(inside) < 2:
            return {}
        first, last = inside[0], inside[-1]
        bounds = sorted(last)
        cumulative = [last[b] - first.get(b, 0.0) for b in bounds]
        total = cumulative[-1]
        if total <= 0:
            return {}
        result = {}
        for name, q in (("server_p50_ms", 0.5), ("server_p95_ms", 0.95), ("server_p99_ms", 0.99)):
            rank = q * total
            lower_bound, lower_count = 0.0, 0.0
            for bound, count in zip(bounds, cumulative, strict=True):
                if count >= rank:
                    if bound == float("inf"):
                        value = lower_bound
                    else:
                        share = (rank - lower_count) / max(count - lower_count, 1e-9)
                        value = lower_bound + share * (bound - lower_bound)
                    result[name] = value * 1000
                    break
                lower_bound, lower_count = bound, count
        return result


# --------------------------------------------------------------------------- memory


def memory_run(subject: Subject, args: argparse.Namespace, streams: int, logs: Path) -> dict:
    bootstrap = args.bootstrap_servers
    topic = f"bench-memory-{uuid.uuid4().hex[:8]}"
    output = f"{topic}.out"
    create_topic(bootstrap, topic, PARTITIONS)
    create_topic(bootstrap, output, PARTITIONS)
    reader = Reader(bootstrap, output, PARTITIONS).start()
    running = Running(
        subject, args, topic, output, logs / f"memory-{topic}.log", ["--max-streams", str(streams)]
    )
    try:
        running.wait_in_group(bootstrap)
        if subject.is_server:
            running.wait_ready()
        fill(bootstrap, topic, 100, 1000, first_stream=10_000_000)  # warm every code path
        wait_for(reader, 1000, running, timeout=60)
        time.sleep(1)
        rss0 = memory_kib(running.pid, "VmRSS")
        started = time.monotonic()
        fill(bootstrap, topic, streams, streams)
        wait_for(reader, 1000 + streams, running, timeout=1800)
        seconds = time.monotonic() - started
        time.sleep(1)
        rss1 = memory_kib(running.pid, "VmRSS")
        hwm = memory_kib(running.pid, "VmHWM")
        store_bytes = running.metric("hiddenstate_state_store_bytes")
        active = running.metric("hiddenstate_active_streams")
    finally:
        running.stop()
        reader.stop()
        used(topic, output, running.changelog, f"{topic}.dead-letter", *running.shadow_topics)
    return {
        "streams": streams,
        "rss_before_mib": rss0 / 1024,
        "rss_after_mib": rss1 / 1024,
        "peak_rss_mib": hwm / 1024,
        "rss_bytes_per_stream": (rss1 - rss0) * 1024 / streams,
        "store_gauge_bytes_per_stream": store_bytes / active if store_bytes and active else None,
        "active_streams": active,
        "seconds_to_serve": seconds,
    }


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import confluent_kafka
    import kafka
    import onnxruntime

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB",
        "python": platform.python_version(),
        "kafka-python": kafka.__version__,
        "confluent-kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch_version,
        "broker": args.bootstrap_servers,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def summarise(results: dict[str, Any], subjects: list[Subject]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for subject in subjects:
        runs = results["capacity"].get(subject.label, [])
        row: dict[str, Any] = {
            key: median([r.get(key, float("nan")) for r in runs])
            for key in (
                "events_per_second",
                "cpu_seconds_per_1000_events",
                "cpu_cores_busy",
                "peak_rss_mib",
            )
        }
        row["events_per_second_runs"] = [round(r["events_per_second"]) for r in runs]
        sweeps = results["latency"].get(subject.label, [])
        stages: list[dict[str, Any]] = []
        rates = sorted({s["offered_events_per_second"] for sweep in sweeps for s in sweep})
        for rate in rates:
            at = [s for sweep in sweeps for s in sweep if s["offered_events_per_second"] == rate]
            if at:
                stages.append(
                    {
                        "fraction_of_capacity": at[0]["fraction_of_capacity"],
                        "fixed_rate": at[0].get("fixed_rate", False),
                        **{
                            key: median([s.get(key, float("nan")) for s in at])
                            for key in (
                                "offered_events_per_second",
                                "served_events_per_second",
                                "p50_ms",
                                "p95_ms",
                                "p99_ms",
                                "p999_ms",
                                "samples",
                                "floor_p50_ms",
                                "floor_p99_ms",
                                "floor_p999_ms",
                                "added_p50_ms",
                                "added_p99_ms",
                                "added_p999_ms",
                                "server_p50_ms",
                                "server_p95_ms",
                                "server_p99_ms",
                                "p99_to_produce_ms",
                                "p99_after_produce_ms",
                                "machine_cores_busy",
                                "subject_cores_busy",
                            )
                            if any(key in s for s in at)
                        },
                    }
                )
        row["latency"] = stages
        memory = results["memory"].get(subject.label)
        if memory:
            row["memory"] = memory
        summary[subject.label] = row
    added_to_floor(summary, subjects)
    ceiling = next((s for s in subjects if s.is_passthrough), None)
    if ceiling is not None:
        top = summary[ceiling.label]["events_per_second"]
        for subject in subjects:
            if not subject.is_floor:
                row = summary[subject.label]
                row["share_of_passthrough"] = row["events_per_second"] / top
    base = next((s for s in subjects if s.is_baseline), None)
    if base is not None:
        base_row = summary[base.label]
        half = _at_fraction(base_row["latency"], 0.5)
        for subject in subjects:
            row = summary[subject.label]
            if subject.is_floor:
                continue
            row["throughput_vs_baseline"] = row["events_per_second"] / base_row["events_per_second"]
            mine = _at_fraction(row["latency"], 0.5)
            if half and mine:
                row["p99_at_half_capacity_vs_baseline"] = mine["p99_ms"] / half["p99_ms"]
    return summary


QUANTILES = (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms"))


def added_to_floor(summary: dict[str, Any], subjects: list[Subject]) -> None:
    """Stages without a floor reader beside them (older results) get the `floor`
    subject's at the same offered rate: `added_p50_ms`, `added_p99_ms`, `added_p999_ms`
    and the floor's own. The sweep's own side-by-side floor is preferred: it saw the
    same moments of the shared machine (the added latency is then the median of each
    run's difference)."""
    floor = next((s for s in subjects if s.is_floor), None)
    if floor is None:
        return
    at_rate = {s["offered_events_per_second"]: s for s in summary[floor.label]["latency"]}
    for subject in subjects:
        if subject.is_floor:
            continue
        for stage in summary[subject.label]["latency"]:
            base = at_rate.get(stage["offered_events_per_second"])
            if base is None or "added_p50_ms" in stage:
                continue
            for _, key in QUANTILES:
                stage["floor_" + key] = base[key]
                stage["added_" + key] = stage[key] - base[key]


def _at_fraction(stages: list[dict[str, Any]], fraction: float) -> dict[str, Any] | None:
    return next((s for s in stages if abs(s["fraction_of_capacity"] - fraction) < 1e-9), None)


def plot(summary: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for label, row in summary.items():
        stages = row["latency"]
        if not stages:
            continue
        floor = results["subjects"][label]["kind"] == "floor"
        color = "grey" if floor else next(colors)
        x = [s["offered_events_per_second"] for s in stages]
        ax.plot(x, [s["p99_ms"] for s in stages], "o-", color=color, label=f"{label} p99")
        ax.plot(
            x, [s["p50_ms"] for s in stages], "s--", color=color, alpha=0.6, label=f"{label} p50"
        )
        if not floor:
            ax.axvline(row["events_per_second"], color=color, linestyle=":", alpha=0.7)
        if any("floor_p99_ms" in s for s in stages):
            ax.plot(
                x,
                [s.get("floor_p99_ms", float("nan")) for s in stages],
                "x:",
                color=color,
                alpha=0.5,
                label=f"{label}: floor p99 beside it",
            )
    ax.axhline(20, color="black", linewidth=0.6)
    ax.text(0.01, 21, "20 ms", transform=ax.get_yaxis_transform(), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(
        "offered load (events/s); dotted: capacity (backlog drain); "
        "floor: no server, the reader reads the events"
    )
    ax.set_ylabel("end-to-end latency at a reader (ms)")
    _title(ax, results)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _title(ax: Any, results: dict[str, Any]) -> None:
    env = results["environment"]
    ax.set_title(
        f"GRU 64x1, 8 features, JSON, at-least-once, {results['streams']:,} streams\n"
        f"{env['machine']}, broker on the same cores; medians of {results['runs']} runs",
        fontsize=9,
    )


def plot_added(summary: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    """The latency each subject adds over the floor (no server), p50 and p99, against
    the offered load: the issue's 'close to Kafka's own' in one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for label, row in summary.items():
        stages = [s for s in row["latency"] if "added_p99_ms" in s]
        if not stages:
            continue
        color = next(colors)
        x = [s["offered_events_per_second"] for s in stages]
        ax.plot(x, [s["added_p99_ms"] for s in stages], "o-", color=color, label=f"{label} p99")
        ax.plot(
            x,
            [s["added_p50_ms"] for s in stages],
            "s--",
            color=color,
            alpha=0.6,
            label=f"{label} p50",
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    lowest = min(
        (
            s[k]
            for row in summary.values()
            for s in row["latency"]
            for k in ("added_p50_ms",)
            if k in s
        ),
        default=0.0,
    )
    ax.set_ylim(bottom=min(-1.0, lowest * 1.5))
    ax.set_xlabel("offered load (events/s): fixed rates and 25/50/75% of each one's capacity")
    ax.set_ylabel("latency added over the floor (ms): subject - plain reader of the input")
    _title(ax, results)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def print_added_table(summary: dict[str, Any]) -> None:
    """Per subject and offered rate: p50/p99/p99.9 at the reader, the floor's, the difference."""
    print(
        f"\n{'added latency':<16}{'offered/s':>10}{'share':>7}"
        + "".join(f"{q:>8}" for q, _ in QUANTILES)
        + "".join(f"{'floor ' + q:>12}" for q, _ in QUANTILES)
        + "".join(f"{'+' + q:>9}" for q, _ in QUANTILES)
        + "   (ms)"
    )
    for label, row in summary.items():
        for s in row["latency"]:
            if "added_p50_ms" not in s:
                continue
            share = s["fraction_of_capacity"]
            print(
                f"{label:<16}{s['offered_events_per_second']:>10,}"
                f"{'' if share != share else f'{share:.2f}':>7}"
                + "".join(f"{s[key]:>8.1f}" for _, key in QUANTILES)
                + "".join(f"{s['floor_' + key]:>12.1f}" for _, key in QUANTILES)
                + "".join(f"{s['added_' + key]:>+9.1f}" for _, key in QUANTILES)
            )


def print_table(summary: dict[str, Any]) -> None:
    print(
        f"\n{'subject':<16}{'events/s':>10}{'x base':>8}{'of pass':>8}{'CPU s/1k':>10}"
        f"{'RSS MiB':>9}{'p50@.5':>9}{'p95@.5':>9}{'p99@.5':>9}"
    )
    for label, row in summary.items():
        if "events_per_second" not in row or row["events_per_second"] != row["events_per_second"]:
            continue  # the floor: no throughput of its own
        half = _at_fraction(row["latency"], 0.5) or {}
        print(
            f"{label:<16}{row['events_per_second']:>10,.0f}"
            f"{row.get('throughput_vs_baseline', float('nan')):>8.1f}"
            f"{row.get('share_of_passthrough', float('nan')):>8.0%}"
            f"{row['cpu_seconds_per_1000_events']:>10.3f}{row['peak_rss_mib']:>9.0f}"
            f"{half.get('p50_ms', float('nan')):>9.1f}{half.get('p95_ms', float('nan')):>9.1f}"
            f"{half.get('p99_ms', float('nan')):>9.1f}"
        )
        if "memory" in row:
            m = row["memory"]
            gauge = m["store_gauge_bytes_per_stream"]
            print(
                f"{'':<16}memory: {m['streams']:,} streams, {m['rss_bytes_per_stream']:.0f} B/stream "
                f"(RSS), store gauge {gauge if gauge is None else round(gauge)} B/stream, "
                f"peak RSS {m['peak_rss_mib']:.0f} MiB"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--subject", action="append", dest="subjects", default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=2_500_000)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--capacity-seconds", type=float, default=12.0)
    parser.add_argument(
        "--sweep", default="0.25,0.5,0.75", help="fractions of each subject's capacity, rising"
    )
    parser.add_argument(
        "--rates",
        default="100,200,1000,10000",
        help="fixed rates (events/s) every subject is swept at too, below 90%% of its capacity "
        "('' for none)",
    )
    parser.add_argument("--stage-seconds", type=float, default=8.0)
    parser.add_argument(
        "--min-stage-events",
        type=int,
        default=2000,
        help="a slow stage lasts long enough for this many events (p99.9 needs them)",
    )
    parser.add_argument("--no-sweep", action="store_true", help="capacity only")
    parser.add_argument(
        "--capacity",
        action="append",
        default=[],
        help="LABEL=EVENTS_PER_S: use this capacity for the sweep instead of measuring it",
    )
    parser.add_argument(
        "--memory-streams",
        default="baseline=100000,kafka-python=1000000,confluent=1000000",
        help="KIND=N streams for the memory run ('' to skip)",
    )
    parser.add_argument("--max-streams", type=int, default=100_000)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run of a few minutes: one run, short stages, a smaller backlog, no memory "
        "run (the latency probe and the throughput table, less precise)",
    )
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts/bench/model")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/bench/bench.json")
    parser.add_argument("--plot", type=Path, default=REPO / "artifacts/bench/latency.png")
    parser.add_argument(
        "--added-plot",
        type=Path,
        default=None,
        help="the added latency over the floor against load (default: beside --plot, "
        "NAME-added.png)",
    )
    parser.add_argument(
        "--serve-args", default="", help="extra `hiddenstate serve` flags, one string"
    )
    args = parser.parse_args()
    args.sweep = [float(f) for f in args.sweep.split(",") if f]
    args.rates = [int(float(r)) for r in args.rates.split(",") if r]
    args.serve_args = args.serve_args.split()
    if args.added_plot is None:
        args.added_plot = args.plot.with_name(args.plot.stem + "-added" + args.plot.suffix)
    if args.quick:
        args.backlog, args.warmup, args.capacity_seconds = 2_000_000, 2.0, 5.0
        args.stage_seconds, args.min_stage_events, args.runs = 5.0, 500, 1
        args.memory_streams = ""
    subjects = [
        Subject.parse(s)
        for s in args.subjects or ["baseline", "kafka-python", "confluent", "passthrough"]
    ]
    memory_streams = dict(
        (kind, int(n))
        for kind, n in (item.split("=") for item in args.memory_streams.split(",") if item)
    )
    build(args.model_dir)
    if any(s.has_shadow for s in subjects):
        build_shadow(args.model_dir)
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bootstrap = args.bootstrap_servers

    results: dict[str, Any] = {
        "benchmark": "hiddenstate serve vs a hand-written per-event consumer",
        "model": "GRU, 1 layer, 64 hidden, 8 features -> 8 forecasts (bench/model.py)",
        "guarantee": "at-least-once",
        "environment": environment(args),
        "streams": args.streams,
        "partitions": PARTITIONS,
        "runs": args.runs,
        "backlog": args.backlog,
        "capacity_seconds": args.capacity_seconds,
        "sweep_fractions": args.sweep,
        "fixed_rates": args.rates,
        "stage_seconds": args.stage_seconds,
        "latency_measured_at": "a reader: fetch time - event ts (event time -> prediction readable)",
        "subjects": {
            s.label: {"kind": s.kind, "tree": str(s.tree), "flags": list(s.flags)} for s in subjects
        },
        "capacity": {s.label: [] for s in subjects},
        "latency": {s.label: [] for s in subjects},
        "memory": {},
    }
    try:
        run_all(args, subjects, memory_streams, results, logs)
    finally:
        delete_topics(bootstrap, _USED_TOPICS)
    results["summary"] = summarise(results, subjects)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_sweep:
        plot(results["summary"], results, args.plot)
        plot_added(results["summary"], results, args.added_plot)
    print_table(results["summary"])
    print_added_table(results["summary"])
    print(f"\n-> {args.out}" + ("" if args.no_sweep else f", {args.plot}, {args.added_plot}"))
    return 0


def run_all(
    args: argparse.Namespace,
    subjects: list[Subject],
    memory_streams: dict[str, int],
    results: dict[str, Any],
    logs: Path,
) -> None:
    """Capacity runs, then latency sweeps, then memory runs, filling `results`."""
    bootstrap = args.bootstrap_servers
    given = dict(item.split("=") for item in args.capacity)
    measured = [s for s in subjects if s.label not in given and not s.is_floor]
    backlog = f"bench-backlog-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, backlog, PARTITIONS)
    try:
        if measured:
            seconds = fill(bootstrap, backlog, args.streams, args.backlog)
            print(f"backlog: {args.backlog:,} events, {args.streams:,} streams, {seconds:.1f} s")
        for run in range(args.runs):
            for subject in measured:
                row = capacity_run(subject, args, backlog, logs)
                results["capacity"][subject.label].append(row)
                print(
                    f"run {run + 1} capacity {subject.label}: {row['events_per_second']:,.0f} events/s, "
                    f"{row['cpu_seconds_per_1000_events']:.3f} CPU s/1k, {row['peak_rss_mib']:.0f} MiB"
                )
    finally:
        used(backlog, f"{backlog}.dead-letter")
    capacity = {
        s.label: float(given[s.label])
        if s.label in given
        else median([r["events_per_second"] for r in results["capacity"][s.label]])
        for s in subjects
        if not s.is_floor
    }
    for label, events_per_second in given.items():
        results["capacity"][label] = [
            {"events_per_second": float(events_per_second), "given": True}
        ]
    # The floor (no server) is swept at every rate any other subject is (`stages_for`).
    if not args.no_sweep:
        plans = {s.label: stages_for(s, args, capacity, subjects) for s in subjects}
        for run in range(args.runs):
            for subject in subjects:
                stages = latency_sweep(subject, args, plans[subject.label], logs)
                results["latency"][subject.label].append(stages)
                print(
                    f"run {run + 1} latency {subject.label}: "
                    + ", ".join(
                        f"{s['offered_events_per_second']}/s p99 {s['p99_ms']:.1f} ms"
                        for s in stages
                    )
                )
    for subject in subjects:
        streams = memory_streams.get(subject.kind)
        if streams:
            results["memory"][subject.label] = memory_run(subject, args, streams, logs)
            print(f"memory {subject.label}: {results['memory'][subject.label]}")


if __name__ == "__main__":
    sys.exit(main())
