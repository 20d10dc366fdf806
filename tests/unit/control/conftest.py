"""The status server's test harness, for every test file here."""

from .test_status import harness  # noqa: F401  (the fixture)
