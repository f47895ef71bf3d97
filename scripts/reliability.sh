#!/usr/bin/env bash
# The reliability scenarios (killed, slow, trickling, silent and garbage servers,
# bad keys, values, planted pickles, evictions, concurrency) against real
# memcached; writes docs/reliability.md. Extra arguments go to the report script.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
"$py" -m tests.reliability_report "$@"
