"""BLIP-2 stage-1 training of the Q-Former (ITC + ITM + ITG) on image-caption pairs, nanoGPT style.

    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000
    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000 --resume
    python -m qformer.train --dataset manifest --data-root pairs.csv --eval-split dev --out-dir runs/s1 ...
    python -m qformer.train --dataset webdataset --data-root 'shards/{000..099}.tar' --out-dir runs/s1 ...
    torchrun --nproc-per-node 4 -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 ...

Read top to bottom: config -> data -> optimiser and schedule -> checkpoints -> evaluation -> distributed
-> the loop -> command line.

- Frozen image features are computed once into a memory-mapped cache (`qformer.features`), so a step costs
  only the Q-Former; `--no-cache` runs the encoder live with BLIP-2's training augmentation instead, and
  `--cache-views V` is the cached middle way: V-1 augmented views of every image are encoded once, and each
  pair of each epoch reads one of the V views (the plain one included).
- Every checkpoint `<out-dir>/checkpoints/step_NNNNNNN/` is a qsearch model directory
  (`qformer.factory.create_model(dir)` loads it) plus `train_state.pt` (optimiser, grad scaler, step).
- `--resume` continues bit for bit: the batches of step s depend only on (seed, s) - each epoch's order is
  a permutation drawn from (seed, epoch) - and every step reseeds dropout and the ITM negative sampler
  from (seed, step), so no RNG state has to be carried across a restart.
- `--eval-split dev` scores the model on a held-out split at every epoch boundary (`--eval-every-epochs`)
  and at the end with the retrieval benchmark's protocol (ITC, then ITM re-ranking of the top
  `--eval-k-test`); the recall rows go to metrics.jsonl, and metrics.svg plots loss and recall.
- Without a torch.distributed environment this is one plain process. Under torchrun (WORLD_SIZE > 1) each
  rank takes its contiguous slice of every global batch (`--batch-size` is the global batch, split evenly),
  `Stage1Objective` runs under DistributedDataParallel (the losses gather ITC/ITM negatives across ranks)
  and rank 0 alone writes checkpoints, metrics and plots, and evaluates. Resume with the same number of
  ranks to continue bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from qformer.datasets import RetrievalSet, load_retrieval_set, pre_caption
from qformer.evaluate import EmbeddedSet, make_itm_fn
from qformer.factory import Blip2Retriever, create_model
from qformer.features import INDEX, FeatureCache, read_image
from qformer.losses import Stage1Objective
from qformer.malloc import keep_freed_memory
from qformer.plot import read_metrics, write_metrics_svg
from qformer.precision import bf16_native
from qformer.retrieval import itc_similarity, recall_at_k, rerank_with_itm
from qformer.tokenizer import TRAIN_MAX_LENGTH, tokenize

logger = logging.getLogger(__name__)


# ---- config ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run depends on, as plain data (saved as <out_dir>/config.json)."""

    # data
    data_root: str = ""  # dataset directory; manifest: a .csv/.parquet; webdataset: .tar, its folder, or a {000..009} pattern
    dataset: str = "flickr8k"  # flickr8k | coco | flickr30k | karpathy-<name> | lavis | manifest | webdataset
    split: str = "train"  # train | dev | test (manifest: its split column, if any; webdataset: <data_root>/<split>/)
    max_images: int = 0  # use only the first N images of the split (0: all)
    # model
    model: str = "blip2-tiny-init"  # starting weights: anything qformer.factory.create_model accepts
    # image features
    cache: bool = True  # frozen-encoder tokens from a disk cache (no augmentation); --no-cache: live + augmentation
    cache_dir: str = ""  # feature cache directory ('': <out_dir>/features); share it between runs
    cache_views: int = 1  # cached views per image: the plain one + V-1 augmented (crop + flip) ones in <cache_dir>/augment_<v>
    # optimisation (LAVIS stage 1: AdamW, lr 1e-4 -> 1e-5 cosine, weight decay 0.05, linear warmup)
    batch_size: int = 64  # pairs per micro-batch (ITC negatives come from the micro-batch)
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000  # optimiser steps
    lr: float = 1e-4  # peak learning rate, reached after warmup
    min_lr: float = 1e-5  # cosine decay ends here at max_steps
    warmup_steps: int = 100  # linear warmup from warmup_lr
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05  # AdamW, on weight matrices and embeddings only
    text_lr_scale: float = 1.0  # lr multiplier for the language-model-initialised text path (embeddings, self-attention, text FFNs); 1: one lr, as BLIP-2
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999
    grad_clip: float = 0.0  # max gradient norm; 0: off (LAVIS does not clip)
    # evaluation: recall@1/5/10 with the retrieval benchmark's protocol, at epoch boundaries and at the end
    eval_split: str = ""  # held-out split to evaluate on, e.g. dev ('': no evaluation)
    eval_dataset: str = ""  # its dataset ('': --dataset)
    eval_data_root: str = ""  # its data root ('': --data-root), e.g. another manifest or shard directory
    eval_every_epochs: float = 1.0  # epochs between evaluations, e.g. 0.5 (0: only at the end)
    eval_k_test: int = 128  # ITM re-ranks the top k by ITC (0: ITC only); CPU runs: about 16
    eval_max_images: int = 0  # evaluate on the first N images of the split (0: all); CPU runs: about 100
    # runtime
    device: str = "auto"  # auto: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)
    precision: str = "auto"  # fp32 | bf16 | fp16 (autocast; fp16 CUDA only); auto: bf16 where native (GPU or CPU)
    num_workers: int = 0  # DataLoader workers (image decoding in --no-cache mode)
    seed: int = 0  # data order, augmentation, dropout and ITM negatives all derive from it
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise resume on CUDA (slower)
    # output
    out_dir: str = "runs/stage1"  # checkpoints/, metrics.jsonl, metrics.svg, config.json
    checkpoint_every: int = 500  # steps; the last step is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: all)
    log_every: int = 10  # steps between metrics.jsonl records
    resume: str = ""  # "": fresh run; "latest": newest checkpoint in out_dir (fresh if none); or a directory
    progress: bool = True  # tqdm progress bar (rank 0)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts, e.g. derive_seed(seed, "epoch", 3)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---- data --------------------------------------------------------------------------------------------------
