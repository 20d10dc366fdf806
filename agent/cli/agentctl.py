"""agentctl: the operator's command-line tool.

It reads and acts on a running agent through its status socket
(docs/status-api.md), and runs one app in the foreground (`serve`).
docs/agentctl.md describes every command.

Exit codes:
  0  success
  1  the command failed: the agent answered an error, or refused the action
  2  the command line is wrong
  3  no running agent found (or several, and no --instance to choose one)
  4  no rights: the agent refused the action (403)
  5  unknown app or pid (404)
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from agent import __version__
from agent.cli.serve import ServeError, find_module, render_config, serve
from agent.cli.serve_config import ServeConfigError, build_options, load
from agent.control.client import (
    EXIT_FAILED,
    EXIT_NO_AGENT,
    NotFoundError,
    StatusClient,
    StatusError,
    choose_instance,
    inspect_instance,
    running_instances,
)
from agent.instance import Instance
from agent.settings import SERVE_SETTINGS, Kind, Scope, Setting, check_value, render_directive_value

EXIT_OK = 0
EXIT_USAGE = 2
MB = 1024 * 1024
CLEAR_SCREEN = "\x1b[H\x1b[2J"
BLOCKING_RESTART_TIMEOUT = 3600.0

EXIT_CODES = "exit codes: 0 ok, 1 failed, 2 usage, 3 no running agent, 4 no rights, 5 unknown app or pid\n"
EXAMPLES = """\
examples:
  agentctl status                        every app and process of the running agent
  agentctl status --json | jq .pool      the same, as the status socket's JSON
  agentctl top --interval 1              the table, refreshed every second
  agentctl restart-app /srv/shop --blocking
  agentctl detach-process 2001
  agentctl --instance /run/agent-1a2b3c4d memory-stats
  agentctl serve ./shop --config agent.yaml --port 8000

""" + EXIT_CODES


# -- formatting ------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A short human duration: 45s, 3m 5s, 2h 4m, 3d 2h."""
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def percent(value: float | None) -> str:
    """CPU use; null until the agent has sampled the process twice."""
    return "-" if value is None else f"{value:.1f}"


def ago(when: float | None, now: float) -> str:
    return "never" if when is None else f"{duration(now - when)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns, each as wide as its widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def memory_of(process: dict[str, Any], kind: str) -> int | None:
    memory = process.get("memory") or {}
    value = memory.get(kind)
    return value if isinstance(value, int) else None


def format_server(server: dict[str, Any]) -> list[str]:
    return [
        f"Version : {server.get('version', '?')}",
        f"Instance: {server.get('instance_dir', '?')} (watchdog {server.get('watchdog_pid', '?')}, "
        f"core {server.get('pid', '?')}, up {duration(server.get('uptime'))})",
        f"Pool    : {server.get('processes', 0)} processes of at most {server.get('max_pool_size', '?')}, "
        f"{server.get('requests', 0)} requests, {server.get('queued', 0)} queued",
    ]


def threads(app: dict[str, Any]) -> str:
    """How many requests a process takes at once, when more than one."""
    if app.get("app_type") == "asgi":
        return f", {app.get('worker_concurrency')} requests at once per process"
    return f", {app.get('worker_concurrency')} threads per process" if app.get("concurrency_model") == "thread" else ""


def sessions(process: dict[str, Any]) -> str:
    """Requests in flight; out of how many at once when a worker takes more than one."""
    concurrency = process.get("concurrency", 1)
    return f"{process.get('sessions', 0)}/{concurrency}" if concurrency > 1 else str(process.get("sessions", 0))


def format_app(app: dict[str, Any], now: float) -> list[str]:
    processes = app.get("processes", [])
    bounds = f"min {app.get('min_instances', '?')}, max {app.get('max_instances') or 'no bound'}"
    lines = [
        f"{app['name']} ({app.get('app_type', 'wsgi')}{threads(app)})",
        f"  Queue: {app.get('queue_length', 0)}  Requests: {app.get('requests', 0)}  "
        f"Processes: {len(processes)} ({bounds})  Restarts: {app.get('restarts', 0)}  "
        f"Failed: {app.get('failed', 0)}",
    ]
    for preloader in app.get("preloaders", []):
        lines.append(f"  Preloader: pid {preloader.get('pid')}, {preloader.get('state', '?')}, "
                     f"{preloader.get('forks', 0)} forks, up {duration(preloader.get('uptime'))}, "
                     f"private {megabytes(memory_of(preloader, 'private'))} MB, "
                     f"PSS {megabytes(memory_of(preloader, 'pss'))} MB")
    error = app.get("last_spawn_error")
    if error:
        lines.append(f"  Last start failure: {error.get('summary', '?')} ({ago(error.get('at'), now)})")
    if not processes:
        return [*lines, "  (no processes)"]
    rows = [[str(p["pid"]), str(p.get("state", "?")), sessions(p), str(p.get("processed", 0)),
             duration(p.get("uptime")), percent(p.get("cpu_percent")), megabytes(memory_of(p, "private")),
             ago(p.get("last_used"), now)] for p in processes]
    headers = ["PID", "STATE", "SESSIONS", "PROCESSED", "UPTIME", "CPU%", "PRIVATE MB", "LAST USED"]
    return lines + table(headers, rows, indent="  ")


