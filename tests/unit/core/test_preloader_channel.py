"""The core's end of a preloader's control socket (agent/core/preloader.py),
on a real SOCK_SEQPACKET pair: the other end plays the preloader."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest

from agent.core.preloader import Channel, Exited, PreloaderFailed


@pytest.fixture
def pair() -> Iterator[tuple[Channel, socket.socket]]:
    core, preloader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(core.detach(), pid=1234)
    yield channel, preloader
    channel.close()
    preloader.close()


def say(sock: socket.socket, message: dict[str, object]) -> None:
    sock.send(json.dumps(message).encode())


def test_an_exit_reported_with_the_fork_reply_is_kept(pair: tuple[Channel, socket.socket]) -> None:
    # A worker that ends as the next one is forked: both reports are read
    # by one take(), the exit after the reply, and neither may be lost.
    channel, preloader = pair
    say(preloader, {"exited": 41, "status": 0})
    say(preloader, {"forked": 1, "pid": 42})
    say(preloader, {"exited": 43, "status": 9})
    read_end, write_end = os.pipe()
    try:
        assert channel.fork([read_end, write_end], cgroup=False) == 42
    finally:
        os.close(read_end)
        os.close(write_end)
    assert channel.take() == [Exited(41, 0), Exited(43, 9)]
    command, fds, _, _ = socket.recv_fds(preloader, 4096, 5)
    assert json.loads(command) == {"spawn": 1, "cgroup": False} and len(fds) == 2
    for fd in fds:
        os.close(fd)


def test_a_failed_fork_is_raised_and_the_exits_beside_it_kept(pair: tuple[Channel, socket.socket]) -> None:
    channel, preloader = pair
    say(preloader, {"failed": 1, "error": "fork: out of memory"})
    say(preloader, {"exited": 44, "status": 0})
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(PreloaderFailed, match="out of memory"):
            channel.fork([read_end], cgroup=False)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert channel.take() == [Exited(44, 0)]
