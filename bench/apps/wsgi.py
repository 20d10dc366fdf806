"""The benchmark's WSGI app, served unchanged by every stack.

    /        hello world: a 13-byte text body
    /100k    a 100 KB body
    /sleep   answers after sleeping 10 ms (an app waiting on a database)

Standard library only, so that it runs under any interpreter.
"""

import time
from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., object]
Body = Iterable[bytes]

HELLO = b"Hello, world\n"
BIG = b"x" * (100 * 1024)
SLEEP_SECONDS = 0.010
NOT_FOUND = b"not found\n"


def _text(start_response: StartResponse, status: str, body: bytes) -> Body:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> Body:
    return _text(start_response, "200 OK", HELLO)


def big(environ: Environ, start_response: StartResponse) -> Body:
    return _text(start_response, "200 OK", BIG)


def sleep(environ: Environ, start_response: StartResponse) -> Body:
    time.sleep(SLEEP_SECONDS)
    return _text(start_response, "200 OK", HELLO)


ROUTES: dict[str, Callable[[Environ, StartResponse], Body]] = {"/": hello, "/100k": big, "/sleep": sleep}


def application(environ: Environ, start_response: StartResponse) -> Body:
    handler = ROUTES.get(environ.get("PATH_INFO") or "/")
    if handler is None:
        return _text(start_response, "404 Not Found", NOT_FOUND)
    return handler(environ, start_response)
