#!/usr/bin/env bash
# The example site on a fresh machine: installs memcached (apt, when root) and the
# Python deps into $VENV, then runs example_project/demo.py, which starts its own
# memcached (unless OCMEMCACHE_LOCATION=host:port is set) and gunicorn on free
# loopback ports, drives real HTTP requests, prints the results and stops both.
# Extra arguments go to demo.py (--help lists them). Exit code is demo.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
exec "$py" example_project/demo.py "$@"
