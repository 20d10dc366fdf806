"""The ASGI loader on a kept connection, as a real process on a real
socket: the next request's frame may arrive while the app of the one
before still runs (after its response ended) and still listens for
http.disconnect. Not a byte of that frame may be taken by the listening."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_loader_connections import wait_for_line
from .test_wsgi_loader import (
    ROOT,
    Worker,
    assert_closed,
    connect,
    receive_reply,
    request_frame,
    request_on,
    start_worker,
)

ASGI_LOADER = ROOT / "agent" / "loaders" / "asgi_loader.py"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    started = start_worker(tmp_path, "asgi_linger.py", loader=ASGI_LOADER, extra_env={"AGENT_APP_TYPE": "asgi"})
    yield started
    assert started.stop() == 0


def test_the_next_request_arriving_while_the_app_lingers_is_served_whole(worker: Worker) -> None:
    conn = connect(worker.sock_path)
    try:
        for _ in range(5):
            lingering = request_on(conn, "/linger")
            assert (lingering.status, lingering.ended) == (200, True)
            # At once, while the app of the request before still runs.
            after = request_on(conn, "/hello")
            assert (after.status, after.ended) == (200, True), after
            assert after.body == lingering.body  # the same worker, the same connection
        seen = request_on(conn, "/disconnects")
        # Each listener was told its response had ended.
        assert seen.body.split(b",")[:10] == [b"http.disconnect"] * 10
    finally:
        conn.close()
    assert "past the end" not in worker.log() and "malformed" not in worker.log(), worker.log()


def test_bytes_before_the_end_of_the_response_still_close_the_connection(worker: Worker) -> None:
    """The watch still sees what the protocol forbids: a frame sent while
    the response has not ended."""
    conn = connect(worker.sock_path)
    try:
        conn.sendall(request_frame("/slow"))
        wait_for_line(worker, "slow: body read")  # and the response not yet sent
        conn.sendall(request_frame("/hello"))
        first = receive_reply(conn)
        assert (first.status, first.ended) == (200, True)
        assert_closed(conn)
    finally:
        conn.close()
    assert "bytes past the end of a request body" in worker.log()


def test_a_connection_closed_mid_request_tells_the_listener(worker: Worker) -> None:
    gone = connect(worker.sock_path)
    gone.sendall(request_frame("/slow"))
    wait_for_line(worker, "slow: body read")
    gone.close()
    wait_for_line(worker, "listener of /slow: http.disconnect")
