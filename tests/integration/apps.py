"""Startup files for the integration tests' apps (WSGI, standard library only)."""

HELLO = """
import os

def application(environ, start_response):
    body = b"hello from %d" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

# Answers with what the worker sees: pid, uid, cwd, an env variable, the path.
INTROSPECT = """
import json, os

def application(environ, start_response):
    body = json.dumps({
        "pid": os.getpid(),
        "uid": os.getuid(),
        "cwd": os.getcwd(),
        "color": os.environ.get("COLOR"),
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "method": environ["REQUEST_METHOD"],
        "header": environ.get("HTTP_X_TEST"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""

# Streams the request body back and reports its sha256 in a trailer-like last line.
ECHO_SHA = """
import hashlib

def application(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    received = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            break
        digest.update(chunk)
        received += len(chunk)
    body = ("%d %s" % (received, digest.hexdigest())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Content-Length", str(length))])
    return [body]
"""

# Spools the body to a temporary file, then sends it back through
# wsgi.file_wrapper. (nginx sends the whole request before it reads the
# response, so an app cannot echo while it reads.)
ECHO = """
import shutil, tempfile

def application(environ, start_response):
    spool = tempfile.TemporaryFile()
    shutil.copyfileobj(environ["wsgi.input"], spool, 65536)
    size = spool.tell()
    spool.seek(0)
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
    return environ["wsgi.file_wrapper"](spool, 65536)
"""

# Sends one chunk, then waits for a file to appear before sending the next:
# the test creates the file only after it has read the first chunk.
STREAM = """
import os, time

def application(environ, start_response):
    gate = environ["QUERY_STRING"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Accel-Buffering", "no")])
    def chunks():
        yield b"first\\n"
        deadline = time.time() + 20
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.01)
        yield b"second\\n" if os.path.exists(gate) else b"gate never opened\\n"
    return chunks()
"""

RAISES = """
def application(environ, start_response):
    raise RuntimeError("the app failed on purpose")
"""

IMPORT_ERROR = """
import module_that_does_not_exist_here

def application(environ, start_response):
    start_response("200 OK", [])
    return [b"unreachable"]
"""

# Sleeps for the number of seconds in the query string, then names its pid.
# "SECONDS:PATH" first creates the file PATH, to show the request has begun.
SLOW = """
import os, time

def application(environ, start_response):
    seconds, _, marker = environ["QUERY_STRING"].partition(":")
    if marker:
        open(marker, "w").close()
    time.sleep(float(seconds or 0))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""
