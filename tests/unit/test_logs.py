"""Log lines: text for people, one JSON object per line for collectors (`--log-format`)."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import logs

REPO = Path(__file__).resolve().parents[2]


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("pipeline.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


@pytest.fixture
def root_handlers():
    """The root logger's handlers and level, restored after the test."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = saved
    root.setLevel(level)


def test_a_json_record_has_time_level_logger_and_the_formatted_message():
    line = logs.JsonFormatter().format(record("hello %s", "world"))
    entry = json.loads(line)
    assert {k: entry[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING",
        "logger": "pipeline.test",
        "message": "hello world",
    }
    assert entry["time"].endswith("+00:00")


def test_extra_fields_become_fields_of_the_json_object():
    entry = json.loads(logs.JsonFormatter().format(record(config={"max_streams": 10})))
    assert entry["config"] == {"max_streams": 10}


def test_a_traceback_stays_inside_one_json_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.LogRecord(
            "pipeline.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = logs.JsonFormatter().format(failed)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_values_json_cannot_encode_are_written_as_text():
    entry = json.loads(logs.JsonFormatter().format(record(path=Path("/models/m.onnx"))))
    assert entry["path"] == "/models/m.onnx"


def test_configuring_twice_keeps_one_handler_and_the_latest_format(root_handlers):
    logs.configure("text")
    logs.configure("json", "DEBUG")
    ours = [h for h in root_handlers.handlers if isinstance(h, logs._Handler)]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, logs.JsonFormatter)
    assert root_handlers.level == logging.DEBUG


def test_an_unknown_log_format_is_refused_and_named(root_handlers):
    with pytest.raises(ValueError, match="log format 'xml': expected one of text, json"):
        logs.configure("xml")


def test_the_flag_wins_over_the_environment_for_the_early_format():
    environ = {"HIDDENSTATE_LOG_FORMAT": "text"}
    assert logs.requested_format(["--log-format=json"], environ) == "json"
    assert logs.requested_format(["--log-format", "json"], environ) == "json"


def test_the_environment_gives_the_early_format_without_a_flag():
    assert (
        logs.requested_format(["--model", "m.onnx"], {"HIDDENSTATE_LOG_FORMAT": "JSON"}) == "json"
    )


def test_an_unknown_early_format_falls_back_to_text():
    assert logs.requested_format([], {"HIDDENSTATE_LOG_FORMAT": "xml"}) == "text"


def test_a_final_error_is_a_plain_line_in_text_mode(root_handlers, capsys):
    logs.configure("text")
    logs.report_error("hiddenstate serve: error: no model")
    assert capsys.readouterr().err == "hiddenstate serve: error: no model\n"


def serve(*args: str, **env: str) -> list[str]:
    """`hiddenstate serve` in a fresh process; its stderr lines. The model does not exist,
    so it stops after the start-up record, at the model check, without a broker."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr.splitlines()


@pytest.mark.slow
def test_serve_in_json_mode_writes_the_configuration_as_one_record_then_its_error():
    lines = serve(
        "--log-format", "json", "--model", "/nonexistent/m.onnx",
        "--input-topic", "events", "--output-topic", "predictions",
        HIDDENSTATE_SASL_PLAIN_PASSWORD="hunter2",
    )  # fmt: skip
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    start, error = records[0], records[-1]
    assert start["message"] == "starting"
    assert start["config"]["input_topic"] == "events"
    assert start["config"]["sasl_plain_password"] == "***"
    assert start["sources"]["log_format"] == "flag"
    assert (error["level"], error["logger"]) == ("ERROR", "pipeline.cli")
    assert "'/nonexistent/m.onnx' does not exist" in error["message"]


@pytest.mark.slow
def test_a_configuration_error_comes_out_as_json_when_the_environment_asks_for_it():
    (line,) = serve("--max-streams", "0", HIDDENSTATE_LOG_FORMAT="json")
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "--max-streams / HIDDENSTATE_MAX_STREAMS: expected >= 1" in entry["message"]


def test_records_go_to_the_stderr_of_the_moment(root_handlers, monkeypatch):
    logs.configure("json")
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)
    logging.getLogger("pipeline.test").warning("to the new stream")
    assert json.loads(replaced.getvalue())["message"] == "to the new stream"


def test_the_refresh_kafka_python_cancels_at_its_own_close_is_not_logged_as_an_error(capsys):
    from kafka.errors import Cancelled

    logs.configure("text")
    cluster = logging.getLogger("kafka.cluster")
    cluster.error("Metadata refresh: failed %s", Cancelled())
    cluster.error("Metadata refresh: failed %s", OSError("connection refused"))
    err = capsys.readouterr().err
    assert "Cancelled" not in err
    assert "connection refused" in err
