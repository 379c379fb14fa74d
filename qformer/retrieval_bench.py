"""Retrieval benchmark: embed a dataset, then score it with the paper's protocol (ITC top-k_test, ITM
re-ranking, recall@K), reporting ITC-only and ITC+ITM rows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qformer.datasets import RetrievalSet
from qformer.decode import BadImage, load_image
from qformer.factory import Blip2Retriever
from qformer.itm import ITM_BATCH, ImageInput, ItmReranker
from qformer.model import CrossKV
from qformer.precision import resolve
from qformer.recall import itc_similarity, recall_at_k, rerank_with_itm
from qformer.workers import lower_priority


class ImageReadError(ValueError):
    """An image file that cannot be decoded."""


class ImageFiles(Dataset):
    """Image files -> preprocessed pixels, decoded in DataLoader workers."""

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], Tensor]):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return self.transform(load_image(self.paths[i]))
        except BadImage as e:
            raise ImageReadError(f"cannot read image {self.paths[i]}: {e}") from e


@dataclass
class EmbeddedSet:
    image_embeds: Tensor  # [Ni,Q,D] normalised ITC query embeddings
    image_tokens: Tensor  # [Ni,N,C] frozen-encoder tokens, for ITM
    text_embeds: Tensor  # [Nt,D]
    text_ids: Tensor  # [Nt,L]
    text_mask: Tensor  # [Nt,L]


def embed_dataset(
    model: Blip2Retriever,
    data: RetrievalSet,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
    image_precision: str = "fp32",
) -> EmbeddedSet:
    """ITC embeddings of every image and caption, and the image tokens ITM needs; the images embedded under
    `image_precision` (qformer.precision)."""
    loader = DataLoader(ImageFiles(data.image_paths, model.preprocess()), batch_size=batch_size,
                        num_workers=num_workers, persistent_workers=False, worker_init_fn=lower_priority)
    embeds, tokens = [], []
    for pixels in tqdm(loader, desc="images", unit="batch", disable=not progress):
        e, t = model.embed_images(pixels, image_precision)
        embeds.append(e)
        tokens.append(t)
    ids, mask = model.tokenize(data.texts)
    encoder = model.text_encoder()  # as `embed_texts` (and so the search engine) embeds a text
    text = [encoder.encode_text(ids[i : i + text_batch_size], mask[i : i + text_batch_size])
            for i in tqdm(range(0, len(ids), text_batch_size), desc="texts", unit="batch", disable=not progress)]
    return EmbeddedSet(torch.cat(embeds), torch.cat(tokens), torch.cat(text), ids, mask)


def kv_bytes_per_image(model: Blip2Retriever, num_tokens: int, element_size: int = 4) -> int:
    c = model.qformer.config
    return len(c.cross_layers) * 2 * num_tokens * c.hidden_size * element_size


def make_itm_fn(
    model: Blip2Retriever, emb: EmbeddedSet, kv_cache_bytes: int = 2 << 30, precision: str = "auto",
    batch_size: int = ITM_BATCH,
) -> Callable[[Tensor, Tensor], Tensor]:
    """itm_fn(image_idx [P], text_idx [P]) -> match logits [P] for `rerank_with_itm`, by the search engine's
    re-ranker (qformer.itm) under `precision` (auto = bf16 where the device has native bf16).

    A call whose pairs share one text is scored as the engine scores a query (`ItmReranker.text_vs_images`),
    so text → image recall equals the engine's. Cross-attention keys/values are text-independent: when all
    images' fit in `kv_cache_bytes` they are computed once for the whole run (the same bits either way).
    """
    rr = ItmReranker(model, precision, batch_size)
    tokens = emb.image_tokens
    n_img, n_tok = tokens.shape[:2]
    cache: CrossKV | None = None
    if n_img * kv_bytes_per_image(model, n_tok, torch.finfo(rr.dtype).bits // 8) <= kv_cache_bytes:
        cache = rr.keys_values(tokens)

    def images(idx: Tensor) -> ImageInput:
        return tokens[idx] if cache is None else [(k[idx], v[idx]) for k, v in cache]

    @torch.inference_mode()
    def itm_fn(image_idx: Tensor, text_idx: Tensor) -> Tensor:
        if bool((text_idx == text_idx[0]).all()):  # one text against its candidates: as a search query
            t = int(text_idx[0])
            return rr.text_vs_images(emb.text_ids[t], emb.text_mask[t], images(image_idx))
        shared = bool((image_idx == image_idx[0]).all())  # one image against its candidate texts
        return rr.pairs(images(image_idx[:1] if shared else image_idx), emb.text_ids[text_idx], emb.text_mask[text_idx])

    return itm_fn


def evaluate_retrieval(
    model: Blip2Retriever,
    data: RetrievalSet,
    k_test: int = 128,
    batch_size: int = 64,
    itm_batch_size: int = 128,
    num_workers: int = 2,
    progress: bool = True,
    itm_precision: str = "auto",
    image_precision: str = "auto",
) -> dict[str, Any]:
    """Recall@1/5/10 both ways, ITC-only and ITC+ITM (k_test=0 skips ITM), with timings. itm_precision, image_precision:
    the arithmetic of the ITM re-ranker and of the image path (qformer.precision; auto = bf16 where native, as
    in search and indexing)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        emb = embed_dataset(model, data, batch_size, num_workers=num_workers, progress=progress,
                            image_precision=image_precision)
        t1 = time.perf_counter()
        itc = itc_similarity(emb.image_embeds.float(), emb.text_embeds.float())  # [Ni,Nt]
        results: dict[str, Any] = {"itc": recall_at_k(itc, itc.t(), data.img2txt, data.txt2img)}
        t2 = time.perf_counter()
        if k_test > 0:
            itm_fn = make_itm_fn(model, emb, precision=itm_precision, batch_size=itm_batch_size)
            i2t, t2i = rerank_with_itm(itc, itm_fn, k=k_test, batch_size=itm_batch_size,
                                       progress=progress)
            results["itc+itm"] = recall_at_k(i2t, t2i, data.img2txt, data.txt2img)
        t3 = time.perf_counter()
    results["seconds"] = {"embed": round(t1 - t0, 2), "itc": round(t2 - t1, 2), "itm": round(t3 - t2, 2)}
    results["n_images"], results["n_texts"], results["k_test"] = len(data.image_paths), len(data.texts), k_test
    results["image_precision"] = resolve(model.device, image_precision)
    if k_test > 0:
        results["itm_precision"] = resolve(model.device, itm_precision)
    return results
