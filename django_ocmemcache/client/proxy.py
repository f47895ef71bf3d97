"""The servers behind a proxy (twemproxy, mcrouter), for what it does not forward.

twemproxy 0.5 forwards the data commands (get/gets, set, add, replace, append,
prepend, cas, touch, incr, decr, delete, version) and answers ``stats``,
``flush_all``, meta commands and ``lru_crawler`` by closing the connection.
With ``OPTIONS["PROXY"]`` the backend sends those to ``ProxiedServers``
instead: the servers of ``OPTIONS["PROXY_SERVERS"]`` directly, or nowhere
(``NotProxied``, naming the proxy and what to do).
"""

from __future__ import annotations

from typing import Any

from ..conf import BackendOptions
from ..exceptions import NotProxied
from .pool import ClientPool, get_pool


class ProxiedServers:
    """``flush_all``/``server_stats`` for a cache whose ``LOCATION`` is ``proxy``.

    ``behind`` is the pool of the memcached servers behind it, or None when
    ``PROXY_SERVERS`` is not set (then both raise ``NotProxied``, sending
    nothing).
    """

    def __init__(self, proxy: str, behind: ClientPool | None) -> None:
        self.proxy = proxy
        self.behind = behind

    @classmethod
    def for_options(
        cls, options: BackendOptions, client_kwargs: dict[str, Any]
    ) -> ProxiedServers | None:
        """The servers behind ``options.proxy``, or None without a proxy."""
        if options.proxy is None:
            return None
        specs = options.proxy_server_specs
        pool = get_pool(specs, client_kwargs) if specs is not None else None
        return cls(options.proxy, pool)

    def _servers(self, call: str, command: str) -> ClientPool:
        if self.behind is None:
            raise NotProxied(
                f"{call} needs memcached's {command}, which {self.proxy} "
                "(OPTIONS['PROXY']) does not forward: list the memcached servers "
                "behind it in OPTIONS['PROXY_SERVERS'] to send it to each of them"
            )
        return self.behind

    def flush_all(self) -> None:
        """``flush_all`` on every server behind the proxy."""
        self._servers("clear()", "flush_all").client().flush_all()

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """``stats`` of every server behind the proxy (``ClientPool.server_stats``)."""
        return self._servers("get_stats()", "stats").server_stats()

    def disconnect(self) -> None:
        """Close this thread's connections to the servers behind the proxy."""
        if self.behind is not None:
            self.behind.disconnect()
