"""Tests for qformer.recall: ITC similarity, ITM re-ranking and recall@K."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import Tensor

from qformer import recall
from qformer.recall import FILL_SCORE, format_table, itc_similarity, recall_at_k, rerank_with_itm

# ---------------------------------------------------------------------------------------------------------
# reference implementations


def brute_force_ranks(scores: list[list[float]], positives: list[set[int]]) -> list[int]:
    """Rank of each row's best positive after a pessimistic sort.

    Candidates are sorted by descending score, and on equal score negatives go BEFORE positives (ties
    count against the model). The rank is the position of the first positive in that order.
    A row without positives gets rank len(row).
    """
    ranks = []
    for row, pos in zip(scores, positives, strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j in pos))
        rank = len(row)
        for position, j in enumerate(order):
            if j in pos:
                rank = position
                break
        ranks.append(rank)
    return ranks


def brute_force_recall(
    scores_i2t: Tensor, scores_t2i: Tensor, img2txt: list[list[int]], txt2img: list[int], ks=(1, 5, 10)
) -> dict[str, float]:
    ranks_i2t = brute_force_ranks(scores_i2t.tolist(), [set(c) for c in img2txt])
    ranks_t2i = brute_force_ranks(scores_t2i.tolist(), [{i} for i in txt2img])
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * sum(r < k for r in ranks_i2t) / len(ranks_i2t)
    for k in ks:
        out[f"img_r{k}"] = 100.0 * sum(r < k for r in ranks_t2i) / len(ranks_t2i)
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def lavis_report_metrics(
    scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt
) -> dict[str, float]:
    """LAVIS tasks/retrieval.py::_report_metrics (argsort positions), valid only without ties."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }  # fmt: skip


