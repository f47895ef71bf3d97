from django.apps import AppConfig


class ExampleConfig(AppConfig):
    """The example site's own app: the guestbook model and the page templates."""

    name = "example_project"
    verbose_name = "django-ocmemcache example site"
    default_auto_field = "django.db.models.BigAutoField"
