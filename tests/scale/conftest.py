"""The scale tests start network namespaces, Redis and several nginx
instances with the module (`make test-scale` builds what they need)."""

from __future__ import annotations

import os

import pytest

from tests.integration.stack import MODULE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("scale" in str(item.path) for item in items):
        if not MODULE.exists():
            raise pytest.UsageError(f"{MODULE} is missing: run them with `make test-scale`, which builds it")
        if os.geteuid() != 0:
            raise pytest.UsageError("the scale tests create network namespaces and start nginx: run them as root")
