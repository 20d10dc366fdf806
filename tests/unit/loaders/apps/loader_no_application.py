"""A startup file that defines no `application`."""

app = None