@dataclass
class CaptionPairs:
    """Image-caption training pairs: unique images, and one entry per (image, caption) pair."""

    image_paths: list[Path]  # unique images
    captions: list[str]  # one per pair, already cleaned with pre_caption
    pair_image: list[int]  # image index (into image_paths) of each pair; equal index = same image

    def __len__(self) -> int:
        return len(self.captions)


def pairs_from_retrieval_set(rs: RetrievalSet) -> CaptionPairs:
    """Every (image, caption) of a RetrievalSet; repeated paths (one-caption-per-entry files) are merged."""
    paths: list[Path] = []
    index: dict[Path, int] = {}
    pair_image: list[int] = []
    for i in rs.txt2img:
        path = rs.image_paths[i]
        if path not in index:
            index[path] = len(paths)
            paths.append(path)
        pair_image.append(index[path])
    return CaptionPairs(paths, list(rs.texts), pair_image)


def _retrieval_set_reader(name: str) -> Callable[[Path, str], CaptionPairs]:
    return lambda root, split: pairs_from_retrieval_set(load_retrieval_set(name, root, split))


CAPTION_FIELDS = ("caption", "text")  # manifest columns / webdataset .json fields holding a sample's caption(s)


def _captions(meta: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """The cleaned captions of a manifest row or shard sample: the first field present and non-empty (a list
    of strings gives several captions of one image)."""
    for name in fields:
        value = meta.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        captions = [c for c in (pre_caption(str(v)) for v in values if v is not None) if c]
        if captions:
            return captions
    return []


def _pairs(samples: Iterable[tuple[Path, list[str]]]) -> CaptionPairs:
    """(image path, captions) samples -> CaptionPairs; samples naming the same path are one image."""
    paths: list[Path] = []
    index: dict[Path, int] = {}
    captions: list[str] = []
    pair_image: list[int] = []
    for path, caps in samples:
        if path not in index:
            index[path] = len(paths)
            paths.append(path)
        captions += caps
        pair_image += [index[path]] * len(caps)
    return CaptionPairs(paths, captions, pair_image)


def _warn_skipped(what: str, problems: list[tuple[str, str]], shown: int = 5) -> None:
    for path, reason in problems[:shown]:
        logger.warning("skipping %s %s: %s", what, path, reason)
    if len(problems) > shown:
        logger.warning("... and %d more %ss skipped", len(problems) - shown, what)


def read_manifest_pairs(path: Path, split: str) -> CaptionPairs:
    """Pairs of a CSV/Parquet manifest, read as `qsearch index` reads one (`indexer.sources.scan_manifest`):
    an image path column (`image`, `path`, ...; relative paths resolve against the manifest's folder) and a
    caption column (`caption` or `text`; a Parquet list column gives several captions). Rows naming the same
    image share its image id. With a `split` column, only the rows whose split is `split` are read."""
    from indexer.sources import scan_manifest  # the indexer package, loaded only for this dataset

    items, missing = scan_manifest(Path(path))
    _warn_skipped("manifest row", missing)
    if any("split" in it.meta for it in items):
        splits = sorted({str(it.meta.get("split")) for it in items})
        items = [it for it in items if str(it.meta.get("split")) == split]
        if not items:
            raise ValueError(f"{path}: no rows of split {split!r} (its split column holds {splits})")
    if items and not any(f in items[0].meta for f in CAPTION_FIELDS):
        raise ValueError(f"{path}: no caption column (expected one of {list(CAPTION_FIELDS)}; columns are "
                         f"{sorted(items[0].meta)})")
    samples = [(Path(it.path), _captions(it.meta, CAPTION_FIELDS)) for it in items]
    _warn_skipped("manifest row", [(str(p), "no caption") for p, caps in samples if not caps])
    pairs = _pairs(samples)
    if not pairs.captions:
        raise ValueError(f"{path}: no usable (image, caption) rows")
    return pairs


def webdataset_shards(root: str | Path, split: str = "") -> list[Path]:
    """The tar shards of a webdataset source: a shard file, a brace or glob pattern (`shards/{000..099}.tar`,
    `shards/*.tar`), or a directory of shards (its `<split>/` subdirectory when there is one)."""
    from indexer.sources import TAR_SUFFIXES, expand_source

    root_path = Path(root)
    if root_path.is_dir():
        folder = root_path / split if split and (root_path / split).is_dir() else root_path
        shards = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    else:
        shards = expand_source(root)
    missing = [p for p in shards if not p.is_file()]
    if missing or not shards:
        raise FileNotFoundError(f"{root}: no tar shard" + (f" ({missing[0]} does not exist)" if missing else ""))
    return shards


def read_webdataset_pairs(root: Path, split: str) -> CaptionPairs:
    """Pairs of webdataset tar shards (`webdataset_shards`), read with `indexer.sources.scan_tar`: a sample
    is `<key>.jpg|png|webp|...` with its caption in `<key>.txt` or in the "caption"/"text" field of
    `<key>.json`. Images stay inside the tars: their paths are `<tar>::<member>` (`qformer.features`).
    A shard that cannot be listed is skipped with a warning; an undecodable image later, at feature time."""
    from indexer.sources import image_extensions, scan_tar

    extensions = image_extensions()
    samples: list[tuple[Path, list[str]]] = []
    for shard in webdataset_shards(root, split):
        try:
            items, problems = scan_tar(shard, extensions)
        except (OSError, ValueError, tarfile.TarError) as e:  # indexer.sources.SourceError is a ValueError
            logger.warning("skipping shard %s: %s", shard, e)
            continue
        _warn_skipped("shard member", problems)
        samples += [(Path(it.path), _captions(it.meta, ("txt", *CAPTION_FIELDS))) for it in items]
    _warn_skipped("sample", [(str(p), "no caption (.txt, .json caption/text)") for p, caps in samples if not caps])
    pairs = _pairs(samples)
    if not pairs.captions:
        raise ValueError(f"{root}: no (image, caption) samples in its shards")
    return pairs


# A reader turns (root, split) into CaptionPairs. The map-style design (all pairs known up front, shards
# listed once) is what makes a resumable, seed-determined order easy: a step's batches depend only on
# (seed, step), wherever the images live (image files, or members of tar shards read by offset).
PAIR_READERS: dict[str, Callable[[Path, str], CaptionPairs]] = {
    **{name: _retrieval_set_reader(name) for name in ("flickr8k", "coco", "flickr30k", "lavis")},
    "manifest": read_manifest_pairs,
    "webdataset": read_webdataset_pairs,
}


def load_pairs(dataset: str, root: str | Path, split: str, max_images: int = 0) -> CaptionPairs:
    """Training pairs of a dataset by name (see PAIR_READERS); max_images > 0 keeps the first N images."""
    if dataset not in PAIR_READERS and not dataset.startswith("karpathy-"):
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(PAIR_READERS)} or karpathy-<name>")
    reader = PAIR_READERS.get(dataset) or _retrieval_set_reader(dataset)
    pairs = reader(Path(root), split)
    if max_images > 0:
        keep = [j for j, i in enumerate(pairs.pair_image) if i < max_images]
        pairs = CaptionPairs(pairs.image_paths[:max_images], [pairs.captions[j] for j in keep],
                             [pairs.pair_image[j] for j in keep])
    return pairs


