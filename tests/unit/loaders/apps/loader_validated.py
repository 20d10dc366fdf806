"""loader_app wrapped in wsgiref.validate, with every warning an error.

A request that breaks PEP 3333 on either side (loader or app) raises inside
the app, and the loader answers 500.
"""

import warnings
from wsgiref.validate import validator

from loader_app import application as unchecked_application  # type: ignore[import-not-found]

warnings.simplefilter("error")

application = validator(unchecked_application)
