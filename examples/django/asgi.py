"""The ASGI startup file: the Django project's ASGI application, for
`agent_app_type asgi; agent_startup_file asgi.py;` (docs/policy.md, "ASGI
apps"). The same views as wsgi.py, on an event loop.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_asgi_application()
