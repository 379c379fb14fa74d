"""Stage-1 training: the losses, the feature cache, the training loop, exact resume after a kill.

A small random Q-Former on the real EfficientNet-Lite0 encoder and tokenizer, on a handful of real
Flickr8k training images (skipped when the shared data set is not there).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qformer.config import QFormerConfig
from qformer.encoders import EfficientNetLiteEncoder
from qformer.factory import Blip2Retriever, create_model
from qformer.features import FeatureCache
from qformer.losses import (
    itc_loss,
    itg_loss,
    positive_mask,
    sample_hard_negatives,
    stage1_losses,
)
from qformer.model import QFormer
from qformer.pairs import CaptionPairs, Collate, EpochBatches, PairDataset, load_pairs
from qformer.tokenizer import TRAIN_MAX_LENGTH, load_tokenizer, tokenize
from qformer.train import TrainConfig, list_checkpoints, load_train_state, lr_at, train

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k"
REPO = Path(__file__).resolve().parents[1]
SMALL = QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_query_tokens=8,
                      embed_dim=32, encoder_width=1280, vocab_size=30523)
N_IMAGES = 8  # 40 pairs

needs_data = pytest.mark.skipif(not (DATA / "Flickr8k.token.txt").is_file(),
                                reason=f"Flickr8k not found at {DATA} (shared data set absent)")


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder() -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder("lite0")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def small_model(encoder, tokenizer, seed: int = 0) -> Blip2Retriever:
    torch.manual_seed(seed)
    return Blip2Retriever(encoder, QFormer(SMALL), tokenizer, "small")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, encoder, tokenizer) -> Path:
    """The untrained small model as a qsearch checkpoint directory (the training runs' --model)."""
    return small_model(encoder, tokenizer).save_pretrained(tmp_path_factory.mktemp("small") / "model")


@pytest.fixture(scope="module")
def pairs():
    if not (DATA / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found at {DATA} (shared data set absent)")
    return load_pairs("flickr8k", DATA, "train", max_images=N_IMAGES)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, encoder, pairs) -> Path:
    d = tmp_path_factory.mktemp("features")
    FeatureCache.build(encoder, pairs.image_paths, d, batch_size=8, progress=False)
    return d


def run_config(out_dir: Path, model: Path, cache_dir: Path, **kw) -> TrainConfig:
    base = dict(data_root=str(DATA), max_images=N_IMAGES, model=str(model), out_dir=str(out_dir),
                cache_dir=str(cache_dir), batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def rand_batch(b: int, length: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, 49, 1280, generator=g)
    ids = torch.randint(1000, 5000, (b, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    ids[mask == 0] = 0
    return tokens, ids, mask


# ---- losses -------------------------------------------------------------------------------------------------
def test_hard_negatives_never_pick_a_positive():
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # captions of the same image share an id
    pos = positive_mask(ids, len(ids), torch.device("cpu"))
    assert torch.equal(pos, ids[:, None] == ids[None, :])
    sim = torch.where(pos, 50.0, 0.0)  # positives would win every softmax draw were they not masked
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, cols = sample_hard_negatives(sim, pos, g)
        assert torch.equal(rows, torch.arange(len(ids)))
        assert not pos[rows, cols].any()
    # a row whose every candidate is the same image has no negative and is left out
    rows, cols = sample_hard_negatives(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool), g)
    assert rows.numel() == 0 and cols.numel() == 0
    # the draw follows softmax(sim): the hardest negative is picked most often
    sim = torch.tensor([[9.0, 3.0, 0.0, -2.0]]).expand(500, -1)
    pos = torch.zeros(500, 4, dtype=torch.bool)
    pos[:, 0] = True
    _, cols = sample_hard_negatives(sim, pos, g)
    assert (cols == 1).float().mean() > 0.8 and not (cols == 0).any()
    # --itm-uniform: a share of the draws uniform over the negatives, still never a positive
    sim = torch.tensor([[9.0, 30.0, 0.0, -2.0]]).expand(3000, -1)  # column 1 would take every hard draw
    pos = torch.zeros(3000, 4, dtype=torch.bool)
    pos[:, 0] = True
    _, cols = sample_hard_negatives(sim, pos, g, uniform=0.6)
    share = torch.bincount(cols, minlength=4).float() / len(cols)  # expected [0, 0.4 + 0.2, 0.2, 0.2]
    assert share[0] == 0 and abs(share[1] - 0.6) < 0.04 and abs(share[2] - 0.2) < 0.03 and abs(share[3] - 0.2) < 0.03
    _, cols = sample_hard_negatives(sim, pos, g, uniform=1.0)
    assert abs((cols == 1).float().mean() - 1 / 3) < 0.04
    with pytest.raises(ValueError, match="uniform"):
        sample_hard_negatives(sim, pos, g, uniform=1.5)


def test_itc_label_smoothing():
    g = torch.Generator().manual_seed(1)
    sim_i2t, sim_t2i = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    pos = torch.eye(6, dtype=torch.bool)
    targets = torch.arange(6)
    expected = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    torch.testing.assert_close(itc_loss(sim_i2t, sim_t2i, pos), expected)
    # even a perfect separation keeps a loss: the smoothed targets put 0.1/G on every column
    perfect = torch.eye(6) * 100
    assert itc_loss(perfect, perfect, pos) > 0.1
    # two captions of one image: both are positives with half the mass each
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    pos2 = positive_mask(ids, 6, torch.device("cpu"))
    t = (0.9 * pos2.float() / pos2.float().sum(1, keepdim=True) + 0.1 / 6)
    expected2 = -(F.log_softmax(sim_i2t, 1) * t).sum(1).mean() / 2 - (F.log_softmax(sim_t2i, 1) * t).sum(1).mean() / 2
    torch.testing.assert_close(itc_loss(sim_i2t, sim_t2i, pos2), expected2)


def test_itg_uses_dec_shift_padding_and_smoothing():
    torch.manual_seed(0)
    q = QFormer(SMALL).eval()
    tokens, ids, mask = rand_batch(3, length=9)
    kv = q.image_kv(tokens)
    dec = ids.clone()
    dec[:, 0] = SMALL.bos_token_id
    logits = q.itg_logits(tokens, dec, mask)  # [B,L,V]
    labels = dec.masked_fill(mask == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, SMALL.vocab_size), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(itg_loss(q, kv, ids, mask), expected)
    unsmoothed = F.cross_entropy(logits[:, :-1].reshape(-1, SMALL.vocab_size), labels[:, 1:].reshape(-1))
    assert not torch.allclose(expected, unsmoothed)


def test_itg_reusing_the_itc_query_pass_gives_the_full_pass_loss_and_gradients(monkeypatch):
    """ITG's text attends to the ITC image pass's query keys/values (LAVIS `past_key_values`): same loss and
    gradients as running queries + text under the multimodal-causal mask, with one query pass per batch."""
    torch.manual_seed(0)
    q = QFormer(SMALL).eval()  # no dropout: both ways compute the same function
    tokens, ids, mask = rand_batch(4, length=9)
    dec = ids.clone()
    dec[:, 0] = SMALL.bos_token_id
    labels = dec.masked_fill(mask == 0, -100)[:, 1:]

    def grads(loss):
        q.zero_grad()
        loss.backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in q.named_parameters()}

    h = q.encode(dec, mask, kv=q.image_kv(tokens), mask_kind="causal")[:, SMALL.num_query_tokens : -1]
    full = F.cross_entropy(q.lm_head(h, q.embeddings.word.weight).flatten(0, 1), labels.flatten(),
                           label_smoothing=0.1)
    g_full = grads(full)
    kv = q.image_kv(tokens)
    reused = itg_loss(q, kv, ids, mask, query_kv=q.query_pass(kv)[1])
    g_reused = grads(reused)
    torch.testing.assert_close(reused, full)
    assert g_full["query_tokens"].abs().sum() > 0  # the text's loss reaches the queries through their keys/values
    for name in g_full:
        torch.testing.assert_close(g_reused[name], g_full[name], atol=1e-6, rtol=1e-4, msg=name)

    calls = []
    real = q.query_pass
    monkeypatch.setattr(q, "query_pass", lambda kv: calls.append(1) or real(kv))
    stage1_losses(q, tokens, ids, mask, torch.arange(4), torch.Generator().manual_seed(0))
    assert len(calls) == 1  # ITC's image pass, shared with ITG


def test_stage1_losses_shapes_itm_pairs_and_temp_clamp(monkeypatch):
    torch.manual_seed(0)
    q = QFormer(SMALL).train()
    tokens, ids, mask = rand_batch(5)
    seen = []
    real_itm = q.itm_logits

    def spy(kv, input_ids, text_mask):
        seen.append(input_ids.shape[0])
        return real_itm(kv, input_ids, text_mask)

    monkeypatch.setattr(q, "itm_logits", spy)
    with torch.no_grad():
        q.temp.fill_(2.0)
    out = stage1_losses(q, tokens, ids, mask, torch.arange(5), torch.Generator().manual_seed(0))
    assert set(out) == {"itc", "itm", "itg", "loss"}
    assert seen == [15]  # 3B pairs: B positives, B texts with a negative image, B images with a negative text
    assert q.temp.item() == 0.5  # clamped as LAVIS does
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"] + out["itg"])
    out["loss"].backward()
    assert all(p.grad is not None for p in q.parameters())


def test_stage1_losses_batch_of_one():
    torch.manual_seed(0)
    q = QFormer(SMALL).train()
    tokens, ids, mask = rand_batch(1)
    out = stage1_losses(q, tokens, ids, mask, None, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in out.values())
    assert out["itm"].item() == 0.0  # no negative exists: no ITM pairs rather than a positive labelled 0
    out["loss"].backward()
    # a batch made of one image's captions has no negative either
    tokens, ids, mask = rand_batch(3)
    out = stage1_losses(q, tokens, ids, mask, torch.zeros(3, dtype=torch.long))
    assert out["itm"].item() == 0.0 and torch.isfinite(out["loss"])


# ---- data order, schedule ---------------------------------------------------------------------------------
def test_batches_depend_only_on_seed_and_position():
    full = EpochBatches(range(20), 6, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    resumed = iter(EpochBatches(range(20), 6, seed=3, start_batch=4))
    assert [next(resumed) for _ in range(3)] == first[4:7]
    epoch0 = sorted(j for b in first[:3] for j, _ in b)
    assert len(set(epoch0)) == 18  # no pair twice in an epoch
    assert [j for j, _ in first[0]] != [j for j, _ in first[3]]  # a new order every epoch
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_lr=0.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(110, cfg) == pytest.approx(1e-4)


# ---- feature cache, unreadable images -------------------------------------------------------------------
@needs_data
def test_feature_cache_skips_corrupt_and_missing_images(tmp_path, encoder, pairs, caplog):
    good = pairs.image_paths[:3]
    corrupt = tmp_path / "truncated.jpg"
    corrupt.write_bytes(good[0].read_bytes()[:700])  # a JPEG cut short
    missing = tmp_path / "missing.jpg"
    paths = [good[0], corrupt, good[1], missing, good[2]]
    with caplog.at_level(logging.WARNING, logger="qformer.features"):
        cache = FeatureCache.build(encoder, paths, tmp_path / "cache", batch_size=2, progress=False)
    text = caplog.text
    assert f"skipping image {corrupt}" in text and f"skipping image {missing}" in text
    assert "file not found" in cache.skipped[str(missing)] and str(corrupt) in cache.skipped
    assert cache.valid.tolist() == [True, False, True, False, True]
    assert cache[1].abs().sum() == 0
    pixels = torch.stack([encoder.preprocess()(PIL.Image.open(p)) for p in good])
    with torch.no_grad():
        ref = encoder(pixels)  # [3,49,1280]
    got = cache[[0, 2, 4]].float()
    assert got.shape == (3, 49, 1280) and cache.array.dtype.name == "float16"
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)
    # reopening reads the same; rebuilding the same paths reuses the cache
    again = FeatureCache.open(tmp_path / "cache")
    assert torch.equal(again[[0, 2, 4]], cache[[0, 2, 4]])
    assert FeatureCache.build(encoder, paths, tmp_path / "cache", progress=False).skipped == cache.skipped


@needs_data
def test_feature_cache_resumes_after_a_crash(tmp_path, encoder, pairs, monkeypatch):
    paths = pairs.image_paths[:6]
    calls = {"n": 0}
    real_forward = EfficientNetLiteEncoder.forward

    def crashing(self, pixels):
        calls["n"] += 1
        if calls["n"] == 4:  # probe + 2 batches done, then the "machine dies"
            raise KeyboardInterrupt
        return real_forward(self, pixels)

    monkeypatch.setattr(EfficientNetLiteEncoder, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build(encoder, paths, tmp_path / "c", batch_size=2, flush_every=1, progress=False)
    assert not (tmp_path / "c" / "index.json").exists()
    assert json.loads((tmp_path / "c" / "progress.json").read_text())["done"] == 4
    monkeypatch.setattr(EfficientNetLiteEncoder, "forward", real_forward)
    resumed = FeatureCache.build(encoder, paths, tmp_path / "c", batch_size=2, progress=False)
    fresh = FeatureCache.build(encoder, paths, tmp_path / "fresh", batch_size=2, progress=False)
    assert torch.equal(resumed[list(range(6))], fresh[list(range(6))])


@needs_data
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "live"])
def test_training_goes_on_past_unreadable_images(tmp_path, small_dir, pairs, caplog, use_cache):
    corrupt = tmp_path / "truncated.jpg"
    corrupt.write_bytes(pairs.image_paths[0].read_bytes()[:700])
    missing = tmp_path / "missing.jpg"
    bad = CaptionPairs(image_paths=[*pairs.image_paths[:3], corrupt, missing],
                          captions=[*pairs.captions[:15], "a truncated photo", "a photo that is not there"],
                          pair_image=[*pairs.pair_image[:15], 3, 4])
    # live: every batch holds all 17 pairs, the 2 bad ones included; cached: they are left out up front
    cfg = run_config(tmp_path / "run", small_dir, tmp_path / "cache", cache=use_cache, max_steps=2,
                     batch_size=15 if use_cache else 17)
    with caplog.at_level(logging.WARNING):
        final = train(cfg, pairs=bad)
    assert f"skipping image {corrupt}" in caplog.text and f"skipping image {missing}" in caplog.text
    if use_cache:
        assert "training on 15 of 17 pairs" in caplog.text
    records = [json.loads(ln) for ln in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] == r["loss"] for r in records)
    assert final.name == "step_0000002"


