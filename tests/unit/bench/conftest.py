"""bench/ is a folder of scripts that import each other by name: its tests
put it on sys.path, as running bench/run.py does."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
