"""Image captioning with the Q-Former's own ITG decoder, as LAVIS `Blip2Qformer.generate`.

Decoding starts from [DEC] (config.bos_token_id) and stops at [SEP] (the tokenizer's sep token); LAVIS
defaults are beam search with 3 beams, max_length 30, min_length 10, repetition penalty 1.0.

Repetition guards, both off by default and applied as in HF `generate` (greedy: to the logits; beam search:
to the beams' log-probs): `repetition_penalty` (CTRL) and `no_repeat_ngram_size` n (HF's
`NoRepeatNGramLogitsProcessor`: a token that would repeat an n-gram of the sequence so far, [DEC] included,
is forbidden).

Length accounting follows HF `generate` with LAVIS' one-token prompt [DEC]:
- `max_length` counts the whole sequence, [DEC] and [SEP] included: at most max_length - 1 generated tokens;
- [SEP] is forbidden while the sequence, [DEC] included, is shorter than `min_length`: at least
  min_length - 1 word pieces before [SEP];
- a beam hypothesis scores sum(log-probs) / (number of generated tokens, [SEP] included) (length_penalty 1);
  log-probs are the model's own (log_softmax before [SEP] is masked, no renormalisation), as in HF.

Decoding is incremental: the query pass under the multimodal-causal mask depends only on the image, so it
runs once per image and its per-layer self-attention keys/values are cached; each step then runs only the
newest text token through the layers, appending its keys/values (`ITGDecoder`).

Shapes: B images, K beams, R = B*K decoding rows, Q queries, T text positions, H hidden, V vocabulary,
h heads, d = H/h.
"""

from __future__ import annotations

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import NoRepeatNGramLogitsProcessor

from qformer.factory import Blip2Retriever
from qformer.model import QFormer

Hypothesis = tuple[float, list[int]]  # (length-normalised score, generated token ids)


class ITGDecoder:
    """KV-cached ITG decoder for R = B*rows_per_image rows; rows of one image are contiguous.

    Per layer, a key and a value buffer [R,h,Q+T,d] holds the queries' self-attention keys/values (from the
    query pass, computed once per image) followed by those of the text tokens fed so far.
    """

    def __init__(self, qformer: QFormer, image_tokens: Tensor, rows_per_image: int, max_text: int):
        self.qformer = qformer
        self.num_queries = q = qformer.config.num_query_tokens
        self.length = 0  # text tokens fed so far
        b = image_tokens.shape[0]
        _, query_kv = qformer.query_pass(qformer.image_kv(image_tokens))  # per layer [B,h,Q,d]
        self.keys: list[Tensor] = []  # per layer [R,h,Q+T,d]
        self.values: list[Tensor] = []
        for k, v in query_kv:  # queries see only queries, so text never changes them
            for buf, src in ((self.keys, k), (self.values, v)):
                full = src.new_empty(b * rows_per_image, src.shape[1], q + max_text, src.shape[3])
                full[:, :, :q] = src.repeat_interleave(rows_per_image, dim=0)
                buf.append(full)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one text token per row, tokens [R], at the next position -> next-token logits [R,V]."""
        qf, t, q = self.qformer, self.length, self.num_queries
        emb = qf.embeddings
        x = emb.norm(emb.word(tokens) + emb.position.weight[t])[:, None]  # [R,1,H]
        for layer, kbuf, vbuf in zip(qf.layers, self.keys, self.values, strict=True):
            attn = layer.attn
            k, v = attn.kv(x)  # [R,h,1,d]
            kbuf[:, :, q + t] = k[:, :, 0]
            vbuf[:, :, q + t] = v[:, :, 0]
            query = attn.query(x).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # [R,h,1,d]
            # the newest token sees all queries and all earlier text: no mask needed
            a = F.scaled_dot_product_attention(query, kbuf[:, :, : q + t + 1], vbuf[:, :, : q + t + 1])
            x = attn.norm(x + attn.out(a.transpose(1, 2).flatten(2)))  # [R,1,H]
            x = layer.ffn_text(x)
        self.length += 1
        return qf.lm_head(x[:, 0], emb.word.weight)  # [R,V]

    def reorder(self, rows: Tensor) -> None:
        """Row i continues row rows[i] [R]; rows must stay within their image (text part copied only)."""
        q, t = self.num_queries, self.length
        for buf in self.keys + self.values:
            buf[:, :, q : q + t] = buf[rows, :, q : q + t]

    def keep(self, rows: Tensor) -> None:
        """Keep only rows [R'] (any rows, e.g. those of the images still decoding)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


def _repetition_guard(scores: Tensor, seqs: Tensor, penalty: float, no_repeat_ngram_size: int) -> Tensor:
    """Scores [R,V] after the CTRL / HF penalty on every token already in seqs [R,t] (negative * p, positive / p)
    and with -inf on each token that would repeat an n-gram of seqs (n = no_repeat_ngram_size; 0: off)."""
    if penalty != 1.0:
        seen = scores.gather(1, seqs)  # [R,t]
        scores = scores.scatter(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))
    if no_repeat_ngram_size > 0:
        scores = NoRepeatNGramLogitsProcessor(no_repeat_ngram_size)(seqs, scores)
    return scores


