"""What the benchmark changes in the nginx configuration `agentctl serve`
writes, so that our stack runs with the same nginx settings as the peers.

serve writes its own nginx.conf (one worker process, the module's buffer
defaults). The benchmark gives serve, as its --nginx, a script written by
bench/stacks.py that calls main() here: it writes nginx-bench.conf beside
the configuration serve passed with -c, with these changes, and executes the
real nginx on it with the same arguments. serve runs unchanged otherwise
(its run directory, its signals, its wait for the agent to exit), and no
process is added to the stack: the script replaces itself with nginx.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

EDITED_NAME = "nginx-bench.conf"
BUFFER_DIRECTIVES = ("agent_buffer_size", "agent_buffers", "agent_busy_buffers_size")


class ShimError(Exception):
    """The configuration is not the shape this module knows how to edit."""


def edit(text: str, worker_processes: int, location_lines: list[str]) -> str:
    """serve's configuration with worker_processes set, and location_lines
    (the agent_* buffer directives) added to the app's location after
    agent_app_root. Buffer directives serve wrote itself are dropped first
    when lines are added, so that none is given twice."""
    text, count = re.subn(r"^worker_processes\s+[^;]*;", f"worker_processes {worker_processes};", text,
                          flags=re.MULTILINE)
    if count != 1:
        raise ShimError(f"expected one worker_processes directive in serve's configuration, found {count}")
    if not location_lines:
        return text
    names = "|".join(BUFFER_DIRECTIVES)
    text = re.sub(rf"^[ \t]*(?:{names})[ \t][^;]*;[ \t]*\n", "", text, flags=re.MULTILINE)
    anchors = list(re.finditer(r"^([ \t]*)agent_app_root\s[^;]*;[ \t]*\n", text, flags=re.MULTILINE))
    if len(anchors) != 1:
        raise ShimError(f"expected one agent_app_root directive in serve's configuration, found {len(anchors)}")
    anchor = anchors[0]
    added = "".join(f"{anchor.group(1)}{line}\n" for line in location_lines)
    return text[:anchor.end()] + added + text[anchor.end():]


def edited_arguments(arguments: list[str], worker_processes: int, location_lines: list[str]) -> list[str]:
    """nginx's arguments with -c naming the edited copy, which is written."""
    try:
        index = arguments.index("-c") + 1
        config = Path(arguments[index])
    except (ValueError, IndexError):
        raise ShimError(f"no -c CONFIG among nginx's arguments {arguments}") from None
    edited = config.with_name(EDITED_NAME)
    edited.write_text(edit(config.read_text(), worker_processes, location_lines))
    return [*arguments[:index], str(edited), *arguments[index + 1:]]


def main(nginx: str, worker_processes: int, location_lines: list[str], arguments: list[str]) -> int:
    try:
        arguments = edited_arguments(arguments, worker_processes, location_lines)
    except (ShimError, OSError) as e:
        print(f"bench nginx shim: {e}", file=sys.stderr)
        return 1
    os.execv(nginx, [nginx, *arguments])


def script(python: str, nginx: str, worker_processes: int, location_lines: list[str]) -> str:
    """The executable serve is given as --nginx."""
    bench = str(Path(__file__).resolve().parent)
    return (f"#!{python}\n"
            "import sys\n"
            f"sys.path.insert(0, {bench!r})\n"
            "import nginx_shim\n"
            f"sys.exit(nginx_shim.main({nginx!r}, {worker_processes!r}, {location_lines!r}, sys.argv[1:]))\n")
