"""Inference copies of the Q-Former, each faster at one job.

`fp16_text_encoder`: a faster CPU text encoder for queries, the Q-Former's text path with fp16 weights
packed for fbgemm.

At batch 1 a text query's 37 matrix products are bound by reading the weights (42 MB in fp32 for
blip2-tiny's 6 layers), not by arithmetic. fbgemm's fp16 GEMM reads half the bytes and computes in fp32, so
a text query is faster, and the embeddings move by at most ~1e-4 (less than the fp16 storage of the index's
own image embeddings). `Blip2Retriever.embed_texts` uses it for every text on CPU, so the search engine and
the retrieval benchmark embed texts alike. Image embeddings and ITM keep fp32 weights: at their batch sizes
fbgemm's fp16 GEMM is slower than fp32.

`bf16_itm_encoder`: the ITM re-ranker with bf16 weights, for devices with native bf16. Under bf16 autocast
every call re-casts each weight and LayerNorm output; stored in bf16 they are cast once. On a CPU with
native bf16 its linear layers are `OneDnnBf16Linear`: the same oneDNN product with the bias added inside it.
nn.Linear's bf16 path first copies the bias into every output row and then accumulates onto it, an extra
pass over each output; the fused product gives the same bits. docs/benchmarks.md has the timings.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn

from qformer.model import QFormer
from qformer.precision import cpu_bf16_native


@functools.cache
def packed_fp16_available() -> bool:
    """Whether this torch build has fbgemm's fp16 linear (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class PackedFp16Linear(nn.Module):
    """Inference-only nn.Linear: fp16 weights prepacked for fbgemm, fp32 inputs and outputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).contiguous(), self.packed)
        return y.reshape(*x.shape[:-1], self.out_features)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fused linear (x86 and arm64 builds with mkldnn do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnBf16Linear(nn.Module):
    """Inference-only bf16 nn.Linear on a CPU: one oneDNN matmul with the bias fused, bit-equal to F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach()  # [out,in] bf16, shared with nothing else (a copy's own)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                               "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def fp16_text_encoder(qformer: QFormer) -> QFormer:
    """A copy of qformer that can only `encode_text`, with every Linear a PackedFp16Linear.

    The word/position tables are shared with qformer (lookups, not weight-bound); queries, cross-attention,
    query FFNs and the other heads are left out. Build it after the weights are final: it does not follow
    later changes to qformer."""
    leave_out: list[nn.Module | nn.Parameter] = [qformer.query_tokens, qformer.ln_vision, qformer.vision_proj,
                                                 qformer.itm_head, qformer.lm_head, qformer.temp]
    for layer in qformer.layers:
        leave_out += [m for m in (layer.cross, layer.ffn_query) if m is not None]
    memo: dict[int, object] = {id(m): None for m in leave_out if m is not None}
    shared = (qformer.embeddings.word, qformer.embeddings.position)  # not copied
    for table in shared:
        memo[id(table)] = table
    text = copy.deepcopy(qformer, memo)
    for module in list(text.modules()):
        if any(module is table for table in shared):
            continue  # the caller's own modules: their train mode and requires_grad are not ours to change
        module.training = False
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedFp16Linear(child))
    return text


def bf16_itm_encoder(qformer: QFormer) -> QFormer:
    """A bf16 copy of qformer for `image_kv` and `itm_logits` alone: the ITC projections and the ITG head are
    left out, the ITM head stays fp32 (itm_logits computes it in fp32). Build it after the weights are final:
    it does not follow later changes to qformer."""
    leave_out = [qformer.vision_proj, qformer.text_proj, qformer.lm_head, qformer.temp]
    itm = copy.deepcopy(qformer, {id(m): None for m in leave_out})
    itm.to(torch.bfloat16).itm_head.float()
    itm.train(False)
    for p in itm.parameters():
        p.requires_grad_(False)
    if qformer.query_tokens.device.type == "cpu" and cpu_bf16_native() and onednn_linear_available():
        for module in list(itm.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                    setattr(module, name, OneDnnBf16Linear(child))
    return itm
