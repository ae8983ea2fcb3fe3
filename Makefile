# The two commands a newcomer needs: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# Tests run the Triton kernels on CPU through the interpreter.
export TRITON_INTERPRET ?= 1

.PHONY: venv test lint demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-venv.sh scripts/constraints.txt \
		$(wildcard tests/plugins/*/pyproject.toml)
	bash scripts/setup-venv.sh
	touch $@

test: venv
	$(PY) -m ruff check prunekit tests benchmarks
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check --fix prunekit tests benchmarks
	$(PY) -m ruff format prunekit tests benchmarks

demo: venv
	$(PY) -m prunekit demo -o demo-out --overwrite

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .hypothesis
