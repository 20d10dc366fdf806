"""The engine's pure wire parsers (csrc/wire.h), tested in C.

tests/native/test_parsers.c holds the checks; this file compiles it against
the parser sources with ASan and UBSan, warnings as errors, and runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
PARSER_SOURCES = [CSRC / "frame.c", CSRC / "records.c", CSRC / "http_head.c"]
TEST_SOURCE = ROOT / "tests" / "native" / "test_parsers.c"
WARNINGS = ["-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wpointer-arith"]
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
CFLAGS = ["-std=gnu11", "-g", "-O1", *WARNINGS, *SANITIZERS]


def _clean_env() -> dict[str, str]:
    """`make sanitize` preloads the sanitizer runtimes into the suite; the
    compiler and the test program get their own, so none is inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    # The parsers allocate nothing, and LeakSanitizer needs ptrace, which
    # some containers refuse.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def test_parsers_in_c(tmp_path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler (cc) found: `make deps` installs build-essential")
    program = tmp_path / "test_parsers"
    env = _clean_env()
    build = subprocess.run(
        [cc, *CFLAGS, f"-I{CSRC}", str(TEST_SOURCE), *map(str, PARSER_SOURCES), "-o", str(program)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert build.returncode == 0, f"compiling {TEST_SOURCE.name} failed:\n{build.stderr}"
    run = subprocess.run([str(program)], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, f"{TEST_SOURCE.name} failed:\n{run.stdout}{run.stderr}"
    assert "all parser checks passed" in run.stdout
