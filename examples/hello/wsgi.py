"""The smallest app: says hello, and shows which worker answered."""

import os


def application(environ, start_response):
    body = f"Hello from worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
