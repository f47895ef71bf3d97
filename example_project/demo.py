"""Run the example site under gunicorn against real memcached and show what it does.

``make demo`` runs this (through ``scripts/demo.sh``, which prepares ``.venv``).
It starts its own memcached on a free 127.0.0.1 port (unless ``--location`` or
``OCMEMCACHE_LOCATION`` names a running server), migrates a fresh SQLite database
in a temporary folder, starts gunicorn on a free 127.0.0.1 port, drives real HTTP
requests at it with urllib, prints the results, and stops every process it started
(by pid, also on Ctrl-C or failure).

Exit status: 0 when every step behaved as expected, 1 when a page misbehaved,
2 when memcached or gunicorn is missing or would not start, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

try:
    from example_project import telemetry_demo
except ImportError:  # run as a script: example_project/ is sys.path[0]
    import telemetry_demo  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine",
         "Ten", "Eleven", "Twelve")  # fmt: skip


class DemoError(Exception):
    """Raised when a step cannot go on; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop(proc: subprocess.Popen[Any], name: str) -> None:
    """Stop a process this demo started: SIGTERM by pid, SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    print(f"  stopped {name} (pid {proc.pid})")


#: Where Debian's package puts memcached, when ``/usr/bin`` is not on ``PATH``.
MEMCACHED_FALLBACK = "/usr/bin/memcached"


def memcached_binary() -> str:
    """Return the memcached executable, or raise DemoError saying how to get one."""
    found = shutil.which("memcached") or (
        MEMCACHED_FALLBACK if os.path.exists(MEMCACHED_FALLBACK) else None
    )
    if found is None:
        raise DemoError(
            "memcached is not installed.\n"
            "  Debian/Ubuntu: sudo apt-get install memcached   (make demo does this "
            "itself when run as root)\n"
            "  macOS:         brew install memcached\n"
            "Or point the demo at a running server: "
            "OCMEMCACHE_LOCATION=host:port make demo",
            code=2,
        )
    return found


def start_memcached(stack: ExitStack) -> str:
    """Start memcached on a free loopback port; return its ``host:port``."""
    binary = memcached_binary()
    for _attempt in range(5):
        port = free_port()
        args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root otherwise
        # A session of its own: Ctrl-C reaches only this script, which then stops
        # the servers in order (a server killed mid-request would fail the demo).
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            if port_open("127.0.0.1", port):
                stack.callback(stop, proc, "memcached")
                print(f"  memcached started on 127.0.0.1:{port} (pid {proc.pid})")
                return f"127.0.0.1:{port}"
            time.sleep(0.02)
        stop(proc, "memcached")  # port taken meanwhile: try another
    raise DemoError("memcached did not start on a free 127.0.0.1 port", code=2)


def check_location(location: str) -> None:
    """Fail early, with the address, when a given memcached does not answer."""
    first = re.split(r"[;,]", location)[0].strip()
    if first.startswith("unix:"):
        return
    host, _, port = first.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not port_open(host, int(port), timeout=1.0):
        raise DemoError(f"no memcached answers at {first} (OCMEMCACHE_LOCATION)", 2)
    print(f"  using memcached at {location}")


def migrate(env: dict[str, str]) -> None:
    manage = [sys.executable, str(ROOT / "example_project" / "manage.py")]
    done = subprocess.run(
        [*manage, "migrate", "--noinput", "-v", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        raise DemoError(f"migrate failed:\n{done.stdout}{done.stderr}")
    print(f"  database migrated: {env['EXAMPLE_DATABASE']}")


def start_gunicorn(
    stack: ExitStack, env: dict[str, str], workdir: Path, args: argparse.Namespace
) -> str:
    """Start gunicorn on a free loopback port; return its base URL once it answers."""
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        raise DemoError(
            "gunicorn is not installed: pip install -e '.[example]' "
            "(make demo installs it into .venv)",
            code=2,
        ) from None
    log = workdir / "gunicorn.log"
    for _attempt in range(3):
        port = free_port()
        cmd = [
            sys.executable, "-m", "gunicorn", "example_project.wsgi:application",
            "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--chdir", str(ROOT), "--error-logfile", str(log),
            "--graceful-timeout", "2",
        ]  # fmt: skip
        if args.preload:
            cmd.append("--preload")
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as response:
                    if response.status == 200:
                        stack.callback(stop, proc, "gunicorn")
                        print(
                            f"  gunicorn started on {url} with {args.workers} "
                            f"worker(s) (pid {proc.pid})"
                        )
                        return url
            except OSError:
                time.sleep(0.1)
        stop(proc, "gunicorn")
    tail = log.read_text()[-2000:] if log.exists() else "(no log)"
    raise DemoError(f"gunicorn did not start; its log ends with:\n{tail}", code=2)


def fetch(
    opener: urllib.request.OpenerDirector,
    url: str,
    data: dict[str, str] | None = None,
) -> tuple[float, str]:
    """GET (or POST ``data``) ``url``; return ``(seconds, body)``."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    start = time.perf_counter()
    try:
        with opener.open(url, data=body, timeout=60) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise DemoError(f"{url} answered {exc.code} {exc.reason}: {detail}") from None
    except OSError as exc:  # URLError, reset connections, timeouts
        raise DemoError(f"{url} failed: {exc}") from None
    return time.perf_counter() - start, text


