from django.urls import path

from django_ocmemcache.views import metrics

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("squares/", views.squares, name="squares"),
    path("fragment/", views.fragment, name="fragment"),
    path("cached/", views.cached, name="cached"),
    path("guestbook/", views.guestbook, name="guestbook"),
    # The cache metrics in Prometheus' text format (README, "Metrics").
    path("metrics", metrics, name="metrics"),
    # The OpenTelemetry SDK's metrics (demo.py --otel; otel_setup.py).
    path("otel-metrics", views.otel_metrics, name="otel-metrics"),
]
