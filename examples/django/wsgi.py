"""The startup file: the WSGI callable `application` of the Django project.

The agent's loader, uWSGI (--wsgi-file wsgi.py) and gunicorn (wsgi:application)
all load it from the app root, which they put first on sys.path.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_wsgi_application()
