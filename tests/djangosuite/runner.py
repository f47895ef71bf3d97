"""Run Django's own ``PyMemcacheCacheTests`` against django-ocmemcache.

``python -m tests.djangosuite.runner SUITE_DIR LOCATION [OPTIONS_JSON]``

``SUITE_DIR`` holds Django's ``tests/cache`` package (as ``SUITE_DIR/cache``),
taken unchanged from the Django sdist of the installed version, with one
substitution: ``PyMemcacheCache_params`` (the ``CACHES`` entry the class runs
against, which Django's ``runtests.py`` reads from the settings by the
``BACKEND`` of Django's backend) is read by this backend's dotted path instead.
Nothing else of the class is touched: the test methods, ``base_params`` and
``incr_decr_type_error`` are Django's. ``should_disconnect_on_close`` (Django's
own knob, which ``PyLibMCCacheTests`` turns off because libmemcached keeps its
connections) is Django's ``True`` when ``OPTIONS`` sets
``PERSISTENT_CONNECTIONS: False`` and ``False`` otherwise: by default this
backend keeps its connections across requests.

Prints one JSON line last: ``{"run": n, "failures": [...], "errors": [...],
"skipped": [...]}``; the exit code is 0 when nothing failed.
"""

from __future__ import annotations

import json
import re
import sys
import unittest
from pathlib import Path

OUR_BACKEND = "django_ocmemcache.backend.OCMemcacheCache"
DJANGO_BACKEND = "django.core.cache.backends.memcached.PyMemcacheCache"

_PARAMS_LINE = re.compile(
    r"(PyMemcacheCache_params\s*=\s*configured_caches\.get\(\s*)"
    + re.escape(f'"{DJANGO_BACKEND}"')
)


def prepare(suite_dir: Path) -> None:
    """Point ``PyMemcacheCache_params`` at this backend in ``cache/tests.py``."""
    tests_py = suite_dir / "cache" / "tests.py"
    source = tests_py.read_text()
    if OUR_BACKEND in source:
        return
    patched, n = _PARAMS_LINE.subn(rf'\g<1>"{OUR_BACKEND}"', source)
    if n != 1:
        raise SystemExit(f"{tests_py}: PyMemcacheCache_params line not found")
    tests_py.write_text(patched)


def main(argv: list[str]) -> int:
    suite_dir, location = Path(argv[1]), argv[2]
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    prepare(suite_dir)
    sys.path.insert(0, str(suite_dir))

    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="django-ocmemcache-django-suite",
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "cache",
        ],
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
        },
        CACHES={
            "default": {
                "BACKEND": OUR_BACKEND,
                "LOCATION": location,
                "OPTIONS": options,
            }
        },
        MIDDLEWARE=[],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
            }
        ],
        USE_TZ=False,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        OCMEMCACHE={"METRICS": False, "TRACING": False},
    )
    django.setup()

    from cache import tests as django_tests  # noqa: I001 (from SUITE_DIR)
    from django.test.runner import DiscoverRunner

    tests_class = django_tests.PyMemcacheCacheTests
    tests_class.should_disconnect_on_close = (
        options.get("PERSISTENT_CONNECTIONS", True) is False
    )
    runner = DiscoverRunner(verbosity=0, interactive=False)
    runner.setup_test_environment()
    old = runner.setup_databases(aliases={"default"})
    try:
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(tests_class)
        result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(suite)
    finally:
        runner.teardown_databases(old)
        runner.teardown_test_environment()
    summary = {
        "run": result.testsRun,
        "failures": [t.id() for t, _ in result.failures],
        "errors": [t.id() for t, _ in result.errors],
        "skipped": [t.id() for t, _ in result.skipped],
    }
    print(json.dumps(summary))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
