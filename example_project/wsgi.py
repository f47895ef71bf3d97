"""WSGI entry point: ``gunicorn example_project.wsgi:application``."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

try:
    from example_project import otel_setup
except ImportError:  # run from example_project/
    import otel_setup  # type: ignore[no-redef]

otel_setup.configure()  # only with EXAMPLE_TELEMETRY_API=opentelemetry (demo --otel)

application = get_wsgi_application()
