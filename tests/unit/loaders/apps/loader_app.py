"""A WSGI app for the loader's tests: one route per behaviour under test.

The route is PATH_INFO; parameters come in the query string. Every route
stays within PEP 3333 so that loader_validated.py can wrap it in
wsgiref.validate.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]
Body = Iterable[bytes]

TEXT = [("Content-Type", "text/plain")]


def query(environ: Environ, name: str, default: str = "") -> str:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(name)
    return values[0] if values else default


def reply(start_response: StartResponse, body: bytes, status: str = "200 OK") -> Body:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> Body:
    return reply(start_response, b"Hello, world!")


def show_environ(environ: Environ, start_response: StartResponse) -> Body:
    shown: dict[str, Any] = {key: value for key, value in environ.items() if isinstance(value, str)}
    shown["wsgi.version"] = list(environ["wsgi.version"])
    for key in ("wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once"):
        shown[key] = environ[key]
    shown["wsgi.input_terminated"] = environ.get("wsgi.input_terminated")
    shown["wsgi.errors is stderr"] = environ["wsgi.errors"] is sys.stderr
    shown["file_wrapper is a class"] = isinstance(environ["wsgi.file_wrapper"], type)
    shown["sys.path"] = sys.path
    shown["module"] = __name__
    shown["cwd"] = os.getcwd()
    body = json.dumps(shown).encode()
    return reply(start_response, body)


def read_body(environ: Environ, mode: str) -> bytes:
    stream = environ["wsgi.input"]
    if mode == "read":
        return bytes(stream.read())
    if mode == "read5":
        parts: list[bytes] = []
        while True:
            part = stream.read(5)
            if not part:
                return b"".join(parts)
            assert len(part) <= 5
            parts.append(part)
    if mode == "readline":
        return b"|".join(iter(stream.readline, b""))
    if mode == "readline3":
        return b"|".join(iter(lambda: stream.readline(3), b""))
    if mode == "readlines":
        return b"|".join(stream.readlines())
    if mode == "readlines_hint":
        return b"|".join(stream.readlines(1)) + b"#" + bytes(stream.read(1000))
    if mode == "iter":
        return b"|".join(stream)
    raise ValueError(mode)


def echo(environ: Environ, start_response: StartResponse) -> Body:
    return reply(start_response, read_body(environ, query(environ, "mode", "read5")))


def digest(environ: Environ, start_response: StartResponse) -> Body:
    stream = environ["wsgi.input"]
    hasher = hashlib.sha256()
    total = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        hasher.update(chunk)
        total += len(chunk)
    return reply(start_response, f"{total} {hasher.hexdigest()}".encode())


def stream(environ: Environ, start_response: StartResponse) -> Body:
    pause = float(query(environ, "pause", "0"))

    def chunks() -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"first;"
        yield b""
        time.sleep(pause)
        for number in range(3):
            yield f"chunk-{number};".encode()

    return chunks()


def write_callable(environ: Environ, start_response: StartResponse) -> Body:
    write = start_response("200 OK", TEXT)
    write(b"written;")
    return [b"returned"]


def file_wrapper(environ: Environ, start_response: StartResponse) -> Body:
    handle = open(query(environ, "path"), "rb")  # noqa: SIM115 - closed by the server
    handle.seek(int(query(environ, "offset", "0")))
    headers = list(TEXT)
    if query(environ, "length"):
        headers.append(("Content-Length", query(environ, "length")))
    start_response("200 OK", headers)
    wrapped: Body = environ["wsgi.file_wrapper"](handle, 4096)
    return wrapped


def error_before(environ: Environ, start_response: StartResponse) -> Body:
    raise RuntimeError("raised before start_response")


def error_after(environ: Environ, start_response: StartResponse) -> Body:
    def chunks() -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"partial;"
        raise RuntimeError("raised after the head was sent")

    return chunks()


def exc_info_replace(environ: Environ, start_response: StartResponse) -> Body:
    start_response("200 OK", TEXT)
    try:
        raise ValueError("replaced")
    except ValueError:
        start_response("503 Service Unavailable", TEXT, sys.exc_info())
    return [b"replaced by exc_info"]


def exc_info_after_sent(environ: Environ, start_response: StartResponse) -> Body:
    write = start_response("200 OK", TEXT)
    write(b"sent;")
    try:
        raise ValueError("too late")
    except ValueError:
        start_response("500 Internal Server Error", TEXT, sys.exc_info())
    return [b"never sent"]


class ClosingBody:
    """An iterable whose close() leaves a marker file behind (and raises,
    when asked to, after leaving it)."""

    def __init__(self, marker: str, fail: bool, close_fails: bool = False) -> None:
        self.marker = marker
        self.fail = fail
        self.close_fails = close_fails

    def __iter__(self) -> Iterator[bytes]:
        yield b"body;"
        if self.fail:
            raise RuntimeError("failing body")

    def close(self) -> None:
        with open(self.marker, "w") as handle:
            handle.write("closed")
        if self.close_fails:
            raise RuntimeError("failing close")


def closing(environ: Environ, start_response: StartResponse) -> Body:
    start_response("200 OK", TEXT)
    return ClosingBody(
        query(environ, "marker"),
        query(environ, "fail") == "1",
        query(environ, "close_fails") == "1",
    )


def big(environ: Environ, start_response: StartResponse) -> Body:
    """`parts` chunks of `size` bytes each, returned as a list."""
    size = int(query(environ, "size", "1000000"))
    parts = int(query(environ, "parts", "1"))
    start_response("200 OK", TEXT)
    return [bytes([ord("a") + number % 26]) * size for number in range(parts)]


def slow(environ: Environ, start_response: StartResponse) -> Body:
    time.sleep(float(query(environ, "seconds", "1")))
    return reply(start_response, b"slept")


def empty(environ: Environ, start_response: StartResponse) -> Body:
    start_response("204 No Content", [])
    return []


def header_injection(environ: Environ, start_response: StartResponse) -> Body:
    start_response("200 OK", [("X-Bad", "a\r\nX-Injected: b")])
    return [b"never sent"]


def str_body(environ: Environ, start_response: StartResponse) -> Any:
    start_response("200 OK", TEXT)
    return ["not bytes"]


def pid(environ: Environ, start_response: StartResponse) -> Body:
    return reply(start_response, str(os.getpid()).encode())


ROUTES: dict[str, Callable[[Environ, StartResponse], Body]] = {
    "/hello": hello,
    "/environ": show_environ,
    "/echo": echo,
    "/digest": digest,
    "/stream": stream,
    "/write": write_callable,
    "/file": file_wrapper,
    "/error-before": error_before,
    "/error-after": error_after,
    "/exc-info": exc_info_replace,
    "/exc-info-after-sent": exc_info_after_sent,
    "/close": closing,
    "/big": big,
    "/slow": slow,
    "/empty": empty,
    "/header-injection": header_injection,
    "/pid": pid,
    "/str-body": str_body,
}


def not_found(environ: Environ, start_response: StartResponse) -> Body:
    return reply(start_response, b"no such route", "404 Not Found")


def application(environ: Environ, start_response: StartResponse) -> Body:
    return ROUTES.get(environ["PATH_INFO"], not_found)(environ, start_response)
