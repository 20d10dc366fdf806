"""The agent's status published through nginx behind a token, as
examples/multi-host and examples/prometheus do: `agent_status on;` in a
location guarded by HTTP basic auth whose password is the token.

Basic rather than Bearer: nginx passes a Bearer header on to the status
socket, which accepts only the agent's own tokens (docs/status-api.md); a
Basic header stays with nginx.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

USER = "prometheus"


def new_token() -> str:
    return secrets.token_hex(16)


def write_htpasswd(path: Path, token: str, user: str = USER) -> Path:
    """One user with the token as password, salted SHA-1 ({SSHA}, a scheme
    nginx's auth_basic reads); readable by nginx's workers."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(token.encode() + salt).digest()
    path.write_text(f"{user}:{{SSHA}}{base64.b64encode(digest + salt).decode()}\n")
    os.chmod(path, 0o644)
    return path


def status_location(htpasswd: Path, prefix: str = "/agent/") -> str:
    return f"""        location {prefix} {{
            auth_basic "agent status";
            auth_basic_user_file {htpasswd};
            agent_status on;
        }}
"""


def basic_auth(token: str, user: str = USER) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}
