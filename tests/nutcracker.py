"""A real twemproxy (``nutcracker``) in front of memcached servers, for the tests.

The fixture writes the pool's config (loopback ports, ``hash: fnv1a_64``,
``distribution: ketama``, ``auto_eject_hosts: false``), starts
``nutcracker -c CONF`` in the foreground with its stats port on 127.0.0.1, and
stops it by its own pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence

from tests.memcached import MemcachedServer, free_port, wait_for_port

NUTCRACKER = shutil.which("nutcracker") or (
    "/usr/sbin/nutcracker" if os.path.exists("/usr/sbin/nutcracker") else None
)


class NutcrackerProxy:
    """One nutcracker process (a pool named ``ocmemcache``) this run owns."""

    def __init__(self, servers: Sequence[MemcachedServer]) -> None:
        self.servers = list(servers)
        self.port = free_port()
        self.stats_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="nutcracker-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> str:
        servers = "\n".join(f"    - {s.location}:1" for s in self.servers)
        return (
            "ocmemcache:\n"
            f"  listen: 127.0.0.1:{self.port}\n"
            "  hash: fnv1a_64\n"
            "  distribution: ketama\n"
            "  auto_eject_hosts: false\n"
            "  timeout: 1000\n"
            "  servers:\n"
            f"{servers}\n"
        )

    def start(self) -> NutcrackerProxy:
        if NUTCRACKER is None:
            raise RuntimeError("nutcracker binary not found")
        conf = os.path.join(self.dir, "nutcracker.yml")
        with open(conf, "w") as f:
            f.write(self.config())
        args = [
            NUTCRACKER, "-c", conf, "-s", str(self.stats_port), "-a", "127.0.0.1",
            "-o", os.path.join(self.dir, "nutcracker.log"),
            "-p", os.path.join(self.dir, "nutcracker.pid"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not wait_for_port(self.port):
            self.stop()
            raise RuntimeError(f"nutcracker did not start on {self.location}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<NutcrackerProxy {self.location} -> {self.servers}>"
