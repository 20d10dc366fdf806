"""A startup file that raises while it is loaded."""

raise RuntimeError("the app refuses to start")
