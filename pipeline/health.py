"""The HTTP endpoint on the metrics port: `/metrics`, `/healthz`, `/readyz`.

- `/metrics`: the Prometheus exposition of the server's registry.
- `/healthz` (liveness): 200 while the Kafka loop has beaten within
  `liveness_timeout_seconds`. Only a stuck loop fails it: a broker outage
  does not, since the loop keeps polling (and beating) while the broker is
  away, and restarting the pod would not bring the broker back.
- `/readyz` (readiness): 200 only when the consumer has partitions assigned
  and no changelog restore is running.

The loop reports through a `LoopState` (`beat()`, `set_assigned()`,
`set_restoring()`); the server runs in a daemon thread and only reads it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from pipeline.errors import ConfigError
from pipeline.settings import who

log = logging.getLogger(__name__)


class LoopState:
    """What the Kafka loop says about itself; written by the loop, read by `/healthz`/`/readyz`.

    Each write is a single attribute assignment, atomic under the GIL, so no lock.
    """

    def __init__(
        self, liveness_timeout_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._timeout = liveness_timeout_seconds
        self._clock = clock
        self._last_beat = clock()  # starting counts as a beat: loading the model takes time
        self._assigned = 0
        self._restoring = False

    def beat(self) -> None:
        """The loop is turning: call once per iteration (also when a poll returns nothing)."""
        self._last_beat = self._clock()

    def set_assigned(self, partitions: int) -> None:
        """How many input partitions the consumer holds now."""
        self._assigned = partitions

    def set_restoring(self, restoring: bool) -> None:
        """True while states are being restored from the changelog."""
        self._restoring = restoring

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Liveness and why: the age of the last heartbeat against the timeout."""
        age = self._clock() - self._last_beat
        return age <= self._timeout, {
            "last_beat_seconds_ago": round(age, 3),
            "timeout_seconds": self._timeout,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and why: partitions assigned and no restore running."""
        return self._assigned > 0 and not self._restoring, {
            "assigned_partitions": self._assigned,
            "restoring": self._restoring,
        }


class HealthServer:
    """Serves the registry and the loop's health on `host:port` from a daemon thread.

    `port=0` binds a free port (tests); `port` then says which.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        state: LoopState,
        host: str = "0.0.0.0",
        port: int = 9108,
        poll_interval: float = 0.5,
    ) -> None:
        self._registry = registry
        self._poll_interval = poll_interval  # how fast `stop` is noticed
        self._state = state
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._server is None:
            return self._address[1]
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Bind and serve in the background; a ConfigError names the setting if the port is taken."""
        handler = _handler_for(self._registry, self._state)
        try:
            self._server = ThreadingHTTPServer(self._address, handler)
        except OSError as exc:
            host, port = self._address
            raise ConfigError(
                f"{who('metrics_port')}: cannot listen on "
                f"{host}:{port} ({exc.strerror or exc}); choose a free port"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(self._poll_interval,),
            name="hiddenstate-http",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "metrics and health on http://%s:%d/ (metrics, healthz, readyz)",
            self._address[0],
            self.port,
        )
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _handler_for(registry: CollectorRegistry, state: LoopState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path in ("/healthz", "/readyz"):
                ok, detail = state.live() if path == "/healthz" else state.ready()
                body = json.dumps({"ok": ok, **detail}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes hit these every few seconds: keep them out of the info log.
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
