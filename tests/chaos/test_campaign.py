"""The bounded fault campaign CI runs: a kill loop, a pause past the session timeout and a
broker restart under each guarantee (tests/chaos/campaign.py has the full one, `make chaos`).

Each run is checked by `tests.chaos.checker` against the independent reference; a run
passes with nothing lost, nothing wrong, no stale snapshot, no hang and, under
exactly-once, no committed duplicate.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.broker import Broker
from tests.chaos.campaign import QUICK, REPO, Run, model, run_one, summary

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    home = tmp_path_factory.mktemp("chaos") / "kafka"
    home.mkdir()
    jars = REPO / ".kafka" / "libs"
    if (jars / ".complete").exists():
        shutil.copytree(jars, home / "libs")
    started = Broker(home)
    started.start()
    yield started
    started.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model(tmp_path_factory.mktemp("chaos-model"))


@pytest.mark.parametrize("run", QUICK, ids=[r.name for r in QUICK])
def test_the_guarantees_hold_under_the_fault(
    run: Run, broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    result = run_one(run, broker, model_path, tmp_path / "logs")
    out = REPO / "artifacts" / "chaos"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ci-{run.name.replace('/', '-')}.json").write_text(json.dumps(result, indent=1))
    report = result["report"]
    assert len(result["faults"]) >= run.count, summary(result)
    assert report["lost"] == 0, summary(result) + "\n" + "\n".join(report["examples"])
    assert report["wrong_values"] + report["wrong_steps"] == 0, report["examples"]
    assert report["order_violations"] == 0, report["examples"]
    assert report["stale_snapshots"] + report["snapshots_matching_no_state"] == 0, report[
        "examples"
    ]
    assert report["dead_letters_missing"] == 0, report["examples"]
    assert report["streams_wrong_after_final_restart"] == 0, report["examples"]
    assert result["hangs"] == []
    if run.guarantee == "exactly-once":
        assert report["duplicates"] == 0, summary(result)
