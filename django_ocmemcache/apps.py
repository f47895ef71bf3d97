from django.apps import AppConfig


class OCMemcacheConfig(AppConfig):
    """Registers the system checks (``django_ocmemcache.E001`` …) and validates
    ``settings.OCMEMCACHE`` (telemetry: metrics, tracing, Server-Timing)."""

    name = "django_ocmemcache"
    verbose_name = "django-ocmemcache"
    default = True

    def ready(self) -> None:
        from django.core.exceptions import ImproperlyConfigured

        from . import checks  # noqa: F401  (registers the checks)
        from .telemetry.hook import install

        try:
            install()
        except ImproperlyConfigured:
            # Reported in one line by the django_ocmemcache.E005 check (a raise
            # here would be a traceback before any check runs), and raised
            # again where the setting is used.
            pass
