# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-fast bench compose-config clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# Byte-compiled at install on purpose (no --no-compile): where PYTHONDONTWRITEBYTECODE is set, as on these
	# machines, a module not compiled here is compiled again by every process that imports it (measured:
	# --no-compile saved 30 s of install and made make test run past 20 minutes).
	$(PY) -m pip install -q -e '.[airflow,test]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: setup
	bash scripts/demo.sh

test: setup system-deps
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

compose-config: system-deps
	docker-compose -f docker-compose.yaml --env-file .env.example config -q 2>/dev/null; \
	  test $$? -ne 0 || { echo "docker-compose.yaml accepted empty secrets"; exit 1; }
	POSTGRES_PASSWORD=x MINIO_ROOT_USER=x MINIO_ROOT_PASSWORD=x AIRFLOW_JWT_SECRET=x \
	  docker-compose -f docker-compose.yaml --env-file .env.example config -q && echo "docker-compose.yaml is valid"

bench: setup
	@echo "Each benchmark is one command; see bench/README.md"

clean:
	rm -rf demo-data .pytest_cache tests/artifacts
