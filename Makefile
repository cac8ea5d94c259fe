# The README's two commands: `make run` and `make test`. Everything else follows from them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: run test lint bench bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

## Run the relay on the embedded default policy (127.0.0.1:2525, data in ./var).
run: $(STAMP)
	$(VENV)/bin/mta run $$([ "$$(id -u)" = 0 ] && echo --allow-root)

## Lint, type-check and run every test (installs swaks/openssl first when root).
test: $(STAMP)
	scripts/system-deps.sh
	$(VENV)/bin/ruff check mta tests benchmarks
	$(VENV)/bin/ruff format --check mta tests benchmarks
	$(VENV)/bin/mypy --strict mta
	$(VENV)/bin/pytest

## Relayed messages per second over STARTTLS on both legs (see benchmarks/).
bench: $(STAMP)
	$(PY) benchmarks/relay_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
