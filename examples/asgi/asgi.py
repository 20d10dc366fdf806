"""A small Starlette app, served by the agent as an ASGI app
(agent_app_type asgi): each worker runs it on its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, int]]:
    # Runs in each worker before it takes requests; the state reaches every request.
    yield {"started_by": os.getpid()}


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "world", "pid": os.getpid(), "started_by": request.state.started_by,
                         "path": request.url.path})


async def stream(request: Request) -> Response:
    """`count` lines, `delay` seconds apart, each sent as it is made."""
    count = int(request.query_params.get("count", "5"))
    delay = float(request.query_params.get("delay", "0.5"))

    async def lines() -> AsyncIterator[str]:
        for n in range(count):
            if n:
                await asyncio.sleep(delay)
            yield f"line {n}\n"

    # X-Accel-Buffering: no makes nginx pass each line on as it comes.
    return StreamingResponse(lines(), media_type="text/plain", headers={"X-Accel-Buffering": "no"})


async def echo(websocket: WebSocket) -> None:
    """A WebSocket echo: text comes back as "echo: ...", bytes as they came;
    the text "bye" closes the WebSocket."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                if message["text"] == "bye":
                    await websocket.close(code=1000)
                    return
                await websocket.send_text("echo: " + message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


app = Starlette(routes=[Route("/", hello), Route("/stream", stream), WebSocketRoute("/ws", echo)],
                lifespan=lifespan)
