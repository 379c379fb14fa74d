"""BLIP-2 stage-1 losses (LAVIS `blip2_qformer.py::Blip2Qformer.forward`) as plain functions of tensors.

    loss = itc + itm + itg      (unweighted, as in LAVIS)

- ITC: image feature = the Q normalised query embeddings, text feature = normalised [CLS]; similarity =
  max over queries / temp; cross-entropy with label smoothing 0.1 against in-batch negatives (gathered
  from every rank under torch.distributed). Captions of the same image (equal image ids) are all
  positives, as LAVIS does when the batch carries `image_id`.
- ITM: one hard negative image per text and one hard negative text per image, drawn with
  `torch.multinomial(softmax(sim))` with every positive (same image id) masked out; 3B pairs labelled
  [1]*B + [0]*2B; cross-entropy on `itm_head(query outputs).mean(queries)`.
- ITG: first text token replaced by [DEC]; multimodal-causal mask; next-token cross-entropy with label
  smoothing 0.1, padding ignored (-100).

The frozen image tokens go through `ln_vision` and the cross-attention key/value projections once per
batch (`QFormer.image_kv`); all three objectives reuse those keys/values. ITG also reuses the ITC image
pass's query self-attention keys/values (`QFormer.query_pass`), as LAVIS does with `past_key_values`, so its
pass runs the text tokens only.

Shapes: B local batch, W world size, G = B*W global batch, Q queries, D ITC width, L text tokens,
N image tokens, C image token width.

Differences from LAVIS, on purpose:
- a text (or image) whose every candidate is a positive (B=1, or a batch of one image's captions) gets no
  hard negative, instead of LAVIS' silently sampling a positive as a "negative";
- across ranks, the negatives' keys/values are recomputed locally from the gathered (frozen, no-grad)
  image tokens, instead of gathering the LayerNormed image embeddings with gradient: the parameter
  gradients are the same after DDP's all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from qformer.model import CrossKV, QFormer, QueryKV

LABEL_SMOOTHING = 0.1
TEMP_RANGE = (0.001, 0.5)  # LAVIS clamps temp into this range before every forward
NO_NEGATIVE = float("-inf")  # similarity given to positives before the ITM softmax: probability exactly 0


# ---- torch.distributed helpers: a plain process (no process group) is world size 1 --------------------
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """[B,...] from every rank -> [W*B,...] in rank order, without gradient (LAVIS concat_all_gather)."""
    _, w = world()
    if w == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x.contiguous())
    with torch.autocast(x.device.type, enabled=False):  # CPU autocast's cat rejects fp16 (the cached tokens)
        return torch.cat(parts)


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's shard (LAVIS GatherLayer)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        rank, w = world()
        grad = grad.contiguous()
        dist.all_reduce(grad)  # the other ranks' losses also depend on this rank's features
        return grad.chunk(w)[rank]


def gather_with_grad(x: Tensor) -> Tensor:
    """[B,...] from every rank -> [W*B,...], differentiable: each rank's shard receives the gradient of every
    rank's loss, so after DDP's gradient averaging the update equals one process on the global batch."""
    _, w = world()
    if w == 1:
        return x
    return _GatherLayer.apply(x)


def gather_text(input_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids and mask [B,L] from every rank -> [W*B,L'] (right-padded to the longest L on any rank)."""
    _, w = world()
    if w == 1:
        return input_ids, text_mask
    length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length) - input_ids.shape[1]
    input_ids, text_mask = F.pad(input_ids, (0, pad)), F.pad(text_mask, (0, pad))  # pad id 0 = [PAD]
    return gather_no_grad(input_ids), gather_no_grad(text_mask)


