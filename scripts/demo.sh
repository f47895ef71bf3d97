#!/usr/bin/env bash
# The example site on a fresh machine: installs memcached (apt, when root) and the
# site's Python deps into .venv-demo, then runs example_project/demo.py, which starts its own
# memcached (unless OCMEMCACHE_LOCATION=host:port is set) and gunicorn on free
# loopback ports, drives real HTTP requests, prints the results and stops both.
# Then example_project/migration_demo.py runs the README's migration runbook
# (fallback pair + warm-cache) on two memcached servers of its own.
# Extra arguments go to demo.py (--help lists them). Exit code: the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# Its own virtualenv with only what the site needs (the "example" extra:
# gunicorn, prometheus-client, tqdm, the Zipkin exporter): no pytest, ruff, mypy.
# With --otel (the site on OpenTelemetry) also the "opentelemetry" extra, in a
# virtualenv of its own so the two runs do not reinstall each other's.
extras=example venv="${DEMO_VENV:-.venv-demo}"
for arg in "$@"; do
  if [ "$arg" = "--otel" ]; then extras=example,opentelemetry venv="${DEMO_VENV:-.venv-demo-otel}"; fi
done
py=$(VENV="$venv" EXTRAS="$extras" bash scripts/setup-env.sh)
"$py" example_project/demo.py "$@"
echo
echo "7. Moving to new memcached servers (example_project/migration_demo.py: the README's runbook)"
"$py" example_project/migration_demo.py | sed -u "s/^/   /"
echo
echo "Done."