def element(html: str, element_id: str) -> str:
    """The text of the element with ``id=element_id`` (the pages keep it simple)."""
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    if match is None:
        raise DemoError(f"the page has no element id={element_id!r}")
    return match.group(1).strip()


def clock(iso: str) -> str:
    return iso[11:26]  # HH:MM:SS.ffffff of an ISO timestamp


def run_squares(url: str, args: argparse.Namespace) -> list[tuple[float, int, int]]:
    """Ten (``--runs``) batches of random numbers from one range, timed:
    ``(seconds, squares computed, squares from the cache)`` for each run."""
    print(
        f"\n1. Slow squares, cached per number, GET /squares/?n=...: {args.runs} "
        f"runs, each squaring\n   {args.draws} random numbers from "
        f"0..{args.range - 1}; {args.cost:g} s per square not in the cache "
        "(repeats in a run count once)"
    )
    rng = random.Random(args.seed)
    opener = urllib.request.build_opener()
    timings = []
    for run in range(1, args.runs + 1):
        numbers = [rng.randrange(args.range) for _ in range(args.draws)]
        query = urllib.parse.urlencode({"n": ",".join(map(str, numbers))})
        seconds, body = fetch(opener, f"{url}/squares/?{query}")
        result = json.loads(body)
        if any(result["squares"][str(n)] != n * n for n in numbers):
            raise DemoError(f"wrong squares in run {run}: {body[:200]}")
        computed = len(result["computed"])
        timings.append((seconds, computed, result["cached"]))
        print(
            f"   run {run:2}: {seconds:6.3f}s  {computed:3} computed, "
            f"{result['cached']:3} from the cache"
        )
    label = WORDS[len(timings) - 1] if len(timings) <= len(WORDS) else len(timings)
    print(f"   {label} successive runs: " + " ".join(f"{t[0]:.3f}s" for t in timings))
    return timings


def run_fragment(url: str) -> bool:
    print("\n2. Template fragment caching, {% cache 500 sidebar %}, GET /fragment/")
    opener = urllib.request.build_opener()
    seen = []
    for request in (1, 2):
        seconds, html = fetch(opener, f"{url}/fragment/")
        page, sidebar = (
            element(html, "page-rendered"),
            element(html, "sidebar-rendered"),
        )
        seen.append((page, sidebar))
        print(
            f"   request {request}: {seconds:6.3f}s  page rendered {clock(page)}, "
            f"sidebar rendered {clock(sidebar)}"
        )
    ok = seen[0][1] == seen[1][1] and seen[0][0] != seen[1][0]
    print(
        "   -> the page was rendered again, the sidebar came from the cache"
        if ok
        else "   -> UNEXPECTED: the sidebar was not served from the cache"
    )
    return ok


def run_cache_page(url: str) -> bool:
    print("\n3. Whole-page caching, @cache_page(60), GET /cached/")
    opener = urllib.request.build_opener()
    seen = []
    for request in (1, 2):
        seconds, html = fetch(opener, f"{url}/cached/")
        seen.append(element(html, "page-rendered"))
        print(f"   request {request}: {seconds:6.3f}s  page rendered {clock(seen[-1])}")
    ok = seen[0] == seen[1]
    print(
        "   -> same timestamp: the second response came from memcached"
        if ok
        else "   -> UNEXPECTED: the page was rendered twice"
    )
    return ok


