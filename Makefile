# kdrun developer commands. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run sweep bench bench-sweep bench-lm test test-slow test-full test-slurm lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv if absent and install kdrun with its dev tools
	@echo "kdrun installed in $(VENV); activate with: source $(BIN)/activate"

run: $(STAMP) ## run the default pipeline (MNIST-1D, offline, well under a minute on 2 CPU cores)
	$(BIN)/kdrun
	@echo "kdrun is installed in $(VENV): run 'source $(BIN)/activate' to put kdrun on your PATH, then try: kdrun -m loss.T=2,4"

sweep: $(STAMP) ## a small T x alpha sweep on the default data (one teacher, 3 student seeds, students trained stacked; ~25 s on 2 CPU cores)
	$(BIN)/kdrun -m loss.T=1,2,4 loss.alpha=0.5,0.9

bench: $(STAMP) ## kdrun's epochs vs the seed notebook's loop, side by side (a few minutes on CPU)
	$(BIN)/python benchmarks/bench_kd.py

bench-lm: $(STAMP) ## a GPT-2's distillation step vs a plain PyTorch loop (about a minute on CPU); then kdrun vs nanoGPT's train.py loop on real text, TEXT=input.txt (generated without it; ~8 min on CPU)
	$(BIN)/python benchmarks/bench_lm.py
	$(BIN)/python benchmarks/bench_lm_text.py $(if $(TEXT),--text $(TEXT))

bench-sweep: $(STAMP) ## the 24-job T x alpha x seed sweep, basic vs batched launcher, cold cache (a few minutes on CPU)
	$(BIN)/python benchmarks/bench_sweep.py

test: $(STAMP) ## the test suite without the slow tests (a few minutes on 2 CPU cores)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP) ## only the slow tests
	$(BIN)/python -m pytest -q -m slow

test-slurm: $(STAMP) ## as root: a one-node Slurm cluster on localhost (installs slurm-wlm, munge if absent), kdrun's Slurm tests against it (~5 min)
	bash tests/slurm/run_slurm_tests.sh

test-full: $(STAMP) ## every test
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff over the code and the tests; the import layers (lint-imports)
	$(BIN)/ruff check kdrun hydra_plugins tests benchmarks
	$(BIN)/lint-imports

clean: ## delete run outputs, caches and build files (keeps .venv)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
