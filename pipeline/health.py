"""The HTTP endpoint on the metrics port: `/metrics`, `/healthz`, `/readyz`.

- `/metrics`: the Prometheus exposition of the server's registry, served by
  prometheus-client's own WSGI app: OpenMetrics when the scraper asks for it,
  gzip when it accepts it, `?name[]=...` to fetch only some families.
- `/healthz` (liveness): 200 while the Kafka loop has beaten within
  `liveness_timeout_seconds`, or a changelog restore is running. Only a stuck
  loop fails it: a broker outage does not, since the loop keeps polling (and
  beating) while the broker is away, and restarting the pod would not bring
  the broker back.
- `/readyz` (readiness): 200 only when the consumer has partitions assigned
  and no changelog restore is running.

Every path answers HEAD like GET, without the body. The loop reports
through a `LoopState` (`beat()`, `set_assigned()`, `set_restoring()`); the
server runs in a daemon thread (one more per request) and only reads it.

With `--streams-api` on the metrics port, `/streams` and `/streams/{key}` are passed to
the streams API's app (`pipeline.streams_api`, the `streams` argument).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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
        """Liveness and why: the age of the last heartbeat against the timeout. A restore
        counts as alive however long it takes: it is work, reading the changelog (slow
        when the changelog is large, waiting when the broker is away), and a restart
        would only begin it again. Readiness stays down meanwhile."""
        age = self._clock() - self._last_beat
        return age <= self._timeout or self._restoring, {
            "last_beat_seconds_ago": round(age, 3),
            "timeout_seconds": self._timeout,
            "restoring": self._restoring,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and why: partitions assigned and no restore running."""
        return self._assigned > 0 and not self._restoring, {
            "assigned_partitions": self._assigned,
            "restoring": self._restoring,
        }


Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]


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
        streams: WsgiApp | None = None,
    ) -> None:
        self._app = health_app(registry, state, streams)
        self._poll_interval = poll_interval  # how fast `stop` is noticed
        self._address = (host, port)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._server is None:
            return self._address[1]
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Bind and serve in the background; a ConfigError names the setting if the port is taken."""
        host, port = self._address
        try:
            server_class = _server_class_for(host, port)
            self._server = make_server(host, port, self._app, server_class, _QuietHandler)
        except OSError as exc:
            raise ConfigError(
                f"{who('metrics_port')}: cannot listen on "
                f"{host}:{port} ({exc.strerror or exc}); choose a free port"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(self._poll_interval,),
            name="hiddenstate-http",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics and health on http://%s:%d/ (metrics, healthz, readyz)", host, self.port)
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


def health_app(
    registry: CollectorRegistry, state: LoopState, streams: WsgiApp | None = None
) -> WsgiApp:
    """The WSGI app behind the port: `/metrics` to prometheus-client, `/streams...` to
    `streams` when given, the rest here."""
    metrics = make_wsgi_app(registry)
    known = "/metrics, /healthz, /readyz" + (", /streams" if streams is not None else "")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        head = environ["REQUEST_METHOD"] == "HEAD"
        if head:
            # prometheus-client answers GET only; HEAD is GET without the body.
            environ = {**environ, "REQUEST_METHOD": "GET"}
        path = environ.get("PATH_INFO", "")
        if streams is not None and (path == "/streams" or path.startswith("/streams/")):
            return streams(
                {**environ, "REQUEST_METHOD": "HEAD"} if head else environ, start_response
            )
        if path == "/metrics":
            answered: list[tuple[str, list[tuple[str, str]]]] = []
            body = b"".join(metrics(environ, lambda *answer: answered.append(answer[:2])))
            ((status, headers),) = answered
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
        elif path in ("/healthz", "/readyz"):
            ok, detail = state.live() if path == "/healthz" else state.ready()
            body = json.dumps({"ok": ok, **detail}).encode()
            _respond(start_response, "200 OK" if ok else "503 Service Unavailable", body)
        else:
            body = f"not found: try {known}\n".encode()
            _respond(start_response, "404 Not Found", body, "text/plain")
        # One empty write sends the headers as they are, Content-Length included.
        return [b"" if head else body]

    return app


def _respond(
    start_response: StartResponse, status: str, body: bytes, content_type: str = "application/json"
) -> None:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])


def _server_class_for(host: str, port: int) -> type[ThreadingWSGIServer]:
    """prometheus-client's threading WSGI server, in the address family of `host` (an
    IPv6 address needs AF_INET6; the server class defaults to IPv4)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    return Server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit these every few seconds: keep them out of the info log.
        log.debug("%s %s", self.address_string(), format % args)
