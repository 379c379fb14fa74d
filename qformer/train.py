"""BLIP-2 stage-1 training of the Q-Former (ITC + ITM + ITG) on image-caption pairs, nanoGPT style.

    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000
    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000 --resume

Read top to bottom: config -> data -> optimiser and schedule -> checkpoints -> the loop -> command line.

- Frozen image features are computed once into a memory-mapped cache (`qformer.features`), so a step costs
  only the Q-Former; `--no-cache` runs the encoder live with BLIP-2's training augmentation instead.
- Every checkpoint `<out-dir>/checkpoints/step_NNNNNNN/` is a qsearch model directory
  (`qformer.factory.create_model(dir)` loads it) plus `train_state.pt` (optimiser, grad scaler, step).
- `--resume` continues bit for bit: the batches of step s depend only on (seed, s) - each epoch's order is
  a permutation drawn from (seed, epoch) - and every step reseeds dropout and the ITM negative sampler
  from (seed, step), so no RNG state has to be carried across a restart.
- One process, no torch.distributed needed. The losses already gather across ranks when a process
  group exists (`qformer.losses`); DDP would wrap `Stage1Objective` and shard the batch sampler by rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from qformer.datasets import RetrievalSet, load_retrieval_set
from qformer.factory import Blip2Retriever, create_model
from qformer.features import FeatureCache, read_image
from qformer.losses import Stage1Objective
from qformer.model import QFormer
from qformer.tokenizer import TRAIN_MAX_LENGTH, tokenize

logger = logging.getLogger(__name__)


# ---- config ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run depends on, as plain data (saved as <out_dir>/config.json)."""

    # data
    data_root: str = ""  # dataset directory (for flickr8k: Flickr8k.token.txt, Flickr_8k.*Images.txt, images/)
    dataset: str = "flickr8k"  # a name in PAIR_READERS
    split: str = "train"  # train | dev | test (names per dataset)
    max_images: int = 0  # use only the first N images of the split (0: all)
    # model
    model: str = "blip2-tiny-init"  # starting weights: anything qformer.factory.create_model accepts
    # image features
    cache: bool = True  # frozen-encoder tokens from a disk cache (no augmentation); --no-cache: live + augmentation
    cache_dir: str = ""  # feature cache directory ('': <out_dir>/features); share it between runs
    # optimisation (LAVIS stage 1: AdamW, lr 1e-4 -> 1e-5 cosine, weight decay 0.05, linear warmup)
    batch_size: int = 64  # pairs per micro-batch (ITC negatives come from the micro-batch)
    grad_accum: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000  # optimiser steps
    lr: float = 1e-4  # peak learning rate, reached after warmup
    min_lr: float = 1e-5  # cosine decay ends here at max_steps
    warmup_steps: int = 100  # linear warmup from warmup_lr
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05  # AdamW, on weight matrices and embeddings only
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999
    grad_clip: float = 0.0  # max gradient norm; 0: off (LAVIS does not clip)
    # runtime
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # fp32 | bf16 | fp16 (autocast, CUDA only); auto: bf16 on CUDA if supported
    num_workers: int = 0  # DataLoader workers (image decoding in --no-cache mode)
    seed: int = 0  # data order, augmentation, dropout and ITM negatives all derive from it
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise resume on CUDA (slower)
    # output
    out_dir: str = "runs/stage1"  # checkpoints/, metrics.jsonl, config.json
    checkpoint_every: int = 500  # steps; the last step is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: all)
    log_every: int = 10  # steps between metrics.jsonl records
    resume: str = ""  # "": fresh run; "latest": newest checkpoint in out_dir (fresh if none); or a directory
    progress: bool = True  # tqdm progress bar


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