class PairDataset(Dataset):
    """Item (pair index, augmentation seed) -> {"image" tokens [N,C] | "pixels" [3,S,S], "text", "image_id"},
    or None for an unreadable image (logged once, dropped by the collate function).

    With a FeatureCache the tokens are read from disk; with several (views of the same images), the seed picks
    the view. Otherwise the image is decoded and augmented with `transform`, seeded per item so that the crop
    does not depend on worker or restart.
    """

    def __init__(self, pairs: CaptionPairs, cache: FeatureCache | Sequence[FeatureCache] | None = None,
                 transform: Callable[[Image.Image], Tensor] | None = None):
        if (cache is None) == (transform is None):
            raise ValueError("PairDataset needs exactly one of cache and transform")
        self.views = [] if cache is None else [cache] if isinstance(cache, FeatureCache) else list(cache)
        if any(v.paths != self.views[0].paths for v in self.views):
            raise ValueError("PairDataset: the cached views hold different images")
        self.pairs, self.cache, self.transform = pairs, self.views[0] if self.views else None, transform
        self.rows = None if cache is None else [self.cache.row(p) for p in pairs.image_paths]  # image -> cache row
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def usable(self) -> list[int]:
        """Pair indices whose image made it into the cache (all pairs in live mode)."""
        if self.cache is None:
            return list(range(len(self.pairs)))
        return [j for j, i in enumerate(self.pairs.pair_image) if self.cache.valid[self.rows[i]]]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any] | None:
        j, seed = item
        i = self.pairs.pair_image[j]
        out: dict[str, Any] = {"text": self.pairs.captions[j], "image_id": i}
        if self.cache is not None:
            out["image"] = self.views[seed % len(self.views)][self.rows[i]]  # [N,C]
            return out
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the crop and flip of this pair in this epoch
            pixels, reason = read_image(self.pairs.image_paths[i], self.transform)
        if pixels is None:
            if i not in self._warned:
                self._warned.add(i)
                logger.warning("skipping image %s: %s", self.pairs.image_paths[i], reason)
            return None
        out["pixels"] = pixels
        return out


