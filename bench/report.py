"""Markdown tables from the benchmark's JSON results (what docs/benchmarks.md and the
README show), so that every number there comes from a file and a command.

    python bench/report.py artifacts/bench/bench.json                # run.py results
    python bench/report.py artifacts/bench/bench.json --added        # the latency probe
    python bench/report.py artifacts/bench/milestones.json --milestones
    python bench/report.py artifacts/bench/restore.json --restore
    python bench/report.py artifacts/bench/contention.json --contention
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _at(stages: list[dict[str, Any]], fraction: float) -> dict[str, Any]:
    return next((s for s in stages if abs(s["fraction_of_capacity"] - fraction) < 1e-9), {})


def main_table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    subjects = results["subjects"]
    lines = [
        "| subject | events/s (runs) | x baseline | share of passthrough | CPU s / 1,000 events "
        "| peak RSS MiB | p50 / p95 / p99 ms at 1/2 capacity (reader) "
        "| p99 ms at 1/2 (server histogram) | memory per stream |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in summary.items():
        kind = subjects[label]["kind"]
        half = _at(row["latency"], 0.5)
        runs = ", ".join(f"{r / 1000:.1f}k" for r in row.get("events_per_second_runs", []))
        memory = row.get("memory")
        if memory:
            per_stream = (
                f"{memory['rss_bytes_per_stream']:.0f} B RSS ({memory['streams']:,} streams)"
            )
            if memory.get("store_gauge_bytes_per_stream"):
                per_stream += f"; store {memory['store_gauge_bytes_per_stream']:.0f} B"
        else:
            per_stream = "-"
        if kind == "floor":
            lines.append(
                f"| {label} (no server) | - | - | - | - | - | {_num(half.get('p50_ms'), 1)} / "
                f"{_num(half.get('p95_ms'), 1)} / {_num(half.get('p99_ms'), 1)} "
                f"at {_num(half.get('offered_events_per_second'))}/s | - | - |"
            )
            continue
        lines.append(
            f"| {label} | **{_num(row['events_per_second'])}** ({runs}) "
            f"| {_num(row.get('throughput_vs_baseline'), 1, 'x')} "
            f"| {_num(_pct(row.get('share_of_passthrough')), 0, '%')} "
            f"| {_num(row['cpu_seconds_per_1000_events'], 3)} | {_num(row['peak_rss_mib'])} "
            f"| {_num(half.get('p50_ms'), 1)} / {_num(half.get('p95_ms'), 1)} / "
            f"**{_num(half.get('p99_ms'), 1)}** at {_num(half.get('offered_events_per_second'))}/s "
            f"| {_num(half.get('server_p99_ms'), 1)} | {per_stream} |"
        )
    return "\n".join(lines)


def _pct(share: float | None) -> float | None:
    return None if share is None else share * 100


def added_table(results: dict[str, Any]) -> str:
    """The latency probe: per subject and offered rate, the reader's p50/p99/p99.9, the
    floor's at the same rate (a reader of the input, no server) and the difference."""
    lines = [
        "| subject | offered events/s | share of capacity | p50 / p99 / p99.9 ms "
        "| floor p50 / p99 / p99.9 ms | added p50 / p99 / p99.9 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in results["summary"].items():
        if results["subjects"][label]["kind"] == "floor":
            continue
        for s in row["latency"]:
            if "added_p50_ms" not in s:
                continue
            share = s["fraction_of_capacity"]
            lines.append(
                f"| {label} | {_num(s['offered_events_per_second'])} "
                f"| {'-' if share != share else f'{share:.2f}'} "
                f"| {_num(s['p50_ms'], 1)} / {_num(s['p99_ms'], 1)} / {_num(s['p999_ms'], 1)} "
                f"| {_num(s['floor_p50_ms'], 1)} / {_num(s['floor_p99_ms'], 1)} / "
                f"{_num(s['floor_p999_ms'], 1)} "
                f"| **{s['added_p50_ms']:+.1f}** / **{s['added_p99_ms']:+.1f}** / "
                f"{s['added_p999_ms']:+.1f} |"
            )
    return "\n".join(lines)


def latency_table(results: dict[str, Any]) -> str:
    lines = [
        "| subject | offered events/s | share of capacity | served events/s "
        "| p50 ms | p95 ms | p99 ms | server p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in results["summary"].items():
        for stage in row["latency"]:
            lines.append(
                f"| {label} | {_num(stage['offered_events_per_second'])} "
                f"| {stage['fraction_of_capacity']:.2f} "
                f"| {_num(stage['served_events_per_second'])} | {_num(stage['p50_ms'], 1)} "
                f"| {_num(stage['p95_ms'], 1)} | {_num(stage['p99_ms'], 1)} "
                f"| {_num(stage.get('server_p99_ms'), 1)} |"
            )
    return "\n".join(lines)


def contention_table(results: dict[str, Any]) -> str:
    """Per stage: where the p99 builds up, and how busy the two cores were."""
    lines = [
        "| subject | offered events/s | p99 ms | p99 ms event -> handed to producer "
        "| p99 ms producer -> reader | cores busy, whole machine | cores busy, subject |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in results["summary"].items():
        for stage in row["latency"]:
            lines.append(
                f"| {label} | {_num(stage['offered_events_per_second'])} "
                f"| {_num(stage['p99_ms'], 1)} | {_num(stage.get('p99_to_produce_ms'), 1)} "
                f"| {_num(stage.get('p99_after_produce_ms'), 1)} "
                f"| {_num(stage.get('machine_cores_busy'), 2)} "
                f"| {_num(stage.get('subject_cores_busy'), 2)} |"
            )
    return "\n".join(lines)


def milestones_table(results: dict[str, Any]) -> str:
    lines = [
        "| tree | transport | events/s (median; runs) | CPU µs / event | peak RSS MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, row in results["summary"].items():
        subject = results["subjects"][label]
        runs = ", ".join(f"{r / 1000:.1f}k" for r in row["events_per_second_runs"])
        lines.append(
            f"| {label} (`{Path(subject['tree']).name}`) | {subject['kind']} "
            f"| **{_num(row['events_per_second'])}** ({runs}) "
            f"| {_num(row['cpu_seconds_per_1000_events'] * 1000, 1)} | {_num(row['peak_rss_mib'])} |"
        )
    return "\n".join(lines)


def restore_table(results: dict[str, Any]) -> str:
    lines = [
        "| transport | streams | restore seconds (runs) | states/s (median) |",
        "| --- | --- | --- | --- |",
    ]
    for transport, seconds in results["restore_seconds_runs"].items():
        rate = results["restored_states_per_second_median"][transport]
        lines.append(
            f"| {transport} | {results['streams']:,} | {', '.join(f'{s:.2f}' for s in seconds)} "
            f"| **{rate:,}** |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--milestones", action="store_true")
    kind.add_argument("--restore", action="store_true")
    kind.add_argument("--contention", action="store_true", help="the latency sweep's CPU view")
    kind.add_argument(
        "--added", action="store_true", help="the latency probe: added over the floor"
    )
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    if args.milestones:
        print(milestones_table(results))
    elif args.restore:
        print(restore_table(results))
    elif args.contention:
        print(contention_table(results))
    elif args.added:
        print(added_table(results))
    else:
        env = results["environment"]
        print(f"{env['date']}, {env['machine']}; `{env['command']}`\n")
        print(main_table(results))
        print()
        print(added_table(results))
        print()
        print(latency_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
