# Distillery — two commands set everything up on a fresh machine:
#   make pipeline                          # the built-in demo (no TEACHER) or TEACHER=… STUDENT=…
#   make test                              # the whole test suite, what CI runs (.ci/run)
#   make test-fast                         # the same minus the tests marked slow (development)
#   make submit RECIPE=… ADDRESS=http://head:8265 [STAGE=all] [ARGS=…]   # a Ray job (docs/cluster.md)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
# Where the CPU torch 2.13.0 wheel lies on this machine kind; uv only sees it through --find-links.
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS))
# GPU machines get stock vLLM (CUDA torch); everything else vLLM's CPU build.
EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
RECIPE ?= configs/tiny.yaml
TEACHER ?=
STUDENT ?=
ARGS ?=
STAGE ?= all
ADDRESS ?= $(RAY_ADDRESS)

.PHONY: install pipeline test test-fast bench submit clean-data

install: $(VENV)/.installed-$(EXTRA)

# Re-runs only when pyproject.toml or the exclude list change (make's timestamps): idempotent, ~0 s.
$(VENV)/.installed-$(EXTRA): pyproject.toml cluster/install-excludes.txt
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@test -x $(VENV)/bin/uv || $(VENV)/bin/python -m pip install -q --disable-pip-version-check uv
	# --compile-bytecode: this environment sets PYTHONDONTWRITEBYTECODE=1; without .pyc files
	# vLLM's start-up doubles (31-35 s instead of 14-17 s, docs/stack.md).
	$(VENV)/bin/uv pip install -q -p $(VENV)/bin/python $(FIND_LINKS) \
	    --excludes cluster/install-excludes.txt --compile-bytecode -e ".[$(EXTRA),dev]"
	# DeepSpeed's CPU comm op, built here rather than inside the first training run (~38 s).
	$(VENV)/bin/python -c "from cluster.train import prebuild_deepspeed_ops as b; b()"
	@rm -f $(VENV)/.installed-*
	@touch $@

pipeline: install
ifeq ($(strip $(TEACHER)),)
	$(VENV)/bin/distillery demo $(ARGS)
else
	$(VENV)/bin/distillery run all --recipe configs/recipe.yaml teacher=$(TEACHER) $(if $(STUDENT),student=$(STUDENT)) $(ARGS)
endif

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

# The development loop: skips the `slow` marker's minutes-long runs (pyproject.toml says which
# kinds; docs/status.md lists them and the tiers' times). CI runs `make test`, slow ones included.
test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow" $(ARGS)

# The same `distillery run STAGE` as a Ray job on the cluster at ADDRESS; logs stream back.
submit: install
	$(VENV)/bin/distillery submit $(STAGE) --recipe $(RECIPE) $(if $(ADDRESS),--address $(ADDRESS)) $(ARGS)

bench: install
	for b in bench/*.py; do $(VENV)/bin/python $$b || exit 1; done
