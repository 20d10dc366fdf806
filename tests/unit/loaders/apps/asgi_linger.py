"""An ASGI app that, as Django's handler does, listens for http.disconnect
once it has read the body, and goes on running after its response ended."""

import asyncio
import os
import sys

disconnects = []


async def listen(path, receive):
    message = await receive()
    disconnects.append(message["type"])
    print(f"listener of {path}: {message['type']}", file=sys.stderr, flush=True)


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    listener = asyncio.ensure_future(listen(scope["path"], receive))
    await asyncio.sleep(0.01)  # the listener waits before the response starts (Django's thread hop)
    if scope["path"] == "/slow":
        print("slow: body read, responding in 2 s", file=sys.stderr, flush=True)
        await asyncio.sleep(2)  # the next frame may come before the response
    body = ",".join(disconnects).encode() if scope["path"] == "/disconnects" else b"pid %d" % os.getpid()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    if scope["path"] == "/linger":
        await asyncio.sleep(0.3)  # work after the response, while the next request arrives
    await listener
