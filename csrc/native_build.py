"""cffi builder for agent._native: the engine and the spawn helpers (csrc/).

The cdef is read from the *_api.h headers, which hold plain declarations
only, so that the C sources and Python see one definition of the interface.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
API_HEADERS = ("engine_api.h", "spawn_api.h")
SOURCES = ("frame.c", "records.c", "http_head.c", "events.c", "conn.c", "fastpath.c", "session.c", "loop.c", "engine_api.c", "spawn.c")

WARNINGS = ["-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wpointer-arith", "-Wno-unused-parameter"]


def _sanitize_flags() -> list[str]:
    """AGENT_SANITIZE=1 builds with ASan and UBSan (see Makefile: sanitize)."""
    if os.environ.get("AGENT_SANITIZE") == "1":
        return ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    return []


ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / name).read_text() for name in API_HEADERS))
ffibuilder.set_source(
    "agent._native",
    '#include "engine.h"\n#include "spawn.h"\n',
    sources=[str((HERE / name).relative_to(HERE.parent)) for name in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-std=gnu11", "-O2", "-g", *WARNINGS, *_sanitize_flags()],
    extra_link_args=[*_sanitize_flags(), "-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
