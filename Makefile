# Two commands a new user needs: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:8080

.PHONY: setup system run test lint format demo clean bench lock lowest

# `make setup` installs exactly requirements.lock (every package pinned, with hashes), then the
# project itself without touching its dependencies. `make lock` refreshes the lock on purpose;
# `make lowest` checks the lower bounds pyproject.toml publishes (docs/dependencies.md).
LOCK_ARGS := pyproject.toml requirements/build.in --all-extras --python-version 3.11 \
             --python-platform x86_64-manylinux_2_28 \
             --generate-hashes

$(STAMP): requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

# `make lock` keeps every pin it can and resolves what pyproject.toml changed;
# `make lock UPGRADE=1` moves every package to its newest allowed release.
# Not `lock: setup`: after a new dependency in pyproject.toml, setup's `pip check` fails until
# the lock has it, so lock only needs the locked uv that an earlier setup installed.
lock:
	test -x $(BIN)/uv || $(MAKE) setup
	$(BIN)/uv pip compile $(LOCK_ARGS) $(if $(UPGRADE),--upgrade) -o requirements.lock
	$(BIN)/uv pip compile benchmarks/litellm.in --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --generate-hashes \
	    $(if $(UPGRADE),--upgrade) -o benchmarks/litellm.lock

lowest: setup
	./scripts/lowest.sh

system:
	./scripts/setup-system.sh

run: setup
	@echo "Try, in another terminal (the tutorial's Step 7):"
	@echo "  export KUADRANT_GATEWAY_URL=$(LISTEN)"
	@echo "  curl -i -H 'Host: trlp-tutorial.example.com' -H 'Authorization: APIKEY iamafreeuser' http://\$$KUADRANT_GATEWAY_URL/v1/models"
	@echo "  curl -i -H 'Host: trlp-tutorial.example.com' -H 'Authorization: APIKEY iamafreeuser' \\"
	@echo "       -H 'Content-Type: application/json' -X POST http://\$$KUADRANT_GATEWAY_URL/v1/chat/completions \\"
	@echo "       -d '{\"model\": \"meta-llama/Llama-3.1-8B-Instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"What is Kubernetes?\"}], \"max_tokens\": 100, \"stream\": false, \"usage\": true}'"
	@echo "  (again, until 429; then the same with 'APIKEY iamagolduser')"
	@echo "  $(BIN)/tokengateway get trlp -n gateway-system             # policy status"
	@echo "  $(BIN)/tokengateway counters default/trlp-tutorial-llm-sim # tokens used per user"
	@echo
	$(BIN)/tokengateway serve -f examples/tutorial --listen $(LISTEN)

test: setup system
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m mypy
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m mypy

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

demo: setup
	$(BIN)/tokengateway demo

# Benchmarks (docs/benchmarks.md): wrk and redis-server via apt-get when missing, LiteLLM in
# its own benchmarks/.litellm-venv. `make bench BENCH_ARGS=--no-litellm` skips LiteLLM.
bench: setup
	./benchmarks/setup.sh
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-lowest .venv-lowest.txt .pytest_cache .ruff_cache
