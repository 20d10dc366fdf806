"""A startup file that imports a module that does not exist."""

import loader_module_that_does_not_exist  # type: ignore[import-not-found]  # noqa: F401

application = None
