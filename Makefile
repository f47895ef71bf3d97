# One entry point per job; each script installs what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
DJANGO ?= Django>=5.2,<6.0
export PYTHON VENV DJANGO

.PHONY: test demo bench lint reliability docs package

test:            ## install memcached + deps, then run the whole suite
	bash scripts/test.sh $(PYTEST_ARGS)

demo:            ## run the example site against real memcached and print what it shows
	bash scripts/demo.sh $(DEMO_ARGS)

bench:           ## benchmarks side by side with Django's PyMemcacheCache
	bash scripts/bench.sh $(BENCH_ARGS)

reliability:     ## failure scenarios against real memcached; writes docs/reliability.md
	bash scripts/reliability.sh $(RELIABILITY_ARGS)

lint:            ## ruff + mypy on the package
	bash scripts/setup-env.sh >/dev/null
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check django_ocmemcache
	$(VENV)/bin/mypy django_ocmemcache

docs:            ## the MkDocs site into site/ (warnings are errors) + README link check
	bash scripts/docs.sh

package:         ## sdist + wheel, twine check --strict, fresh install of the wheel
	bash scripts/package.sh
