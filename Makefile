# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test format test-bf16 test-no-bf16 test-cuda test-slow bench bench-precision clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the torch pair first, pinned, so no other package pulls a different build
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# builtin:fortunes (the text demo and tests) reads Debian's fortunes package: installed where apt can
	@test -f /usr/share/games/fortunes/computers || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null) \
	  || echo "note: could not install fortunes; builtin:fortunes and its tests are unavailable" >&2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/transferkit train builtin:faces --name demo --overwrite
	$(BIN)/transferkit predict runs/demo --split test --limit 6
	$(BIN)/transferkit evaluate runs/demo

test: $(STAMP)
	$(BIN)/ruff format --check -q src tests benchmarks  # one format (pyproject.toml [tool.ruff]); `make format` applies it
	$(BIN)/ruff check -q src tests benchmarks
	$(BIN)/lint-imports  # the layers in pyproject.toml: imports point down, no cycles
	$(BIN)/python -m pytest -q

# the suite as a CPU with native bf16 would run it (auto choosing bf16 wherever it may), and as one without
test-bf16: $(STAMP)
	TRANSFERKIT_CPU_BF16=1 TRANSFERKIT_TEST_BF16_FASTER=1 $(BIN)/python -m pytest -q

test-no-bf16: $(STAMP)
	TRANSFERKIT_CPU_BF16=0 $(BIN)/python -m pytest -q

test-cuda: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

format: $(STAMP)
	$(BIN)/ruff format -q src tests benchmarks
	$(BIN)/ruff check -q --fix src tests benchmarks

clean:
	rm -rf runs .pytest_cache

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

bench-precision: $(STAMP)
	$(BIN)/python benchmarks/precision.py