@needs_data
def test_cache_views_train_on_augmented_views_encoded_once(tmp_path, small_dir, encoder, pairs):
    """--cache-views 3: two augmented views (random resized crop + flip) are encoded next to the plain cache,
    the same on every build; each pair of each epoch reads one of the three."""
    root = tmp_path / "features"
    final = train(run_config(tmp_path / "run", small_dir, root, max_steps=2, cache_views=3))
    assert final.name == "step_0000002"
    plain, v1, v2 = (FeatureCache.open(d) for d in (root, root / "augment_1", root / "augment_2"))
    assert (plain.augment_seed, v1.augment_seed, v2.augment_seed) == (None, 1, 2)
    rows = list(range(len(plain)))
    assert not torch.equal(plain[rows], v1[rows]) and not torch.equal(v1[rows], v2[rows])
    again = FeatureCache.build(encoder, pairs.image_paths, tmp_path / "again", batch_size=8, progress=False,
                               augment_seed=1)
    assert torch.equal(again[rows], v1[rows])  # a view is a function of (seed, image), not of the run
    with pytest.raises(ValueError, match="augmentation"):
        FeatureCache.build(encoder, pairs.image_paths, root / "augment_1", progress=False, augment_seed=2)
    ds = PairDataset(pairs, cache=[plain, v1, v2])
    row = plain.row(pairs.image_paths[pairs.pair_image[7]])
    for seed, view in ((30, plain), (31, v1), (32, v2)):
        assert torch.equal(ds[(7, seed)]["image"], view[row])


