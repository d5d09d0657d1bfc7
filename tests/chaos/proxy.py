"""A TCP proxy on loopback whose link can be cut: the network between server and broker.

    proxy = Proxy(listen_port, upstream_port).start()
    proxy.cut()          # every connection reset, new ones refused at once
    proxy.blackhole()    # connections stay open but nothing passes either way
    proxy.restore()      # forward again
    proxy.stop()

The broker advertises the proxy's port on a listener of its own
(`LocalKafka.proxied`), so a client that bootstraps through the proxy also
reaches the broker through it afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

FORWARD, CUT, BLACKHOLE = "forward", "cut", "blackhole"


class Proxy:
    """Forwards 127.0.0.1:`listen_port` to 127.0.0.1:`upstream_port`, until told otherwise."""

    def __init__(self, listen_port: int, upstream_port: int) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.mode = FORWARD
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self._server.settimeout(0.2)
        self._stopped = threading.Event()

    def start(self) -> Proxy:
        threading.Thread(target=self._accept, name="chaos-proxy", daemon=True).start()
        return self

    def cut(self) -> None:
        """Reset every connection and refuse new ones: a link that went down hard."""
        with self._lock:
            self.mode = CUT
            for conn in self._connections:
                _reset(conn)
            self._connections.clear()

    def blackhole(self) -> None:
        """Keep connections but pass nothing: packets silently dropped."""
        with self._lock:
            self.mode = BLACKHOLE

    def restore(self) -> None:
        """Forward again. Connections held in the blackhole are reset: their streams lost
        bytes, so no client could go on with them."""
        with self._lock:
            if self.mode == BLACKHOLE:
                for conn in self._connections:
                    _reset(conn)
                self._connections.clear()
            self.mode = FORWARD

    def stop(self) -> None:
        self._stopped.set()
        self.cut()
        self._server.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                mode = self.mode
            if mode == CUT:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _reset(client)  # the broker is down: so is the link
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, target), name="chaos-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        source.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                mode = self.mode
            if mode == BLACKHOLE:
                continue  # dropped
            try:
                target.sendall(data)
            except OSError:
                break
        for conn in (source, target):
            _close(conn)


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a peer that vanished does."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(conn)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()