def format_status(server: dict[str, Any], pool: dict[str, Any], now: float) -> str:
    """The human status table, in the spirit of passenger-status."""
    lines = format_server(server)
    apps = pool.get("apps", [])
    if not apps:
        lines += ["", "No apps yet: nginx has not configured any location with agent_enabled."]
    for app in apps:
        lines += ["", *format_app(app, now)]
    return "\n".join(lines) + "\n"


def format_memory(pool: dict[str, Any]) -> str:
    """Per process memory, then the totals, in megabytes."""
    kinds = ("rss", "pss", "private", "swap")
    rows: list[list[str]] = []
    totals = dict.fromkeys(kinds, 0)
    count = 0
    for app in pool.get("apps", []):
        for process in app.get("processes", []):
            count += 1
            figures = [memory_of(process, kind) for kind in kinds]
            for kind, figure in zip(kinds, figures, strict=True):
                totals[kind] += figure or 0
            rows.append([app["name"], str(process["pid"]), *(megabytes(f) for f in figures)])
    if not rows:
        return "No worker processes.\n"
    rows.append([f"total ({count} processes)", "", *(megabytes(totals[k]) for k in kinds)])
    return "\n".join(table(["APP", "PID", "RSS MB", "PSS MB", "PRIVATE MB", "SWAP MB"], rows)) + "\n"


def format_requests(document: dict[str, Any]) -> str:
    """Requests in flight, oldest first."""
    requests = sorted(document.get("requests", []), key=lambda r: -float(r.get("age") or 0))
    if not requests:
        return "No requests in flight.\n"
    rows = [[str(r.get("app", "?")), str(r.get("method", "?")), str(r.get("path", "?")),
             "-" if r.get("pid") is None else str(r["pid"]), f"{float(r.get('age') or 0):.2f}s",
             str(r.get("state", "?"))] for r in requests]
    return "\n".join(table(["APP", "METHOD", "PATH", "PID", "AGE", "STATE"], rows)) + "\n"


# -- talking to the agent ---------------------------------------------------


def client_for(args: argparse.Namespace) -> StatusClient:
    root = choose_instance(args.instance)
    return StatusClient(Instance(root).status_socket, token=args.token)


def resolve_app(client: StatusClient, given: str) -> str:
    """An app's name, from its name or from any path that resolves to its
    root (`.`, a symlink, a trailing slash). An unknown app is a 404 like
    the agent's, with the names it does know."""
    apps = client.get("/pool").get("apps", [])
    names = [str(app["name"]) for app in apps]
    if given in names:
        return given
    target = Path(given).resolve()
    for app in apps:
        if Path(str(app.get("app_root", app["name"]))).resolve() == target:
            return str(app["name"])
    raise NotFoundError(f"unknown app {given!r}; the agent runs: {', '.join(names) or 'no apps'}")


def command_status(args: argparse.Namespace, out: TextIO) -> int:
    client = client_for(args)
    server, pool = client.get("/server"), client.get("/pool")
    if args.json:
        json.dump({"server": server, "pool": pool}, out, indent=2)
        out.write("\n")
    else:
        out.write(format_status(server, pool, time.time()))
    return EXIT_OK


def command_top(args: argparse.Namespace, out: TextIO) -> int:
    client = client_for(args)
    shown = 0
    try:
        while args.iterations is None or shown < args.iterations:
            if shown:
                time.sleep(args.interval)
            server, pool = client.get("/server"), client.get("/pool")
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{CLEAR_SCREEN}agentctl top - {stamp} - every {args.interval:g}s (Ctrl-C quits)\n\n")
            out.write(format_status(server, pool, time.time()))
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        out.write("\n")
    return EXIT_OK


def command_memory_stats(args: argparse.Namespace, out: TextIO) -> int:
    out.write(format_memory(client_for(args).get("/pool")))
    return EXIT_OK


def command_requests(args: argparse.Namespace, out: TextIO) -> int:
    out.write(format_requests(client_for(args).get("/requests")))
    return EXIT_OK


