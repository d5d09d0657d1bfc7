"""The streams API on a port of its own (`--streams-api-port`): a small HTTP/1.1 server
in one thread.

Why not the metrics port's server (prometheus-client's threading WSGI server): it starts
a thread per request and builds a WSGI environ for it, about 700 us of CPU per request
on the development VM, most of it holding the GIL the serving loop needs. This one
multiplexes every connection with `selectors` in one thread, keeps connections alive,
and reads only the request line and the `Connection` header (bench/streams_api.py
measures both).

What it accepts: GET and HEAD of `/streams` and `/streams/{key}` (the key
percent-encoded), HTTP/1.0 and 1.1, connections kept alive unless the client says
`Connection: close` (HTTP/1.0: unless it says `keep-alive`). A request head over
`max_head` bytes is answered 431, a malformed request line 400, any other method 405
(its body is not read), and each of these closes the connection; a connection idle for
`idle_s` is closed. A fault of the API's own is a 500 and a log line; the server goes
on. An answer goes out in one `send` when it fits the socket's buffer; a client that
does not read the rest holds the thread up for 2 s at most, then loses its connection.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
import urllib.parse
from types import TracebackType
from typing import Protocol, Self

from pipeline.errors import ConfigError
from pipeline.settings import who

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 2.0  # a client that reads nothing for this long loses its connection


class Answers(Protocol):
    """What the server asks of the API (`pipeline.streams_api.StreamsApi`)."""

    def answer(self, method: str, path: bytes, query: str) -> tuple[str, bytes]:
        """(status line, JSON body) for `method` on `path` (percent-escapes decoded)."""
        ...


class _Connection:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.buffer = b""
        self.last = now


class StreamsServer:
    """Serves `api` on `host:port` from a daemon thread; `port=0` binds a free port."""

    def __init__(
        self,
        api: Answers,
        host: str,
        port: int,
        *,
        max_head: int = 8192,
        idle_s: float = 10.0,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._api = api
        self._address = (host, port)
        self._max_head = max_head
        self._idle_s = idle_s
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: dict[int, _Connection] = {}

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._listener is None:
            return self._address[1]
        return int(self._listener.getsockname()[1])

    def start(self) -> Self:
        """Bind and serve in the background; a ConfigError names the setting if the port
        is taken."""
        host, port = self._address
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            listener = socket.socket(family[0][0], socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
        except OSError as exc:
            raise ConfigError(
                f"{who('streams_api_port')}: cannot listen on {host}:{port} "
                f"({exc.strerror or exc}); choose a free port"
            ) from exc
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="hiddenstate-streams", daemon=True)
        self._thread.start()
        log.info("the streams API on http://%s:%d/streams", host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and release the port."""
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for connection in list(self._connections.values()):
            self._close(connection)
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        swept = time.monotonic()
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=1.0):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._wake_r.recv(64)
                elif (connection := self._connections.get(key.fd)) is not None:
                    self._read(connection)
            now = time.monotonic()
            if now - swept >= 1.0:
                swept = now
                for connection in list(self._connections.values()):
                    if now - connection.last > self._idle_s:
                        self._close(connection)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, ...: try at the next wake-up
                log.warning("the streams API could not accept a connection: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, time.monotonic())
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if not data:
            self._close(connection)
            return
        connection.last = time.monotonic()
        connection.buffer += data
        while True:  # pipelined requests are answered in order
            end = connection.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(connection.buffer) > self._max_head:
                    self._send(connection, "431 Request Header Fields Too Large", b"", keep=False)
                return
            head, connection.buffer = connection.buffer[:end], connection.buffer[end + 4 :]
            if not self._respond(connection, head):
                return

    def _respond(self, connection: _Connection, head: bytes) -> bool:
        """Answer one request; False when the connection was closed."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if (
            len(parts) != 3
            or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1")
            or len(head) > self._max_head
        ):
            status = (
                "400 Bad Request"
                if len(head) <= self._max_head
                else "431 Request Header Fields Too Large"
            )
            return self._send(connection, status, b"", keep=False)
        method, target, version = parts[0].decode("latin-1"), parts[1], parts[2]
        wanted = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"connection":
                wanted = value.strip().lower()
        keep = wanted != b"close" if version == b"HTTP/1.1" else wanted == b"keep-alive"
        if method not in ("GET", "HEAD"):
            keep = False  # a body may follow, and is not read
        path, _, query = target.partition(b"?")
        try:
            status, body = self._api.answer(
                method, urllib.parse.unquote_to_bytes(path), query.decode("latin-1")
            )
        except Exception:  # a fault of ours must not end the server
            log.exception("the streams API failed on %r", lines[0][:200])
            status, body, keep = "500 Internal Server Error", b"", False
        return self._send(connection, status, b"" if method == "HEAD" else body, keep, len(body))

    def _send(
        self,
        connection: _Connection,
        status: str,
        body: bytes,
        keep: bool,
        length: int | None = None,
    ) -> bool:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n"
        ).encode()
        sock = connection.sock
        data = head + self._headers + b"\r\n" + body
        try:
            try:
                # An answer usually fits the socket's buffer: one call, and no timeout to
                # set and unset (two system calls more per request).
                sent = sock.send(data)
            except BlockingIOError:  # the buffer still holds an earlier answer
                sent = 0
            if sent < len(data):  # a client that reads slowly: the rest within the bound
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendall(data[sent:])
                sock.setblocking(False)
        except OSError:  # a reset, or the bound passed: the connection goes
            self._close(connection)
            return False
        if not keep:
            self._close(connection)
            return False
        return True

    def _close(self, connection: _Connection) -> None:
        sock = connection.sock
        self._connections.pop(sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):  # not registered any more
            self._selector.unregister(sock)
        sock.close()