# A reader turns (root, split) into CaptionPairs. The map-style design (all pairs known up front) is what
# makes a resumable, seed-determined order easy. To add a source, write a reader: LAVIS caption JSON
# ([{"image", "caption", "image_id"}]), a CSV/Parquet manifest (image, caption columns), ... A webdataset
# stream would instead replace EpochBatches with shard-level order + position bookkeeping.
PAIR_READERS: dict[str, Callable[[Path, str], CaptionPairs]] = {
    name: _retrieval_set_reader(name) for name in ("flickr8k", "coco", "flickr30k", "lavis")
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

    With a FeatureCache the tokens are read from disk; otherwise the image is decoded and augmented with
    `transform`, seeded per item so that the crop does not depend on worker or restart.
    """

    def __init__(self, pairs: CaptionPairs, cache: FeatureCache | None = None,
                 transform: Callable[[Image.Image], Tensor] | None = None):
        if (cache is None) == (transform is None):
            raise ValueError("PairDataset needs exactly one of cache and transform")
        self.pairs, self.cache, self.transform = pairs, cache, transform
        self.rows = None if cache is None else [cache.row(p) for p in pairs.image_paths]  # image -> cache row
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
            out["image"] = self.cache[self.rows[i]]  # [N,C]
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
    drawn from (seed, epoch). Yields lists of (pair index, augmentation seed)."""

    def __init__(self, items: Sequence[int], batch_size: int, seed: int, start_batch: int = 0):
        self.items, self.batch_size, self.seed, self.start_batch = list(items), batch_size, seed, start_batch
        self.per_epoch = len(self.items) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.items)} usable pairs: fewer than one batch of {batch_size}")

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(len(self.items), generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, epoch, perm = self.start_batch, -1, []
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            chosen = [self.items[p] for p in perm[k * self.batch_size : (k + 1) * self.batch_size]]
            yield [(j, derive_seed(self.seed, "augment", epoch, j)) for j in chosen]
            b += 1


# ---- optimiser and schedule ----------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_lr to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(qformer: QFormer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; like LAVIS, no weight decay on biases, LayerNorms and the temperature (params with ndim < 2)."""
    params = [p for p in qformer.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


# ---- the loop ----------------------------------------------------------------------------------------------
def mixed_precision(precision: str, device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """(autocast on?, its dtype, grad scaler) for "auto" | "fp32" | "bf16" | "fp16"; autocast is CUDA only."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    use_amp = device.type == "cuda" and precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return use_amp, amp_dtype, torch.amp.GradScaler(device.type, enabled=use_amp and precision == "fp16")


def restore_train_state(resume_dir: Path | None, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        cfg: Any) -> int:
    """Load optimiser and scaler state from a checkpoint; returns the step to continue from (0: fresh)."""
    if resume_dir is None:
        return 0
    state = load_train_state(resume_dir)
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

    pairs: training pairs to use instead of reading cfg.dataset from cfg.data_root.
    """
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoint_root(out_dir).glob(".tmp_step_*"):  # a checkpoint interrupted mid-write
        shutil.rmtree(stale)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    # model: a fresh start, or the weights of the checkpoint we resume from
    resume_dir = resolve_resume(cfg)
    model = create_model(resume_dir or cfg.model, device=device)
    qformer = model.qformer.train()  # dropout on; the frozen encoder stays in eval mode
    objective = Stage1Objective(qformer)
    optimizer = make_optimizer(qformer, cfg)
    use_amp, amp_dtype, scaler = mixed_precision(cfg.precision, device)
    start_step = restore_train_state(resume_dir, optimizer, scaler, cfg)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    # data: pairs -> (cached features | live images) -> deterministic batches from global batch index on
    if pairs is None:
        if not cfg.data_root:
            raise ValueError("no training data: set data_root (--data-root)")
        pairs = load_pairs(cfg.dataset, cfg.data_root, cfg.split, cfg.max_images)
    if cfg.cache:
        cache = FeatureCache.build(model, pairs.image_paths, cfg.cache_dir or out_dir / "features",
                                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress)
        dataset = PairDataset(pairs, cache=cache)
    else:
        dataset = PairDataset(pairs, transform=model.encoder.train_transform())
    usable = dataset.usable()
    if len(usable) < len(pairs):
        logger.warning("training on %d of %d pairs (the others' images could not be read)", len(usable), len(pairs))
    sampler = EpochBatches(usable, cfg.batch_size, cfg.seed, start_batch=start_step * cfg.grad_accum)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(model.tokenizer),
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    logger.info("%d pairs, %d images; %d batches of %d per epoch", len(usable), len(pairs.image_paths),
                sampler.per_epoch, cfg.batch_size)

    metrics_path = out_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_step)
    generator = torch.Generator(device=device)  # ITM hard negatives
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="stage 1", unit="step", disable=not cfg.progress)
    t_last, pairs_seen = time.perf_counter(), 0
    final = checkpoint_root(out_dir) / f"step_{start_step:07d}"
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_seed = derive_seed(cfg.seed, "step", step)
        torch.manual_seed(step_seed)  # dropout, on every device
        generator.manual_seed(step_seed)  # ITM negatives

        sums = {"itc": 0.0, "itm": 0.0, "itg": 0.0, "loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            if batch is None:  # every image of this micro-batch was unreadable
                continue
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

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            record = {"step": done, "epoch": round(done * cfg.grad_accum / sampler.per_epoch, 3), "lr": lr,
                      **{k: round(v, 5) for k, v in sums.items()}, "temp": round(qformer.temp.item(), 5),
                      "pairs_per_s": round(pairs_seen / (now - t_last), 2)}
            _append_jsonl(metrics_path, record)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", itc=f"{sums['itc']:.3f}", itm=f"{sums['itm']:.3f}",
                            itg=f"{sums['itg']:.3f}")
            t_last, pairs_seen = now, 0
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            final = save_checkpoint(model, optimizer, scaler, done, cfg)
    bar.close()
    del batches  # stops DataLoader workers
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    final = train(cfg)
    print(f"final checkpoint: {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