def command_restart_app(args: argparse.Namespace, out: TextIO) -> int:
    client = client_for(args)
    name = resolve_app(client, args.app)
    path = f"/apps/restart?app={quote(name, safe='')}" + ("&blocking=1" if args.blocking else "")
    answer = client.post(path, timeout=BLOCKING_RESTART_TIMEOUT if args.blocking else 30.0)
    done = "restarted" if args.blocking else "restart begun for"
    out.write(f"{done} {name}\n")
    return EXIT_OK if answer.get("ok", True) else EXIT_FAILED


def command_detach_process(args: argparse.Namespace, out: TextIO) -> int:
    client_for(args).post(f"/processes/{args.pid}/detach")
    out.write(f"detached {args.pid}: it finishes its requests, then stops\n")
    return EXIT_OK


def command_reopen_logs(args: argparse.Namespace, out: TextIO) -> int:
    client_for(args).post("/logs/reopen")
    out.write("the agent's log file was reopened\n")
    return EXIT_OK


def command_list_instances(args: argparse.Namespace, out: TextIO) -> int:
    found = [inspect_instance(args.instance)] if args.instance else running_instances()
    found = [info for info in found if info.running]
    if not found:
        print("agentctl: no running agent found", file=sys.stderr)
        return EXIT_NO_AGENT
    rows = [[str(info.root), str(info.watchdog_pid or "?"), apps_count(info.status_socket, args.token)]
            for info in found]
    out.write("\n".join(table(["INSTANCE", "WATCHDOG", "APPS"], rows)) + "\n")
    return EXIT_OK


def apps_count(status_socket: Path, token: str | None) -> str:
    """How many apps the agent runs; `?` when it does not answer, which a
    listing should show rather than stop at."""
    try:
        return str(StatusClient(status_socket, token).get("/server", timeout=5.0).get("apps", "?"))
    except StatusError:
        return "?"


def command_serve(args: argparse.Namespace, out: TextIO) -> int:
    settings = load(args.config) if args.config else None
    overrides = {setting.name: getattr(args, setting.name) for setting in SERVE_SETTINGS}
    overrides["env"] = dict(args.env) if args.env else None
    options = build_options(args.app_dir, settings, overrides)
    options.run_dir, options.module, options.nginx = args.run_dir, args.module, args.nginx
    if args.print_config:
        out.write(render_config(options, find_module(options.module)))
        return EXIT_OK
    return serve(options)


