"""`python -m agent watchdog|core ...`: the agent's own processes.

nginx starts the watchdog (docs/protocol.md §4); the watchdog starts the
core. Operators use `agentctl` (agent/cli/agentctl.py) instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import logs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent")
    roles = parser.add_subparsers(dest="role", required=True)
    watchdog = roles.add_parser("watchdog", help="own the sockets and keep a core running")
    watchdog.add_argument("--instance-dir", type=Path, required=True)
    watchdog.add_argument("--nginx-fd", type=int, help="end of file here means nginx has stopped")
    watchdog.add_argument("--ready-fd", type=int, help="'ok' or 'error: ...' is written here")
    watchdog.add_argument("--log-file")
    watchdog.add_argument("--socket-owner", help="UID:GID of nginx's workers")
    core = roles.add_parser("core", help="the engine and the pool policy")
    core.add_argument("--instance-dir", type=Path, required=True)
    core.add_argument("--listen-fd", type=int, required=True)
    core.add_argument("--status-fd", type=int, help="the status socket, listening")
    core.add_argument("--log-file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup(args.role, args.log_file)
    if args.role == "watchdog":
        from agent import watchdog

        return watchdog.run(args.instance_dir, args.nginx_fd, args.ready_fd, args.log_file, args.socket_owner)
    from agent.core import main as core

    return core.run(args.instance_dir, args.listen_fd, args.status_fd)


if __name__ == "__main__":
    sys.exit(main())
