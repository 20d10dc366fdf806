"""Counts visits twice: in a module-level variable and in Redis.

Each worker process has its own copy of VISITS, so the process-local count
is one worker's share of the traffic and is lost when the worker is
replaced. The Redis count is one number every worker increments atomically
(INCR), so it is exact whichever worker answers and survives every restart.

Needs the `redis` client in the app's interpreter (its virtualenv) and
REDIS_URL in its environment, e.g. `unix:///run/redis/redis.sock` or
`redis://10.0.0.5:6379/0` (`agent_env REDIS_URL ...;`).
"""

import json
import os

import redis

KEY = os.environ.get("VISITS_KEY", "visits")
VISITS = 0          # this process's count: invisible to every other worker
_client = None      # made on first use, in the worker that uses it


def client():
    """One connection pool per process, made after the fork: a connection
    opened at import would be shared by every worker forked from a
    preloader (smart spawning), and their replies would interleave."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    return _client


def application(environ, start_response):
    global VISITS
    VISITS += 1
    shared = client().incr(KEY)
    body = json.dumps({"pid": os.getpid(), "local": VISITS, "redis": shared}).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                              ("Cache-Control", "no-store")])
    return [body]
