"""The page the engine answers with while an app cannot start.

Every client sees it, so by default it says only that the app could not be
started: a traceback names files, modules and sometimes secrets. With
agent_friendly_error_pages on (Passenger's passenger_friendly_error_pages)
it shows the error and the traceback too. The log always has them.
"""

from __future__ import annotations

import html

STYLE = "body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em;overflow:auto}"


def startup_error_response(app: str, summary: str, details: str, friendly: bool = False) -> bytes:
    """A complete HTTP 500 response (docs/protocol.md §1): the error named
    only when friendly."""
    body = detailed_body(app, summary, details) if friendly else generic_body()
    head = (
        "HTTP/1.1 500 Internal Server Error\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body


def generic_body() -> bytes:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Web application could not be started</title>
<style>{STYLE}</style>
</head><body>
<h1>Web application could not be started</h1>
<p>The web application could not be started. The server's log has the details.</p>
</body></html>
""".encode()


def detailed_body(app: str, summary: str, details: str) -> bytes:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Web application could not be started</title>
<style>{STYLE}</style>
</head><body>
<h1>Web application could not be started</h1>
<p>The app <code>{html.escape(app)}</code> failed to start:</p>
<p><strong>{html.escape(summary)}</strong></p>
<pre>{html.escape(details)}</pre>
<p>The agent retries the start on later requests; the agent's log holds the same details.</p>
</body></html>
""".encode()
