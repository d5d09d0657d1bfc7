"""Markers by folder (everything under tests/integration needs a real broker), and the
`--transport` option: which Kafka client every `hiddenstate serve` of the integration
tests runs with (`make integration` runs the suite once per transport)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TRANSPORTS = ("kafka-python", "confluent")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--transport",
        choices=TRANSPORTS,
        default=os.environ.get("HIDDENSTATE_TEST_TRANSPORT", "kafka-python"),
        help="Kafka client of the served processes in tests/integration "
        "(default: $HIDDENSTATE_TEST_TRANSPORT, else kafka-python)",
    )


_INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def pytest_report_header(config: pytest.Config) -> str:
    return f"hiddenstate serve transport: {config.getoption('--transport')}"
