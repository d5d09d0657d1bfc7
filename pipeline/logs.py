"""Log lines of the `hiddenstate` commands: for people, or one JSON object per line.

`--log-format text` (the default) writes `time LEVEL logger: message` lines.
`--log-format json` writes each record as one JSON object on one line, which
log collectors (Fluent Bit, Vector, Promtail, Cloud Logging) parse without a
multi-line rule: `time` (UTC, ISO 8601), `level`, `logger`, `message`, a
traceback as one `exception` string, and any `extra={...}` fields as they are
(the server's start-up record carries its whole configuration as `config`).

The standard library does this in a few lines, so the serving image needs no
logging dependency.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that narrate every connection or graph pass at INFO; warnings still show.
_CHATTY = ("kafka", "onnx_ir", "onnxscript", "torch")
# What every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}

# Final errors are the command's, not this module's.
log = logging.getLogger("pipeline.cli")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler these commands install (told apart from any other). It writes to
    the `sys.stderr` of the moment, not of its creation: a caller that swaps stderr (a
    test capturing it) gets the records, and none go to a stream since closed."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(log_format: str, level: int | str = logging.INFO) -> None:
    """Send every log record to stderr in `log_format` ("text" or "json") at `level`.

    Called again (the server, once its configuration is read), it replaces its own
    handler's format and leaves other handlers alone.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler(sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root.setLevel(level)
    for chatty in _CHATTY:
        logging.getLogger(chatty).setLevel(logging.WARNING)
    cluster = logging.getLogger("kafka.cluster")
    if not any(isinstance(f, _CancelledRefresh) for f in cluster.filters):
        cluster.addFilter(_CancelledRefresh())


class _CancelledRefresh(logging.Filter):
    """kafka-python 3 logs the metadata refresh that its own close cancels as an ERROR
    ("Metadata refresh: failed Cancelled", kafka/cluster.py): a clean stop is not an
    error, so that one record is dropped; every other failed refresh still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        cancelled = bool(args) and type(args[0]).__name__ == "Cancelled"
        return not (record.msg == "Metadata refresh: failed %s" and cancelled)


def requested_format(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """The log format asked for by `--log-format` or HIDDENSTATE_LOG_FORMAT, read before the
    whole configuration is (so that even a configuration error comes out in it); "text"
    when neither names a known format (the configuration check then says why)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--log-format")
    known, _ = peek.parse_known_args(list(argv))
    wanted = known.log_format or environ.get("HIDDENSTATE_LOG_FORMAT", "")
    return wanted.strip().lower() if wanted.strip().lower() in FORMATS else "text"


def json_enabled() -> bool:
    """Whether the installed handler writes JSON."""
    return any(
        isinstance(h, _Handler) and isinstance(h.formatter, JsonFormatter)
        for h in logging.getLogger().handlers
    )


def report_error(message: str) -> None:
    """A command's final error: a JSON record when logging JSON, else a plain stderr line."""
    if json_enabled():
        log.error(message)
    else:
        print(message, file=sys.stderr)