# ---- ITC -----------------------------------------------------------------------------------------------
def positive_mask(image_ids: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """Bool [B,G]: True where the local row and global column are the same image (always the diagonal of
    this rank's block; with image ids, every pair with equal ids)."""
    rank, w = world()
    if image_ids is None:
        pos = torch.zeros(batch_size, batch_size * w, dtype=torch.bool, device=device)
        local = torch.arange(batch_size, device=device)
        pos[local, rank * batch_size + local] = True
        return pos
    ids = image_ids.to(device).view(-1)
    return ids[:, None] == gather_no_grad(ids)[None, :]


def itc_similarity_logits(
    image_feats: Tensor, text_feat: Tensor, image_feats_all: Tensor, text_feat_all: Tensor, temp: Tensor
) -> tuple[Tensor, Tensor]:
    """(sim_i2t [B,G], sim_t2i [B,G]): cosine max over queries, divided by temp.

    image_feats [B,Q,D], text_feat [B,D] are this rank's; *_all [G,Q,D] / [G,D] are gathered.
    """
    with torch.autocast(image_feats.device.type, enabled=False):  # fp32 under autocast: see itc_image_embeds
        image_feats, image_feats_all = image_feats.float(), image_feats_all.float()
        text_feat, text_feat_all = text_feat.float(), text_feat_all.float()
        sim_i2t = torch.einsum("bqd,gd->bgq", image_feats, text_feat_all).amax(-1) / temp  # [B,G]
        sim_t2i = torch.einsum("bd,gqd->bgq", text_feat, image_feats_all).amax(-1) / temp  # [B,G]
    return sim_i2t, sim_t2i


def soft_targets(pos: Tensor, smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """Targets [B,G] from a positive mask: positives share 1 - smoothing, everything gets smoothing / G.

    With one positive per row this is exactly F.cross_entropy(..., label_smoothing=smoothing)."""
    p = pos.float()
    p = p / p.sum(1, keepdim=True)
    return (1.0 - smoothing) * p + smoothing / p.shape[1]


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, pos: Tensor, smoothing: float = LABEL_SMOOTHING,
             pos_t2i: Tensor | None = None) -> Tensor:
    """Mean of the image->text and text->image soft-target cross-entropies; sims [B,G], pos [B,G] bool.
    pos_t2i: the text->image positives when they differ from `pos` (sim_t2i [T,B] against sim_i2t [B,T])."""
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * soft_targets(pos, smoothing)).sum(1).mean()
    targets_t2i = soft_targets(pos if pos_t2i is None else pos_t2i, smoothing)
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


# ---- ITM -----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_hard_negatives(
    sim: Tensor, pos: Tensor, generator: torch.Generator | None = None, uniform: float = 0.0
) -> tuple[Tensor, Tensor]:
    """One negative column per row, drawn with probability (1 - uniform) * softmax(sim) + uniform / m over
    the m non-positive columns of the row (uniform 0: BLIP-2's hard negatives; 1: uniformly random ones).

    sim [B,G] (logits), pos [B,G] bool. Returns (rows [B'], cols [B']): the rows that have at least one
    non-positive column (B' <= B) and the column drawn for each. A positive is never drawn.
    """
    if not 0.0 <= uniform <= 1.0:
        raise ValueError(f"uniform must be in [0, 1], got {uniform}")
    has_negative = (~pos).any(dim=1)  # [B]
    rows = has_negative.nonzero().view(-1)
    if rows.numel() == 0:
        return rows, rows.clone()
    logits = sim[rows].float().masked_fill(pos[rows], NO_NEGATIVE)
    weights = F.softmax(logits, dim=1)  # [B',G], exactly 0 on positives
    if uniform > 0:
        negative = (~pos[rows]).float()
        weights = (1 - uniform) * weights + uniform * negative / negative.sum(1, keepdim=True)
    cols = torch.multinomial(weights, 1, generator=generator).view(-1)
    return rows, cols


def select_kv(kv: CrossKV, idx: Tensor) -> CrossKV:
    """Rows idx [P] of every cross layer's keys/values [B,heads,N,h] -> [P,heads,N,h]."""
    return [(k[idx], v[idx]) for k, v in kv]


def cat_kv(parts: list[CrossKV]) -> CrossKV:
    """Concatenate keys/values along the batch, layer by layer."""
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def itm_loss(
    qformer: QFormer,
    kv: CrossKV,
    input_ids: Tensor,
    text_mask: Tensor,
    neg_kv: CrossKV,
    neg_image_rows: Tensor,
    neg_ids: Tensor,
    neg_mask: Tensor,
    neg_text_rows: Tensor,
) -> Tensor:
    """Cross-entropy of the ITM head on B positives, texts[neg_image_rows] with their negative images
    (neg_kv), and images[neg_text_rows] with their negative texts (neg_ids/neg_mask [P,L]).

    kv: this batch's image keys/values [B,...]; positives are (kv[i], text i). Labels 1 for positives,
    0 for negatives. With no negative at all (e.g. B=1) the loss is 0, not a pull towards "match".
    """
    if neg_image_rows.numel() + neg_text_rows.numel() == 0:
        return kv[0][0].sum() * 0.0  # keeps the graph (and DDP's used-parameter set) intact
    length = max(input_ids.shape[1], neg_ids.shape[1])
    ids_all = torch.cat([F.pad(input_ids, (0, length - input_ids.shape[1])),
                         F.pad(input_ids[neg_image_rows], (0, length - input_ids.shape[1])),
                         F.pad(neg_ids, (0, length - neg_ids.shape[1]))])  # [B+P1+P2,L]
    mask_all = torch.cat([F.pad(text_mask, (0, length - text_mask.shape[1])),
                          F.pad(text_mask[neg_image_rows], (0, length - text_mask.shape[1])),
                          F.pad(neg_mask, (0, length - neg_mask.shape[1]))])
    kv_all = cat_kv([kv, neg_kv, select_kv(kv, neg_text_rows)])  # pos, neg image, pos image w/ neg text
    logits = qformer.itm_logits(kv_all, ids_all, mask_all)  # [B+P1+P2,2]
    b = input_ids.shape[0]
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:b] = 1
    return F.cross_entropy(logits.float(), labels)


