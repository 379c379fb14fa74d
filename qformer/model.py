"""The BLIP-2 Q-Former (Li et al., 2023): learned queries, a BERT encoder with cross-attention to frozen
image tokens, and the ITC / ITM / ITG heads.

Shapes: B batch, Q learned queries, L text tokens, N image tokens, C image token width,
H hidden size, D ITC embedding width, V vocabulary.

The three stage-1 objectives share every weight and differ only in the self-attention mask
(see `attention_mask`):
- ITC, uni-modal: queries and text cannot see each other (run as two separate passes).
- ITM, bi-directional: queries and text see each other.
- ITG, multimodal causal: queries see queries; each text token sees all queries and earlier text.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.config import QFormerConfig

MaskKind = Literal["unimodal", "bidirectional", "causal"]
CrossKV = list[tuple[Tensor, Tensor]]  # per cross-attention layer: keys, values [B|1, heads, N, H/heads]
QueryKV = list[tuple[Tensor, Tensor]]  # per layer: the queries' self-attention keys, values [B, heads, Q, H/heads]


TEXT_PATH = ("embeddings.", ".attn.", ".ffn_text.")  # parameter names of the text path: what the language model initialises


def attention_mask(kind: MaskKind, num_queries: int, text_mask: Tensor) -> Tensor:
    """Boolean self-attention mask [B,1,Q+L,Q+L] (True = may attend) for queries followed by text.

    text_mask [B,L] marks real (1) and padding (0) text tokens; padded keys are never attended.
    """
    b, length = text_mask.shape
    q, n = num_queries, num_queries + length
    device = text_mask.device
    keys = torch.cat([torch.ones(b, q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # [B,Q+L]
    is_query = torch.arange(n, device=device) < q  # [Q+L]
    if kind == "bidirectional":
        allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    elif kind == "unimodal":
        allowed = is_query[:, None] == is_query[None, :]
    elif kind == "causal":
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        # queries see only queries; text sees all queries and earlier (and its own) text
        allowed = torch.where(is_query[:, None], is_query[None, :], is_query[None, :] | causal)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return (allowed[None] & keys[:, None, :])[:, None]  # [B,1,Q+L,Q+L]


class QFormerEmbeddings(nn.Module):
    """Word + position embeddings for text; learned queries are put in front; one shared LayerNorm."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

    def forward(self, input_ids: Tensor | None, queries: Tensor | None) -> Tensor:
        """input_ids [B,L] and/or queries [B,Q,H] -> [B,Q+L,H]; queries get no position embedding."""
        parts = []
        if queries is not None:
            parts.append(queries)
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions)[None])
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual output."""

    def __init__(self, config: QFormerConfig, kv_width: int):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)
        self.out = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)
        self.attention_dropout = config.attention_dropout

    def _heads(self, x: Tensor) -> Tensor:  # [B,T,H] -> [B,heads,T,H/heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B,heads,T,H/heads] of states [B,T,width]."""
        return self._heads(self.key(states)), self._heads(self.value(states))

    def forward(self, x: Tensor, mask: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B,T,H] attends to itself, or to precomputed kv (batch B or 1); mask [B,1,T,S] bool."""
        k, v = self.kv(x) if kv is None else kv
        q = self._heads(self.query(x))
        if k.shape[0] != q.shape[0]:  # one image's keys/values shared by a batch of texts
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        p = self.attention_dropout if self.training else 0.0
        if q.device.type == "cpu" and (p > 0 or q.dtype == torch.bfloat16):
            a = cpu_attention(q, k, v, mask, p)  # [B,heads,T,H/heads]
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B,heads,T,H/heads]
        a = a.transpose(1, 2).flatten(2)  # [B,T,H]
        return self.norm(x + self.dropout(self.out(a)))


def cpu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Attention [B,heads,T,d] of q [B,heads,T,d] on k, v [B,heads,S,d] (mask [B,1,T,S] bool) as two batched
    products around a softmax, with `dropout` on the probabilities when dropout_p > 0.

    `Attention` uses it on CPU in two cases where it is faster than torch's kernels (docs/benchmarks.md):
    - bf16 inference (the ITM re-ranker): for ITM's short sequences two plain products beat the fused kernel;
    - training with dropout: torch's attention draws its dropout mask with one `bernoulli_` per probability,
      `dropout` draws it from fewer, wider random words.
    The softmax runs on an fp32 copy of bf16 scores, rounded back once: torch's bf16 softmax kernel is slower
    for rows this short, and the result differs from it by at most one bf16 ulp in a few elements per million."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B,heads,T,S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(-1).to(scores.dtype)
    return dropout(probs, dropout_p, dropout_p > 0) @ v


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    On CPU the keep mask is read from 16-bit slices of 64-bit random integers, four elements per two draws of
    torch's generator, where `F.dropout` makes one `bernoulli_` draw per element; drawing the mask is a large
    part of a CPU training step, so this matters (docs/benchmarks.md). The drop probability is rounded to a
    multiple of 2^-16 (0.1 -> 0.100006). Elsewhere (GPUs) this is `F.dropout`. Seeded by torch's global
    generator either way."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # uniform 64-bit words
    r = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    return torch.where(r >= round(p * 65536) - 32768, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Module):
    """`dropout` as a module (nn.Dropout's drop-in)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """BERT FFN with post-LayerNorm residual."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {config.hidden_act!r}")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries to the image, then separate
    FFNs for query and text positions."""

    def __init__(self, config: QFormerConfig, has_cross: bool):
        super().__init__()
        self.attn = Attention(config, config.hidden_size)
        self.cross = Attention(config, config.encoder_width) if has_cross else None
        self.ffn_query = FeedForward(config)
        self.ffn_text = FeedForward(config)

    def forward(self, x: Tensor, mask: Tensor | None, num_queries: int, kv: tuple[Tensor, Tensor] | None,
                self_kv: tuple[Tensor, Tensor] | None = None, same_rows: bool = False,
                queries_only: bool = False) -> Tensor:
        """x [B,Q+L,H] -> [B,Q+L,H]. kv: this layer's image keys/values (cross layers with queries only);
        self_kv: the self-attention's keys/values when the caller has them (default: from x); same_rows: every
        row of x and mask is the same (one text against many images, before any cross-attention), so the
        self-attention and the text FFN run on one row and are broadcast. queries_only: return the query
        positions alone [B,Q,H] (the last layer under ITM, whose head reads only those); the text still serves
        as keys and values."""
        b = x.shape[0]
        if queries_only:
            k, v = self.attn.kv(x) if self_kv is None else self_kv
            queries = x[:, :num_queries].contiguous()
            queries = self.attn(queries, None if mask is None else mask[:, :, :num_queries], kv=(k, v))
            return self.ffn_query(self.cross(queries, kv=kv) if self.cross is not None else queries)
        if same_rows and self_kv is None:
            x = self.attn(x[:1], None if mask is None else mask[:1]).expand(b, -1, -1)
        else:
            x = self.attn(x, mask, kv=self_kv)
        # contiguous slices: a Linear on a strided 3-D view falls back to a batched product with its weight
        # copied once per row (in bf16 on CPU, that copy costs more than the ITM re-ranker's arithmetic)
        queries, text = x[:, :num_queries].contiguous(), x[:, num_queries:].contiguous()
        parts = []
        if num_queries > 0:
            if self.cross is not None:
                queries = self.cross(queries, kv=kv)
            parts.append(self.ffn_query(queries))
        if text.shape[1] > 0:
            parts.append(self.ffn_text(text[:1]).expand(b, -1, -1) if same_rows else self.ffn_text(text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LMHead(nn.Module):
    """BERT LM prediction head for ITG; the decoder weight is tied to the word embeddings."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:  # [B,L,H] -> [B,L,V]
        return F.linear(self.norm(F.gelu(self.dense(x))), word_embeddings, self.bias)


class QFormer(nn.Module):
    """The BLIP-2 stage-1 Q-Former with its ITC, ITM and ITG heads.

    Image inputs are frozen-encoder tokens [B,N,C]; the trainable `ln_vision` LayerNorm is applied here.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, h))
        self.ln_vision = nn.LayerNorm(config.encoder_width, eps=config.vision_layer_norm_eps)
        self.embeddings = QFormerEmbeddings(config)
        cross = set(config.cross_layers)
        self.layers = nn.ModuleList(QFormerLayer(config, i in cross) for i in range(config.num_layers))
        self.vision_proj = nn.Linear(h, config.embed_dim)
        self.text_proj = nn.Linear(h, config.embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.lm_head = LMHead(config)
        self.temp = nn.Parameter(torch.tensor(config.temp_init))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms; queries normal(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                m.weight.normal_(0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.query_tokens.normal_(0.0, 0.02)
        self.lm_head.bias.zero_()
        self.temp.fill_(self.config.temp_init)

    # ---- the shared encoder -------------------------------------------------------------------------
    def image_kv(self, image_tokens: Tensor) -> CrossKV:
        """Cross-attention keys/values of every cross layer for image tokens [B,N,C]: text-independent, so
        an image scored against many texts computes them once."""
        x = self.ln_vision(image_tokens.to(self.ln_vision.weight.dtype))
        return [layer.cross.kv(x) for layer in self.layers if layer.cross is not None]

    def encode(
        self,
        input_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        kv: CrossKV | None = None,
        mask_kind: MaskKind = "bidirectional",
        batch_size: int | None = None,
        queries_out: bool = False,
    ) -> Tensor:
        """Hidden states [B,Q+L,H] for queries (when kv is given) followed by text (when input_ids is given).

        kv comes from `image_kv` and may have batch 1 for a batch of texts against one image. queries_out: return
        the query positions alone [B,Q,H]; the last layer then skips the text's own outputs (ITM).
        """
        if kv is None and input_ids is None:
            raise ValueError("encode needs image keys/values, text, or both")
        queries = None
        if kv is not None:
            b = batch_size or (input_ids.shape[0] if input_ids is not None else kv[0][0].shape[0])
            queries = self.query_tokens.expand(b, -1, -1)
        num_queries = 0 if queries is None else queries.shape[1]
        x = self.embeddings(input_ids, queries)
        mask = None
        if input_ids is not None:
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
            mask = attention_mask(mask_kind, num_queries, text_mask)
            if not self.training and bool(mask.all()):  # nothing masked (one unpadded text under ITM): same, faster
                mask = None
        kv_iter = iter(kv) if kv is not None else None
        # one text against many images (the search engine's and t2i re-ranking's case): the first layer's input
        # rows are all equal (learned queries + that text), so its self-attention runs once (exact)
        same = (not self.training and input_ids is not None and x.shape[0] > 1
                and bool((input_ids == input_ids[:1]).all()) and bool((text_mask == text_mask[:1]).all()))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_kv = next(kv_iter) if (layer.cross is not None and kv_iter is not None) else None
            only = queries_out and i == last
            x = layer(x, mask, num_queries, layer_kv, same_rows=same and i == 0 and not only, queries_only=only)
        return x[:, :num_queries] if queries_out else x

    def _head(self, linear: nn.Module, x: Tensor) -> Tensor:
        """linear(x) outside any autocast, in the Q-Former's own dtype (the embeddings' LayerNorm is in every
        copy of it, also the packed text path)."""
        with torch.autocast(x.device.type, enabled=False):
            return linear(x.to(self.embeddings.norm.weight.dtype))

    # ---- public task functions ----------------------------------------------------------------------
    def encode_image(self, image_tokens: Tensor) -> Tensor:
        """Image tokens [B,N,C] -> L2-normalised ITC query embeddings [B,Q,D]."""
        return self.image_embeds_from_kv(self.image_kv(image_tokens))

    def image_embeds_from_kv(self, kv: CrossKV) -> Tensor:
        """Cross keys/values (batch B) -> L2-normalised ITC query embeddings [B,Q,D]."""
        return self.itc_image_embeds(self.query_pass(kv)[0])

    def itc_image_embeds(self, query_states: Tensor) -> Tensor:
        """Query outputs [B,Q,H] of `query_pass` -> L2-normalised ITC query embeddings [B,Q,D] (fp32 under
        autocast: the cosines divided by temp 0.07 are too sensitive for bf16's 8-bit mantissa)."""
        return F.normalize(self._head(self.vision_proj, query_states), dim=-1)

    def query_pass(self, kv: CrossKV) -> tuple[Tensor, QueryKV]:
        """The queries alone on an image (ITC's uni-modal image pass): hidden states [B,Q,H] and every
        layer's self-attention keys/values of the queries. Under the multimodal-causal mask the queries
        never see text, so ITG's text reuses these keys/values instead of re-running the queries (as LAVIS
        passes `past_key_values`)."""
        b = kv[0][0].shape[0]
        x = self.embeddings(None, self.query_tokens.expand(b, -1, -1))  # [B,Q,H]
        q, cross, query_kv = x.shape[1], iter(kv), []
        for layer in self.layers:
            query_kv.append(layer.attn.kv(x))  # [B,heads,Q,H/heads] each
            x = layer(x, None, q, next(cross) if layer.cross is not None else None, self_kv=query_kv[-1])
        return x, query_kv

    def decode_text(self, input_ids: Tensor, text_mask: Tensor, query_kv: QueryKV) -> Tensor:
        """ITG text hidden states [B,L,H] under the multimodal-causal mask: each text token attends to
        every query (through `query_pass`'s keys/values) and to itself and earlier text."""
        q = query_kv[0][0].shape[2]
        mask = attention_mask("causal", q, text_mask)[:, :, q:]  # the text rows [B,1,L,Q+L]
        x = self.embeddings(input_ids, None)  # [B,L,H]
        for layer, (qk, qv) in zip(self.layers, query_kv, strict=True):
            k, v = layer.attn.kv(x)  # [B,heads,L,H/heads]
            x = layer(x, mask, 0, None, self_kv=(torch.cat([qk, k], dim=2), torch.cat([qv, v], dim=2)))
        return x

    def encode_text(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Token ids [B,L] with mask [B,L] -> L2-normalised ITC embedding of [CLS], [B,D]."""
        input_ids, text_mask = trim_padding(input_ids, text_mask)
        h = self.encode(input_ids, text_mask)
        return F.normalize(self._head(self.text_proj, h[:, 0]), dim=-1)  # fp32 under autocast, as the image side

    def itm_logits(self, image: Tensor | CrossKV, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """ITM logits [B,2] (no-match, match) for pairs: image tokens [B,N,C] (or `image_kv` output, batch
        B or 1) with texts [B,L]. Queries and text see each other; the head is averaged over queries."""
        kv = self.image_kv(image) if isinstance(image, Tensor) else image
        input_ids, text_mask = trim_padding(input_ids, text_mask)
        h = self.encode(input_ids, text_mask, kv=kv, mask_kind="bidirectional", queries_out=True)  # [B,Q,H]
        w, b = self.itm_head.weight.float(), self.itm_head.bias.float()
        with torch.autocast(h.device.type, enabled=False):  # the small head in fp32, whatever the model's dtype
            return F.linear(h.float(), w, b).mean(dim=1)

    def itm_match_logit(self, image: Tensor | CrossKV, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """The raw match logit [B] that the paper's retrieval score adds to the ITC cosine."""
        return self.itm_logits(image, input_ids, text_mask)[:, 1]

    def itg_logits(self, image: Tensor | CrossKV, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Next-token logits [B,L,V] of the ITG decoder under the multimodal-causal mask. The caller puts
        [DEC] (config.bos_token_id) as the first token, as LAVIS does."""
        kv = self.image_kv(image) if isinstance(image, Tensor) else image
        h = self.encode(input_ids, text_mask, kv=kv, mask_kind="causal")
        return self.lm_head(h[:, self.config.num_query_tokens :], self.embeddings.word.weight)


def trim_padding(input_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing columns that are padding in every row: masked keys change no output."""
    keep = int(text_mask.any(dim=0).nonzero().max()) + 1 if text_mask.any() else 1
    return input_ids[:, :keep], text_mask[:, :keep]