def _greedy(dec: ITGDecoder, b: int, bos: int, eos: int, max_length: int, min_length: int,
            penalty: float, no_repeat_ngram_size: int) -> list[list[int]]:
    """Argmax decoding of B images (one row each); rows leave the batch when they emit [SEP]."""
    out: list[list[int]] = [[] for _ in range(b)]
    active = list(range(b))  # image of each row
    seqs = torch.full((b, 1), bos, dtype=torch.long, device=dec.keys[0].device)  # [A,1+t]
    for t in range(1, max_length):  # t: position being predicted = tokens so far, [DEC] included
        logits = _repetition_guard(dec.step(seqs[:, -1]).float(), seqs, penalty, no_repeat_ngram_size)  # [A,V]
        if t < min_length:
            logits[:, eos] = -torch.inf
        token = logits.argmax(dim=-1)  # [A]
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        ended = token == eos if t < max_length - 1 else torch.ones_like(token, dtype=torch.bool)
        for i in ended.nonzero()[:, 0].tolist():
            out[active[i]] = seqs[i, 1:].tolist()
        if ended.all():
            break
        if ended.any():
            rows = (~ended).nonzero()[:, 0]
            active = [active[i] for i in rows.tolist()]
            seqs = seqs[rows]
            dec.keep(rows)
    return out


def _add_hypothesis(hyps: list[Hypothesis], hyp: Hypothesis, num_beams: int) -> None:
    """Keep the num_beams best finished hypotheses of one image."""
    hyps.append(hyp)
    hyps.sort(key=lambda h: h[0], reverse=True)
    del hyps[num_beams:]