def make_maps(n_img: int, caps_per_img: int, shuffle: bool, gen: torch.Generator):
    """img2txt/txt2img with caps_per_img captions per image, optionally in a shuffled text order."""
    n_txt = n_img * caps_per_img
    perm = torch.randperm(n_txt, generator=gen).tolist() if shuffle else list(range(n_txt))
    img2txt = [[perm[i * caps_per_img + c] for c in range(caps_per_img)] for i in range(n_img)]
    txt2img = [0] * n_txt
    for i, caps in enumerate(img2txt):
        for t in caps:
            txt2img[t] = i
    return img2txt, txt2img


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------
# recall_at_k


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["float", "int_ties", "fill"])
def test_recall_matches_brute_force(seed: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_img = 7 + seed * 5
    caps = 1 + seed % 5
    img2txt, txt2img = make_maps(n_img, caps, shuffle=seed % 2 == 1, gen=gen)
    n_txt = len(txt2img)
    if kind == "float":
        s_i2t = torch.randn(n_img, n_txt, generator=gen)
        s_t2i = torch.randn(n_txt, n_img, generator=gen)
    elif kind == "int_ties":  # lots of ties: integer scores in 0..3
        s_i2t = torch.randint(0, 4, (n_img, n_txt), generator=gen).float()
        s_t2i = torch.randint(0, 4, (n_txt, n_img), generator=gen).float()
    else:  # as after ITM re-ranking: a few real scores per row, every other entry -100
        s_i2t = torch.full((n_img, n_txt), FILL_SCORE)
        s_t2i = torch.full((n_txt, n_img), FILL_SCORE)
        for s in (s_i2t, s_t2i):
            keep = torch.rand(s.shape, generator=gen) < 0.3
            s[keep] = torch.randint(0, 3, (int(keep.sum()),), generator=gen).float()
    got = recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
    assert_metrics_close(got, brute_force_recall(s_i2t, s_t2i, img2txt, txt2img))
    got = recall_at_k(s_i2t, s_t2i, img2txt, txt2img, ks=(1, 2, 3))
    assert_metrics_close(got, brute_force_recall(s_i2t, s_t2i, img2txt, txt2img, ks=(1, 2, 3)))


@pytest.mark.parametrize("seed", range(3))
def test_recall_matches_lavis_without_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    img2txt, txt2img = make_maps(40, 5, shuffle=True, gen=gen)
    s_i2t = torch.randn(40, 200, generator=gen, dtype=torch.float64)
    s_t2i = torch.randn(200, 40, generator=gen, dtype=torch.float64)
    # make the positives score higher on average so the recalls are not all ~0
    for i, caps in enumerate(img2txt):
        s_i2t[i, caps] += 2.0
        s_t2i[caps, i] += 2.0
    want = lavis_report_metrics(s_i2t.numpy(), s_t2i.numpy(), txt2img, img2txt)
    assert_metrics_close(recall_at_k(s_i2t, s_t2i, img2txt, txt2img), want)


def test_recall_hand_worked_example() -> None:
    # 3 images x 2 captions: image 0 -> captions 0,1; image 1 -> 2,3; image 2 -> 4,5.
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    scores_i2t = torch.tensor(
        [
            # cap0 cap1 cap2 cap3 cap4 cap5
            [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # img0: best positive cap0 = 0.9, no negative >= 0.9 -> rank 0
            [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],  # img1: best positive cap2 = 0.5; negatives 0.7, 0.6 >= -> rank 2
            [0.6, 0.2, 0.3, 0.4, 0.6, 0.1],  # img2: best positive cap4 = 0.6 TIES negative cap0 -> rank 1
        ]
    )
    scores_t2i = torch.tensor(
        [
            # img0 img1 img2
            [0.9, 0.1, 0.2],  # cap0 (img0): 0.9, nothing >= -> rank 0
            [0.3, 0.5, 0.1],  # cap1 (img0): 0.3, img1 0.5 >= -> rank 1
            [0.2, 0.8, 0.4],  # cap2 (img1): 0.8 -> rank 0
            [0.4, 0.4, 0.1],  # cap3 (img1): 0.4 TIES img0 -> rank 1
            [0.1, 0.2, 0.7],  # cap4 (img2): 0.7 -> rank 0
            [0.6, 0.5, 0.4],  # cap5 (img2): 0.4, img0 and img1 above -> rank 2
        ]
    )
    # i2t ranks [0, 2, 1]: R@1 = 1/3, R@2 = 2/3, R@5 = R@10 = 3/3.
    # t2i ranks [0, 1, 0, 1, 0, 2]: R@1 = 3/6, R@2 = 5/6, R@5 = R@10 = 6/6.
    got = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img)
    want = {
        "txt_r1": 100 / 3, "txt_r5": 100.0, "txt_r10": 100.0,
        "txt_r_mean": (100 / 3 + 200) / 3,  # 77.78
        "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0,
        "img_r_mean": (50 + 200) / 3,  # 83.33
        "r_mean": ((100 / 3 + 200) / 3 + 250 / 3) / 2,  # 80.56
    }  # fmt: skip
    assert_metrics_close(got, want)
    got = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img, ks=(1, 2))
    assert got["txt_r1"] == pytest.approx(100 / 3)
    assert got["txt_r2"] == pytest.approx(200 / 3)
    assert got["img_r1"] == pytest.approx(50.0)
    assert got["img_r2"] == pytest.approx(500 / 6)
    assert got["r_mean"] == pytest.approx(((100 / 3 + 200 / 3) / 2 + (50 + 500 / 6) / 2) / 2)


def test_recall_constant_scores_get_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    img2txt, txt2img = make_maps(100, 5, shuffle=False, gen=gen)
    got = recall_at_k(torch.zeros(100, 500), torch.zeros(500, 100), img2txt, txt2img)
    assert all(v == 0.0 for v in got.values())


def test_recall_perfect_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    img2txt, txt2img = make_maps(20, 5, shuffle=True, gen=gen)
    s_i2t = torch.zeros(20, 100)
    for i, caps in enumerate(img2txt):
        s_i2t[i, caps] = 1.0  # the positives tie with each other; that must not count against them
    got = recall_at_k(s_i2t, s_i2t.t().contiguous(), img2txt, txt2img)
    assert all(v == 100.0 for v in got.values())


def test_recall_rejects_bad_input() -> None:
    img2txt, txt2img = [[0], [1]], [0, 1]
    with pytest.raises(ValueError, match="scores_t2i"):
        recall_at_k(torch.zeros(2, 2), torch.zeros(3, 2), img2txt, txt2img)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((2, 2), float("nan")), torch.zeros(2, 2), img2txt, txt2img)
    with pytest.raises(ValueError, match="img2txt"):
        recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2), [[0]], txt2img)


