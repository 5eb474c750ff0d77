# The two commands: `make demo` runs replicator on an embedded default (a demo database with
# a small writer, replicated to a local file replica); `make test` runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup compile clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# bytecode of the project's own modules: an editable install has none, and where
# PYTHONDONTWRITEBYTECODE is set every command would compile them again (~40 ms a start)
compile: $(VENV)/.installed
	$(PY) -m compileall -q replicator replicas > /dev/null

setup: $(VENV)/.installed compile

demo: setup
	$(PY) -m replicator demo --log-format text

test: setup
	bash scripts/install-test-services.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo .pytest_cache