# ---- training -----------------------------------------------------------------------------------------------
def fixed_batch_losses(model: Blip2Retriever, pairs, cache_dir: Path) -> dict[str, float]:
    """Eval-mode stage-1 losses on the same batches (all pairs, fixed order and ITM draws)."""
    ds = PairDataset(pairs, cache=FeatureCache.open(cache_dir))
    collate = Collate(model.tokenizer)
    q = model.qformer.eval()
    totals = {"itc": 0.0, "itm": 0.0, "itg": 0.0, "loss": 0.0}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            b = collate([ds[(j, 0)] for j in range(start, min(start + 8, len(pairs)))])
            out = stage1_losses(q, b["image"], b["input_ids"], b["text_mask"], b["image_ids"], g)
            for k in totals:
                totals[k] += float(out[k])
    return totals


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dir, cache_dir, pairs) -> Path:
    """12 steps of stage 1 on 40 pairs; returns the run directory."""
    out = tmp_path_factory.mktemp("run")
    train(run_config(out, small_dir, cache_dir, max_steps=12, checkpoint_every=6))
    return out


@needs_data
def test_losses_fall(trained, small_dir, cache_dir, pairs):
    before = fixed_batch_losses(create_model(small_dir), pairs, cache_dir)
    after = fixed_batch_losses(create_model(list_checkpoints(trained)[-1]), pairs, cache_dir)
    assert after["loss"] < before["loss"] - 0.3
    assert after["itg"] < before["itg"] and after["itm"] < before["itm"]
    # from a random init, ITC sits on its ln(B) plateau for the first ~80 steps (then drops): it must not rise
    assert after["itc"] < before["itc"] + 0.05
    records = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first


