from django.apps import AppConfig


class OCMemcacheConfig(AppConfig):
    """Registers the system checks (``django_ocmemcache.E001`` …) and validates
    ``settings.OCMEMCACHE`` (telemetry: metrics, tracing, Server-Timing)."""

    name = "django_ocmemcache"
    verbose_name = "django-ocmemcache"
    default = True

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
        from .telemetry.metrics import install

        install()
