#!/usr/bin/env bash
# The benchmarks on a fresh machine: installs memcached and the Python deps (via
# setup-env.sh), then runs `python -m bench` (it starts its own memcached servers
# on free loopback ports). Extra arguments go to the bench: --quick, --cases RE,
# --write-readme, ... (`python -m bench --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
exec "$py" -m bench "$@"
