"""The one training loop of qsearch: BLIP-2 stage 1 (`qformer.stage1`) and stage 2 (`qformer.stage2`), nanoGPT style.

    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000
    python -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 --max-steps 2000 --resume
    python -m qformer.train --lock-text --objectives itc --batch-size 256 ...    (the locked-text warm-up)
    python -m qformer.train --stage 2 --model blip2-tiny --llm smollm2 --out-dir runs/stage2 ...
    python -m qformer.train --dataset webdataset --data-root 'shards/{000..099}.tar' --out-dir runs/s1 ...
    torchrun --nproc-per-node 4 -m qformer.train --data-root /path/to/flickr8k --out-dir runs/stage1 ...

`qsearch train ...` is the same command. Read top to bottom: config -> optimiser and schedule ->
checkpoints -> distributed -> the loop -> command line. A stage (`Stage1`, `Stage2`) supplies what differs:
its model, what trains, its objective, and (stage 1) its evaluation; everything else is here, once.

- Frozen image features are computed once into a memory-mapped cache (`qformer.features`), so a step costs
  only what trains; `--no-cache` runs the encoder live with BLIP-2's training augmentation instead, and
  `--cache-views V` is the cached middle way: V-1 augmented views of every image are encoded once, and each
  pair of each epoch reads one of the V views (the plain one included).
- Every checkpoint `<out-dir>/checkpoints/step_NNNNNNN/` is a model directory of its stage
  (`qformer.factory.create_model(dir)`, or `Blip2LLM.from_pretrained(dir)`) plus `train_state.pt`
  (optimiser, grad scaler, step, config).
- `--resume` continues bit for bit: the batches of step s depend only on (seed, s) - each epoch's order is
  a permutation drawn from (seed, epoch) - and every step reseeds dropout and the objective's sampler
  from (seed, step), so no RNG state has to be carried across a restart.
- Stage 1 with `--eval-split dev` scores the model on a held-out split at every epoch boundary
  (`--eval-every-epochs`) and at the end with the retrieval benchmark's protocol; the recall rows go to
  metrics.jsonl, and metrics.svg plots loss and recall.
- Without a torch.distributed environment this is one plain process. Under torchrun (WORLD_SIZE > 1) each
  rank takes its contiguous slice of every global batch (`--batch-size` is the global batch, split evenly),
  the objective runs under DistributedDataParallel (stage 1's losses gather ITC/ITM negatives across ranks)
  and rank 0 alone writes checkpoints, metrics and plots, and evaluates. Resume with the same number of
  ranks to continue bit for bit.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qformer.blip2_llm import DEFAULT_LLM, DEFAULT_PROMPT, MAX_TEXT_LENGTH
from qformer.features import INDEX, FeatureCache
from qformer.malloc import keep_freed_memory
from qformer.model import TEXT_PATH
from qformer.pairs import (
    CaptionPairs,
    Collate,
    EpochBatches,
    PairDataset,
    derive_seed,
    load_pairs,
)
from qformer.plot import read_metrics, write_metrics_svg
from qformer.precision import bf16_native
from qformer.stage1 import Stage1
from qformer.stage2 import Stage2

logger = logging.getLogger(__name__)


# ---- config ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run of either stage depends on, as plain data (saved as <out_dir>/config.json)."""

    stage: int = 1  # 1: ITC + ITM + ITG of the Q-Former; 2: its query path as soft prompts into a frozen LLM
    # data
    data_root: str = ""  # dataset directory; manifest: a .csv/.parquet; webdataset: .tar, its folder, or a {000..009} pattern
    dataset: str = "flickr8k"  # flickr8k | coco | flickr30k | karpathy-<name> | lavis | manifest | webdataset
    split: str = "train"  # train | dev | test (manifest: its split column, if any; webdataset: <data_root>/<split>/)
    max_images: int = 0  # use only the first N images of the split (0: all)
    # model
    model: str = ""  # starting weights, anything qformer.factory.create_model accepts ('': blip2-tiny-init for stage 1, blip2-tiny for stage 2; stage 2 also takes a stage-2 checkpoint)
    # stage 1
    objectives: str = "itc+itm+itg"  # itc+itm+itg (BLIP-2) | itc (with --lock-text: the locked-text warm-up)
    lock_text: bool = False  # freeze the text path (embeddings, shared self-attention, text FFNs); its [CLS] states are computed once
    itm_negatives: int = 0  # K > 0: ITM negatives mined once with the starting model over the whole train set, one of the K hardest per pair and per image each epoch, instead of in-batch sampling
    itm_uniform: float = 0.0  # share of the in-batch ITM negatives drawn uniformly among the non-positives instead of by ITC similarity (0: all hard, as BLIP-2); easy negatives let ITM start learning when a warm-started ITC makes every batch negative hard
    text_lr_scale: float = 1.0  # lr multiplier for the language-model-initialised text path (embeddings, self-attention, text FFNs); 1: one lr, as BLIP-2
    attn_lr_scale: float = -1.0  # lr multiplier for the self-attention that queries and text share, ITM's only query-text path (< 0: --text-lr-scale's)
    eval_split: str = ""  # held-out split to evaluate on, e.g. dev ('': no evaluation)
    eval_dataset: str = ""  # its dataset ('': --dataset)
    eval_data_root: str = ""  # its data root ('': --data-root), e.g. another manifest or shard directory
    eval_every_epochs: float = 1.0  # epochs between evaluations, e.g. 0.5 (0: only at the end)
    eval_k_test: int = 128  # ITM re-ranks the top k by ITC (0: ITC only); CPU runs: about 16
    eval_max_images: int = 0  # evaluate on the first N images of the split (0: all); CPU runs: about 100
    # stage 2
    llm: str = DEFAULT_LLM  # frozen LLM: smollm2 (offline wheel), a .gguf file, a transformers directory or hub id
    llm_dtype: str = "auto"  # fp32 | bf16 | fp16; auto: fp32 on CPU, bf16 (else fp16) on CUDA
    prompt: str = DEFAULT_PROMPT  # text between soft prompts and caption; not in the loss
    prefix_lm: bool = True  # encoder-decoder LLMs: split captions at a random word (prefix LM); --no-prefix-lm: prompt in, caption out
    max_text_length: int = MAX_TEXT_LENGTH  # LLM tokens per text, prompt and EOS included
    # image features
    cache: bool = True  # frozen-encoder tokens from a disk cache (no augmentation); --no-cache: live + augmentation
    cache_dir: str = ""  # feature cache directory ('': <out_dir>/features); share it between runs and stages
    cache_views: int = 1  # cached views per image: the plain one + V-1 augmented (crop + flip) ones in <cache_dir>/augment_<v>
    # optimisation (LAVIS: AdamW, lr 1e-4 -> 1e-5 cosine, weight decay 0.05, linear warmup)
    batch_size: int = 64  # pairs per micro-batch (images with --lock-text); ITC negatives come from the micro-batch
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
    device: str = "auto"  # auto: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)
    precision: str = "auto"  # fp32 | bf16 | fp16 (autocast; fp16 CUDA only); auto: bf16 where native (GPU or CPU)
    num_workers: int = 0  # DataLoader workers (image decoding in --no-cache mode)
    seed: int = 0  # data order, augmentation, dropout, ITM negatives, prefix splits and llm_proj init derive from it
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bitwise resume on CUDA (slower)
    # output
    out_dir: str = ""  # checkpoints/, metrics.jsonl, metrics.svg, config.json ('': runs/stage<stage>)
    checkpoint_every: int = 500  # steps; the last step is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0: all)
    log_every: int = 10  # steps between metrics.jsonl records
    resume: str = ""  # "": fresh run; "latest": newest checkpoint in out_dir (fresh if none); or a directory
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {self.stage}")
        self.out_dir = self.out_dir or f"runs/stage{self.stage}"


