# Set-up and checks. `make test` is what CI runs (.ci/run): it installs into .venv and runs lint and the
# default test suite; CI then runs `make test-reliability-slow`. Tiers: `make test-slow` runs the slow
# end-to-end tests, `make test-reliability` every fault, bad-input and security test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
# The torch build to install first. torch==2.13.0 is the CPU wheel on machines that provide one locally;
# on a GPU machine install the CUDA build of the same version before `make install` (see README.md).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-slow test-reliability test-reliability-slow lint format bench-model clean

install: $(STAMP)

# torch first, then deepspeed without build isolation (its build imports torch; an isolated build would
# download another, CUDA, torch), then the package and its other dependencies pinned by the lock file.
# DeepSpeed's shared-memory collective op for CPU ranks is compiled at install (DS_BUILD_SHM_COMM=1), not
# at the first run: a just-in-time build holds a lock in ~/.cache/torch_extensions that a process killed
# mid-build leaves behind (every later run then waits on it), and it is rebuilt whenever another ninja
# is first on PATH. --no-cache-dir: pip's wheel cache does not know about that build option.
$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" "setuptools>=69" wheel
	$(PIP) install --quiet "$(TORCH_SPEC)"
	DS_BUILD_SHM_COMM=1 $(PIP) install --quiet --no-cache-dir --no-build-isolation -c requirements-lock.txt deepspeed
	$(PIP) install --quiet -c requirements-lock.txt -e ".[dev]"
	$(BIN)/python -c "import torch, deepspeed, transformers, ray, mlflow; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__)"
	touch $(STAMP)

# The main job: `albert-scale quickstart` on embedded defaults (about 20 minutes on 2 CPU cores): fetch two
# real corpora, preprocess them with a local Ray, pretrain the quickstart ALBERT with DeepSpeed and LAMB,
# export it, register it in the local MLflow registry (quickstart/mlflow.db) and fine-tune Rotten
# Tomatoes from the registry against random initialization. Interrupted, `make run` continues.
run: install
	$(BIN)/albert-scale quickstart --output quickstart

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pytest exits 5 when a selection holds no test; that is not a failure of the code.
define run_pytest
	$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests selected"; rc=0; fi; exit $$rc
endef

test: lint
	$(call run_pytest,)

test-slow: install
	$(call run_pytest,-m slow)

# Fault injection, bad input and security (tests marked `reliability`), the slow ones included.
test-reliability: install
	$(call run_pytest,-m reliability)

# The slow reliability tests only: CI runs them after `make test`, which has run the others.
test-reliability-slow: install
	$(call run_pytest,-m "reliability and slow")

bench-model: install
	$(BIN)/python bench/model_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
