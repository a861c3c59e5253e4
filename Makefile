# `make demo`: set up .venv and train the quickstart on CPU (a few minutes).
# `make test`: set up .venv (with test tools) and run the whole test suite.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python

.PHONY: demo test lint format tools clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m sg2dist train --config configs/quickstart.yaml

# kubectl renders the kustomize overlays in the k8s tests; Debian ships it.
tools:
	@command -v kubectl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; \
	  else echo "note: kubectl missing (apt-get install kubernetes-client); k8s render tests will skip"; fi; }

test: $(VENV)/.installed tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
