# psipo developer targets. Everything runs inside .venv, created on first use.
# On a GPU machine: make install TORCH_SPEC=   (empty: let pip pick the CUDA torch build)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The exact versions the test suite passed with, torch excepted (TORCH_SPEC picks the build). Shipped inside the
# package: the run banner names TRL/transformers versions that differ. pyproject.toml keeps ranges for library users.
CONSTRAINTS := psipo_cli/constraints.txt
# Left out of the constraints: the torch build differs by machine (CPU wheel here, CUDA on GPUs) and brings these.
UNPINNED := ^(torch|triton|nvidia-[a-z0-9-]+|psipo)==

.PHONY: install constraints demo test test-fast lint format docs check bench bench-repeat soak assets paper frontier clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The CPU torch wheel first: a bare `torch` requirement resolved on its own pulls a multi-GB CUDA build.
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# After upgrading a library in .venv and passing the suite: pin what is installed now (commit the file).
constraints:
	@test -x $(BIN)/python || { echo "no $(VENV): make install first"; exit 1; }
	{ echo "# Exact versions psipo's test suite passed with: make install uses them (pip install -c). Regenerate"; \
	  echo "# with make constraints. torch, triton and nvidia-* are left out: TORCH_SPEC picks the torch build."; \
	  echo "# Resolved on $$($(BIN)/python --version) (other Pythons may need other versions: pip install -e . without -c)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE '$(UNPINNED)' | grep -v '^#'; \
	} > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

demo: install
	$(BIN)/psipo finetune recipes/tiny-ipo.yaml --overwrite

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check psipo_cli tests scripts bench
	$(BIN)/ruff format --check psipo_cli tests scripts bench

format: install
	$(BIN)/ruff format psipo_cli tests scripts bench
	$(BIN)/ruff check --fix psipo_cli tests scripts bench

docs: install
	$(BIN)/python scripts/gen_docs.py --write

check: lint
	$(BIN)/python scripts/gen_docs.py --check

assets: install
	$(BIN)/python scripts/make_tiny_assets.py

# psipo vs stock TRL DPOTrainer (IPO) throughput, memory and MFU: bench/results.json (about 15 minutes on 2 cores)
bench: install
	$(BIN)/python bench/bench.py

# A long run under load: 10,000 logged steps, 50 checkpoints, killed and resumed; disk use and resume time (soak.json)
soak: install
	$(BIN)/python scripts/soak.py

# Two consecutive runs on a quiet machine and how far each ratio moved between them (about 30 minutes)
bench-repeat: install
	$(BIN)/python bench/bench.py --out bench/results-first.json
	$(BIN)/python bench/bench.py --out bench/results.json --against bench/results-first.json

# IPO vs DPO margins on the tiny model at three τ: docs/paper-margins.png and .md (about 2 minutes on 2 cores)
paper: install
	$(BIN)/python scripts/paper_margins.py

# DPO, IPO, ΨPO, RLHF and online IPO judged by a gold preference: docs/frontier{.json,.md,.png,-training.png} (~15 min, 2 cores)
frontier: install
	$(BIN)/psipo frontier --out docs

clean:
	rm -rf $(VENV) runs .pytest_cache