@needs_data
def test_text_lr_scale_scales_only_the_language_model_initialised_text_path(tmp_path, small_dir, cache_dir):
    """--text-lr-scale 0 keeps the embeddings, self-attention and text FFNs where they started while the
    queries, cross-attention, query FFNs and heads train; the checkpoint keeps the groups' scales, and resuming
    at another scale is refused."""
    from qformer.model import TEXT_PATH

    train(run_config(tmp_path, small_dir, cache_dir, max_steps=3, checkpoint_every=3, text_lr_scale=0.0))
    start = load_file(str(Path(small_dir) / "qformer.safetensors"))
    ckpt = list_checkpoints(tmp_path)[-1]
    end = load_file(str(ckpt / "qformer.safetensors"))
    text = [k for k in start if any(t in f".{k}" for t in TEXT_PATH)]
    rest = [k for k in start if k not in text and start[k].dtype.is_floating_point]
    assert any(".attn." in k for k in text) and any(".ffn_text." in k for k in text) and any(
        k.startswith("embeddings.") for k in text)
    assert all(torch.equal(start[k], end[k]) for k in text)
    moved = [k for k in rest if not torch.equal(start[k], end[k])]
    assert any(".cross." in k for k in moved) and any(".ffn_query." in k for k in moved)
    assert "query_tokens" in moved
    groups = load_train_state(ckpt)["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="--text-lr-scale 0.0"):  # resuming at another scale: a clear error
        train(run_config(tmp_path, small_dir, cache_dir, max_steps=6, checkpoint_every=3, text_lr_scale=0.5,
                         resume="latest"))


@needs_data
def test_attn_lr_scale_gives_the_shared_self_attention_its_own_lr(tmp_path, small_dir, cache_dir):
    """--text-lr-scale 0 --attn-lr-scale 1 keeps the embeddings and text FFNs where they started while the
    self-attention that queries and text share trains at the full lr; resuming without the option is refused."""
    train(run_config(tmp_path, small_dir, cache_dir, max_steps=3, checkpoint_every=3, text_lr_scale=0.0,
                     attn_lr_scale=1.0))
    start = load_file(str(Path(small_dir) / "qformer.safetensors"))
    ckpt = list_checkpoints(tmp_path)[-1]
    end = load_file(str(ckpt / "qformer.safetensors"))
    frozen = [k for k in start if k.startswith("embeddings.") or ".ffn_text." in k]
    attn = [k for k in start if ".attn." in f".{k}"]
    assert frozen and attn
    assert all(torch.equal(start[k], end[k]) for k in frozen)
    assert all(not torch.equal(start[k], end[k]) for k in attn if k.endswith("weight") and start[k].ndim == 2)
    groups = load_train_state(ckpt)["optimizer"]["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="--attn-lr-scale 1.0"):
        train(run_config(tmp_path, small_dir, cache_dir, max_steps=6, checkpoint_every=3, text_lr_scale=0.0,
                         resume="latest"))


def locked_itc_loss(model: Blip2Retriever, pairs, cache_dir: Path) -> float:
    """The locked-text ITC loss of every image against every caption, in eval mode."""
    from qformer.stage1 import LockedTextITC, text_cls_states

    q = model.qformer.eval()
    objective = LockedTextITC(q, text_cls_states(q, model.tokenizer, pairs.captions), pairs.pair_image)
    tokens = FeatureCache.open(cache_dir)[list(range(len(pairs.image_paths)))]
    with torch.no_grad():
        return float(objective(tokens, {"image_ids": torch.arange(len(pairs.image_paths))})["loss"])


@needs_data
def test_locked_text_warmup_trains_itc_on_what_sees_the_image(tmp_path, small_dir, cache_dir, pairs):
    """--lock-text --objectives itc: the ITC loss falls on fixed batches; every text-path parameter (and the
    ITM/ITG heads, which ITC does not use) is bit-for-bit the starting one, while queries, cross-attention,
    query FFNs and the projections train; a resumed run ends with identical weights."""
    from qformer.model import TEXT_PATH

    # the real offline starting point: a MiniLM text path, whose [CLS] states already tell captions apart
    common = dict(lock_text=True, objectives="itc", batch_size=4, max_steps=8, checkpoint_every=4,
                  keep_checkpoints=0, lr=1e-3)
    straight = train(run_config(tmp_path / "a", "blip2-tiny-init", cache_dir, **common))
    start = {k: v.contiguous() for k, v in create_model("blip2-tiny-init").qformer.state_dict().items()}
    end = load_file(str(straight / "qformer.safetensors"))
    text = [k for k in start if any(t in f".{k}" for t in TEXT_PATH)]
    assert any(".attn." in k for k in text) and any(".ffn_text." in k for k in text)
    frozen = text + [k for k in start if k.startswith(("itm_head.", "lm_head."))]
    assert all(torch.equal(start[k], end[k]) for k in frozen)
    moved = {k for k in start if k not in frozen and not torch.equal(start[k], end[k])}
    assert {"query_tokens", "vision_proj.weight", "text_proj.weight"} <= moved
    assert any(".cross." in k for k in moved) and any(".ffn_query." in k for k in moved)
    # the warm-up's ITC loss on all images and captions at once (eval mode) is lower after training
    before, after = (locked_itc_loss(create_model(d), pairs, cache_dir) for d in ("blip2-tiny-init", straight))
    assert after < before - 0.05, (before, after)
    records = [json.loads(ln) for ln in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)) and "images_per_s" in records[0]
    assert set(records[0]) >= {"itc", "loss", "temp"} and "itm" not in records[0]
    # resume from the step-4 checkpoint: the same final weights
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_0000004", tmp_path / "b/checkpoints/step_0000004")
    resumed = train(run_config(tmp_path / "b", "blip2-tiny-init", cache_dir, resume="latest", **common))
    again = load_file(str(resumed / "qformer.safetensors"))
    assert all(torch.equal(end[k], again[k]) for k in end)


@needs_data
def test_mined_itm_negatives_are_never_positives_and_resume_exactly(tmp_path, small_dir, cache_dir, pairs):
    """--itm-negatives K: negatives mined once with the starting model over all pairs (never an image's own
    caption, never a caption's own image), kept with the run; ITM trains on them; resume is bit-exact."""
    from qformer.stage1 import mine_hard_negatives

    negatives = mine_hard_negatives(create_model(small_dir), pairs, FeatureCache.open(cache_dir), k=3)
    image_of = torch.tensor(pairs.pair_image)
    assert negatives.images_of_pair.shape == (len(pairs), 3)
    assert negatives.pairs_of_image.shape == (len(pairs.image_paths), 3)
    assert not (negatives.images_of_pair == image_of[:, None]).any()
    assert not (image_of[negatives.pairs_of_image] == torch.arange(len(pairs.image_paths))[:, None]).any()

    common = dict(itm_negatives=3, max_steps=6, checkpoint_every=3, keep_checkpoints=0)
    straight = train(run_config(tmp_path / "a", small_dir, cache_dir, **common))
    saved = torch.load(tmp_path / "a/hard_negatives.pt", weights_only=True)
    assert torch.equal(saved["images_of_pair"], negatives.images_of_pair)
    records = [json.loads(ln) for ln in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["itm"]) and r["itm"] > 0 for r in records)
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_0000003", tmp_path / "b/checkpoints/step_0000003")
    with pytest.raises(FileNotFoundError, match="hard_negatives.pt"):  # the mined set belongs to the run
        train(run_config(tmp_path / "b", small_dir, cache_dir, resume="latest", **common))
    shutil.copy(tmp_path / "a/hard_negatives.pt", tmp_path / "b/hard_negatives.pt")
    resumed = train(run_config(tmp_path / "b", small_dir, cache_dir, resume="latest", **common))
    a, b = (load_file(str(d / "qformer.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_locked_text_needs_the_itc_objective(tmp_path):
    with pytest.raises(ValueError, match="--objectives itc"):
        train(TrainConfig(lock_text=True, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--lock-text"):
        train(TrainConfig(objectives="itc", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="stage-1 options"):
        train(TrainConfig(stage=2, lock_text=True, objectives="itc", out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--itm-uniform"):
        train(TrainConfig(itm_uniform=0.5, itm_negatives=4, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--itm-uniform"):
        train(TrainConfig(itm_uniform=-0.1, out_dir=str(tmp_path)))


@needs_data
def test_trained_checkpoint_round_trips(trained, tmp_path, encoder, tokenizer, pairs, cache_dir):
    # the training checkpoint is a qsearch model directory, and its train state loads with weights_only
    ckpt = list_checkpoints(trained)[-1]
    assert [c.name for c in list_checkpoints(trained)] == ["step_0000006", "step_0000012"]
    state = load_train_state(ckpt)
    assert state["step"] == 12 and state["optimizer"]["state"]
    loaded = create_model(ckpt)
    saved = load_file(str(ckpt / "qformer.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in loaded.qformer.state_dict().items())
    # an in-memory trained model -> save_pretrained -> create_model gives the same outputs
    model = small_model(encoder, tokenizer, seed=1)
    opt = torch.optim.AdamW(model.qformer.parameters(), lr=1e-3)
    ds = PairDataset(pairs, cache=FeatureCache.open(cache_dir))
    b = Collate(tokenizer)([ds[(j, 0)] for j in range(8)])
    model.qformer.train()
    for _ in range(3):
        stage1_losses(model.qformer, b["image"], b["input_ids"], b["text_mask"], b["image_ids"])["loss"].backward()
        opt.step()
        opt.zero_grad()
    model.qformer.eval()
    again = create_model(model.save_pretrained(tmp_path / "m"))
    ids, mask = tokenize(tokenizer, pairs.captions[:4], TRAIN_MAX_LENGTH)
    tokens = b["image"][:4]
    for m in (model, again):
        assert not m.qformer.training
    with torch.no_grad():
        for fn in ("encode_image",):
            assert torch.equal(getattr(model.qformer, fn)(tokens), getattr(again.qformer, fn)(tokens))
        assert torch.equal(model.qformer.encode_text(ids, mask), again.qformer.encode_text(ids, mask))
        assert torch.equal(model.qformer.itm_logits(tokens, ids, mask), again.qformer.itm_logits(tokens, ids, mask))
        assert torch.equal(model.qformer.itg_logits(tokens, ids, mask), again.qformer.itg_logits(tokens, ids, mask))
    assert again.qformer.config == SMALL and again.encoder.spec() == encoder.spec()


def _cli_args(cfg: TrainConfig) -> list[str]:
    return ["--data-root", cfg.data_root, "--max-images", str(cfg.max_images), "--model", cfg.model,
            "--out-dir", cfg.out_dir, "--cache-dir", cfg.cache_dir, "--batch-size", str(cfg.batch_size),
            "--grad-accum", str(cfg.grad_accum), "--max-steps", str(cfg.max_steps), "--lr", str(cfg.lr),
            "--warmup-steps", str(cfg.warmup_steps), "--checkpoint-every", str(cfg.checkpoint_every),
            "--keep-checkpoints", str(cfg.keep_checkpoints), "--log-every", "1", "--no-progress"]


@needs_data
def test_resume_after_kill_is_bitwise_identical(tmp_path, small_dir, cache_dir):
    n, k = 6, 2
    common = dict(max_steps=n, checkpoint_every=k, grad_accum=2, keep_checkpoints=0)
    # uninterrupted
    straight = run_config(tmp_path / "straight", small_dir, cache_dir, **common)
    train(straight)
    # killed (SIGKILL, no cleanup) right after the step-k checkpoint appears, then resumed
    killed = run_config(tmp_path / "killed", small_dir, cache_dir, **common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "qformer.train", *_cli_args(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = Path(killed.out_dir) / "checkpoints" / f"step_{k:07d}"
    deadline = time.monotonic() + 120
    while not target.is_dir():
        if proc.poll() is not None:
            pytest.fail(f"training subprocess exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    left = list_checkpoints(killed.out_dir)
    assert left and int(left[-1].name[5:]) < n, "the run finished before it was killed"
    train(run_config(tmp_path / "killed", small_dir, cache_dir, resume="latest", **common))

    a = load_file(str(Path(straight.out_dir) / "checkpoints" / f"step_{n:07d}" / "qformer.safetensors"))
    b = load_file(str(Path(killed.out_dir) / "checkpoints" / f"step_{n:07d}" / "qformer.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    sa = load_train_state(Path(straight.out_dir) / "checkpoints" / f"step_{n:07d}")["optimizer"]["state"]
    sb = load_train_state(Path(killed.out_dir) / "checkpoints" / f"step_{n:07d}")["optimizer"]["state"]
    assert all(torch.equal(sa[i][s], sb[i][s]) for i in sa for s in sa[i])
    # the metrics log of the resumed run matches step for step (records after the checkpoint re-done once)
    la = [json.loads(x) for x in (Path(straight.out_dir) / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (Path(killed.out_dir) / "metrics.jsonl").read_text().splitlines()]
    strip = ("pairs_per_s",)
    assert [{k2: v for k2, v in r.items() if k2 not in strip} for r in la] == \
           [{k2: v for k2, v in r.items() if k2 not in strip} for r in lb]


# ---- your own data: CSV/Parquet manifests, webdataset shards ------------------------------------------------
def make_photos(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    """n small generated photos (a coloured gradient plus noise), alternately JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(start, start + n):
        base = torch.rand(3, 1, 1, generator=g) * torch.linspace(0.2, 1.0, 64).view(1, 1, 64)
        pixels = ((base + 0.2 * torch.rand(3, 64, 64, generator=g)).clamp(0, 1) * 255).byte()
        path = folder / f"photo_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def manifest_config(out_dir: Path, model: Path, manifest: Path, **kw) -> TrainConfig:
    base = dict(dataset="manifest", data_root=str(manifest), model=str(model), out_dir=str(out_dir),
                cache_dir=str(out_dir.parent / f"{out_dir.name}-features"), batch_size=8, lr=1e-3,
                warmup_steps=2, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def read_log(out_dir: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_training(tmp_path, small_dir, fmt):
    photos = make_photos(tmp_path / "data" / "images", 8)
    if fmt == "csv":  # `image` + `caption`, one row per caption
        rows = [{"image": f"images/{p.name}", "caption": f"A photo, number {i} ({k})!"}
                for i, p in enumerate(photos) for k in ("first", "second")]
    else:  # `path` + `text`, a list of captions per row
        rows = [{"path": f"images/{p.name}", "text": [f"photo number {i}", f"picture {i}"]}
                for i, p in enumerate(photos)]
    manifest = write_manifest(tmp_path / "data" / f"pairs.{fmt}", rows)

    pairs = load_pairs("manifest", manifest, "train")  # relative paths resolve against the manifest's folder
    assert pairs.image_paths == [p.resolve() for p in photos]
    assert len(pairs) == 16 and pairs.pair_image == [i for i in range(8) for _ in range(2)]
    assert pairs.captions[:2] == (["a photo, number 0 first", "a photo, number 0 second"] if fmt == "csv"
                                  else ["photo number 0", "picture 0"])

    cfg = manifest_config(tmp_path / "run", small_dir, manifest, max_steps=3)
    final = train(cfg)
    records = read_log(cfg.out_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in records for k in ("itc", "itm", "itg", "loss"))
    assert final.name == "step_0000003" and create_model(final).qformer.config == SMALL


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """An (uncompressed) webdataset tar shard of (member name, bytes)."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "live"])
def test_webdataset_training_skips_a_corrupt_member(tmp_path, small_dir, caplog, use_cache):
    photos = make_photos(tmp_path / "photos", 9)
    samples = [[(f"{i:03d}{p.suffix}", p.read_bytes()),
                (f"{i:03d}.txt", f"a photo number {i}".encode()) if i % 2 == 0 else
                (f"{i:03d}.json", json.dumps({"caption": f"a picture number {i}"}).encode())]
               for i, p in enumerate(photos)]  # .jpg + .txt, .png + .json
    write_shard(tmp_path / "shards" / "shard-000.tar", [m for s in samples[:5] for m in s])
    bad = write_shard(tmp_path / "shards" / "shard-001.tar", [*(m for s in samples[5:] for m in s),
                      ("bad.jpg", b"\xff\xd8 this is not a JPEG" * 20), ("bad.txt", b"a broken photo")])
    root = tmp_path / "shards" if use_cache else tmp_path / "shards" / "shard-{000..001}.tar"  # folder or pattern

    pairs = load_pairs("webdataset", root, "train")
    assert len(pairs) == 10 and len(pairs.image_paths) == 10
    assert str(pairs.image_paths[0]) == f"{tmp_path / 'shards' / 'shard-000.tar'}::000.jpg"
    assert pairs.captions[:2] == ["a photo number 0", "a picture number 1"]

    # cached: the corrupt image is left out up front (9 usable pairs); live: each batch holds all 10 pairs
    cfg = manifest_config(tmp_path / "run", small_dir, root, dataset="webdataset", cache=use_cache, max_steps=2,
                          batch_size=8 if use_cache else 10)
    with caplog.at_level(logging.WARNING):
        final = train(cfg)
    assert f"skipping image {bad}::bad.jpg: not an image Pillow can identify" in caplog.text
    if use_cache:
        assert "training on 9 of 10 pairs" in caplog.text
    records = read_log(cfg.out_dir)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert final.name == "step_0000002"


# ---- evaluation every epoch, the metrics plot --------------------------------------------------------------
def split_manifest(folder: Path, n_train: int = 8, n_dev: int = 4) -> Path:
    """A manifest with a `split` column: n_train training and n_dev dev images, two captions each."""
    photos = make_photos(folder / "images", n_train + n_dev)
    rows = [{"image": f"images/{p.name}", "caption": f"{word} photo {i}",
             "split": "train" if i < n_train else "dev"}
            for i, p in enumerate(photos) for word in ("a", "one")]
    return write_manifest(folder / "pairs.csv", rows)


def test_eval_every_epoch_and_metrics_plot(tmp_path, small_dir):
    import xml.etree.ElementTree as ET

    from qformer.pairs import retrieval_set_from_pairs
    from qformer.retrieval_bench import evaluate_retrieval

    manifest = split_manifest(tmp_path / "data")
    # 16 training pairs, batch 8: two steps per epoch -> evaluations after steps 2 and 4 and at the end (5)
    cfg = manifest_config(tmp_path / "run", small_dir, manifest, max_steps=5, eval_split="dev", eval_k_test=4)
    final = train(cfg)
    records = read_log(cfg.out_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(2, 1.0), (4, 2.0), (5, 2.5)]
    assert [r["step"] for r in records if r.get("kind") != "eval"] == [1, 2, 3, 4, 5]
    for r in evals:
        assert r["split"] == "dev" and r["n_images"] == 4 and r["n_texts"] == 8 and r["k_test"] == 4
        for row in ("itc", "itc+itm"):
            assert all(0.0 <= r[row][f"{d}_r{k}"] <= 100.0 for d in ("txt", "img") for k in (1, 5, 10))
    assert evals[-1]["itc"]["txt_r10"] == 100.0  # 4 images: every caption ranks in the top 10

    # the numbers are the retrieval benchmark's, for the final checkpoint on the same dev images (whose tokens
    # come from the feature cache, i.e. the encoder in fp32)
    dev = retrieval_set_from_pairs(load_pairs("manifest", manifest, "dev"))
    bench = evaluate_retrieval(create_model(final), dev, k_test=4, num_workers=0, progress=False,
                               image_precision="fp32")
    for row in ("itc", "itc+itm"):
        assert evals[-1][row] == pytest.approx(bench[row])

    # metrics.svg: valid SVG with the loss curves and the recall curves
    svg = ET.parse(Path(cfg.out_dir) / "metrics.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"itc", "itm", "itg", "loss", "itc+itm txt_r1", "itc img_r1"} <= texts
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}polyline"))) >= 12

    # evaluating does not perturb training: the same run without evaluation ends with the same weights
    plain = manifest_config(tmp_path / "plain", small_dir, manifest, max_steps=5, cache_dir=cfg.cache_dir)
    train(plain)
    a = load_file(str(final / "qformer.safetensors"))
    b = load_file(str(list_checkpoints(plain.out_dir)[-1] / "qformer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in records if r.get("kind") != "eval"]
    assert losses == [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in read_log(plain.out_dir)]


# ---- multi-process DDP (torchrun, gloo on CPU) ---------------------------------------------------------------
def test_torchrun_two_ranks(tmp_path, small_dir):
    manifest = split_manifest(tmp_path / "data", n_train=8, n_dev=2)
    out = tmp_path / "run"
    args = ["--dataset", "manifest", "--data-root", str(manifest), "--model", str(small_dir), "--out-dir", str(out),
            "--batch-size", "8", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1",
            "--checkpoint-every", "100", "--eval-split", "dev", "--eval-k-test", "2", "--device", "cpu",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "qformer.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 ranks)" in proc.stderr and "final checkpoint" in proc.stdout
    assert [c.name for c in list_checkpoints(out)] == ["step_0000003"]  # written once, by rank 0
    model = create_model(list_checkpoints(out)[0])
    assert model.qformer.config == SMALL
    records = read_log(out)
    steps = [r for r in records if r.get("kind") != "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3]  # one record per step: rank 0 alone writes
    assert all(math.isfinite(r[k]) for r in steps for k in ("itc", "itm", "itg", "loss"))
    assert [r["step"] for r in records if r.get("kind") == "eval"] == [2, 3]  # 16 pairs: two steps per epoch
    assert (out / "metrics.svg").is_file()


def _itc_grad_worker(rank: int, world: int, init_file: str, feats: torch.Tensor, texts: torch.Tensor,
                     out: str) -> None:
    import torch.distributed as dist

    from qformer.losses import gather_with_grad, itc_loss, itc_similarity_logits, positive_mask

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = feats.shape[0] // world
    f = feats[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    t = texts[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    ids = torch.arange(rank * b, (rank + 1) * b)
    sims = itc_similarity_logits(f, t, gather_with_grad(f), gather_with_grad(t), torch.tensor(0.07))
    loss = itc_loss(*sims, positive_mask(ids, b, f.device))
    (loss / world).backward()  # DDP averages gradients over ranks
    grads = [torch.zeros_like(f.grad) for _ in range(world)], [torch.zeros_like(t.grad) for _ in range(world)]
    dist.all_gather(grads[0], f.grad)
    dist.all_gather(grads[1], t.grad)
    if rank == 0:
        torch.save({"feats": torch.cat(grads[0]), "texts": torch.cat(grads[1])}, out)
    dist.destroy_process_group()


def test_itc_gradients_across_two_ranks_equal_one_process(tmp_path):
    """ITC with negatives gathered from 2 gloo ranks gives the gradient of one process on the global batch."""
    from qformer.losses import itc_loss, itc_similarity_logits, positive_mask

    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(8, 4, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    torch.multiprocessing.spawn(_itc_grad_worker, args=(2, str(tmp_path / "init"), feats, texts,
                                                        str(tmp_path / "g.pt")), nprocs=2)
    got = torch.load(tmp_path / "g.pt")
    f, t = feats.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    sims = itc_similarity_logits(f, t, f, t, torch.tensor(0.07))
    itc_loss(*sims, positive_mask(torch.arange(8), 8, f.device)).backward()
    torch.testing.assert_close(got["feats"], f.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["texts"], t.grad, atol=1e-6, rtol=1e-5)
