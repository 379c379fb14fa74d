"""The engine agrees with the benchmark: indexing Flickr8k dev and searching each of its 5,000 captions gives
the text → image recall that `qsearch bench retrieval` reports for the same model."""

from __future__ import annotations

from conftest import FLICKR8K, needs_flickr8k

from indexer import IndexConfig, build_index
from qformer.datasets import load_retrieval_set
from qformer.evaluate import evaluate_retrieval
from qformer.factory import create_model
from search.engine import Searcher
from search.evaluate import engine_text_to_image_recall

K_TEST = 16  # >= 10: recall@10 then only sees re-ranked results, as in the benchmark (k_test=128 >= K there)


@needs_flickr8k
def test_engine_recall_equals_bench_on_flickr8k_dev(small_model_dir, tmp_path):
    data = load_retrieval_set("flickr8k", FLICKR8K, "dev")
    model = create_model(small_model_dir)
    bench = evaluate_retrieval(model, data, k_test=K_TEST, progress=False)
    build_index(model, list(data.image_paths), tmp_path / "index", IndexConfig(), progress=False)
    engine = engine_text_to_image_recall(Searcher(tmp_path / "index", model=model), data, rerank=K_TEST,
                                         progress=False)
    for k in ("img_r1", "img_r5", "img_r10"):
        assert abs(engine[k] - bench["itc+itm"][k]) < 1e-9, (k, engine, bench["itc+itm"])
