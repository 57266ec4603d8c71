"""Client sessions resend a request once when the server dropped the pooled connection."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from fedcompute.adapters.http import keep_alive_session


@pytest.fixture
def drops_first_request() -> Iterator[tuple[str, list[bytes]]]:
    """A server that closes the first connection after reading its request (no answer), then answers 200."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    requests_seen: list[bytes] = []

    def serve() -> None:
        for attempt in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                requests_seen.append(conn.recv(65536).split(b"\r\n", 1)[0])
                if attempt:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/x", requests_seen
    server.close()
    thread.join(timeout=5)


def test_a_get_whose_connection_was_dropped_is_resent_once(drops_first_request: tuple[str, list[bytes]]) -> None:
    url, seen = drops_first_request
    assert keep_alive_session(resend_any_method=False).get(url, timeout=5).text == "ok"
    assert seen == [b"GET /x HTTP/1.1"] * 2


def test_a_post_is_resent_only_where_it_is_safe_twice(drops_first_request: tuple[str, list[bytes]]) -> None:
    url, seen = drops_first_request
    with pytest.raises(requests.ConnectionError):
        keep_alive_session(resend_any_method=False).post(url, data=b"x", timeout=5)
    assert seen == [b"POST /x HTTP/1.1"]


def test_an_at_least_once_post_is_resent(drops_first_request: tuple[str, list[bytes]]) -> None:
    url, seen = drops_first_request
    assert keep_alive_session(resend_any_method=True).post(url, data=b"x", timeout=5).text == "ok"
    assert seen == [b"POST /x HTTP/1.1"] * 2
