"""The documentation against the code: every metric the server exports is in
docs/core.md's table, and every relative link of README.md and docs/ names a file that
exists."""

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from pipeline.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "docs" / "core.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _exported_families() -> set[str]:
    """Family names as users write them: counters with `_total`, infos with `_info`."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffix = {"counter": "_total", "info": "_info"}
    return {
        family.name + suffix.get(family.type, "")
        for family in registry.collect()
        if family.name.startswith("hiddenstate_")
    }


def _documented() -> set[str]:
    table = CORE.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(hiddenstate_[a-z_]+)` \|", table, flags=re.MULTILINE))


def test_every_metric_the_server_exports_is_in_the_core_metrics_table() -> None:
    assert _exported_families() - _documented() == set()


def test_the_core_metrics_table_lists_no_metric_the_server_lacks() -> None:
    assert _documented() - _exported_families() == set()


def test_every_relative_link_in_the_readme_and_docs_names_an_existing_file() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = {
        (page.name, target)
        for page in pages
        for target in LINK.findall(page.read_text())
        if not target.startswith(("http://", "https://", "mailto:"))
        and not (page.parent / target).exists()
    }
    assert broken == set()
