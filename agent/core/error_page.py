"""The page the engine answers with while an app cannot start."""

from __future__ import annotations

import html


def startup_error_response(app: str, summary: str, details: str) -> bytes:
    """A complete HTTP 500 response naming the error (docs/protocol.md §1)."""
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Web application could not be started</title>
<style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>
</head><body>
<h1>Web application could not be started</h1>
<p>The app <code>{html.escape(app)}</code> failed to start:</p>
<p><strong>{html.escape(summary)}</strong></p>
<pre>{html.escape(details)}</pre>
<p>The agent retries the start on later requests; the agent's log holds the same details.</p>
</body></html>
""".encode()
    head = (
        "HTTP/1.1 500 Internal Server Error\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + body