def _beam_search(dec: ITGDecoder, b: int, k: int, bos: int, eos: int, max_length: int, min_length: int,
                 penalty: float, no_repeat_ngram_size: int) -> list[list[int]]:
    """Length-normalised beam search (HF `generate`, early_stopping=False) of B images × K beams."""
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    active = list(range(b))  # images still searching, in row order
    device = dec.keys[0].device
    scores = torch.full((b, k), -torch.inf, device=device)  # [A,K] running sums of log-probs
    scores[:, 0] = 0.0  # all beams start equal: expand only the first at step 1
    seqs = torch.full((b * k, 1), bos, dtype=torch.long, device=device)  # [A*K,1+t]
    pick = torch.arange(2 * k, device=device)  # [2K]
    for t in range(1, max_length):  # t: position being predicted = generated tokens after this step
        a = len(active)
        logp = F.log_softmax(dec.step(seqs[:, -1]).float(), dim=-1)  # [A*K,V]
        logp = _repetition_guard(logp, seqs, penalty, no_repeat_ngram_size)  # HF: on the beam log-probs
        if t < min_length:
            logp[:, eos] = -torch.inf
        v = logp.shape[1]
        top, idx = (scores.reshape(-1, 1) + logp).reshape(a, k * v).topk(2 * k, dim=1)  # [A,2K]
        rows = torch.arange(a, device=device)[:, None] * k + idx // v  # [A,2K] source row
        token = idx % v  # [A,2K]
        is_eos = token == eos
        # the best K candidates that end ([SEP], or any at max_length) become finished hypotheses
        ends = is_eos.clone() if t < max_length - 1 else torch.ones_like(is_eos)
        ends[:, k:] = False
        for i, j in ends.nonzero().tolist():
            tokens = seqs[rows[i, j], 1:].tolist() + [int(token[i, j])]
            _add_hypothesis(finished[active[i]], (float(top[i, j]) / t, tokens), k)
        if t == max_length - 1:
            break
        # the best K candidates that do not end continue (at most K of the 2K end, so K remain)
        order = (is_eos.long() * 2 * k + pick).argsort(dim=1)[:, :k]  # [A,K]
        scores = top.gather(1, order)  # [A,K], best first
        rows = rows.gather(1, order).flatten()  # [A*K]
        seqs = torch.cat([seqs[rows], token.gather(1, order).reshape(-1, 1)], dim=1)
        dec.reorder(rows)
        # an image is done when its K finished hypotheses all beat its best running beam's current score
        done = torch.tensor([len(finished[img]) == k and finished[img][-1][0] >= float(scores[i, 0]) / t
                             for i, img in enumerate(active)], device=device)
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero()[:, 0]  # [A']
            active = [active[i] for i in keep.tolist()]
            scores = scores[keep]
            rows = (keep[:, None] * k + torch.arange(k, device=device)).flatten()  # [A'*K]
            seqs = seqs[rows]
            dec.keep(rows)
    return [max(h, key=lambda x: x[0])[1] for h in finished]


@torch.inference_mode()
def generate_token_ids(qformer: QFormer, image_tokens: Tensor, eos_token_id: int, num_beams: int = 3,
                       max_length: int = 30, min_length: int = 10, repetition_penalty: float = 1.0,
                       no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """Image tokens [B,N,C] -> B lists of generated token ids: the tokens after [DEC], ending with
    [SEP] (eos_token_id) unless max_length was reached. All images and beams decode in one batch."""
    if num_beams < 1 or no_repeat_ngram_size < 0:
        raise ValueError(f"need num_beams >= 1 and no_repeat_ngram_size >= 0 (got {num_beams}, {no_repeat_ngram_size})")
    b = image_tokens.shape[0]
    if b == 0 or max_length < 2:
        return [[] for _ in range(b)]
    bos = qformer.config.bos_token_id
    was_training = qformer.training
    qformer.eval()
    try:
        dec = ITGDecoder(qformer, image_tokens.to(qformer.query_tokens.device), num_beams, max_length - 1)
        if num_beams == 1:
            return _greedy(dec, b, bos, eos_token_id, max_length, min_length, repetition_penalty, no_repeat_ngram_size)
        return _beam_search(dec, b, num_beams, bos, eos_token_id, max_length, min_length, repetition_penalty,
                            no_repeat_ngram_size)
    finally:
        qformer.train(was_training)


@torch.inference_mode()
def generate_captions(qformer: QFormer, image_tokens: Tensor, tokenizer, num_beams: int = 3, max_length: int = 30,
                      min_length: int = 10, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0
                      ) -> list[str]:
    """Image tokens [B,N,C] -> B captions (LAVIS `Blip2Qformer.generate`: beam search from [DEC] to [SEP],
    decoded without special tokens). num_beams=1 decodes greedily."""
    ids = generate_token_ids(qformer, image_tokens, tokenizer.sep_token_id, num_beams, max_length, min_length,
                             repetition_penalty, no_repeat_ngram_size)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def caption_images(model: Blip2Retriever, images: list[PIL.Image.Image], batch_size: int = 16, **kw) -> list[str]:
    """Caption PIL images in batches of batch_size; kw go to `generate_captions`."""
    preprocess = model.preprocess()
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(im) for im in images[start : start + batch_size]])  # [B,3,S,S]
        captions += generate_captions(model.qformer, model.image_tokens(pixels), model.tokenizer, **kw)
    return captions
