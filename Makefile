# Carrara: `make demo` runs the end-to-end demo, `make test` runs every check. Both install what they
# need on a fresh Debian 12 machine (apt packages, a virtualenv in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := g++ cmake protobuf-compiler libprotobuf-dev libbenchmark-dev libgtest-dev \
                libgrpc++-dev protobuf-compiler-grpc libhiredis-dev \
                postgresql redis-server postgresql-client redis-tools chromium \
                openjdk-17-jre-headless
STAMP := $(VENV)/.installed
NATIVE_BUILD := build/native-asan

TRITON_VENV := build/triton-venv

.PHONY: all install apt triton-env demo test lint typecheck stubs stubcheck native-test pytest bench services clean

all: test

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml CMakeLists.txt | apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja "setuptools>=70.1" wheel
	$(PIP) install -q --no-build-isolation -e '.[platform,dev]'
	touch $(STAMP)

install: $(STAMP)
	@# Rebuild the native module when C++ sources changed (the editable install does not).
	$(PIP) install -q --no-build-isolation --no-deps -e .
	bash scripts/mypy-tree.sh

# A real Triton server for the Triton-backend tests: nvidia-pytriton ships Triton 2.51 (CPU,
# python backend) but pins numpy<2, so it gets its own virtualenv.
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "nvidia-pytriton==0.7.0" onnxruntime
	touch $@

triton-env: $(TRITON_VENV)/.installed

demo: install
	$(VENV)/bin/carrara demo

services:
	bash scripts/start-services.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	bash scripts/mypy-tree.sh
	$(VENV)/bin/mypy

# Stubs are generated from the built module, never edited by hand.
stubs: install
	$(VENV)/bin/pybind11-stubgen carrara._native -o build/stubs --numpy-array-use-type-var
	cp build/stubs/carrara/_native.pyi python/carrara/_native.pyi
	$(VENV)/bin/ruff format -q python/carrara/_native.pyi

stubcheck: install
	$(VENV)/bin/pybind11-stubgen carrara._native -o build/stubs --numpy-array-use-type-var
	cp build/stubs/carrara/_native.pyi build/stubs/_native.pyi && $(VENV)/bin/ruff format -q build/stubs/_native.pyi
	diff -u python/carrara/_native.pyi build/stubs/_native.pyi || { echo "python/carrara/_native.pyi is stale: run 'make stubs'"; exit 1; }
	$(PY) -m mypy.stubtest carrara._native --concise --mypy-config-file pyproject.toml --allowlist cpp/stubtest-allowlist.txt

# The native C++ tests (core, gRPC front, Triton client), built with AddressSanitizer +
# UndefinedBehaviorSanitizer. The Triton client's tests start a real Triton from triton-env.
native-test: apt triton-env
	cmake -S . -B $(NATIVE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCARRARA_NATIVE_TESTS=ON \
	  -DCARRARA_SANITIZE=ON -DCARRARA_KSERVE_PYTHON=$(abspath $(PY)) \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja >/dev/null
	cmake --build $(NATIVE_BUILD) -j2
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(NATIVE_BUILD)/core/tests/carrara_core_tests --gtest_brief=1
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(NATIVE_BUILD)/server/tests/carrara_server_tests --gtest_brief=1
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  CARRARA_TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python \
	  $(NATIVE_BUILD)/server/triton/tests/carrara_triton_tests --gtest_brief=1

pytest: install services triton-env
	$(VENV)/bin/pytest -q -p no:cacheprovider

test: install services lint typecheck stubcheck native-test pytest

bench: install
	$(PY) -m bench.core

# The chaos suite in full (CARRARA_CHAOS_FULL=1: longer loads, more faults, more fuzz inputs;
# `make test` runs it short), with the native open-loop client for the overload case, then
# RELIABILITY.md from the figures the cases recorded in build/chaos (also when a case failed).
.PHONY: chaos kserve-load
kserve-load: install
	$(PY) -c "from bench.overload import build_load; build_load()"

chaos: install services kserve-load
	rm -rf build/chaos
	CARRARA_CHAOS_FULL=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/chaos; status=$$?; \
	$(PY) -m tests.chaos.report; exit $$status

# Triton's perf_analyzer (PyPI wheel, built for glibc 2.38) run through Debian trixie's glibc
# loader from build/perf-analyzer; nothing is installed system-wide.
.PHONY: perf-analyzer bench-check
perf-analyzer:
	bash bench/perf_analyzer/install.sh

# Judge a `python -m bench.kserve_compare` JSON against the gateway's targets (not run in CI).
BENCH_JSON ?= bench/results/native_front.json
bench-check:
	$(PYTHON) -m bench.check_ratios $(BENCH_JSON)

# A self-contained wheel in dist/ (the native libraries vendored by auditwheel).
.PHONY: wheel
wheel: install
	bash scripts/build-wheel.sh

# The image of each role (deploy/Dockerfile; needs a container runtime, not run in CI).
ROLES := serving features monitoring training
IMAGE ?= ghcr.io/carrara-ml/carrara
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
.PHONY: images
images:
	docker build -f deploy/Dockerfile -t $(IMAGE):$(VERSION) .
	for role in $(ROLES); do \
	  docker build -f deploy/Dockerfile --build-arg ROLE=$$role -t $(IMAGE)-$$role:$(VERSION) . || exit 1; \
	done

clean:
	rm -rf build dist $(VENV)
