"""Startup files for the fault suite (WSGI, standard library only).

Every app names the worker that answered in an `X-Pid` header, so that the
load generator (tests/integration/load.py) can count responses per worker.
"""

# Query parameters: sleep=SECONDS before answering; pidfile=PATH to write the
# worker's pid to before sleeping (the test learns which worker holds a
# request that never answers).
PID_SLEEP = """
import os, time
from urllib.parse import parse_qs

def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    pidfile = query.get("pidfile", [""])[0]
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(float(query.get("sleep", ["0"])[0]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("X-Pid", str(os.getpid()))])
    return [body]
"""

# Every request keeps 5 MiB more: bytearray(n) zero-fills its buffer, so the
# pages are touched and count in the worker's unique set size.
LEAK_STEP = 5 << 20
LEAK = f"""
import os

kept = []

def application(environ, start_response):
    kept.append(bytearray({LEAK_STEP}))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("X-Pid", str(os.getpid()))])
    return [body]
"""

# The new code of a failed deploy: it cannot be imported.
IMPORT_ERROR = """
import module_that_the_new_release_forgot

def application(environ, start_response):
    start_response("200 OK", [])
    return [b"unreachable"]
"""
