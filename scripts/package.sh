#!/usr/bin/env bash
# Build the sdist and wheel as a release would (`python -m build`), check their
# metadata (`twine check --strict`), check what they hold, then install the wheel
# with no extra into a fresh virtualenv and check that the package imports, that
# Django's checks pass on a minimal site, and that a feature needing an extra
# names it. Prints the size of that fresh install. Exit code: the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup-env.sh)
PYTHON=${PYTHON:-python3}

out=$(mktemp -d "${TMPDIR:-/tmp}/ocmemcache-package.XXXXXX")
trap 'rm -rf "$out"' EXIT

echo "== python -m build"
"$py" -m build --outdir "$out/dist" . >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
ls -1 "$out/dist"
echo "== twine check --strict"
"$py" -m twine check --strict "$out"/dist/*

echo "== contents"
"$py" - "$out/dist" <<'EOF'
import sys, tarfile, zipfile
from email.parser import Parser
from pathlib import Path

dist = Path(sys.argv[1])
sdist = next(dist.glob("*.tar.gz"))
wheel = next(dist.glob("*.whl"))
names = tarfile.open(sdist).getnames()
root = names[0].split("/")[0]
problems = []
for needed in ("LICENSE", "README.md", "CHANGELOG.md", "mkdocs.yml", "docs/index.md",
               "tests/conftest.py", "example_project/settings.py", "Makefile",
               "scripts/setup-env.sh", "deploy/grafana-dashboard.json"):
    if f"{root}/{needed}" not in names:
        problems.append(f"sdist lacks {needed}")
with zipfile.ZipFile(wheel) as z:
    wnames = z.namelist()
    meta_name = next(n for n in wnames if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(z.read(meta_name).decode())
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames):
    problems.append("wheel lacks LICENSE")
if any(n.startswith(("tests/", "example_project/", "bench/")) for n in wnames):
    problems.append("wheel holds more than the package")
if meta["License-Expression"] != "Apache-2.0":
    problems.append(f"License-Expression is {meta['License-Expression']!r}")
requires = meta.get_all("Requires-Dist")
if "django<7,>=5.2" not in [r.lower().replace(" ", "") for r in requires]:
    problems.append(f"Django pin: {requires}")
extras = set(meta.get_all("Provides-Extra"))
if not {"prometheus", "progress", "zipkin"} <= extras:
    problems.append(f"extras: {sorted(extras)}")
if "](docs/" in meta.get_payload() or "](./" in meta.get_payload():
    problems.append("the long description has relative links (dead on the index)")
print(f"sdist {sdist.name}: {len(names)} files; wheel {wheel.name}: {len(wnames)} files")
print(f"License-Expression: {meta['License-Expression']}; extras: {sorted(extras)}")
if problems:
    sys.exit("package: " + "; ".join(problems))
EOF

echo "== fresh install of the wheel, no extra"
"$PYTHON" -m venv "$out/venv"
"$out/venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
site=$("$out/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
before=$("$out/venv/bin/python" -m pip list --format=freeze | wc -l)
kb_before=$(du -sk "$site" | cut -f1)
"$out/venv/bin/python" -m pip install -q "$out"/dist/*.whl
after=$("$out/venv/bin/python" -m pip list --format=freeze | wc -l)
kb_after=$(du -sk "$site" | cut -f1)
echo "the wheel and its dependencies: $((after - before)) packages, $(( (kb_after - kb_before) / 1024 )) MB in site-packages"
"$out/venv/bin/python" -m pip list --format=freeze --exclude pip --exclude setuptools | sed 's/^/  /' | paste -sd' '
cd "$out"
cat >"$out/site_settings.py" <<'EOF'
SECRET_KEY = "x"
INSTALLED_APPS = ["django_ocmemcache"]
ROOT_URLCONF = "site_urls"
MIDDLEWARE = ["django_ocmemcache.middleware.RequestSpanMiddleware"]
CACHES = {"default": {"BACKEND": "django_ocmemcache.backend.OCMemcacheCache",
                      "LOCATION": "127.0.0.1:11211"}}
EOF
cat >"$out/site_urls.py" <<'EOF'
from django.urls import path
from django_ocmemcache.views import metrics
urlpatterns = [path("metrics", metrics)]
EOF
PYTHONPATH="$out" DJANGO_SETTINGS_MODULE=site_settings "$out/venv/bin/python" -m django check
PYTHONPATH="$out" DJANGO_SETTINGS_MODULE=site_settings "$out/venv/bin/python" - <<'EOF'
import django
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory

django.setup()
from django_ocmemcache.views import metrics

try:
    metrics(RequestFactory().get("/metrics"))
except ImproperlyConfigured as exc:
    assert "django-ocmemcache[prometheus]" in str(exc), exc
    print(f"without [prometheus], /metrics says: {exc}")
else:
    raise SystemExit("/metrics worked without prometheus_client?")
EOF
echo "package: ok"
