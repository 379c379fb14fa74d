"""BLIP-2 stage 1 as a training stage: its model, its objectives and its held-out evaluation.

Run by the one loop in `qformer.train` (`python -m qformer.train --stage 1 ...`).

- Full objective (`--objectives itc+itm+itg`, BLIP-2): `qformer.losses.stage1_losses` on (image, caption)
  pairs, every parameter of the Q-Former trained (the text path at `--text-lr-scale` times the lr).
- Locked-text warm-up (`--lock-text`, LiT-style locking applied to the text side): the text path (word and
  position embeddings, the self-attention that queries and text share, the text FFNs; `model.TEXT_PATH`) is
  frozen, so every caption's [CLS] state is a constant, computed once for all captions, just as the image
  tokens are. ITC alone then trains what sees the image (queries, cross-attention, query FFNs, ln_vision,
  both projections, temp), on batches of images that carry all their captions: a step's cost is the query
  pass of its images, and each image learns from all its captions at once.
- Evaluation: recall@1/5/10 on a held-out split with the retrieval benchmark's protocol, from cached
  image tokens, at epoch boundaries (`--eval-split dev`).

Shapes: B images (or pairs) of a batch, T captions of a batch, P all captions, Q queries, H width,
D ITC width, N image tokens, C image token width.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.datasets import RetrievalSet
from qformer.factory import Blip2Retriever, create_model
from qformer.features import FeatureCache
from qformer.losses import TEMP_RANGE, itc_loss, stage1_losses
from qformer.model import TEXT_PATH, QFormer
from qformer.pairs import CaptionPairs, HardNegatives, load_pairs, retrieval_set_from_pairs
from qformer.recall import itc_similarity, recall_at_k, rerank_with_itm
from qformer.retrieval_bench import EmbeddedSet, make_itm_fn
from qformer.tokenizer import TRAIN_MAX_LENGTH, tokenize

if TYPE_CHECKING:
    from qformer.train import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "blip2-tiny-init"  # the untrained offline starting point
OBJECTIVES = ("itc+itm+itg", "itc")


# ---- the locked text path ------------------------------------------------------------------------------
def is_text_path(name: str) -> bool:
    """Is parameter `name` (of a QFormer) part of the language-model-initialised text path?"""
    return any(k in f".{name}" for k in TEXT_PATH)


def lock_text_path(qformer: QFormer) -> list[str]:
    """Freeze (requires_grad False) the text path of `qformer`; returns the frozen parameter names."""
    frozen = [(n, p) for n, p in qformer.named_parameters() if is_text_path(n)]
    for _, p in frozen:
        p.requires_grad_(False)
    return [n for n, _ in frozen]


@torch.no_grad()
def text_cls_states(qformer: QFormer, tokenizer: Any, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """[CLS] hidden states [P,H] (fp32) of the uni-modal text pass, in eval mode (no dropout): what ITC's
    text feature is made of before `text_proj`. Constant while the text path is frozen."""
    was_training = qformer.training
    qformer.eval()
    out = []
    try:
        for i in range(0, len(captions), batch_size):
            ids, mask = tokenize(tokenizer, list(captions[i : i + batch_size]), TRAIN_MAX_LENGTH)
            device = qformer.query_tokens.device
            out.append(qformer.encode(ids.to(device), mask.to(device))[:, 0].float())  # [b,H]
    finally:
        qformer.train(was_training)
    return torch.cat(out)


class LockedTextITC(nn.Module):
    """ITC with a frozen text path, on a batch of images that carries every caption of each image.

    text_states [P,H]: `text_cls_states` of all P captions; pair_image [P]: each caption's image index.
    forward(image tokens [B,N,C], batch with "image_ids" [B]) -> {"itc", "loss"}: soft-target cross-entropy
    with label smoothing, image->text over the batch's T captions (an image's own captions are all
    positives) and text->image over the batch's B images."""

    def __init__(self, qformer: QFormer, text_states: Tensor, pair_image: Sequence[int]):
        super().__init__()
        self.qformer = qformer
        self.register_buffer("text_states", text_states, persistent=False)  # [P,H]
        pair_image_t = torch.as_tensor(list(pair_image), dtype=torch.long)
        order = torch.argsort(pair_image_t, stable=True)
        counts = torch.bincount(pair_image_t, minlength=int(pair_image_t.max()) + 1)
        self.captions_of = list(torch.split(order, counts.tolist()))  # image index -> its caption indices

    def forward(self, image_tokens: Tensor, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
        q = self.qformer
        with torch.no_grad():
            q.temp.clamp_(*TEMP_RANGE)
        image_ids = batch["image_ids"].view(-1).tolist()
        caption_rows = torch.cat([self.captions_of[i] for i in image_ids])  # [T]
        caption_image = torch.cat([torch.full((len(self.captions_of[i]),), b) for b, i in enumerate(image_ids)])
        image_feats = q.encode_image(image_tokens)  # [B,Q,D], fp32
        h = self.text_states[caption_rows.to(self.text_states.device)]  # [T,H]
        with torch.autocast(h.device.type, enabled=False):
            text_feat = F.normalize(q.text_proj(h.to(q.text_proj.weight.dtype)).float(), dim=-1)  # [T,D]
            sim = torch.einsum("bqd,td->btq", image_feats.float(), text_feat).amax(-1) / q.temp  # [B,T]
        pos = torch.arange(len(image_ids), device=sim.device)[:, None] == caption_image.to(sim.device)[None, :]
        loss = itc_loss(sim, sim.t(), pos, pos_t2i=pos.t())
        return {"itc": loss, "loss": loss}


class FullObjective(nn.Module):
    """BLIP-2's stage-1 losses (ITC + ITM + ITG) of a tokenised batch of pairs; ITM on the batch's mined
    negatives when it carries them, else on negatives drawn from the batch."""

    def __init__(self, qformer: QFormer, itm_uniform: float = 0.0):
        super().__init__()
        self.qformer, self.itm_uniform = qformer, itm_uniform

    def forward(self, image_tokens: Tensor, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
        mined = (batch["neg_image"], batch["neg_input_ids"], batch["neg_text_mask"]) if "neg_image" in batch else None
        return stage1_losses(self.qformer, image_tokens, batch["input_ids"], batch["text_mask"],
                             batch["image_ids"], generator, mined, self.itm_uniform)


# ---- ITM negatives mined over the whole train set --------------------------------------------------------
@torch.no_grad()
def mine_hard_negatives(model: Blip2Retriever, pairs: CaptionPairs, cache: FeatureCache, k: int,
                        batch_size: int = 256) -> HardNegatives:
    """The k most ITC-similar non-matching images of every caption and captions of every image, by the
    model's ITC similarity (cosine, max over queries) on the cached plain view. Unreadable images are
    never chosen."""
    q, device = model.qformer, model.device
    was_training = q.training
    q.eval()
    try:
        rows = [cache.row(p) for p in pairs.image_paths]
        image = torch.cat([q.encode_image(cache[rows[i : i + batch_size]].to(device).float())
                           for i in range(0, len(rows), batch_size)])  # [I,Q,D]
        ids, mask = tokenize(model.tokenizer, pairs.captions, TRAIN_MAX_LENGTH)
        text = torch.cat([q.encode_text(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
                          for i in range(0, len(ids), batch_size)])  # [P,D]
    finally:
        q.train(was_training)
    pair_image = torch.as_tensor(pairs.pair_image, device=device)
    sim = torch.cat([torch.einsum("iqd,pd->piq", image.float(), text[i : i + batch_size].float()).amax(-1)
                     for i in range(0, len(text), batch_size)])  # [P,I]
    sim[torch.arange(len(text), device=device), pair_image] = float("-inf")  # a caption's own image
    sim[:, ~torch.as_tensor(cache.valid[rows], dtype=torch.bool, device=device)] = float("-inf")
    images_of_pair = sim.topk(k, dim=1).indices  # [P,k]
    pairs_of_image = sim.t().topk(k, dim=1).indices  # [I,k]: an image's own captions are -inf
    return HardNegatives(images_of_pair.cpu(), pairs_of_image.cpu())


# ---- evaluation ------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """A held-out retrieval set and its frozen-encoder tokens (images that could not be read are left out)."""

    data: RetrievalSet
    cache: FeatureCache  # float32 tokens, so recall matches `qsearch bench retrieval` on the same images
    rows: list[int]  # cache row of each data.image_paths entry


def load_eval_set(cfg: TrainConfig, model: Blip2Retriever, cache_root: Path, train_pairs: CaptionPairs) -> EvalSet:
    """cfg.eval_split of cfg.eval_dataset (default: the training dataset), its images encoded once into
    `<cache_root>-eval/<hash of the image list>/` (encoder outputs do not change during stage 1)."""
    pairs = load_pairs(cfg.eval_dataset or cfg.dataset, cfg.eval_data_root or cfg.data_root, cfg.eval_split,
                       cfg.eval_max_images)
    if set(pairs.image_paths) <= set(train_pairs.image_paths):
        logger.warning("every evaluation image is also a training image: is --eval-split %r held out?",
                       cfg.eval_split)
    digest = hashlib.sha1("\n".join(map(str, pairs.image_paths)).encode()).hexdigest()[:12]
    cache = FeatureCache.build(model, pairs.image_paths, cache_root.with_name(cache_root.name + "-eval") / digest,
                               batch_size=cfg.batch_size, num_workers=cfg.num_workers, dtype="float32",
                               progress=cfg.progress)
    keep = [bool(cache.valid[cache.row(p)]) for p in pairs.image_paths]
    data = retrieval_set_from_pairs(pairs, keep)
    if len(data) < len(pairs.image_paths):
        logger.warning("evaluating on %d of %d images (the others could not be read)", len(data),
                       len(pairs.image_paths))
    logger.info("evaluation set %r: %d images, %d captions", cfg.eval_split, len(data), len(data.texts))
    return EvalSet(data, cache, [cache.row(p) for p in data.image_paths])


@torch.inference_mode()
def evaluate_model(model: Blip2Retriever, eval_set: EvalSet, k_test: int, batch_size: int = 64,
                   text_batch_size: int = 256) -> dict[str, Any]:
    """Recall@1/5/10 both ways, ITC-only ("itc") and ITC+ITM re-ranked at k_test ("itc+itm"): the protocol of
    `qformer.retrieval_bench.evaluate_retrieval`, fed from cached image tokens. The Q-Former must be in eval mode."""
    t0 = time.perf_counter()
    data, q = eval_set.data, model.qformer
    tokens = eval_set.cache[eval_set.rows].to(model.device)  # [Ni,N,C]
    image_embeds = torch.cat([q.encode_image(tokens[i : i + batch_size])
                              for i in range(0, len(tokens), batch_size)])  # [Ni,Q,D]
    ids, mask = model.tokenize(data.texts)
    text_embeds = torch.cat([q.encode_text(ids[i : i + text_batch_size], mask[i : i + text_batch_size])
                             for i in range(0, len(ids), text_batch_size)])
    emb = EmbeddedSet(image_embeds, tokens, text_embeds, ids, mask)
    itc = itc_similarity(emb.image_embeds.float(), emb.text_embeds.float())  # [Ni,Nt]
    results: dict[str, Any] = {"itc": recall_at_k(itc, itc.t(), data.img2txt, data.txt2img)}
    if k_test > 0:
        i2t, t2i = rerank_with_itm(itc, make_itm_fn(model, emb), k=k_test)
        results["itc+itm"] = recall_at_k(i2t, t2i, data.img2txt, data.txt2img)
    results.update(n_images=len(data), n_texts=len(data.texts), k_test=k_test,
                   seconds=round(time.perf_counter() - t0, 2))
    return results


# ---- the stage -----------------------------------------------------------------------------------------
class Stage1:
    """Stage 1 for `qformer.train`: a stage-1 Q-Former (`Blip2Retriever`), its objective and evaluation."""

    name = "stage 1"
    generator_on_device = True  # ITM hard negatives are drawn where the similarities are

    def __init__(self, cfg: TrainConfig):
        if cfg.objectives not in OBJECTIVES:
            raise ValueError(f"--objectives must be one of {list(OBJECTIVES)}, not {cfg.objectives!r}")
        if cfg.lock_text and cfg.objectives != "itc":
            raise ValueError("--lock-text trains ITC alone: pass --objectives itc")
        if cfg.objectives == "itc" and not cfg.lock_text:
            raise ValueError("--objectives itc is the locked-text warm-up: pass --lock-text")
        if cfg.itm_negatives and (cfg.lock_text or not cfg.cache):
            raise ValueError("--itm-negatives needs the ITM objective and cached features")
        if not 0.0 <= cfg.itm_uniform <= 1.0 or (cfg.itm_uniform and (cfg.itm_negatives or cfg.lock_text)):
            raise ValueError("--itm-uniform is a share in [0, 1] of the in-batch ITM negatives (not with "
                             "--itm-negatives or --lock-text)")
        self.cfg = cfg
        self.text_lr_scale = cfg.text_lr_scale
        self.attn_lr_scale = cfg.attn_lr_scale
        self.by_image = cfg.lock_text  # batches of images with all their captions

    def load(self, resume_dir: Path | None, device: torch.device) -> Blip2Retriever:
        model = create_model(resume_dir or self.cfg.model or DEFAULT_MODEL, device=device)
        if self.cfg.lock_text:
            lock_text_path(model.qformer)
        model.qformer.train()  # dropout on; the frozen encoder stays in eval mode
        return model

    def trainable(self, model: Blip2Retriever) -> nn.Module:
        return model.qformer

    def tokenizer(self, model: Blip2Retriever) -> Any:
        """The collate function's tokenizer (None: the batch keeps caption strings)."""
        return None if self.by_image else model.tokenizer

    def objective(self, model: Blip2Retriever, pairs: CaptionPairs, world_size: int) -> nn.Module:
        if not self.cfg.lock_text:
            return FullObjective(model.qformer, self.cfg.itm_uniform)
        if world_size > 1:
            raise ValueError("--lock-text runs in one process (its batches carry a varying number of captions)")
        return LockedTextITC(model.qformer, self.text_states(model, pairs.captions), pairs.pair_image)

    def text_states(self, model: Blip2Retriever, captions: Sequence[str]) -> Tensor:
        """`text_cls_states` of the captions, kept in <cache_dir>/text_cls/<digest>.pt, the digest naming the
        text path's weights and the captions (so a resume, or another run from the same start, reads it)."""
        q = model.qformer
        h = hashlib.sha1()
        for name, p in q.named_parameters():
            if is_text_path(name):
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        h.update("\n".join(captions).encode())
        path = Path(self.cfg.cache_dir or Path(self.cfg.out_dir) / "features") / "text_cls" / f"{h.hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path, map_location=q.query_tokens.device, weights_only=True)
        t0 = time.perf_counter()
        states = text_cls_states(q, model.tokenizer, captions)
        logger.info("text path locked: [CLS] states of %d captions in %.1f s", len(captions),
                    time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states.cpu(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # whole or absent
        return states

    def negatives(self, model: Blip2Retriever, pairs: CaptionPairs, cache: FeatureCache, resumed: bool
                  ) -> HardNegatives | None:
        """cfg.itm_negatives mined negatives, kept in <out_dir>/hard_negatives.pt: mined with the starting
        model at a fresh start, read back on resume."""
        if self.cfg.itm_negatives <= 0:
            return None
        path = Path(self.cfg.out_dir) / "hard_negatives.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            return HardNegatives(saved["images_of_pair"], saved["pairs_of_image"])
        if resumed:
            raise FileNotFoundError(f"{path} is missing: the run's mined ITM negatives cannot be re-mined "
                                    "with its starting model; start a new --out-dir")
        t0 = time.perf_counter()
        negatives = mine_hard_negatives(model, pairs, cache, self.cfg.itm_negatives)
        logger.info("mined %d ITM negatives per caption and per image in %.1f s", self.cfg.itm_negatives,
                    time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images_of_pair": negatives.images_of_pair, "pairs_of_image": negatives.pairs_of_image},
                   path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return negatives

    def extras(self, model: Blip2Retriever) -> dict[str, float]:
        return {"temp": round(model.qformer.temp.item(), 5)}

    def evaluator(self, model: Blip2Retriever, cache_root: Path, pairs: CaptionPairs):  # noqa: ANN201
        """A function of the model that scores it on cfg.eval_split (None without an eval split)."""
        if not self.cfg.eval_split:
            return None
        eval_set = load_eval_set(self.cfg, model, cache_root, pairs)
        return lambda m: evaluate_model(m, eval_set, self.cfg.eval_k_test)
