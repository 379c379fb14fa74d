"""ITM re-ranking: match logits of (text, image) pairs, computed one way for the search engine, the retrieval
benchmark and the keys/values an index stores (`--itm-kv`).

Low-precision matrix products may round differently at different sizes (oneDNN's bf16 kernels on AMX,
cuBLAS), so "the same arithmetic" has to mean "the same products":
- an image's cross-attention keys/values come from products over that image alone ([N,C] rows), whatever
  batch it arrives in, so stored, cached and freshly computed keys/values are the same bits;
- one text is scored against its candidate images in passes of `batch_size` images, in the order given
  (a search query's ITC order). The benchmark's text → image direction scores each text the same way, so
  the engine's ranking of a query equals the benchmark's by construction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from qformer.factory import Blip2Retriever
from qformer.model import CrossKV, QFormer
from qformer.precision import use_bf16

ITM_BATCH = 128  # images scored against one text per pass (the paper's k_test, one pass)

ImageInput = Tensor | CrossKV  # frozen image tokens [n,N,C], or their keys/values from `ItmReranker.keys_values`
ImageLoader = Callable[[slice], ImageInput]  # the images of one pass, by their positions among the candidates


class ItmReranker:
    """The ITM re-ranker of a model under one precision.

    precision: "auto" (bf16 where the device has native bf16, else fp32), "fp32" or "bf16" (qformer.precision).
    """

    def __init__(self, model: Blip2Retriever, precision: str = "auto", batch_size: int = ITM_BATCH):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        use_bf16(model.device, precision)  # rejects an unknown precision now
        self.model, self.precision, self.batch_size = model, precision, batch_size

    @property
    def encoder(self) -> QFormer:
        """The Q-Former that runs (a bf16 copy where the precision means bf16), following weight updates."""
        return self.model.itm_encoder(self.precision)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype image tokens and keys/values are read in."""
        return self.encoder.ln_vision.weight.dtype

    @torch.inference_mode()
    def keys_values(self, tokens: Tensor) -> CrossKV:
        """Image tokens [n,N,C] -> per cross layer (keys, values) [n,heads,N,d], each image's computed alone."""
        q = self.encoder
        x = tokens.to(self.model.device, self.dtype)
        if len(x) <= 1:
            return q.image_kv(x)
        per = [q.image_kv(x[i : i + 1]) for i in range(len(x))]
        return [(torch.cat([p[j][0] for p in per]), torch.cat([p[j][1] for p in per])) for j in range(len(per[0]))]

    def _kv(self, images: ImageInput) -> CrossKV:
        if isinstance(images, Tensor):
            return self.keys_values(images)
        return [(k.to(self.model.device), v.to(self.model.device)) for k, v in images]

    @torch.inference_mode()
    def pairs(self, images: ImageInput, ids: Tensor, mask: Tensor) -> Tensor:
        """Match logits [P] float32 of P pairs in one pass: images [P] (or one image [1], shared) against
        texts ids, mask [P,L]."""
        kv = self._kv(images)
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        return self.encoder.itm_match_logit(kv, ids, mask).float()

    @torch.inference_mode()
    def text_vs_images(self, ids: Tensor, mask: Tensor, images: ImageInput | ImageLoader, n: int | None = None) -> Tensor:
        """Match logits [n] float32 of one text (ids, mask [L] or [1,L]) against n images, in passes of
        `batch_size`. images: tokens [n,N,C] or keys/values of all n, or a loader `images(slice)` of one
        pass's (then n is required)."""
        if callable(images):
            if n is None:
                raise ValueError("n is required with an image loader")
            load = images
        else:
            n, load = _count(images), functools.partial(_take, images)
        ids, mask = ids.reshape(1, -1), mask.reshape(1, -1)
        out = []
        for i in range(0, n, self.batch_size):
            part = slice(i, min(i + self.batch_size, n))
            m = part.stop - part.start
            out.append(self.pairs(load(part), ids.expand(m, -1), mask.expand(m, -1)))
        return torch.cat(out) if out else torch.empty(0)


def _count(images: ImageInput) -> int:
    return len(images) if isinstance(images, Tensor) else images[0][0].shape[0]


def _take(images: ImageInput, part: slice) -> ImageInput:
    return images[part] if isinstance(images, Tensor) else [(k[part], v[part]) for k, v in images]
