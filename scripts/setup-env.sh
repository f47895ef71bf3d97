#!/usr/bin/env bash
# Make the machine ready to run the project: memcached (from apt when missing and
# we are root), a virtualenv at $VENV with $PYTHON, and the package with the
# extras in $EXTRAS (default: everything a contributor runs: tests, lint, docs,
# packaging, the example site; `make demo` asks for "example" only).
# Idempotent: a second run only checks. Prints the venv's python path last.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DJANGO=${DJANGO:-Django>=5.2,<6.0}
EXTRAS=${EXTRAS:-test,dev,docs,example}

# memcached for the test servers; prometheus (/usr/bin/prometheus) for the telemetry
# integration test and the demo, which scrape the site's /metrics; nutcracker
# (twemproxy, /usr/sbin/nutcracker) for the tests behind a proxy.
missing=""
if ! command -v memcached >/dev/null 2>&1 && [ ! -x /usr/bin/memcached ]; then missing="memcached"; fi
if ! command -v nutcracker >/dev/null 2>&1 && [ ! -x /usr/sbin/nutcracker ]; then missing="$missing nutcracker"; fi
if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then missing="$missing prometheus"; fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing$missing from apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $missing >/dev/null; }
  else
    echo "setup: missing$missing; run: sudo apt-get install --no-install-recommends$missing" >&2
  fi
fi

stamp="$VENV/.ocmemcache-installed"
want="$($PYTHON --version 2>&1) | $DJANGO | $EXTRAS | $(cat setup.cfg | md5sum | cut -c1-12)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1) and $DJANGO" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  log="$VENV/pip-install.log"
  if ! "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" "$DJANGO" >"$log" 2>&1 \
     || ! "$VENV/bin/python" -c "import django, pymemcache"; then
    cat "$log" >&2
    echo "setup: dependency install failed (log above)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "$VENV/bin/python"
