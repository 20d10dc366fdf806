"""The status request parser's fuzz seeds (tests/fuzz/corpus/fuzz_status_request),
each through the harness's check, so that the ordinary suite runs them too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
SEEDS = sorted((FUZZ / "corpus" / "fuzz_status_request").iterdir())


def load_harness() -> object:
    spec = importlib.util.spec_from_file_location("fuzz_status_request", FUZZ / "fuzz_status_request.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed_passes_the_harness_check(seed: Path) -> None:
    load_harness().check(seed.read_bytes())  # type: ignore[attr-defined]


def test_there_are_seeds() -> None:
    assert len(SEEDS) >= 10
