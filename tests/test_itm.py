"""The one ITM re-ranker (qformer.itm): the search engine, the retrieval benchmark and the stored keys/values
(`--itm-kv`) compute the same match logits, bit for bit, whatever batches the images arrive in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer import IndexConfig, build_index
from indexer.build import itm_keys_values
from indexer.store import array_to_kv
from qformer.factory import create_model
from qformer.itm import ItmReranker
from qformer.recall import rerank_with_itm
from qformer.retrieval_bench import EmbeddedSet, make_itm_fn
from search.engine import Searcher


@pytest.fixture(scope="module")
def model(small_model_dir):
    return create_model(small_model_dir)


@pytest.fixture(scope="module")
def tokens(model):
    torch.manual_seed(0)
    return torch.randn(40, 49, model.qformer.config.encoder_width).to(torch.bfloat16).float()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_keys_values_do_not_depend_on_the_batch(model, tokens, precision):
    rr = ItmReranker(model, precision)
    whole = rr.keys_values(tokens)
    perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(1))
    part = rr.keys_values(tokens[perm[:7]])
    for (k, v), (kp, vp) in zip(whole, part, strict=True):
        assert k.dtype == rr.dtype and k.shape[0] == len(tokens)
        assert torch.equal(k[perm[:7]], kp) and torch.equal(v[perm[:7]], vp)


def test_text_vs_images_takes_tokens_keys_values_or_a_loader(model, tokens):
    rr = ItmReranker(model, "bf16", batch_size=16)
    ids, mask = model.tokenize(["a dog runs on the grass"])
    from_tokens = rr.text_vs_images(ids[0], mask[0], tokens)
    kv = rr.keys_values(tokens)
    assert from_tokens.shape == (40,) and from_tokens.dtype == torch.float32
    assert torch.equal(rr.text_vs_images(ids, mask, kv), from_tokens)
    assert torch.equal(rr.text_vs_images(ids, mask, lambda s: tokens[s], len(tokens)), from_tokens)
    # each pass of 16 images is one itm_match_logit call on that pass's images
    q = rr.encoder
    direct = torch.cat([q.itm_match_logit(rr.keys_values(tokens[i : i + 16]), ids.expand(len(tokens[i : i + 16]), -1),
                                          mask.expand(len(tokens[i : i + 16]), -1)).float() for i in (0, 16, 32)])
    assert torch.equal(from_tokens, direct)
    with pytest.raises(ValueError, match="n is required"):
        rr.text_vs_images(ids, mask, lambda s: tokens[s])
    with pytest.raises(ValueError, match="precision"):
        ItmReranker(model, "fp8")


def test_engine_and_benchmark_rerank_a_query_with_the_same_bits(model, tmp_path):
    """The benchmark's text → image re-ranking of a caption gives the logits `Searcher.itm_logits` gives for
    that query and candidate list, though the benchmark caches every image's keys/values in one go."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)).save(tmp_path / f"p{i:02d}.png")
    build_index(model, [tmp_path], tmp_path / "index", IndexConfig(num_workers=0), progress=False)
    s = Searcher(tmp_path / "index", model=model, itm_precision="bf16")
    texts = ["a noisy picture", "colourful dots", "static on a screen"]
    ids = s.index.image_ids()
    emb = EmbeddedSet(torch.from_numpy(s.index.embeddings(ids)), s.index.features(ids), model.embed_texts(texts),
                      *model.tokenize(texts))
    itc = torch.from_numpy(s.first_stage.exact_scores(emb.text_embeds, ids)).t()  # [images, texts]
    _, t2i = rerank_with_itm(itc, make_itm_fn(model, emb, precision="bf16"), k=10)
    for t, text in enumerate(texts):
        cand = itc[:, t].topk(10).indices
        engine = torch.from_numpy(s.itm_logits(text, ids[cand.numpy()]))
        assert torch.equal(engine + itc[cand, t], t2i[t, cand])  # itm + itc, as the benchmark adds them
    # the stored keys/values (--itm-kv) are those of the same re-ranker, image by image
    stored = array_to_kv(itm_keys_values(model, s.index.features(ids[:5]).numpy(), "fp16"),
                         model.qformer.config.num_heads)
    for (k, v), (ks, vs) in zip(ItmReranker(model, "bf16").keys_values(s.index.features(ids[:5])), stored, strict=True):
        assert torch.equal(k, ks) and torch.equal(v, vs)
