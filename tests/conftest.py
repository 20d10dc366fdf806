"""The suite needs the built extension and nginx module (`make test` builds them)."""

from __future__ import annotations

import os

import pytest

from tests.integration.stack import MODULE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("integration" in str(item.path) for item in items):
        if not MODULE.exists():
            raise pytest.UsageError(f"{MODULE} is missing: run the suite with `make test`, which builds it")
        if os.geteuid() != 0:
            raise pytest.UsageError("the integration tests start nginx and switch users: run them as root")
