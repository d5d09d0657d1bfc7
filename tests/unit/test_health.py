import gzip
import json
import socket
import urllib.error
import urllib.request

import pytest

import pipeline
from pipeline.errors import ConfigError
from pipeline.health import HealthServer, LoopState, _server_class_for
from pipeline.testing import ManualClock


def get(server: HealthServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def state(clock: ManualClock) -> LoopState:
    return LoopState(liveness_timeout_seconds=30, clock=clock)


@pytest.fixture
def server(metrics, state):
    with HealthServer(
        metrics.registry, state, host="127.0.0.1", port=0, poll_interval=0.01
    ) as running:
        yield running


def test_metrics_serves_the_registry(server, metrics):
    metrics.events.inc(2)
    status, body = get(server, "/metrics")
    assert status == 200
    assert "hiddenstate_events_total 2.0" in body


def test_healthz_is_ok_while_the_loop_beats(server, state, clock):
    clock.advance(25)
    state.beat()
    clock.advance(25)
    status, body = get(server, "/healthz")
    assert status == 200
    assert json.loads(body)["ok"] is True


def test_healthz_fails_when_the_loop_is_stuck(server, clock):
    clock.advance(31)
    status, body = get(server, "/healthz")
    assert status == 503
    assert json.loads(body) == {
        "ok": False,
        "last_beat_seconds_ago": 31.0,
        "timeout_seconds": 30,
        "restoring": False,
    }


def test_healthz_holds_during_a_restore_longer_than_the_timeout(server, state, clock):
    state.set_restoring(True)
    clock.advance(300)
    status, body = get(server, "/healthz")
    assert (status, json.loads(body)["restoring"]) == (200, True)


def test_healthz_does_not_care_about_partitions_or_the_broker(server, state):
    state.set_assigned(0)  # e.g. the broker is away and the group has no members
    assert get(server, "/healthz")[0] == 200


def test_readyz_fails_without_assigned_partitions(server):
    status, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "assigned_partitions": 0, "restoring": False}


def test_readyz_fails_while_restoring(server, state):
    state.set_assigned(3)
    state.set_restoring(True)
    assert get(server, "/readyz")[0] == 503


def test_readyz_is_ok_with_partitions_and_no_restore(server, state):
    state.set_assigned(3)
    state.set_restoring(False)
    assert get(server, "/readyz") == (
        200,
        '{"ok": true, "assigned_partitions": 3, "restoring": false}',
    )


def test_an_unknown_path_is_not_found(server):
    assert get(server, "/")[0] == 404


def test_a_taken_port_is_a_config_error_naming_the_setting(metrics, state):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError,
            match=f"--metrics-port / HIDDENSTATE_METRICS_PORT: cannot listen on 127.0.0.1:{port}",
        ):
            HealthServer(metrics.registry, state, host="127.0.0.1", port=port).start()


def test_stop_releases_the_port(metrics, state):
    server = HealthServer(
        metrics.registry, state, host="127.0.0.1", port=0, poll_interval=0.01
    ).start()
    port = server.port
    server.stop()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def request(server: HealthServer, path: str, method: str = "GET", **headers: str):
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_metrics_are_gzipped_when_the_scraper_accepts_it(server, metrics):
    metrics.events.inc(5)
    status, headers, body = request(server, "/metrics", **{"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert b"hiddenstate_events_total 5.0" in gzip.decompress(body)


def test_metrics_name_filter_returns_only_the_named_families(server, metrics):
    status, _, body = request(server, "/metrics?name[]=hiddenstate_events_total")
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}
    assert (status, names) == (200, {"hiddenstate_events_total"})


def test_metrics_speak_openmetrics_when_asked(server):
    accept = "application/openmetrics-text; version=1.0.0"
    status, headers, body = request(server, "/metrics", Accept=accept)
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_metrics_expose_process_and_build_information(server):
    _, _, body = request(server, "/metrics")
    text = body.decode()
    assert "process_resident_memory_bytes " in text
    assert f'hiddenstate_build_info{{version="{pipeline.__version__}"}} 1.0' in text


def test_head_on_metrics_sends_the_headers_of_get_without_a_body(server):
    _, get_headers, _ = request(server, "/metrics")
    status, headers, body = request(server, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) > 0


def test_head_on_readyz_answers_its_status_without_a_body(server, state):
    state.set_assigned(1)
    status, headers, body = request(server, "/readyz", method="HEAD")
    assert (status, body, headers["Content-Type"]) == (200, b"", "application/json")


def test_an_ipv6_address_gets_an_ipv6_server():
    assert _server_class_for("::1", 0).address_family == socket.AF_INET6
    assert _server_class_for("0.0.0.0", 0).address_family == socket.AF_INET
