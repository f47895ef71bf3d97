#!/usr/bin/env bash
# The documentation site: mkdocs build --strict (warnings are errors: a broken link
# between pages, to a heading, or to an included file fails it) into site/, then
# the README's links to files of this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
"$py" -m mkdocs build --strict --site-dir site "$@"
"$py" scripts/check_readme_links.py
