"""The streams API's own HTTP server: keep-alive, the answers of each kind of request,
and a slow or faulty client that never holds up the others."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.errors import ConfigError
from pipeline.streams_server import StreamsServer


class Api:
    """Answers with what it was asked; `fail` makes the next answer raise."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, bytes, str]] = []
        self.fail = False

    def answer(self, method: str, path: bytes, query: str) -> tuple[str, bytes]:
        if self.fail:
            self.fail = False
            raise RuntimeError("a bug")
        self.asked.append((method, path, query))
        return "200 OK", b'{"path":"%s"}' % path


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def port(api):
    with StreamsServer(api, "127.0.0.1", 0, max_head=512, idle_s=1.0) as server:
        yield server.port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def exchange(sock: socket.socket, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send one request and read one answer (its Content-Length decides where it ends)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("Content-Length", 0)):
        body += sock.recv(4096)
    return lines[0], headers, body


def closed(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def test_one_connection_carries_many_requests(api, port):
    with connect(port) as sock:
        for key in (b"a", b"b", b"c"):
            status, headers, body = exchange(
                sock, b"GET /streams/%s HTTP/1.1\r\nHost: x\r\n\r\n" % key
            )
            assert (status, headers["Connection"], body) == (
                "HTTP/1.1 200 OK",
                "keep-alive",
                b'{"path":"/streams/%s"}' % key,
            )
    assert [path for _, path, _ in api.asked] == [b"/streams/a", b"/streams/b", b"/streams/c"]


def test_the_key_is_percent_decoded_and_the_query_passed_on(api, port):
    with connect(port) as sock:
        exchange(sock, b"GET /streams/utt%2F%C3%A4%201?state=1 HTTP/1.1\r\n\r\n")
    assert api.asked == [("GET", "/streams/utt/ä 1".encode(), "state=1")]


def test_connection_close_is_honoured(port):
    with connect(port) as sock:
        status, headers, _ = exchange(sock, b"GET /streams HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert (status, headers["Connection"]) == ("HTTP/1.1 200 OK", "close")
        assert closed(sock)


def test_http_1_0_closes_unless_asked_to_keep_alive(port):
    with connect(port) as sock:
        assert exchange(sock, b"GET /streams HTTP/1.0\r\n\r\n")[1]["Connection"] == "close"
        assert closed(sock)
    with connect(port) as sock:
        request = b"GET /streams HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        assert exchange(sock, request)[1]["Connection"] == "keep-alive"


def test_head_sends_the_length_of_get_without_the_body(port):
    with connect(port) as sock:
        sock.sendall(b"HEAD /streams/a HTTP/1.1\r\n\r\n")
        time.sleep(0.2)
        answer = sock.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: 21" in head
    assert body == b""


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GARBAGE\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /streams HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"GET /streams HTTP/1.1\r\nX: " + b"y" * 600 + b"\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large",
        ),
    ],
    ids=["no-request-line", "unknown-version", "head-too-large"],
)
def test_a_bad_request_is_answered_and_closed(port, request_line, status):
    with connect(port) as sock:
        assert exchange(sock, request_line)[0] == status
        assert closed(sock)


def test_a_head_that_never_ends_is_cut_at_the_limit(port):
    with connect(port) as sock:
        sock.sendall(b"GET /streams HTTP/1.1\r\nX: " + b"y" * 600)
        assert exchange(sock, b"")[0] == "HTTP/1.1 431 Request Header Fields Too Large"


def test_a_method_with_a_body_is_passed_on_and_the_connection_closed(api, port):
    with connect(port) as sock:
        status, headers, _ = exchange(
            sock, b"POST /streams HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert (status, headers["Connection"]) == ("HTTP/1.1 200 OK", "close")
        assert closed(sock)
    assert api.asked == [("POST", b"/streams", "")]


def test_a_fault_of_the_api_is_a_500_and_the_server_goes_on(api, port):
    api.fail = True
    with connect(port) as sock:
        assert (
            exchange(sock, b"GET /streams HTTP/1.1\r\n\r\n")[0]
            == "HTTP/1.1 500 Internal Server Error"
        )
    with connect(port) as sock:
        assert exchange(sock, b"GET /streams HTTP/1.1\r\n\r\n")[0] == "HTTP/1.1 200 OK"


def test_a_client_that_sends_half_a_request_holds_up_nobody(port):
    with connect(port) as slow, connect(port) as quick:
        slow.sendall(b"GET /streams/a HTTP/1.1\r\n")
        assert exchange(quick, b"GET /streams/b HTTP/1.1\r\n\r\n")[0] == "HTTP/1.1 200 OK"


def test_an_idle_connection_is_closed(port):
    with connect(port) as sock:
        sock.sendall(b"GET /streams HTTP/1.1\r\n")
        assert closed(sock)  # after idle_s (1 s) and the next sweep


def test_a_taken_port_is_a_config_error_naming_the_setting(api):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError,
            match=f"--streams-api-port / HIDDENSTATE_STREAMS_API_PORT: cannot listen on 127.0.0.1:{port}",
        ):
            StreamsServer(api, "127.0.0.1", port).start()


def test_stop_releases_the_port(api):
    server = StreamsServer(api, "127.0.0.1", 0).start()
    port = server.port
    server.stop()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


class Big(Api):
    def answer(self, method: str, path: bytes, query: str) -> tuple[str, bytes]:
        return "200 OK", b"x" * 8_000_000  # more than any socket buffer holds


def test_a_client_that_does_not_read_its_answer_holds_up_the_others_two_seconds_at_most():
    with StreamsServer(Big(), "127.0.0.1", 0) as server:
        stuck = connect(server.port)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /streams HTTP/1.1\r\n\r\n")
        time.sleep(0.2)  # the server is now blocked sending to it
        started = time.monotonic()
        with connect(server.port) as quick:
            status, _, body = exchange(quick, b"GET /streams HTTP/1.1\r\n\r\n")
        waited = time.monotonic() - started
        # Reset, not closed: nothing of the answer left to drain at 4 KiB a read.
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        stuck.close()
    assert (status, len(body)) == ("HTTP/1.1 200 OK", 8_000_000)
    assert 1.0 < waited < 4.0
