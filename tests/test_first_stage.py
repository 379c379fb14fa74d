"""The first stage on its own: a batch of text embeddings -> the top images of each, by the fp16 scan (the same
top n as the fp32 scan), the fp32 scan and FAISS, over embeddings with many near-ties."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from search.first_stage import FirstStage, faiss_top_images, top_images

Q, D = 8, 64


class ShardedEmbeddings:
    """What the first stage reads from an `Index`: embeddings in two shards, one of them with gaps (removed
    rows), and a FAISS Flat index over the same vectors."""

    def __init__(self, embeds: np.ndarray):
        n = len(embeds)
        self.ids = np.arange(n, dtype=np.int64) * 3 + 1  # ascending, not positions
        cut = n // 2
        extra = np.zeros((n - cut + 5, Q, D), np.float32)  # shard 2 holds 5 more rows than are live
        live = np.sort(np.random.default_rng(1).choice(len(extra), n - cut, replace=False))
        extra[live] = embeds[cut:]
        self.shards = [embeds[:cut].copy(), extra]
        self.loc = [(0, i) for i in range(cut)] + [(1, int(r)) for r in live]
        self.manifest = {"num_queries": Q, "embed_dim": D}
        self.faiss_index = faiss.index_factory(D, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        self.faiss_index.add_with_ids(embeds.reshape(-1, D), np.repeat(self.ids, Q))

    def __len__(self) -> int:
        return len(self.ids)

    def image_ids(self) -> np.ndarray:
        return self.ids.copy()

    def embeddings(self, image_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, image_ids)
        return np.stack([self.shards[s][r] for s, r in (self.loc[p] for p in pos)]) if len(pos) else \
            np.empty((0, Q, D), np.float32)

    def embedding_blocks(self):
        cut = len(self.shards[0])
        rows = torch.tensor([r for _, r in self.loc[cut:]])
        return [(torch.arange(cut), None, torch.from_numpy(self.shards[0])),
                (torch.arange(cut, len(self.ids)), rows, torch.from_numpy(self.shards[1]))]

    def search_index(self):
        return self.faiss_index


def near_ties(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [n,Q,D] of images in tight clusters (scores a few fp16 ulps apart), and 6 texts near them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 50, 1, 1, D))
    e = np.repeat(centres, 50, 0)[:, 0] + 1e-3 * rng.standard_normal((n, Q, D))
    e[-20:] = e[-40:-20]  # exact duplicates: ties broken by image id
    e = (e / np.linalg.norm(e, axis=-1, keepdims=True)).astype(np.float32)
    t = e[rng.choice(n, 6), 0] + 0.3 * rng.standard_normal((6, D))
    return e, (t / np.linalg.norm(t, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("batch_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 7, 50, 128, 999, 1000, 1200])
def test_low_precision_scan_top_n_equals_the_fp32_scan(n, batch_dtype):
    """One query at a time (fp16 matrix-vector products) and a batch of 6 (one product over the batch_dtype
    copy) give the fp32 scan's top n, image for image."""
    embeds, texts = near_ties(1000)
    index = ShardedEmbeddings(embeds)
    half, full = FirstStage(index, batch_dtype=batch_dtype), FirstStage(index, scan_dtype="fp32")
    assert half.method == full.method == "scan"
    exact = np.einsum("iqd,bd->biq", embeds, texts).max(2)  # [B, images]
    got_full = full.top(texts, n)
    for got_half in (half.top(texts, n), [half.top(t, n)[0] for t in texts]):
        assert len(got_half) == len(texts)
        for b, ((ih, sh), (i32, s32)) in enumerate(zip(got_half, got_full, strict=True)):
            assert ih.tolist() == i32.tolist()  # the same images in the same order, ties by image id
            assert sh.tolist() == s32.tolist()  # and the same fp32 cosines
            np.testing.assert_allclose(sh, top_images(index.ids, exact[b], n)[1], atol=1e-5)  # and they are the best
    # the low-precision passes really are approximate here: neighbours' scores tie or swap where fp32 separates them
    for dtype in (torch.float16, half.batch_dtype):
        approx = (half.scan_copy(dtype)[0].view(-1, D) @ torch.from_numpy(texts[0]).to(dtype)).view(1000, Q).amax(1)
        assert len(np.unique(approx.float().numpy())) < len(np.unique(exact[0]))


def test_one_query_vector_a_filter_and_empty_results():
    embeds, texts = near_ties(300)
    index = ShardedEmbeddings(embeds)
    stage = FirstStage(index)
    [(ids, sims)] = stage.top(texts[0], 5)  # [D] is a batch of one
    assert len(ids) == 5 and list(sims) == sorted(sims, reverse=True)
    allowed = index.ids[::7]
    for ids_f, _ in stage.top(texts, 4, allowed):
        assert set(ids_f.tolist()) <= set(allowed.tolist()) and len(ids_f) == 4
    assert [len(i) for i, _ in stage.top(texts, 4, allowed[:0])] == [0] * len(texts)
    assert [len(i) for i, _ in stage.top(texts, 0)] == [0] * len(texts)
    with pytest.raises(ValueError):
        stage.top(np.zeros((2, 3, D), np.float32), 4)
    with pytest.raises(ValueError):
        FirstStage(index, scan_dtype="int4")
    with pytest.raises(ValueError):
        FirstStage(index, batch_dtype="int8")


def test_faiss_method_answers_a_batch_like_the_scan():
    embeds, texts = near_ties(400, seed=3)
    index = ShardedEmbeddings(embeds)
    scan, via_faiss = FirstStage(index, scan_dtype="fp32"), FirstStage(index, method="faiss")
    assert via_faiss.method == "faiss"
    for (a, sa), (b, sb) in zip(scan.top(texts, 30), via_faiss.top(texts, 30), strict=True):
        np.testing.assert_allclose(sb, sa, atol=1e-5)  # FAISS's own fp32 sums: the same ranking to rounding
        assert len(set(a.tolist()) & set(b.tolist())) >= 28
    batch = faiss_top_images(index.faiss_index, texts, 30, len(index), Q)
    single = [faiss_top_images(index.faiss_index, t[None], 30, len(index), Q)[0] for t in texts]
    for (a, _), (b, _) in zip(batch, single, strict=True):
        assert a.tolist() == b.tolist()


def test_rounding_bound_holds_for_same_signed_vectors():
    """The scans' error bounds assume fp32 accumulation; all-positive vectors (no cancellation) would break
    them if the fp16 matrix-vector or the bf16 matrix-matrix kernel accumulated in 16 bits."""
    rng = np.random.default_rng(0)
    e = rng.random((4000, D)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    t = rng.random((4, D)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    stage = FirstStage(ShardedEmbeddings(np.repeat(e[:, None], Q, 1)[:500]))
    exact = e.astype(np.float64) @ t.astype(np.float64).T  # [4000,4]
    half = torch.stack([torch.from_numpy(e).half() @ q.half() for q in torch.from_numpy(t)], 1)
    bf16 = torch.from_numpy(e).bfloat16() @ torch.from_numpy(t).bfloat16().T
    for dtype, approx in ((torch.float16, half), (torch.bfloat16, bf16)):
        err = np.abs(approx.double().numpy() - exact).max()
        assert 0 < err <= stage.rounding_bound(1.0, D, dtype), dtype
