"""BLIP-2 stage 2 as a training stage: the query path of a stage-1 Q-Former into a frozen LLM (`qformer.blip2_llm`).

Run by the one loop in `qformer.train` (`python -m qformer.train --stage 2 ...`; `python -m qformer.stage2`
is the same command with `--stage 2` preset).

- Objective: the LLM's next-token loss on the caption and EOS, with the image's query outputs (through
  `llm_proj`) as soft prompts and `--prompt` in between (`Blip2LLM.forward`). Only the query path and
  `llm_proj` train; the LLM and the image encoder are frozen.
- Data: the same pairs, feature caches and batch order as stage 1; captions stay strings, since the LLM
  tokenises them itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qformer.blip2_llm import (
    Blip2LLM,
    _spec_string,
    default_llm_dtype,
    is_stage2_checkpoint,
    read_stage2_config,
)
from qformer.pairs import CaptionPairs

if TYPE_CHECKING:
    from qformer.train import TrainConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "blip2-tiny"  # the offline stage-1 model whose query path stage 2 starts from
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llm_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen LLM's dtype: cfg.llm_dtype, or for "auto" `default_llm_dtype(device)`."""
    if cfg.llm_dtype == "auto":
        return default_llm_dtype(device)
    if cfg.llm_dtype not in _DTYPES:
        raise ValueError(f"llm_dtype must be auto or one of {sorted(_DTYPES)}, got {cfg.llm_dtype!r}")
    return _DTYPES[cfg.llm_dtype]


def build_stage2_model(cfg: TrainConfig, device: torch.device) -> Blip2LLM:
    """The starting model of a fresh run: a stage-2 checkpoint (cfg.model) or stage-1 weights + cfg.llm."""
    dtype, source = llm_dtype(cfg, device), cfg.model or DEFAULT_MODEL
    if is_stage2_checkpoint(source):
        saved = read_stage2_config(source)["llm"]
        if saved != _spec_string(cfg.llm):
            logger.warning("%s was trained with the LLM %r: using it, not --llm %r", source, saved, cfg.llm)
        return Blip2LLM.from_pretrained(source, device, dtype)
    return Blip2LLM.from_stage1(source, cfg.llm, device, dtype, cfg.seed, cfg.prompt, cfg.max_text_length)


class CaptionLoss(nn.Module):
    """The LLM's caption loss of a batch: {"loss"}."""

    def __init__(self, model: Blip2LLM, prompt: str, prefix_lm: bool):
        super().__init__()
        self.model, self.prompt, self.prefix_lm = model, prompt, prefix_lm

    def forward(self, image_tokens: Tensor, batch: dict[str, Any], generator: torch.Generator | None = None
                ) -> dict[str, Tensor]:
        return {"loss": self.model(image_tokens, batch["texts"], self.prompt, self.prefix_lm, generator)}


class Stage2:
    """Stage 2 for `qformer.train`: a `Blip2LLM` (query path + llm_proj + frozen LLM) and its caption loss."""

    name = "stage 2"
    generator_on_device = False  # prefix-LM split points are drawn per caption on the host
    text_lr_scale = 1.0  # stage 2 has no language-model-initialised text path of its own
    attn_lr_scale = -1.0
    by_image = False

    def __init__(self, cfg: TrainConfig):
        if (cfg.lock_text or cfg.objectives != "itc+itm+itg" or cfg.text_lr_scale != 1.0 or cfg.attn_lr_scale >= 0 or cfg.itm_negatives
                or cfg.itm_uniform):
            raise ValueError("--lock-text, --objectives, --text-lr-scale, --attn-lr-scale, --itm-negatives and --itm-uniform are "
                             "stage-1 options")
        if cfg.eval_split:
            raise ValueError("--eval-split is a stage-1 option (stage 2: qsearch bench captions)")
        self.cfg = cfg

    def load(self, resume_dir: Path | None, device: torch.device) -> Blip2LLM:
        if resume_dir is not None:
            model = Blip2LLM.from_pretrained(resume_dir, device, llm_dtype(self.cfg, device))
        else:
            model = build_stage2_model(self.cfg, device)
        if model.encoder is None:
            raise ValueError("stage-2 training from images needs the model's frozen image encoder")
        return model.train()  # dropout in the Q-Former; LLM and encoder stay in eval mode

    def trainable(self, model: Blip2LLM) -> nn.Module:
        return model.trainable()

    def tokenizer(self, model: Blip2LLM) -> None:
        return None  # captions stay strings: `Blip2LLM.text_batch` tokenises them with the LLM's tokenizer

    def objective(self, model: Blip2LLM, pairs: CaptionPairs, world_size: int) -> nn.Module:
        return CaptionLoss(model, self.cfg.prompt, self.cfg.prefix_lm)

    def negatives(self, model: Blip2LLM, pairs: CaptionPairs, cache: Any, resumed: bool) -> None:
        return None

    def extras(self, model: Blip2LLM) -> dict[str, float]:
        return {}

    def evaluator(self, model: Blip2LLM, cache_root: Path, pairs: CaptionPairs) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qformer.train --stage 2 ...`."""
    from qformer.train import main as train_main  # the loop imports this module

    return train_main(["--stage", "2", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
