"""A startup file whose `application` cannot be called."""

application = "not a callable"