class Collate:
    """Items -> batch: {"image" [B,N,C] | "pixels" [B,3,S,S], "input_ids" [B,L], "text_mask" [B,L],
    "image_ids" [B]}; None when every image of the batch was unreadable."""

    def __init__(self, tokenizer: Any, max_length: int = TRAIN_MAX_LENGTH):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Tensor] | None:
        items = [x for x in items if x is not None]
        if not items:
            return None
        ids, mask = tokenize(self.tokenizer, [x["text"] for x in items], self.max_length)
        key = "image" if "image" in items[0] else "pixels"
        return {key: torch.stack([x[key] for x in items]), "input_ids": ids, "text_mask": mask,
                "image_ids": torch.tensor([x["image_id"] for x in items])}


class EpochBatches(Sampler):
    """Infinite batch sampler: global batch b (from `start_batch` on) = batch b % E of epoch b // E, where
    E = len(items) // batch_size (last partial batch dropped) and each epoch's order is a permutation
    drawn from (seed, epoch). Yields lists of (pair index, augmentation seed).

    With world_size > 1 (DDP), rank r gets the r-th contiguous slice of batch_size // world_size pairs of
    every global batch, so the ranks together see exactly the single-process order."""

    def __init__(self, items: Sequence[int], batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.items, self.batch_size, self.seed, self.start_batch = list(items), batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} ranks")
        self.per_epoch = len(self.items) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.items)} usable pairs: fewer than one batch of {batch_size}")

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(len(self.items), generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, epoch, perm = self.start_batch, -1, []
        local = self.batch_size // self.world_size
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            start = k * self.batch_size + self.rank * local
            chosen = [self.items[p] for p in perm[start : start + local]]
            yield [(j, derive_seed(self.seed, "augment", epoch, j)) for j in chosen]
            b += 1


# ---- optimiser and schedule ----------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_lr to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


TEXT_PATH = ("embeddings.", ".attn.", ".ffn_text.")  # parameter names the language model initialises


def make_optimizer(qformer: nn.Module, cfg: Any, text_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW; like LAVIS, no weight decay on biases, LayerNorms and the temperature (params with ndim < 2).
    Each group's "lr_scale" multiplies the scheduled lr: text_lr_scale for the text path (TEXT_PATH: the
    embeddings, the self-attention that queries and text share, the text FFNs), 1 for the rest."""
    named = [(n, p) for n, p in qformer.named_parameters() if p.requires_grad]
    if text_lr_scale == 1.0:
        parts = [([p for _, p in named], 1.0)]  # one lr: two groups, as in checkpoints from before the option
    else:
        text = {n for n, _ in named if any(k in f".{n}" for k in TEXT_PATH)}
        parts = [([p for n, p in named if n not in text], 1.0), ([p for n, p in named if n in text], text_lr_scale)]
    groups = []
    for params, scale in parts:
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay, "lr_scale": scale},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ---- checkpoints ---------------------------------------------------------------------------------------
TRAIN_STATE = "train_state.pt"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory appears only once fully written)."""
    root = checkpoint_root(out_dir)
    found = [d for d in root.glob("step_*") if d.is_dir() and d.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda d: int(d.name[5:]))


def save_checkpoint(model: Blip2Retriever, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    step: int, cfg: TrainConfig) -> Path:
    """Write step_NNNNNNN/ (model + train_state.pt) via a temporary directory and an atomic rename."""
    root = checkpoint_root(cfg.out_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "config": dataclasses.asdict(cfg)}
    torch.save(state, tmp / TRAIN_STATE)
    if final.exists():  # re-written after a resume from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    if cfg.keep_checkpoints > 0:
        for old in list_checkpoints(cfg.out_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    return final


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: None for a fresh run."""
    if not cfg.resume:
        if list_checkpoints(cfg.out_dir):
            raise FileExistsError(f"{cfg.out_dir} already has checkpoints: pass --resume, or another --out-dir")
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(cfg.out_dir)
        if not found:
            logger.info("no checkpoint in %s: starting a fresh run", cfg.out_dir)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no {TRAIN_STATE})")
    return path


def load_train_state(directory: Path) -> dict[str, Any]:
    """train_state.pt holds only tensors and plain Python data, so weights_only=True loads it."""
    return torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` by a run that died before its next checkpoint."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


# ---- evaluation ------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """A held-out retrieval set and its frozen-encoder tokens (images that could not be read are left out)."""

    data: RetrievalSet
    cache: FeatureCache  # float32 tokens, so recall matches `qsearch bench retrieval` on the same images
    rows: list[int]  # cache row of each data.image_paths entry


def retrieval_set_from_pairs(pairs: CaptionPairs, keep: Sequence[bool] | None = None) -> RetrievalSet:
    """The pairs as a RetrievalSet (image order kept, each image's captions in pair order); keep[i] False
    drops image i and its captions."""
    captions: list[list[str]] = [[] for _ in pairs.image_paths]
    for caption, i in zip(pairs.captions, pairs.pair_image, strict=True):
        captions[i].append(caption)
    out = RetrievalSet()
    for i, path in enumerate(pairs.image_paths):
        if (keep is None or keep[i]) and captions[i]:
            out.add_image(path, captions[i])
    return out


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
    `qformer.evaluate.evaluate_retrieval`, fed from cached image tokens. The Q-Former must be in eval mode."""
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


def eval_due(done: int, cfg: TrainConfig, per_epoch: int) -> bool:
    """Evaluate after step `done`? At the last step, and whenever an eval_every_epochs boundary is crossed."""
    if not cfg.eval_split:
        return False
    if done == cfg.max_steps:
        return True
    if cfg.eval_every_epochs <= 0:
        return False
    every = cfg.eval_every_epochs * per_epoch  # micro-batches between evaluations
    return (done * cfg.grad_accum) // every > ((done - 1) * cfg.grad_accum) // every


# ---- distributed (torchrun) ------------------------------------------------------------------------------
DDP_TIMEOUT = timedelta(hours=2)  # evaluation and checkpoints run on rank 0 while the others wait for it


@contextmanager
def distributed(device: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) the process group is
    initialised here (nccl on CUDA, gloo on CPU), the device is cuda:LOCAL_RANK, and the group is destroyed
    on exit; otherwise (0, 1, device) of a plain process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        yield 0, 1, torch.device(("cuda" if use_cuda else "cpu") if device == "auto" else device)
        return
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DDP_TIMEOUT)
    try:
        yield dist.get_rank(), dist.get_world_size(), dev
    finally:
        if owned:
            dist.destroy_process_group()


def shared_feature_cache(model: Blip2Retriever, paths: Sequence[Path], directory: Path, cfg: TrainConfig,
                         rank: int, augment_seed: int | None = None) -> FeatureCache:
    """FeatureCache.build on rank 0; the other ranks wait for its index file (no collective, so a long build
    cannot time out), then open and check it. The directory must be visible to every rank."""
    if rank != 0:
        while not (directory / INDEX).is_file():
            time.sleep(1.0)
    return FeatureCache.build(model, paths, directory, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              progress=cfg.progress and rank == 0, augment_seed=augment_seed)


def cached_views(model: Blip2Retriever, paths: Sequence[Path], directory: Path, cfg: TrainConfig,
                 rank: int) -> list[FeatureCache]:
    """The plain feature cache in `directory` and cfg.cache_views - 1 augmented ones in directory/augment_<v>
    (view v drawn with augment_seed v: the same views for every run and seed, so runs can share them)."""
    if cfg.cache_views < 1:
        raise ValueError(f"--cache-views must be at least 1, not {cfg.cache_views}")
    return [shared_feature_cache(model, paths, directory, cfg, rank),
            *(shared_feature_cache(model, paths, directory / f"augment_{v}", cfg, rank, augment_seed=v)
              for v in range(1, cfg.cache_views))]


def same_size_batches(batches: list[dict[str, Tensor] | None], device: torch.device
                      ) -> list[dict[str, Tensor] | None]:
    """Trim every rank's micro-batches to the smallest size on any rank (None: all skip it), so that the
    cross-rank gathers of the losses see equal shapes even when some images were unreadable."""
    sizes = torch.tensor([0 if b is None else len(b["input_ids"]) for b in batches], device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN)
    return [None if b is None or n == 0 else {k: v[:n] for k, v in b.items()}
            for b, n in zip(batches, sizes.tolist(), strict=True)]


# ---- the loop ----------------------------------------------------------------------------------------------
def mixed_precision(precision: str, device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """(autocast on?, its dtype, grad scaler) for "auto" | "fp32" | "bf16" | "fp16".

    auto: bf16 where the device has native bf16 (recent GPUs; CPUs with AVX512-BF16/AMX, where a stage-1 step
    runs about 2x faster), fp16 on older GPUs, else fp32. On a CPU only bf16 autocasts."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if bf16_native(device) else "fp16" if device.type == "cuda" else "fp32"
    use_amp = precision == "bf16" if device.type == "cpu" else device.type == "cuda" and precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return use_amp, amp_dtype, torch.amp.GradScaler(device.type, enabled=use_amp and precision == "fp16")


def restore_train_state(resume_dir: Path | None, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        cfg: Any) -> int:
    """Load optimiser and scaler state from a checkpoint; returns the step to continue from (0: fresh)."""
    if resume_dir is None:
        return 0
    state = load_train_state(resume_dir)
    saved_scale, scale = state["config"].get("text_lr_scale", 1.0), getattr(cfg, "text_lr_scale", 1.0)
    if saved_scale != scale:  # the optimizer's groups differ; the saved ones would win silently
        raise ValueError(f"{resume_dir} was trained with --text-lr-scale {saved_scale}, not {scale}: resume with "
                         f"--text-lr-scale {saved_scale}, or start a new --out-dir")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
               if k != "resume" and getattr(cfg, k, None) != v}
    if changed:
        logger.warning("resuming with a changed config (saved, now): %s", changed)
    logger.info("resuming from %s at step %d", resume_dir, state["step"])
    return state["step"]


def train(cfg: TrainConfig, pairs: CaptionPairs | None = None) -> Path:
    """Run (or resume) stage-1 training; returns the final checkpoint directory.

    pairs: training pairs to use instead of reading cfg.dataset from cfg.data_root. Under torchrun every
    rank calls this; rank 0 writes the outputs.
    """
    with distributed(cfg.device) as (rank, world_size, device):
        return _train(cfg, pairs, rank, world_size, device)


def _train(cfg: TrainConfig, pairs: CaptionPairs | None, rank: int, world_size: int, device: torch.device) -> Path:
    out_dir = Path(cfg.out_dir)
    main = rank == 0  # writes checkpoints, metrics and plots; evaluates; shows progress
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_root(out_dir).glob(".tmp_step_*"):  # a checkpoint interrupted mid-write
            shutil.rmtree(stale)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    # model: a fresh start, or the weights of the checkpoint we resume from
    resume_dir = resolve_resume(cfg)
    model = create_model(resume_dir or cfg.model, device=device)
    qformer = model.qformer.train()  # dropout on; the frozen encoder stays in eval mode
    objective: torch.nn.Module = Stage1Objective(qformer)
    if world_size > 1:
        objective = DistributedDataParallel(objective, device_ids=None if device.type == "cpu" else [device.index])
    optimizer = make_optimizer(qformer, cfg, cfg.text_lr_scale)
    use_amp, amp_dtype, scaler = mixed_precision(cfg.precision, device)
    logger.info("precision: %s", f"{amp_dtype} autocast on {device.type}" if use_amp else "fp32")
    start_step = restore_train_state(resume_dir, optimizer, scaler, cfg)
    if main:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    # data: pairs -> (cached features | live images) -> deterministic batches from global batch index on
    if pairs is None:
        if not cfg.data_root:
            raise ValueError("no training data: set data_root (--data-root)")
        pairs = load_pairs(cfg.dataset, cfg.data_root, cfg.split, cfg.max_images)
    cache_root = Path(cfg.cache_dir or out_dir / "features")
    eval_set = load_eval_set(cfg, model, cache_root, pairs) if cfg.eval_split and main else None
    if cfg.cache:
        dataset = PairDataset(pairs, cache=cached_views(model, pairs.image_paths, cache_root, cfg, rank))
    else:
        dataset = PairDataset(pairs, transform=model.encoder.train_transform())
    usable = dataset.usable()
    if len(usable) < len(pairs):
        logger.warning("training on %d of %d pairs (the others' images could not be read)", len(usable), len(pairs))
    sampler = EpochBatches(usable, cfg.batch_size, cfg.seed, start_batch=start_step * cfg.grad_accum, rank=rank,
                           world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(model.tokenizer),
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    logger.info("%d pairs, %d images; %d batches of %d per epoch%s", len(usable), len(pairs.image_paths),
                sampler.per_epoch, cfg.batch_size, f" ({world_size} ranks)" if world_size > 1 else "")

    metrics_path, plot_path = out_dir / "metrics.jsonl", out_dir / "metrics.svg"
    train_log: list[dict[str, Any]] = []
    eval_log: list[dict[str, Any]] = []
    if main:
        _truncate_metrics(metrics_path, start_step)
        if metrics_path.is_file():
            train_log, eval_log = read_metrics(metrics_path)
    generator = torch.Generator(device=device)  # ITM hard negatives
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="stage 1", unit="step",
               disable=not (cfg.progress and main))
    t_last, pairs_seen = time.perf_counter(), 0
    final = checkpoint_root(out_dir) / f"step_{start_step:07d}"
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints before text_lr_scale: no key
        step_seed = derive_seed(cfg.seed, "step", step, *([rank] if world_size > 1 else []))
        torch.manual_seed(step_seed)  # dropout, on every device
        generator.manual_seed(step_seed)  # ITM negatives

        micro = [next(batches) for _ in range(cfg.grad_accum)]  # None: every image of it was unreadable
        if world_size > 1:
            micro = same_size_batches(micro, device)
        micro = [b for b in micro if b is not None]
        sums = {"itc": 0.0, "itm": 0.0, "itg": 0.0, "loss": 0.0}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1  # DDP: all-reduce the gradients once, after the last micro-batch
            with objective.no_sync() if world_size > 1 and not last else nullcontext():
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext():
                    if "image" in batch:
                        tokens = batch["image"]  # [B,N,C] cached
                    else:
                        with torch.no_grad():
                            tokens = model.encoder(batch["pixels"])  # [B,N,C] live
                    losses = objective(tokens, batch["input_ids"], batch["text_mask"], batch["image_ids"], generator)
                scaler.scale(losses["loss"] / cfg.grad_accum).backward()
            for k in sums:
                sums[k] += float(losses[k].detach()) / cfg.grad_accum
            pairs_seen += batch["input_ids"].shape[0]
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(qformer.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        epoch = round(done * cfg.grad_accum / sampler.per_epoch, 3)

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            if world_size > 1:  # losses: mean over ranks; pairs: sum
                totals = torch.tensor([*sums.values(), pairs_seen], dtype=torch.float64, device=device)
                dist.all_reduce(totals)
                sums = {k: float(v) / world_size for k, v in zip(sums, totals[:-1].tolist(), strict=True)}
                pairs_seen = int(totals[-1])
            now = time.perf_counter()
            record = {"step": done, "epoch": epoch, "lr": lr,
                      **{k: round(v, 5) for k, v in sums.items()}, "temp": round(qformer.temp.item(), 5),
                      "pairs_per_s": round(pairs_seen / (now - t_last), 2)}
            if main:
                _append_jsonl(metrics_path, record)
                train_log.append(record)
                write_metrics_svg(train_log, eval_log, plot_path)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", itc=f"{sums['itc']:.3f}", itm=f"{sums['itm']:.3f}",
                            itg=f"{sums['itg']:.3f}")
            t_last, pairs_seen = now, 0
        if eval_set is not None and eval_due(done, cfg, sampler.per_epoch):
            t0 = time.perf_counter()
            qformer.eval()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep training's RNG
                results = evaluate_model(model, eval_set, cfg.eval_k_test)
            qformer.train()
            record = {"kind": "eval", "step": done, "epoch": epoch, "split": cfg.eval_split, **results}
            _append_jsonl(metrics_path, record)
            eval_log.append(record)
            write_metrics_svg(train_log, eval_log, plot_path)
            row = "itc+itm" if "itc+itm" in results else "itc"
            logger.info("step %d eval (%s): txt R@1 %.1f, img R@1 %.1f, mean R %.1f", done, row,
                        results[row]["txt_r1"], results[row]["img_r1"], results[row]["r_mean"])
            t_last += time.perf_counter() - t0  # evaluation time does not count against training throughput
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            final = save_checkpoint(model, optimizer, scaler, done, cfg) if main else \
                checkpoint_root(out_dir) / f"step_{done:07d}"
    bar.close()
    del batches  # stops DataLoader workers
    if world_size > 1:
        dist.barrier()  # every rank returns once rank 0 has written the final checkpoint
    return final


# ---- command line ----------------------------------------------------------------------------------------
def _field_comments(config_cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field of a config dataclass, used as its --help text."""
    found = re.findall(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", inspect.getsource(config_cls), re.M)
    return dict(found)


def add_config_arguments(p: argparse.ArgumentParser, config_cls: type) -> argparse.ArgumentParser:
    """One --flag per field of a config dataclass (underscores become dashes; booleans get --x / --no-x)."""
    comments = _field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", default="", metavar="CHECKPOINT",
                           help="continue from the newest checkpoint in --out-dir, or from CHECKPOINT")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=comments.get(f.name))
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"{comments.get(f.name, '')} (default: {f.default!r})".lstrip())
    return p


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The stage-1 flags: one per TrainConfig field."""
    return add_config_arguments(p, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig fields of parsed arguments (other attributes, e.g. a subcommand name, are ignored)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m qformer.train", description=__doc__.split("\n")[0]))
    cfg = config_from_args(parser.parse_args(argv))
    keep_freed_memory()  # a step reuses the last step's freed activations (README, "Benchmarks": the allocator)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports progress
    tag = f" [rank {rank}]" if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    final = train(cfg)
    if rank == 0:
        print(f"final checkpoint: {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
