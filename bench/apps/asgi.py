"""The benchmark's ASGI app, served unchanged by every stack of the asgi part.

    /        hello world: `Hello, world!`, text/plain
    /ws      a WebSocket that sends every message back as it came (text as
             text, bytes as bytes) until the client closes

It answers the lifespan protocol (startup and shutdown, nothing to do) and
404 to any other path. No framework and only the standard library, so that
it runs under any interpreter and every server runs the same code.
"""

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HELLO = b"Hello, world!"
NOT_FOUND = b"not found\n"
ECHO_PATH = "/ws"


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def http(scope: Scope, send: Send) -> None:
    status, body = (200, HELLO) if scope["path"] == "/" else (404, NOT_FOUND)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if scope["path"] != ECHO_PATH:
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        await http(scope, send)
    elif scope["type"] == "websocket":
        await echo(scope, receive, send)
