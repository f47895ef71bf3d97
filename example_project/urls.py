from django.conf import settings
from django.urls import path
from django.utils.module_loading import import_string

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("squares/", views.squares, name="squares"),
    path("fragment/", views.fragment, name="fragment"),
    path("cached/", views.cached, name="cached"),
    path("guestbook/", views.guestbook, name="guestbook"),
]

# Prometheus scrape endpoint, once the telemetry work provides the view.
if settings.HAS_METRICS_VIEW:
    urlpatterns.append(
        path(
            "metrics", import_string("django_ocmemcache.views.metrics"), name="metrics"
        )
    )
