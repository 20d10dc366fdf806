"""Local users for the attack tests: an unprivileged local user who is
neither nginx's worker user nor any app's, and a way to run code as one."""

from __future__ import annotations

import pwd
import subprocess
from collections.abc import Sequence

ATTACKER = "agent-attacker"


def ensure_user(name: str) -> pwd.struct_passwd:
    """The user, made (a system user without a home or login) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        return pwd.getpwnam(name)


def run_as(name: str, argv: Sequence[str], timeout: float = 30.0,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """argv as the user `name` (uid, primary group, no supplementary groups)."""
    entry = ensure_user(name)
    return subprocess.run(list(argv), user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=timeout, input=input_text, cwd="/")