def test_recall_is_fast_at_5000x1000() -> None:
    gen = torch.Generator().manual_seed(0)
    img2txt, txt2img = make_maps(1000, 5, shuffle=False, gen=gen)
    s_t2i = torch.randn(5000, 1000, generator=gen)
    s_i2t = torch.randn(1000, 5000, generator=gen)
    recall_at_k(s_i2t, s_t2i, img2txt, txt2img)  # warm-up
    start = time.perf_counter()
    recall_at_k(s_i2t, s_t2i, img2txt, txt2img)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------------------------
# itc_similarity


@pytest.mark.parametrize("chunk_elements", [None, 50])
def test_itc_similarity_matches_naive(monkeypatch: pytest.MonkeyPatch, chunk_elements: int | None) -> None:
    if chunk_elements is not None:  # force many small chunks
        monkeypatch.setattr(recall, "_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(13, 4, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=-1)
    want = torch.einsum("iqd,td->iqt", img, txt).max(dim=1).values
    got = itc_similarity(img, txt)
    assert got.shape == (13, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_itc_similarity_half_inputs_and_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 32, 16, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen), dim=-1)
    want = torch.einsum("iqd,td->iqt", img, txt).max(dim=1).values
    torch.testing.assert_close(itc_similarity(img.half(), txt.half()), want, atol=2e-3, rtol=0)
    with pytest.raises(ValueError):
        itc_similarity(img[0], txt)
    with pytest.raises(ValueError):
        itc_similarity(img, txt[:, :8])


# ---------------------------------------------------------------------------------------------------------
# rerank_with_itm


def fake_itm(image_idx: Tensor, text_idx: Tensor) -> Tensor:
    """A deterministic 'match logit' that depends on both indices."""
    return ((image_idx * 7 + text_idx * 3) % 11).float()


class RecordingItm:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, image_idx: Tensor, text_idx: Tensor) -> Tensor:
        assert image_idx.dtype == torch.long and text_idx.dtype == torch.long
        assert image_idx.shape == text_idx.shape and image_idx.dim() == 1
        self.calls.append((image_idx.tolist(), text_idx.tolist()))
        return fake_itm(image_idx, text_idx)