# ---- ITG -----------------------------------------------------------------------------------------------
def itg_loss(
    qformer: QFormer,
    kv: CrossKV,
    input_ids: Tensor,
    text_mask: Tensor,
    smoothing: float = LABEL_SMOOTHING,
    query_kv: QueryKV | None = None,
) -> Tensor:
    """Captioning loss: [DEC] replaces the first token ([CLS]); each token predicts the next under the
    multimodal-causal mask; padding is ignored. input_ids, text_mask [B,L]; kv batch B; query_kv: the ITC
    image pass's query keys/values (`QFormer.query_pass`), reused rather than recomputed when given."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = qformer.config.bos_token_id
    labels = decoder_ids.masked_fill(text_mask == 0, -100)[:, 1:]  # [B,L-1]: token t+1 is the target at t
    if query_kv is None:
        query_kv = qformer.query_pass(kv)[1]
    h = qformer.decode_text(decoder_ids, text_mask, query_kv)[:, :-1]  # text positions 0..L-2 [B,L-1,H]
    keep = labels != -100
    # the LM head (H x vocab) only on positions that have a target: same loss as LAVIS, less compute
    logits = qformer.lm_head(h[keep], qformer.embeddings.word.weight)  # [T,V]
    return F.cross_entropy(logits.float(), labels[keep], label_smoothing=smoothing)


# ---- all three ---------------------------------------------------------------------------------------------
def stage1_losses(
    qformer: QFormer,
    image_tokens: Tensor,
    input_ids: Tensor,
    text_mask: Tensor,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    mined: tuple[Tensor, Tensor, Tensor] | None = None,
    itm_uniform: float = 0.0,
) -> dict[str, Tensor]:
    """The BLIP-2 stage-1 losses of one (local) batch of image-text pairs.

    image_tokens [B,N,C]: frozen-encoder tokens (no grad); input_ids, text_mask [B,L]: the captions
    (first token [CLS], as the tokenizer gives it); image_ids [B]: captions with equal ids describe the
    same image (None: all pairs are different images); generator: draws the ITM hard negatives (on the
    tokens' device; None uses the global RNG); mined: ITM negatives chosen beforehand instead of drawn from
    the batch, (negative image tokens [B,N,C] for each text, negative text ids [B,L'] and mask for each image).
    itm_uniform: share of the in-batch negatives drawn uniformly (`sample_hard_negatives`).
    Returns {"itc", "itm", "itg", "loss"} scalar tensors.
    """
    b = image_tokens.shape[0]
    with torch.no_grad():
        qformer.temp.clamp_(*TEMP_RANGE)

    kv = qformer.image_kv(image_tokens)  # ln_vision + cross K/V, once for all three objectives

    # ITC
    query_states, query_kv = qformer.query_pass(kv)  # [B,Q,H]; per layer the queries' keys/values, for ITG
    image_feats = qformer.itc_image_embeds(query_states)  # [B,Q,D]
    text_feat = qformer.encode_text(input_ids, text_mask)  # [B,D]
    sim_i2t, sim_t2i = itc_similarity_logits(
        image_feats, text_feat, gather_with_grad(image_feats), gather_with_grad(text_feat), qformer.temp
    )  # [B,G] each
    pos = positive_mask(image_ids, b, image_tokens.device)  # [B,G]
    loss_itc = itc_loss(sim_i2t, sim_t2i, pos)

    # ITM: a hard negative image for each text, a hard negative text for each image
    _, w = world()
    if mined is not None:  # every text and every image has its negative already
        neg_tokens, neg_ids, neg_mask = mined
        rows = torch.arange(b, device=image_tokens.device)
        loss_itm = itm_loss(qformer, kv, input_ids, text_mask, qformer.image_kv(neg_tokens), rows,
                            neg_ids, neg_mask, rows)
    else:
        img_rows, img_cols = sample_hard_negatives(sim_t2i.detach(), pos, generator, itm_uniform)  # text row -> image col
        txt_rows, txt_cols = sample_hard_negatives(sim_i2t.detach(), pos, generator, itm_uniform)  # image row -> text col
        if w == 1:
            neg_kv = select_kv(kv, img_cols)
        else:  # negatives may live on other ranks: rebuild their keys/values from the gathered frozen tokens
            neg_kv = qformer.image_kv(gather_no_grad(image_tokens)[img_cols])
        ids_all, mask_all = gather_text(input_ids, text_mask)  # [G,L']
        loss_itm = itm_loss(qformer, kv, input_ids, text_mask, neg_kv, img_rows,
                            ids_all[txt_cols], mask_all[txt_cols], txt_rows)

    # ITG
    loss_itg = itg_loss(qformer, kv, input_ids, text_mask, query_kv=query_kv)

    return {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg, "loss": loss_itc + loss_itm + loss_itg}