def run_guestbook(url: str) -> dict[str, int]:
    print("\n4. Guestbook, GET and POST /guestbook/ (session kept in memcached)")
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    html = ""
    for message in ("Hello from make demo!", "Signing twice: the name is remembered."):
        _, form = fetch(opener, f"{url}/guestbook/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
        if token is None:
            raise DemoError("the guestbook form has no CSRF token")
        _, html = fetch(  # the POST redirects to GET /guestbook/
            opener,
            f"{url}/guestbook/",
            {"csrfmiddlewaretoken": token.group(1), "name": "Ada", "message": message},
        )
    welcome = re.sub(r"<[^>]+>", "", element_block(html, "welcome"))
    entries = len(re.findall(r"<li><strong>", html))
    figures = {
        field: int(element(html, field))
        for field in ("get-hits", "get-misses", "process-hits", "process-misses")
    }
    print(f'   signed twice as Ada; the page says: "{welcome}"')
    print(f"   entries on the page: {entries}")
    print(
        f"   server: {figures['get-hits']} hits / {figures['get-misses']} misses"
        "  <- memcached's own get_hits/get_misses: every process, every key since "
        "it started (cache.get_stats()['totals'])"
    )
    print(
        f"   worker: {figures['process-hits']} hits / "
        f"{figures['process-misses']} misses  <- lookups by the one gunicorn "
        f"worker (pid {element(html, 'pid')}) that served this page "
        "(cache.get_stats()['process'])"
    )
    return figures


def element_block(html: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</p>', html, re.S)
    if match is None:
        raise DemoError(f"the page has no element id={element_id!r}")
    return match.group(1).strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the example site against real memcached and show it.",
    )
    parser.add_argument(
        "--location",
        default=os.environ.get("OCMEMCACHE_LOCATION"),
        help="memcached to use (default: $OCMEMCACHE_LOCATION, else start one)",
    )
    parser.add_argument("--runs", type=int, default=10, help="timed runs (10)")
    parser.add_argument("--draws", type=int, default=40, help="numbers per run (40)")
    parser.add_argument(
        "--range", type=int, default=100, help="numbers are drawn from 0..RANGE-1 (100)"
    )
    parser.add_argument(
        "--cost", type=float, default=0.1, help="seconds per square computed (0.1)"
    )
    parser.add_argument("--seed", type=int, default=2024, help="random seed (2024)")
    parser.add_argument(
        "--workers",
        type=int,
        help="gunicorn workers (2; 1 with --otel, whose Prometheus exporter serves "
        "one process's figures)",
    )
    parser.add_argument(
        "--preload", action="store_true", help="gunicorn --preload (fork after import)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small and fast (for the tests): --draws 15 --range 20 --cost 0.02",
    )
    parser.add_argument(
        "--no-telemetry",
        dest="telemetry",
        action="store_false",
        help="skip the Zipkin receiver, the span tree and Prometheus",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="run the site on OpenTelemetry (OCMEMCACHE['TELEMETRY_API']): spans "
        "through the SDK's Zipkin exporter, metrics through its Prometheus exporter",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep the site running for a browser afterwards, until Ctrl-C",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.draws, args.range, args.cost = 15, 20, 0.02
    if args.workers is None:
        args.workers = 1 if args.otel else 2
    if args.runs < 1 or args.draws < 1 or args.range < 1 or args.cost < 0:
        parser.error("--runs, --draws and --range must be >= 1, --cost >= 0")
    return args


def demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with ExitStack() as stack:
        print("Starting (everything below is stopped again at the end):")
        workdir = Path(tempfile.mkdtemp(prefix="ocmemcache-demo-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        if args.location:
            check_location(args.location)
            location = args.location
        else:
            location = start_memcached(stack)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "example_project.settings",
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "OCMEMCACHE_LOCATION": location,
            # A fresh key prefix: a shared memcached starts cold for this run too.
            "OCMEMCACHE_KEY_PREFIX": f"demo{os.getpid()}x{int(time.time())}",
            "EXAMPLE_DATABASE": str(workdir / "db.sqlite3"),
            "EXAMPLE_SLOW_COST": str(args.cost),
        }
        if args.otel:
            env["EXAMPLE_TELEMETRY_API"] = "opentelemetry"
            print("  telemetry: OpenTelemetry (OCMEMCACHE['TELEMETRY_API'])")
        if args.telemetry:
            receiver = telemetry_demo.start_zipkin(stack)
            env["EXAMPLE_ZIPKIN"] = f"127.0.0.1:{receiver.port}"
            # prometheus_client's multiprocess mode: every worker writes its
            # figures there and /metrics serves the whole site's sum.
            multiproc = workdir / "prometheus-multiproc"
            multiproc.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        migrate(env)
        url = start_gunicorn(stack, env, workdir, args)

        timings = run_squares(url, args)
        fragment_ok = run_fragment(url)
        page_ok = run_cache_page(url)
        figures = run_guestbook(url)

        ok = fragment_ok and page_ok and figures["get-hits"] > 0
        if args.telemetry:
            ok = telemetry_demo.show_trace(receiver, otel=args.otel) and ok
            ok = (
                telemetry_demo.show_metrics(
                    stack,
                    url,
                    workers=args.workers,
                    squares=len(timings),
                    # one lookup per distinct number of a run
                    lookups=sum(computed + cached for _, computed, cached in timings),
                    otel=args.otel,
                )
                and ok
            )
        # Counted, not timed: on a busy machine a run's wall time says little,
        # and the slow part of a run is the squares it computes (--cost each).
        (_, first, _), (_, last, cached) = timings[0], timings[-1]
        if len(timings) > 1 and (cached == 0 or last >= first):
            print(
                "UNEXPECTED: the last run computed as many squares as the first, "
                "or took none from the cache"
            )
            ok = False
        print(f"\nThe site's part took {time.monotonic() - started:.1f}s.")
        if args.serve:
            try:  # Ctrl-C from here on is the normal way out
                print(f"The site stays up at {url}/ until Ctrl-C.")
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        print("Stopping:")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the ExitStack stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return demo(args)
    except DemoError as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
