"""Several servers: a key lands on the same server as with Django's backend.

pymemcache's ``HashClient`` hashes the key object it is given
(``f"{node}-{key}"``), so ``b"k"`` and ``"k"`` go to different servers. Django's
``PyMemcacheCache`` passes ``str`` keys; a switch of ``BACKEND`` keeps the warm
cache only if this backend routes exactly as Django does.
"""

import pytest

from tests.conftest import DJANGO_BACKEND

pytestmark = pytest.mark.integration


def test_both_backends_route_keys_to_the_same_servers(memcached_servers, make_cache):
    for s in memcached_servers:
        s.flush()
    location = [s.location for s in memcached_servers]
    ours = make_cache(location)
    django = make_cache(location, backend=DJANGO_BACKEND)
    data = {f"route{i}": i for i in range(60)}
    django.set_many({k: v for k, v in data.items() if v % 2})
    ours.set_many({k: v for k, v in data.items() if not v % 2})
    assert ours.get_many(list(data)) == data
    assert django.get_many(list(data)) == data
