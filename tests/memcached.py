"""Real memcached servers for the tests, each on a free 127.0.0.1 port.

A server is started as ``memcached -l 127.0.0.1 -p PORT -U 0 -m MB`` (plus
``-u root`` when running as root, which memcached otherwise refuses) and is
stopped by its own pid, never by name. ``restart()`` brings it back on the
same port, so tests can kill a server mid-test and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

MEMCACHED = shutil.which("memcached") or (
    "/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 5.0) -> bool:
    """Return True once 127.0.0.1:port accepts a connection, False after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class MemcachedServer:
    """One memcached process that this test run started and owns."""

    def __init__(
        self, memory_mb: int = 64, extra_args: Sequence[str] = (), port: int = 0
    ) -> None:
        self.memory_mb = memory_mb
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def location(self) -> str:
        """``host:port`` as Django's ``LOCATION`` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> MemcachedServer:
        if MEMCACHED is None:
            raise RuntimeError("memcached binary not found")
        for _attempt in range(5):
            args = [
                MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0",
                "-m", str(self.memory_mb), *self.extra_args,
            ]  # fmt: skip
            if os.geteuid() == 0:
                args += ["-u", "root"]
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            if wait_for_port(self.port):
                return self
            self._kill()
            self.port = free_port()  # port taken meanwhile: try another
        raise RuntimeError(f"memcached did not start on 127.0.0.1:{self.port}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def stop(self) -> None:
        """Stop the process (SIGKILL, by pid) and wait until the port is closed."""
        self._kill()

    def restart(self) -> MemcachedServer:
        """Start again on the same port (after ``stop()``)."""
        self._kill()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(
        self, line: str, end: bytes = b"END\r\n", timeout: float = 2.0
    ) -> bytes:
        """Send one raw text-protocol command and return the reply up to ``end``."""
        with socket.create_connection(self.address, timeout=timeout) as s:
            s.sendall(line.encode() + b"\r\n")
            buf = b""
            deadline = time.monotonic() + timeout
            while not buf.endswith(end) and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf

    def stats(self) -> dict[str, str]:
        """The server's ``stats`` as a dict of strings (read over a fresh socket)."""
        out = {}
        for line in self.command("stats").decode().splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[0] == "STAT":
                out[parts[1]] = parts[2]
        return out

    def flush(self) -> None:
        self.command("flush_all", end=b"OK\r\n")

    def __repr__(self) -> str:
        return f"<MemcachedServer {self.location} running={self.running}>"
