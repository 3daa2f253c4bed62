# Two commands set everything up on a fresh machine:
#   make serve   - create .venv (runtime deps only), start the service on the bundled model
#   make test    - create .venv (runtime + train + dev extras), run the default test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-slow test-docker bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.stamp-runtime: pyproject.toml setup.py $(wildcard service/kernels/_native/*.c service/kernels/_native/*.h) | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml setup.py $(wildcard service/kernels/_native/*.c service/kernels/_native/*.h) | $(PY)
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.stamp-runtime

serve: $(VENV)/.stamp-runtime
	$(VENV)/bin/csist serve --host $(HOST) --port $(PORT)

test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

test-slow: $(VENV)/.stamp-dev
	$(PY) -m pytest -m slow

# Builds the images and runs them on a real Docker engine (tests/docker/test_engine.py); starts
# dockerd and makes the base images from Debian packages when needed (docs/deployment.md).
test-docker: $(VENV)/.stamp-dev
	$(PY) -m pytest -m docker tests/docker

clean-venv:
	rm -rf $(VENV)
