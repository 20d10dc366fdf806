"""An app whose sessions live in Redis, so that any host may serve any visit.

GET / starts a session (a random id in a cookie) or continues one, counts
the session's views in Redis, and answers which host and worker served it.
A session kept in a worker's memory would be lost whenever the load
balancer sends the next visit to another host, or another worker.

Environment: REDIS_URL (e.g. redis://10.0.0.5:6379/0), HOST_NAME.
"""

import json
import os
import secrets
from http.cookies import SimpleCookie

import redis

HOST = os.environ.get("HOST_NAME", "?")
SESSION_TTL = 3600
_client = None


def client():
    """Made in the worker on first use, never at import (smart spawning
    would share one connection between forked workers)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    return _client


def session_id(environ):
    cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
    sid = cookie["sid"].value if "sid" in cookie else ""
    return sid if len(sid) == 32 and sid.isalnum() else ""


def application(environ, start_response):
    sid = session_id(environ) or secrets.token_hex(16)
    key = "session:" + sid
    pipe = client().pipeline()
    pipe.hincrby(key, "views", 1)
    pipe.hsetnx(key, "first_host", HOST)
    pipe.expire(key, SESSION_TTL)
    views, _, _ = pipe.execute()
    first_host = client().hget(key, "first_host").decode()
    body = json.dumps({"host": HOST, "pid": os.getpid(), "session": sid, "views": views,
                       "first_host": first_host}).encode() + b"\n"
    start_response("200 OK", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Set-Cookie", f"sid={sid}; Path=/; HttpOnly; SameSite=Lax"), ("Cache-Control", "no-store"),
    ])
    return [body]
