"""The startup file of the WebSocket tests: a plain ASGI app (standard
library only). Marker files go to the stack's scratch directory (two
levels above the app root); NAME is the query string's `name`.

  /echo        accepts (with the first subprotocol offered, and a header of
               its own), sends back each message as it came (text or
               bytes); on websocket.disconnect writes NAME-disconnect-CODE
  /broadcast   accepts, joins the worker's set of connections, sends
               "welcome PID"; each message is sent to every connection
  /close       accepts, then closes with the query's code and reason
  /hold        accepts, writes NAME-open, waits for websocket.disconnect
               and writes NAME-disconnect-CODE (then tries one more send
               and writes NAME-send-raised when it raises)
  /refuse      websocket.close before accept: 403
  /deny        the websocket.http.response extension: 401 with a body
  /raise       raises before accept: 500
  /scope       accepts and sends the scope as JSON
every request writes NAME-called first.
"""

APP = r"""
import json
import os
from urllib.parse import parse_qs

SCRATCH = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "scratch")
connections = set()


def mark(name):
    with open(os.path.join(SCRATCH, name), "w") as f:
        f.write(str(os.getpid()))


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"plain http, pid %d" % os.getpid()})
        return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    name = query.get("name", "anonymous")
    mark(name + "-called")
    path = scope["path"]
    first = await receive()
    assert first["type"] == "websocket.connect", first
    if path == "/refuse":
        await send({"type": "websocket.close", "code": 1008})
        return
    if path == "/deny":
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
        await send({"type": "websocket.http.response.body", "body": b"not for you\r\n"})
        return
    if path == "/raise":
        raise RuntimeError("the app failed on purpose before accepting")
    offered = scope["subprotocols"]
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None,
                "headers": [(b"x-app", b"yes")]})
    if path == "/echo":
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                mark("%s-disconnect-%d" % (name, message["code"]))
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
    elif path == "/broadcast":
        own = (send, name)
        connections.add(own)
        try:
            await send({"type": "websocket.send", "text": "welcome %d" % os.getpid()})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                for other, _ in list(connections):
                    try:
                        await other({"type": "websocket.send", "text": message["text"]})
                    except OSError:
                        pass
        finally:
            connections.discard(own)
    elif path == "/close":
        await send({"type": "websocket.close", "code": int(query["code"]), "reason": query.get("reason", "")})
        message = await receive()
        mark("%s-disconnect-%d" % (name, message["code"]))
    elif path == "/hold":
        mark(name + "-open")
        message = await receive()
        mark("%s-disconnect-%d" % (name, message["code"]))
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except OSError:
            mark(name + "-send-raised")
    elif path == "/scope":
        shown = {key: scope[key] for key in ("type", "asgi", "http_version", "scheme", "path", "root_path",
                                              "client", "server", "subprotocols", "state")}
        shown["raw_path"] = scope["raw_path"].decode()
        shown["query_string"] = scope["query_string"].decode()
        shown["headers"] = [[k.decode(), v.decode()] for k, v in scope["headers"]]
        shown["pid"] = os.getpid()
        await send({"type": "websocket.send", "text": json.dumps(shown)})
        await send({"type": "websocket.close"})
"""
