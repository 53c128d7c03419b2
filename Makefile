PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# setup.py's package_dir: each top-level folder is the subpackage muse.<folder>.
PACKAGES := calib compile core server bench
# mypy cannot follow the import hook of setuptools' editable install, so it reads muse.* through a
# tree of links, $(MYPY_TREE)/muse/<folder> -> <folder>.
MYPY_TREE := build/mypy
# Tests run in a fresh random order each time; `make test SEED=<n>` replays the order of a run.
SEED ?= $(shell od -An -N2 -tu2 /dev/urandom | tr -d ' ')

.PHONY: install lint test demo demo-cluster bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Cython sources: their extensions are built at install time.
NATIVE := $(wildcard $(addsuffix /*.pyx,$(PACKAGES)) $(addsuffix /*.pxd,$(PACKAGES)))

# Reinstall when packaging or native sources change; Python sources are editable.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(NATIVE)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(MYPY_TREE)/muse && for p in $(PACKAGES); do ln -sfn ../../../$$p $(MYPY_TREE)/muse/$$p; done
	MYPYPATH=$(MYPY_TREE) $(BIN)/mypy $(addprefix -p muse.,$(PACKAGES))

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -p random_order --random-order --random-order-seed=$(SEED) tests

demo: $(STAMP)
	$(BIN)/muse demo --workdir demo-out

# Three replicas behind HAProxy on a registry in moto's S3 server, updated under load (server/demo/cluster.py).
demo-cluster: $(STAMP)
	$(BIN)/muse demo-cluster --workdir demo-cluster-out

bench: $(STAMP)
	$(BIN)/python -m muse.bench.kernel
	$(BIN)/python -m muse.bench.calib_kernels
	$(BIN)/python -m muse.bench.request_path
	$(BIN)/python -m muse.bench.http
	$(BIN)/python -m muse.bench.faults
	$(BIN)/python -m muse.bench.isolation
	$(BIN)/python -m muse.bench.calibration_study

clean:
	rm -rf $(VENV) build *.egg-info demo-out demo-cluster-out $(patsubst %.pyx,%.c,$(filter %.pyx,$(NATIVE))) $(addsuffix /*.so,$(PACKAGES))