def make_stage(cfg: TrainConfig) -> Stage1 | Stage2:
    """The stage object of a run: what its model is, what trains, and its objective."""
    return Stage1(cfg) if cfg.stage == 1 else Stage2(cfg)


# ---- optimiser and schedule ----------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from warmup_lr to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(qformer: nn.Module, cfg: Any, text_lr_scale: float = 1.0,
                   attn_lr_scale: float = -1.0) -> torch.optim.AdamW:
    """AdamW; like LAVIS, no weight decay on biases, LayerNorms and the temperature (params with ndim < 2).
    Each group's "lr_scale" multiplies the scheduled lr: text_lr_scale for the text path (TEXT_PATH: the
    embeddings, the self-attention that queries and text share, the text FFNs), 1 for the rest;
    attn_lr_scale >= 0 sets the shared self-attention's own scale."""
    named = [(n, p) for n, p in qformer.named_parameters() if p.requires_grad]
    attn_scale = text_lr_scale if attn_lr_scale < 0 else attn_lr_scale
    if text_lr_scale == 1.0 and attn_scale == 1.0:
        parts = [([p for _, p in named], 1.0)]  # one lr: two groups, as in checkpoints from before the option
    else:
        def scale_of(name: str) -> float:
            if ".attn." in f".{name}":
                return attn_scale
            return text_lr_scale if any(k in f".{name}" for k in TEXT_PATH) else 1.0
        scales = sorted({scale_of(n) for n, _ in named} | {1.0}, reverse=True)
        parts = [([p for n, p in named if scale_of(n) == s], s) for s in scales]
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


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
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


