"""The fast path's trust boundaries, attacked on the real stack.

nginx's workers and the engine share <instance>/fastpath.table and nginx's
workers wake each other through datagram sockets in <instance>/wake/
(docs/protocol.md §5). Neither may be reachable by app code (which runs as
the app's user) nor by another local user: whoever could write the table
could claim workers, fake counters or park requests; whoever could reach a
wake socket could make nginx's workers spin. The engine's handling of a
table nginx's side filled with garbage is tested against the real engine in
tests/unit/core/test_fastpath.py.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import stat

from tests.integration.stack import NGINX_USER, AppSpec, Stack, running_stack, wait_until
from tests.integration.users import ATTACKER, run_as

# Tries everything the boundary forbids and reports each outcome: "ok" or
# "errno N". Run inside a worker (as the app) and as a local user.
PROBE = r'''
import errno, json, os, socket

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as e:
        return "errno %d" % e.errno

def probe(instance):
    table = os.path.join(instance, "fastpath.table")
    wake = os.path.join(instance, "wake")
    found = {
        "table read": attempt(lambda: os.close(os.open(table, os.O_RDONLY))),
        "table write": attempt(lambda: os.close(os.open(table, os.O_RDWR))),
        "wake list": attempt(lambda: os.listdir(wake)),
    }
    for name in sorted(os.listdir("/proc")):
        if name.isdigit():
            path = os.path.join(wake, name)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                found["wake " + name] = attempt(lambda: s.sendto(b"w", path))
            finally:
                s.close()
    return found
'''

PROBE_APP = PROBE + r'''
def application(environ, start_response):
    instance = environ["QUERY_STRING"]
    body = json.dumps(probe(instance)).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
'''

PROBER = AppSpec("prober", PROBE_APP, "/")


def nginx_workers_waking(stack: Stack) -> list[int]:
    return [pid for pid in stack.nginx_worker_pids() if (stack.instance / "wake" / str(pid)).exists()]


def assert_refused(found: dict[str, str], stack: Stack) -> None:
    denied = f"errno {errno.EACCES}"
    assert found["table read"] == denied, found
    assert found["table write"] == denied, found
    assert found["wake list"] == denied, found
    # Every nginx worker's wake socket was tried, and none took a byte.
    tried = [key for key in found if key.startswith("wake ") and key != "wake list"]
    for pid in nginx_workers_waking(stack):
        assert f"wake {pid}" in tried
    assert all(found[key] != "ok" for key in tried), found


def test_the_table_and_wake_sockets_belong_to_nginx_workers_only() -> None:
    with running_stack([PROBER], nginx_workers=2) as stack:
        assert stack.get(f"/?{stack.instance}").status == 200
        nginx = pwd.getpwnam(NGINX_USER)
        info = os.lstat(stack.instance / "fastpath.table")
        assert stat.S_ISREG(info.st_mode) and info.st_nlink == 1
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nginx.pw_uid, 0o600)
        info = os.lstat(stack.instance / "wake")
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nginx.pw_uid, 0o700)
        wait_until(lambda: len(nginx_workers_waking(stack)) == 2, what="both nginx workers' wake sockets")


def test_app_code_cannot_open_the_table_nor_wake_nginx_workers() -> None:
    with running_stack([PROBER], nginx_workers=2) as stack:
        wait_until(lambda: len(nginx_workers_waking(stack)) == 2, what="both nginx workers' wake sockets")
        response = stack.get(f"/?{stack.instance}")
        assert response.status == 200, response
        assert_refused(json.loads(response.body), stack)
        assert stack.get(f"/?{stack.instance}").status == 200


def test_a_local_user_cannot_open_the_table_nor_wake_nginx_workers() -> None:
    with running_stack([PROBER], nginx_workers=2) as stack:
        wait_until(lambda: len(nginx_workers_waking(stack)) == 2, what="both nginx workers' wake sockets")
        script = PROBE + f"\nprint(json.dumps(probe({str(stack.instance)!r})))\n"
        attack = run_as(ATTACKER, ["/usr/bin/python3", "-c", script])
        assert attack.returncode == 0, attack.stderr
        assert_refused(json.loads(attack.stdout), stack)
        assert stack.get(f"/?{stack.instance}").status == 200