def expected_scores(itc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    n_img, n_txt = itc.shape
    i2t = torch.full((n_img, n_txt), FILL_SCORE)
    for i in range(n_img):
        for t in itc[i].topk(min(k, n_txt)).indices.tolist():
            i2t[i, t] = float((i * 7 + t * 3) % 11) + itc[i, t]
    t2i = torch.full((n_txt, n_img), FILL_SCORE)
    for t in range(n_txt):
        for i in itc[:, t].topk(min(k, n_img)).indices.tolist():
            t2i[t, i] = float((i * 7 + t * 3) % 11) + itc[i, t]
    return i2t, t2i


@pytest.mark.parametrize(("k", "batch_size"), [(4, 10), (4, 4), (5, 2), (3, 1), (1, 128)])
def test_rerank_scores_and_pairs(k: int, batch_size: int) -> None:
    gen = torch.Generator().manual_seed(k * 100 + batch_size)
    n_img, n_txt = 6, 11
    itc = torch.rand(n_img, n_txt, generator=gen)  # distinct values: top-k is unambiguous
    itm = RecordingItm()
    s_i2t, s_t2i = rerank_with_itm(itc, itm, k=k, batch_size=batch_size)
    want_i2t, want_t2i = expected_scores(itc, k)
    torch.testing.assert_close(s_i2t, want_i2t)
    torch.testing.assert_close(s_t2i, want_t2i)
    assert int((s_i2t != FILL_SCORE).sum()) == n_img * k
    assert int((s_t2i != FILL_SCORE).sum()) == n_txt * k

    # every call within batch_size; all pairs seen exactly as the top-k sets, no duplicates
    assert all(len(imgs) <= batch_size for imgs, _ in itm.calls)
    pairs = [p for imgs, txts in itm.calls for p in zip(imgs, txts, strict=True)]
    i2t_pairs = {(i, t) for i in range(n_img) for t in itc[i].topk(k).indices.tolist()}
    t2i_pairs = {(i, t) for t in range(n_txt) for i in itc[:, t].topk(k).indices.tolist()}
    assert len(pairs) == len(i2t_pairs) + len(t2i_pairs)
    assert set(pairs) == i2t_pairs | t2i_pairs

    # grouping: i2t calls come first, then t2i; a query's k candidates share one call when k <= batch_size
    n_i2t_calls = -(-n_img // (batch_size // k)) if k <= batch_size else n_img * -(-k // batch_size)
    i2t_calls, t2i_calls = itm.calls[:n_i2t_calls], itm.calls[n_i2t_calls:]
    assert {p for imgs, txts in i2t_calls for p in zip(imgs, txts, strict=True)} == i2t_pairs
    if k <= batch_size:
        for imgs, _ in i2t_calls:
            assert len(imgs) % k == 0 and all(imgs.count(i) == k for i in set(imgs))
        for _, txts in t2i_calls:
            assert len(txts) % k == 0 and all(txts.count(t) == k for t in set(txts))
            assert len(set(txts)) == 1  # one text per call, as the search engine scores a query
        assert len(i2t_calls[0][0]) == min(n_img, batch_size // k) * k
    else:
        for imgs, _ in i2t_calls:
            assert len(set(imgs)) == 1


def test_rerank_k_clamped() -> None:
    gen = torch.Generator().manual_seed(3)
    itc = torch.rand(3, 5, generator=gen)
    s_i2t, s_t2i = rerank_with_itm(itc, fake_itm, k=1000, batch_size=7)
    want_i2t, want_t2i = expected_scores(itc, 1000)
    assert not (s_i2t == FILL_SCORE).any() and not (s_t2i == FILL_SCORE).any()
    torch.testing.assert_close(s_i2t, want_i2t)
    torch.testing.assert_close(s_t2i, want_t2i)
    # full re-ranking: every entry is itm + itc
    i = torch.arange(3).unsqueeze(1).expand(3, 5)
    t = torch.arange(5).unsqueeze(0).expand(3, 5)
    torch.testing.assert_close(s_i2t, fake_itm(i, t) + itc)
    torch.testing.assert_close(s_t2i, (fake_itm(i, t) + itc).t())


def test_rerank_progress_and_errors() -> None:
    itc = torch.rand(4, 6)
    s_i2t, s_t2i = rerank_with_itm(itc, fake_itm, k=2, batch_size=4, progress=True)
    assert s_i2t.shape == (4, 6) and s_t2i.shape == (6, 4)
    with pytest.raises(ValueError, match="logits"):
        rerank_with_itm(itc, lambda i, t: torch.zeros(1), k=2)
    with pytest.raises(ValueError):
        rerank_with_itm(itc[0], fake_itm)


def test_rerank_then_recall_end_to_end() -> None:
    # ITC alone is perfect on the diagonal; a strongly negative ITM on the diagonal pushes it out of rank 1
    n = 8
    itc = torch.eye(n) * 0.5 + torch.rand(n, n, generator=torch.Generator().manual_seed(0)) * 0.1
    img2txt, txt2img = [[i] for i in range(n)], list(range(n))
    assert recall_at_k(itc, itc.t(), img2txt, txt2img)["r_mean"] == 100.0
    s_i2t, s_t2i = rerank_with_itm(itc, lambda i, t: torch.where(i == t, -5.0, 0.0), k=3)
    got = recall_at_k(s_i2t, s_t2i, img2txt, txt2img, ks=(1, 3))
    assert got["txt_r1"] == 0.0 and got["img_r1"] == 0.0
    assert got["txt_r3"] == 100.0 and got["img_r3"] == 100.0  # still ahead of the -100 fill


# ---------------------------------------------------------------------------------------------------------
# format_table


def test_format_table() -> None:
    res = {
        "itc": {c: 12.3456 for c in recall.TABLE_COLUMNS},
        "itc+itm": {c: 100.0 for c in recall.TABLE_COLUMNS if c != "r_mean"},
    }
    table = format_table(res)
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["method", *recall.TABLE_COLUMNS]
    assert lines[2].split()[0] == "itc" and "12.35" in lines[2]
    assert lines[3].split()[0] == "itc+itm" and lines[3].split()[-1] == "-"
    assert len({len(line) for line in lines}) == 1  # aligned