def shared_feature_cache(model: Any, paths: Sequence[Path], directory: Path, cfg: TrainConfig,
                         rank: int, augment_seed: int | None = None) -> FeatureCache:
    """FeatureCache.build on rank 0; the other ranks wait for its index file (no collective, so a long build
    cannot time out), then open and check it. The directory must be visible to every rank."""
    if rank != 0:
        while not (directory / INDEX).is_file():
            time.sleep(1.0)
    return FeatureCache.build(model, paths, directory, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              progress=cfg.progress and rank == 0, augment_seed=augment_seed)


def cached_views(model: Any, paths: Sequence[Path], directory: Path, cfg: TrainConfig,
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
    for key in ("text_lr_scale", "attn_lr_scale"):  # the optimizer's groups differ; the saved ones would win silently
        default = 1.0 if key == "text_lr_scale" else -1.0
        saved_scale, scale = state["config"].get(key, default), getattr(cfg, key, default)
        if saved_scale != scale:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{resume_dir} was trained with {flag} {saved_scale}, not {scale}: resume with "
                             f"{flag} {saved_scale}, or start a new --out-dir")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    changed = {k: (v, getattr(cfg, k)) for k, v in state["config"].items()
               if k != "resume" and getattr(cfg, k, None) != v}
    if changed:
        logger.warning("resuming with a changed config (saved, now): %s", changed)
    logger.info("resuming from %s at step %d", resume_dir, state["step"])
    return state["step"]



def train(cfg: TrainConfig, pairs: CaptionPairs | None = None) -> Path:
    """Run (or resume) a training run of cfg.stage; returns the final checkpoint directory.

    pairs: training pairs to use instead of reading cfg.dataset from cfg.data_root. Under torchrun every
    rank calls this; rank 0 writes the outputs.
    """
    with distributed(cfg.device) as (rank, world_size, device):
        return _train(cfg, pairs, rank, world_size, device)


