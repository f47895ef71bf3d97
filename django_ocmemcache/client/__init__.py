"""Talking to memcached: knows sockets and servers, not Django's cache rules.

- ``deadline``: the calling thread's whole-call deadline.
- ``guarded``: pymemcache ``Client`` whose socket is clamped to the deadline;
  reply bounds.
- ``health``: process-wide server health (skip, probe, recover).
- ``sharded``: ``ShardedClient``, key -> server as pymemcache's ``HashClient``.
- ``pool``: per-thread clients per (servers, options); fork reset; idle sweep.
- ``meta``: pipelined meta commands (``mg``/``ms``/``md``) and raw replies.
- ``proxy``: ``ProxiedServers``, where ``flush_all``/``stats`` go when
  ``LOCATION`` is a proxy that does not forward them.

Nothing here imports ``telemetry`` (nor the other way round).
"""
