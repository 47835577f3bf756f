# minivlm: `make demo` and `make test` do all set-up themselves (through `make install`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.toml
ARGS   ?=
SWEEP  ?= configs/sweeps/demo_lr.toml
RUN    ?= runs/demo
IMAGE  ?=
RUNS   ?= runs/demo
OUT    ?=
# CPU machines get this CPU build of torch (from a local wheel when pip finds one, else the CPU index);
# machines with nvidia-smi get the default (CUDA) build through pyproject's permissive range.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX   ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo demo-data embed train sweep caption evaluate export view test test-fast gpu-check bench bench-quick clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q 'torch>=2.5'; \
	else \
	  $(BIN)/pip install -q --no-index --no-deps 'torch==$(TORCH_CPU_VERSION)' 2>/dev/null || \
	  $(BIN)/pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -q -e '.[dev,plot,search,view]'
	touch $@

demo-data: install
	$(BIN)/python stages/demo_data.py --out data/demo

demo: demo-data
	$(BIN)/python stages/embed.py --config configs/demo.toml $(ARGS)
	$(BIN)/python stages/train.py --config configs/demo.toml $(ARGS)

embed: install
	$(BIN)/python stages/embed.py --config $(CONFIG) $(ARGS)

train: install
	$(BIN)/python stages/train.py --config $(CONFIG) $(ARGS)

sweep: install
	$(BIN)/python stages/sweep.py --config $(CONFIG) --sweep $(SWEEP) $(ARGS)

caption: install
	$(BIN)/python stages/caption.py --run $(RUN) $(foreach i,$(IMAGE),--image $(i)) $(ARGS)

# the page to look at runs: RUNS="runs/demo runs/demo_lr" (run, sweep or folder paths); ARGS="--port 8000"
view: install
	$(BIN)/python stages/view.py --runs $(RUNS) $(ARGS)

evaluate: install
	$(BIN)/python stages/evaluate.py --run $(RUN) $(ARGS)

export: install
	$(BIN)/python stages/export.py --run $(RUN) --out $(or $(OUT),exports/$(notdir $(RUN))) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# the edit loop: everything but the end-to-end (slow), CUDA (gpu) and browser tiers
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not browser" $(ARGS)

# one GPU, under 8 minutes: the CUDA test tier, then the bench in quick CUDA mode (b16: P1-P4, samples/s,
# tokens/s, MFU) -> bench/results/<host>-<date>-cuda.json
gpu-check: install
	$(BIN)/python -m pytest -q -m gpu -rs -p no:cacheprovider $(ARGS)
	$(BIN)/python bench/run.py --cuda

# the bench writes bench/results/<host>-<date>[-quick].json; report.py then rewrites docs/performance.md and the
# README's headline from the newest results file (commit the three together)
bench: install
	$(BIN)/python bench/run.py $(ARGS)
	$(BIN)/python bench/report.py

bench-quick: install
	$(BIN)/python bench/run.py --quick $(ARGS)
	$(BIN)/python bench/report.py
