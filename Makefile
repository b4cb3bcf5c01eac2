# kubedistill: everything a fresh machine needs, from a clean clone.
#   make demo   create the environment, run the quickstart DistillationRun on a local Ray, serve the student
#   make test   create the environment and run every test (starts its own SeaweedFS S3 server)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test dev crd lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kubedistill needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

dev: $(STAMP)

demo: $(STAMP)
	$(BIN)/kubedistill run manifests/samples/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

crd: $(STAMP)
	$(BIN)/kubedistill crd > manifests/crds/kubedistill.io_distillationruns.yaml

clean:
	rm -rf runs .pytest_cache
