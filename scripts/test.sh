#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs memcached and the Python deps,
# then runs pytest (the fixtures start their own memcached servers on free ports).
# Extra arguments go to pytest. Exit code is pytest's; "no tests ran" (5) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
"$py" -c "import django; print('test: Python', __import__('sys').version.split()[0], '/ Django', django.get_version())"
set +e
"$py" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "test: no tests were collected" >&2; exit 1; fi
exit "$rc"
