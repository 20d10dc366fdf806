"""Startup files for the ASGI integration tests (standard library only).

Files named by the tests live in the app root (the worker's cwd: written by
the test, read by the app) or in the stack's scratch directory (written by
the app, which finds it two levels above its root: tests/integration/stack.py)."""

# Lifespan: startup puts the worker's pid into the state; shutdown writes
# scratch/shutdown-<pid>. Routes:
#   /json...     the scope as JSON, and the worker's pid
#   /echo        the body's length, sha256 and largest http.request chunk
#   /stream      "first\n", then "second\n" once the file named by the query exists
#   /gather?N    waits until N requests are inside the app, then answers its pid
#   /hold?NAME   writes scratch/NAME, waits for the file "release", answers its pid
#   /disconnect?NAME  writes scratch/NAME-began, waits for http.disconnect, writes scratch/NAME-gone
#   /raise       raises before the response starts
#   /cut         raises after the response started (7 bytes of the 100 it announced)
APP = """
import asyncio
import hashlib
import json
import os

SCRATCH = os.path.join(os.path.dirname(os.path.dirname(os.getcwd())), "scratch")
gathering = {"count": 0, "event": None}


def mark(name):
    with open(os.path.join(SCRATCH, name), "w") as f:
        f.write(str(os.getpid()))


async def wait_for_file(name, limit=60.0):
    waited = 0.0
    while not os.path.exists(name) and waited < limit:
        await asyncio.sleep(0.01)
        waited += 0.01


async def lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["started_by"] = os.getpid()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            mark("shutdown-%d" % os.getpid())
            await send({"type": "lifespan.shutdown.complete"})
            return


async def answer(send, body, status=200, content_type=b"text/plain"):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(scope, receive, send)
    assert scope["type"] == "http", scope["type"]
    path = scope["path"]
    query = scope["query_string"].decode()
    if path.startswith("/json"):
        shown = {key: scope[key] for key in ("type", "asgi", "http_version", "method", "scheme", "path",
                                              "query_string", "root_path", "raw_path", "client", "server", "state")}
        shown["query_string"] = scope["query_string"].decode()
        shown["raw_path"] = scope["raw_path"].decode()
        shown["headers"] = [[k.decode(), v.decode()] for k, v in scope["headers"]]
        shown["pid"] = os.getpid()
        await answer(send, json.dumps(shown).encode(), content_type=b"application/json")
    elif path == "/echo":
        digest, size, largest = hashlib.sha256(), 0, 0
        while True:
            message = await receive()
            assert message["type"] == "http.request", message
            digest.update(message["body"])
            size += len(message["body"])
            largest = max(largest, len(message["body"]))
            if not message.get("more_body"):
                break
        await answer(send, ("%d %s %d" % (size, digest.hexdigest(), largest)).encode())
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first\\n", "more_body": True})
        await wait_for_file(query)
        await send({"type": "http.response.body", "body": b"second\\n"})
    elif path == "/gather":
        if gathering["event"] is None:
            gathering["event"] = asyncio.Event()
        gathering["count"] += 1
        if gathering["count"] == int(query):
            gathering["event"].set()
        await asyncio.wait_for(gathering["event"].wait(), 60)
        await answer(send, str(os.getpid()).encode())
    elif path == "/hold":
        mark(query)
        await wait_for_file("release")
        await answer(send, str(os.getpid()).encode())
    elif path == "/disconnect":
        assert (await receive())["type"] == "http.request"
        mark(query + "-began")
        message = await receive()
        mark(query + "-" + message["type"])
    elif path == "/raise":
        raise RuntimeError("the app failed on purpose")
    elif path == "/cut":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("the app failed on purpose, midway")
    else:
        await answer(send, b"not found", status=404)
"""

# Its lifespan startup fails: the app cannot start.
FAILING_STARTUP = """
async def application(scope, receive, send):
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": "the database is not there"})
"""

# Raises in its startup code, after it took lifespan.startup.
RAISING_STARTUP = """
async def application(scope, receive, send):
    await receive()
    raise RuntimeError("startup went wrong on purpose")
"""

# No lifespan support: raises on any scope but http (as Django's handler
# does), and is served all the same.
NO_LIFESPAN = """
import os

async def application(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("only http, not " + scope["type"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"no lifespan, pid %d" % os.getpid()})
"""
