# casakv-vllm developer entry points (CPU machine).  See README.md.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: venv demo test test-all test-unit test-e2e test-kernels test-deploy test-compat generate docs clean-venv

venv:
	@bash scripts/setup-cpu-venv.sh $(VENV)

demo: venv
	$(VENV)/bin/casakv demo

# Everything that runs on a CPU box: unit, kernels (TRITON_INTERPRET=1) and
# end-to-end tests against a real `vllm serve`.  GPU tests skip themselves.
test: venv
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# Everything, the `slow` equivalence checks included.
test-all: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-kernels: venv
	$(VENV)/bin/pytest tests/kernels $(PYTEST_ARGS)

test-e2e: venv
	$(VENV)/bin/pytest tests/e2e $(PYTEST_ARGS)

# Helm chart (lint, render, Kubernetes schemas, checkov), Dockerfiles, dashboard, docs site.
test-deploy: venv
	$(VENV)/bin/pytest tests/deploy $(PYTEST_ARGS)

# The unit tests against vLLM 0.33's Python sources (its wheel, unpacked outside the repo).
test-compat: venv
	@bash scripts/test-compat.sh $(VENV)

# Files generated from CasakvConfig: the chart's values.schema.json, docs/configuration.md.
generate: venv
	$(VENV)/bin/python -m casakv_vllm.tools.schema

docs: venv
	$(VENV)/bin/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
