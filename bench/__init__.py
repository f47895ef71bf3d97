"""Benchmarks: django-ocmemcache side by side with Django's ``PyMemcacheCache``.

Run with ``make bench`` (or ``python -m bench [--quick]`` from the repository
root). See ``bench/README.md`` for what is measured and the latest results.
"""
