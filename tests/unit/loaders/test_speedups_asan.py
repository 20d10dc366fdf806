"""The loader's C speedups (csrc/loader_speedups.c) under ASan and UBSan.

The copy the workers load is built without the sanitizers (they run without
their runtimes), so this test builds its own instrumented copy and drives it
in a Python process that preloads them, against the loader's Python code:
frames truncated at every byte, random bytes, random heads. Any out-of-bounds
access, leak-free misuse or undefined behaviour aborts that process; any
difference from the Python code fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "csrc" / "loader_speedups.c"
LOADERS = ROOT / "agent" / "loaders"
CFLAGS = ["-std=gnu11", "-g", "-O1", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
          "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

# Runs in the instrumented process: the loader imported as a script module,
# so that it picks up the instrumented speedups first on sys.path.
DRIVER = r"""
import random, struct, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import _agent_loader_speedups as c
assert c.__file__.startswith(sys.argv[1]), c.__file__
import wsgi_loader as loader

BASE = {"wsgi.version": (1, 0)}
rng = random.Random(1)

def pair(key, value):
    return struct.pack(">I", len(key)) + key + struct.pack(">I", len(value)) + value

def outcome(call, *args):
    try:
        return call(*args)
    except (loader.MalformedFrame, TypeError, ValueError):
        return None

def check_vars(data):
    buffer = bytes(4) + data
    for end in range(4, len(buffer) + 1):
        py = outcome(loader.py_environ_from_vars, buffer, end, BASE)
        assert outcome(loader.c_environ_from_vars, buffer, end, BASE) == py, (buffer, end)
        assert outcome(loader.c_environ_from_vars, bytearray(buffer), end, BASE) == py

frame = b"".join([pair(b"REQUEST_METHOD", b"GET"), pair(b"HTTP_COOKIE", b"a=1"), pair(b"HTTP_COOKIE", b"b=2"),
                  pair(b"PATH_INFO", bytes(range(256))), pair(b"X", b"")])
check_vars(frame)
check_vars(pair(b"", b"v"))
check_vars(struct.pack(">I", 0xFFFFFFFF) + b"K" * 8)
check_vars(pair(b"K", b"v")[:5] + struct.pack(">I", 0xFFFFFFF0))
for _ in range(3000):
    check_vars(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))

texts = ["200 OK", "204", "20", "", "2000", "\u00b200 OK", "\u20ac", "a\r\nb", "X-A", "v" * 600, "\xff"]
for _ in range(20000):
    status = rng.choice(texts)
    headers = [rng.choice([(rng.choice(texts), rng.choice(texts)), [rng.choice(texts), rng.choice(texts)],
                           (rng.choice(texts),), (1, "x"), "ab"]) for _ in range(rng.randrange(4))]
    assert outcome(c.encode_head, status, headers) == outcome(loader.py_encode_head, status, headers), (status, headers)
print("speedups checks passed")
"""


def _runtime(name: str, cc: str) -> str:
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.fail(f"{cc} knows no {name}: `make deps` installs build-essential")
    return path


def test_the_speedups_under_asan_and_ubsan(tmp_path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler (cc) found: `make deps` installs build-essential")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    module = tmp_path / "_agent_loader_speedups.abi3.so"
    build = subprocess.run([cc, *CFLAGS, f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(module)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert build.returncode == 0, f"compiling {SOURCE.name} failed:\n{build.stderr}"
    # Python's own allocations are not this module's: leaks are not judged.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["LD_PRELOAD"] = f"{_runtime('libasan.so', cc)} {_runtime('libubsan.so', cc)}"
    run = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), str(LOADERS)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, f"the instrumented speedups failed:\n{run.stdout}{run.stderr[-4000:]}"
    assert "speedups checks passed" in run.stdout