# -- the command line --------------------------------------------------------


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def setting_value(setting: Setting) -> Callable[[str], Any]:
    """argparse's type for a setting's flag: the value checked against the
    setting's row, as a YAML value is."""
    def convert(text: str) -> Any:
        value: Any = text
        if setting.kind in (Kind.NUM, Kind.SIZE_MB):
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
        try:
            return check_value(setting, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_setting_flag(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """--NAME for a row of agent.settings; its help names the directive."""
    shown = "none" if setting.default in (None, "", {}) else render_directive_value(setting, setting.default)
    what = setting.directive if setting.scope is not Scope.SERVE else setting.name
    help_text = f"{what}: {setting.help} ({shown})"
    if setting.kind is Kind.ENV:
        parser.add_argument(setting.flag, type=env_pair, action="append", default=[], metavar="NAME=VALUE",
                            help=f"{help_text}; may be repeated")
        return
    metavar = {Kind.FLAG: "on|off", Kind.MSEC: "TIME", Kind.NUM: "N", Kind.SIZE_MB: "MB", Kind.SIZE: "SIZE",
               Kind.BUFS: "'N SIZE'"}.get(setting.kind)
    parser.add_argument(setting.flag, type=setting_value(setting), metavar=metavar, help=help_text)


def positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def more_than_zero(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def instance_options(suppress: bool) -> argparse.ArgumentParser:
    """--instance and --token, accepted before or after the command. After
    it, their default is SUPPRESS, so that an absent flag does not undo one
    given before."""
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--instance", type=Path, metavar="DIR", default=default,
                        help="the agent's instance directory (default: $AGENT_INSTANCE_DIR, else the one "
                             "running agent)")
    parser.add_argument("--token", default=default,
                        help="a read or admin token (INSTANCE_DIR/*.token) to send as a Bearer token")
    return parser


def add_agent_command(commands: Any, name: str, handler: Callable[[argparse.Namespace, TextIO], int],
                      summary: str, description: str, examples: Sequence[str],
                      talks_to_agent: bool = True) -> argparse.ArgumentParser:
    parents = [instance_options(suppress=True)] if talks_to_agent else []
    epilog = "examples:\n" + "".join(f"  {line}\n" for line in examples) + "\n" + EXIT_CODES
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=textwrap.fill(description, 79), epilog=epilog, parents=parents,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def add_status_commands(commands: Any) -> None:
    status = add_agent_command(
        commands, "status", command_status, "every app and process, with counts",
        "Show every app of the agent and each of its processes: state, requests in flight, requests "
        "processed, uptime, CPU, private memory and last use.",
        ["agentctl status", "agentctl status --json", "agentctl --instance /run/agent-1a2b3c4d status"])
    status.add_argument("--json", action="store_true", help="print the status socket's /server and /pool as JSON")
    top = add_agent_command(
        commands, "top", command_top, "the status table, refreshed live",
        "Show the status table and refresh it every --interval seconds until Ctrl-C.",
        ["agentctl top", "agentctl top --interval 0.5"])
    top.add_argument("--interval", type=more_than_zero, default=2.0, help="seconds between refreshes (2)")
    top.add_argument("--iterations", type=positive, help="stop after this many refreshes (default: until Ctrl-C)")
    add_agent_command(
        commands, "memory-stats", command_memory_stats, "memory of every worker process",
        "Show each worker's RSS, PSS, private memory (USS + swap, the figure agent_memory_limit is checked "
        "against) and swap, in megabytes, and the totals.",
        ["agentctl memory-stats"])
    add_agent_command(
        commands, "requests", command_requests, "the requests in flight",
        "Show every request the agent is forwarding or holding in a queue: app, method, path, the worker "
        "serving it (- while queued) and its age, oldest first.",
        ["agentctl requests"])


def add_action_commands(commands: Any) -> None:
    restart = add_agent_command(
        commands, "restart-app", command_restart_app, "rolling restart of one app",
        "Replace every worker of APP one by one; requests keep being served.",
        ["agentctl restart-app /srv/shop", "cd /srv/shop && agentctl restart-app . --blocking"])
    restart.add_argument("app", metavar="APP", help="the app's name (its root), or a path that resolves to it")
    restart.add_argument("--blocking", action="store_true", help="return once the restart is done")
    detach = add_agent_command(
        commands, "detach-process", command_detach_process, "retire one worker",
        "The worker gets no new requests, finishes those it has, and stops; the pool replaces it as its "
        "bounds say.",
        ["agentctl detach-process 2001"])
    detach.add_argument("pid", metavar="PID", type=int, help="the worker's pid (see agentctl status)")
    add_agent_command(
        commands, "reopen-logs", command_reopen_logs, "reopen the agent's log file",
        "Close and reopen the agent's log file, after logrotate has moved it.",
        ["mv agent.log agent.log.1 && agentctl reopen-logs"])
    add_agent_command(
        commands, "list-instances", command_list_instances, "the running agents",
        "List every running agent: its instance directory, watchdog pid and number of apps.",
        ["agentctl list-instances", "agentctl --instance /run/agent-1a2b3c4d list-instances"])


def add_serve_command(commands: Any) -> None:
    serve_parser = add_agent_command(
        commands, "serve", command_serve, "serve one app through nginx and the agent, in the foreground",
        "Write an nginx configuration that enables the agent for APP_DIR and run nginx in the foreground. "
        "Ctrl-C stops nginx, the agent and every worker. Settings come from the defaults, then --config, "
        "then the flags given.",
        ["agentctl serve ./shop", "agentctl serve ./shop --config agent.yaml --port 8000",
         "agentctl serve ./shop --print-config"], talks_to_agent=False)
    add = serve_parser.add_argument
    add("app_dir", type=Path, metavar="APP_DIR",
        help="the app root: holds the startup file, and public/ for static files")
    add("--config", type=Path, metavar="FILE", help="YAML settings: directives without the agent_ prefix")
    for setting in SERVE_SETTINGS:
        add_setting_flag(serve_parser, setting)
    add("--run-dir", type=Path, help="where the config, pid and sockets go "
        "(/run/agent-serve-PORT as root, else a new /tmp/agent-serve-PORT-*)")
    add("--module", type=Path, help="path to ngx_http_agent_module.so")
    add("--nginx", default="nginx", help="the nginx binary (nginx)")
    add("--print-config", action="store_true", help="print the nginx config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentctl", description="Control the agent app server.",
                                     epilog=EXAMPLES, parents=[instance_options(suppress=False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"agentctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_status_commands(commands)
    add_action_commands(commands)
    add_serve_command(commands)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, out or sys.stdout))
    except StatusError as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return e.exit_code
    except (ServeError, ServeConfigError) as e:
        print(f"agentctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `agentctl status | head`: the reader has what it wanted.
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
