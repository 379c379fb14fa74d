"""Shared test fixtures: the Flickr8k data beside the repo, and a small random qsearch model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
LAVIS_TINY = REPO / "tests" / "fixtures" / "lavis_tiny"

needs_flickr8k = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k.token.txt").exists(),
    reason=f"Flickr8k data not found at {FLICKR8K} (../shared is absent on this machine)",
)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A qsearch checkpoint: real frozen EfficientNet-Lite0 + a small randomly initialised Q-Former."""
    from qformer.config import QFormerConfig
    from qformer.encoders import EfficientNetLiteEncoder
    from qformer.factory import Blip2Retriever
    from qformer.model import QFormer
    from qformer.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           num_query_tokens=8, embed_dim=32, encoder_width=1280)
    model = Blip2Retriever(EfficientNetLiteEncoder("lite0"), QFormer(config).eval(), load_tokenizer(), "small-random")
    d = tmp_path_factory.mktemp("models") / "small-random"
    model.save_pretrained(d)
    return d
