"""A Flask app that waits on the network, served by threaded workers.

Each request of /api/quote waits for a slow upstream (here a sleep that
stands for a database or an HTTP call), which is what threads are for: one
worker with agent_thread_count 8 waits on eight at once. /events streams
server-sent events, for a location with agent_long_responses on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request, stream_with_context

application = Flask(__name__)

# Requests that meet here wait for each other: /together?n=N answers only
# once N requests are in the worker at the same time.
_meetings: dict[int, threading.Barrier] = {}
_meetings_lock = threading.Lock()
_leak: list[bytearray] = []


def upstream_wait() -> float:
    return float(request.args.get("wait", "0.01"))


@application.after_request
def name_the_worker(response: Response) -> Response:
    response.headers["X-Pid"] = str(os.getpid())
    return response


@application.get("/")
def index() -> str:
    return "Hello from Flask\n"


@application.get("/api/quote")
def quote() -> Response:
    time.sleep(upstream_wait())
    return jsonify(pid=os.getpid(), thread=threading.current_thread().name,
                   multithread=request.environ["wsgi.multithread"])


@application.get("/together")
def together() -> Response:
    parties = int(request.args["n"])
    with _meetings_lock:
        barrier = _meetings.setdefault(parties, threading.Barrier(parties))
    barrier.wait(timeout=30)
    return jsonify(pid=os.getpid(), thread=threading.current_thread().name)


@application.get("/grow")
def grow() -> str:
    """Keeps 20 MB more for the worker's life: a leak, for the memory limit."""
    _leak.append(bytearray(20 * 1024 * 1024))
    return f"{os.getpid()}\n"



@application.get("/events")
def events() -> Response:
    count = int(request.args.get("count", "5"))
    interval = float(request.args.get("interval", "0.2"))

    def stream() -> Iterator[str]:
        for n in range(count):
            yield f"id: {n}\ndata: {{\"n\": {n}, \"pid\": {os.getpid()}}}\n\n"
            time.sleep(interval)
        yield "event: end\ndata: bye\n\n"

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})