def _train(cfg: TrainConfig, pairs: CaptionPairs | None, rank: int, world_size: int, device: torch.device) -> Path:
    stage = make_stage(cfg)
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
    model = stage.load(resume_dir, device)
    trainable = stage.trainable(model)
    optimizer = make_optimizer(trainable, cfg, stage.text_lr_scale, stage.attn_lr_scale)
    use_amp, amp_dtype, scaler = mixed_precision(cfg.precision, device)
    logger.info("%s, precision: %s", stage.name, f"{amp_dtype} autocast on {device.type}" if use_amp else "fp32")
    start_step = restore_train_state(resume_dir, optimizer, scaler, cfg)
    if main:
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    # data: pairs -> (cached features | live images) -> deterministic batches from global batch index on
    if pairs is None:
        if not cfg.data_root:
            raise ValueError("no training data: set data_root (--data-root)")
        pairs = load_pairs(cfg.dataset, cfg.data_root, cfg.split, cfg.max_images)
    cache_root = Path(cfg.cache_dir or out_dir / "features")
    evaluate = stage.evaluator(model, cache_root, pairs) if main else None
    if cfg.cache:
        views = cached_views(model.encoder, pairs.image_paths, cache_root, cfg, rank)
        negatives = stage.negatives(model, pairs, views[0], resume_dir is not None)
        dataset = PairDataset(pairs, cache=views, by_image=stage.by_image, negatives=negatives)
    else:
        dataset = PairDataset(pairs, transform=model.encoder.train_transform(), by_image=stage.by_image)
    usable = dataset.usable()
    if len(usable) < len(dataset):
        logger.warning("training on %d of %d %s (the others' images could not be read)", len(usable), len(dataset),
                       "images" if stage.by_image else "pairs")
    sampler = EpochBatches(usable, cfg.batch_size, cfg.seed, start_batch=start_step * cfg.grad_accum, rank=rank,
                           world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(stage.tokenizer(model)),
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    logger.info("%d pairs, %d images; %d batches of %d %s per epoch%s", len(pairs), len(pairs.image_paths),
                sampler.per_epoch, cfg.batch_size, "images" if stage.by_image else "pairs",
                f" ({world_size} ranks)" if world_size > 1 else "")
    objective = stage.objective(model, pairs, world_size)
    if world_size > 1:
        objective = DistributedDataParallel(objective, device_ids=None if device.type == "cpu" else [device.index])

    metrics_path, plot_path = out_dir / "metrics.jsonl", out_dir / "metrics.svg"
    train_log: list[dict[str, Any]] = []
    eval_log: list[dict[str, Any]] = []
    if main:
        _truncate_metrics(metrics_path, start_step)
        if metrics_path.is_file():
            train_log, eval_log = read_metrics(metrics_path)
    generator = torch.Generator(device=device if stage.generator_on_device else "cpu")  # the objective's sampler
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=stage.name, unit="step",
               disable=not (cfg.progress and main))
    t_last, pairs_seen = time.perf_counter(), 0
    final = checkpoint_root(out_dir) / f"step_{start_step:07d}"
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints before text_lr_scale: no key
        step_seed = derive_seed(cfg.seed, "step", step, *([rank] if world_size > 1 else []))
        torch.manual_seed(step_seed)  # dropout, on every device
        generator.manual_seed(step_seed)  # ITM negatives (stage 1), prefix-LM splits (stage 2)

        micro = [next(batches) for _ in range(cfg.grad_accum)]  # None: every image of it was unreadable
        if world_size > 1:
            micro = same_size_batches(micro, device)
        micro = [b for b in micro if b is not None]
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1  # DDP: all-reduce the gradients once, after the last micro-batch
            with objective.no_sync() if world_size > 1 and not last else nullcontext():
                batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
                with torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext():
                    if "image" in batch:
                        tokens = batch["image"]  # [B,N,C] cached
                    else:
                        with torch.no_grad():
                            tokens = model.encoder(batch["pixels"])  # [B,N,C] live
                    losses = objective(tokens, batch, generator)
                scaler.scale(losses["loss"] / cfg.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            pairs_seen += len(batch["image_ids"])
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
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
            rate = "images_per_s" if stage.by_image else "pairs_per_s"
            record = {"step": done, "epoch": epoch, "lr": lr, **{k: round(v, 5) for k, v in sums.items()},
                      **stage.extras(model), rate: round(pairs_seen / (now - t_last), 2)}
            if main:
                _append_jsonl(metrics_path, record)
                train_log.append(record)
                write_metrics_svg(train_log, eval_log, plot_path)
            bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()})
            t_last, pairs_seen = now, 0
        if evaluate is not None and eval_due(done, cfg, sampler.per_epoch):
            t0 = time.perf_counter()
            trainable.eval()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep training's RNG
                results = evaluate(model)
            trainable.train()
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
def _field_comments() -> dict[str, str]:
    """The trailing `# comment` of each TrainConfig field, used as its --help text."""
    return dict(re.findall(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", inspect.getsource(TrainConfig), re.M))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One --flag per TrainConfig field (underscores become dashes; booleans get --x / --no-x)."""
    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig fields of parsed arguments (other attributes, e.g. a subcommand name, are ignored)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def run(cfg: TrainConfig) -> int:
    """What `python -m qformer.train` and `qsearch train` do with a config: allocator, logging, train."""
    keep_freed_memory()  # a step reuses the last step's freed activations (qformer.malloc)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports progress
    tag = f" [rank {rank}]" if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    final = train(cfg)
    if rank == 0:
        print(f"final checkpoint: {final}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m qformer.train", description=__doc__.split("\n")[0]))
    return run(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
