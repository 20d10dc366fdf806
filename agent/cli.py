"""agentctl: the operator's command-line tool.

Exit codes: 0 success; 1 the command failed (the message says why);
2 the command line is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import __version__
from agent.serve import ServeError, ServeOptions, find_module, render_config, serve

EXIT_FAILED = 1


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentctl", description="Control the agent app server.")
    parser.add_argument("--version", action="version", version=f"agentctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", help="serve one app through nginx and the agent, in the foreground",
        description="Write an nginx configuration that enables the agent for APP_DIR and run nginx "
                    "in the foreground. Ctrl-C stops nginx, the agent and every worker.")
    serve_parser.add_argument("app_dir", type=Path, metavar="APP_DIR",
                              help="the app root: holds the startup file, and public/ for static files")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve_parser.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    serve_parser.add_argument("--min-instances", type=positive, default=1, help="agent_min_instances (1)")
    serve_parser.add_argument("--max-instances", type=positive, default=0, help="agent_max_instances (0: no bound)")
    serve_parser.add_argument("--max-pool-size", type=positive, default=6, help="agent_max_pool_size (6)")
    serve_parser.add_argument("--startup-file", default="wsgi.py", help="agent_startup_file (wsgi.py)")
    serve_parser.add_argument("--python", default="/usr/bin/python3", help="agent_python, the app's interpreter")
    serve_parser.add_argument("--user", default="", help="agent_user: run workers as this user")
    serve_parser.add_argument("--env", type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                              help="agent_env, may be repeated")
    serve_parser.add_argument("--run-dir", type=Path, help="where the config, pid and sockets go "
                              "(/tmp/agent-serve-PORT)")
    serve_parser.add_argument("--module", type=Path, help="path to ngx_http_agent_module.so")
    serve_parser.add_argument("--nginx", default="nginx", help="the nginx binary (nginx)")
    serve_parser.add_argument("--print-config", action="store_true", help="print the nginx config and exit")
    return parser


def serve_options(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        app_dir=args.app_dir, host=args.host, port=args.port, min_instances=args.min_instances,
        max_instances=args.max_instances, max_pool_size=args.max_pool_size,
        startup_file=args.startup_file, python=args.python, user=args.user, env=dict(args.env),
        run_dir=args.run_dir, module=args.module, nginx=args.nginx)


def command_serve(args: argparse.Namespace) -> int:
    options = serve_options(args)
    if args.print_config:
        sys.stdout.write(render_config(options, find_module(options.module)))
        return 0
    return serve(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return command_serve(args)
    except ServeError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
