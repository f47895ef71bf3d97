"""django-ocmemcache: a Django cache backend for memcached that people can see into."""

__version__ = "0.1.0.dev0"
