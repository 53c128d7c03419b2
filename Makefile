PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when packaging or native sources change; Python sources are editable.
$(STAMP): $(BIN)/python pyproject.toml setup.py compile/_native.pyx
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(BIN)/muse demo --workdir demo-out

bench: $(STAMP)
	$(BIN)/python -m muse.bench.kernel
	$(BIN)/python -m muse.bench.calib_kernels
	$(BIN)/python -m muse.bench.request_path
	$(BIN)/python -m muse.bench.http

clean:
	rm -rf $(VENV) build *.egg-info demo-out compile/_native.c compile/*.so
