"""Do the stage-1 losses generalise? The ITC / ITM / ITG losses of a checkpoint on train pairs and on dev pairs.

Eval mode (no dropout), batch 32, the trainer's loss code (`qformer.losses.stage1_losses`, hard negatives drawn
with a fixed seed), the same random batches for every model. A dev loss well above the train loss means the
objective overfits the 6,000 train images.

    python experiments/train_dev_loss.py --model blip2-tiny --batches 40 --out out/train_dev_loss.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qformer.factory import create_model
from qformer.features import FeatureCache
from qformer.losses import stage1_losses
from qformer.malloc import keep_freed_memory
from qformer.pairs import load_pairs
from qformer.tokenizer import TRAIN_MAX_LENGTH, tokenize


@torch.no_grad()
def mean_losses(model, pairs, cache: FeatureCache, batches: int, batch_size: int, seed: int) -> dict[str, float]:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(pairs), generator=g)[: batches * batch_size].view(batches, batch_size)
    sums = {"itc": 0.0, "itm": 0.0, "itg": 0.0}
    for b, idx in enumerate(perm.tolist()):
        images = [pairs.pair_image[j] for j in idx]
        tokens = torch.stack([cache[cache.row(pairs.image_paths[i])].float() for i in images])
        ids, mask = tokenize(model.tokenizer, [pairs.captions[j] for j in idx], TRAIN_MAX_LENGTH)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stage1_losses(model.qformer, tokens, ids, mask, torch.tensor(images),
                                torch.Generator().manual_seed(seed + b))
        for k in sums:
            sums[k] += float(out[k]) / batches
    return {k: round(v, 4) for k, v in sums.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="repeatable")
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--train-cache", default="runs/lite0-features")
    p.add_argument("--dev-cache", default="out/frozen_probe/dev_features")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="")
    a = p.parse_args()
    keep_freed_memory()
    torch.set_grad_enabled(False)
    splits = {"train": (load_pairs("flickr8k", a.root, "train"), FeatureCache(Path(a.train_cache))),
              "dev": (load_pairs("flickr8k", a.root, "dev"), FeatureCache(Path(a.dev_cache)))}
    rows = []
    for name in a.model:
        model = create_model(name).eval()
        for split, (pairs, cache) in splits.items():
            rows.append({"model": name, "split": split,
                         **mean_losses(model, pairs, cache, a.batches, a.batch_size, seed=0)})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
