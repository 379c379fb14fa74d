"""How far do the frozen parts alone get on Flickr8k dev? A ceiling check for blip2-tiny, not the product.

Image: the frozen EfficientNet-Lite0 tokens [49,1280] of blip2-tiny, LayerNorm per token, mean-pooled, one
linear layer to 256. Text: all-MiniLM-L6-v2 (frozen) sentence embeddings, mean-pooled as that model was trained
(`--text-pool cls`: its [CLS] output, the token BLIP-2's ITC reads), then a small MLP to 256. Only these heads
train: symmetric InfoNCE with a learned temperature, batch 256, AdamW with one-cycle lr 1e-3, on the Flickr8k
train pairs. Dev recall@1/5/10 both ways every 5 epochs, the model card's protocol.

    python experiments/frozen_probe.py --epochs 15 --out out/frozen_probe.json

The train tokens come from a stage-1 feature cache (`--cache-dir`, built by `qformer.train` if missing); the
dev tokens and both splits' sentence embeddings are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from qformer.datasets import load_flickr8k
from qformer.factory import create_model
from qformer.features import FeatureCache
from qformer.malloc import keep_freed_memory
from qformer.pairs import load_pairs
from qformer.recall import recall_at_k
from qformer.tokenizer import load_tokenizer, minilm_dir


def tokens(cache: FeatureCache, paths: list[str]) -> torch.Tensor:  # -> [n,49,1280] fp32
    return torch.stack([cache[cache.row(p)].float() for p in paths])


@torch.inference_mode()
def sentence_embeddings(texts: list[str], pool: str = "mean", batch: int = 256) -> torch.Tensor:  # -> [n,384], L2-normalised
    """MiniLM's sentence embeddings: the mean over tokens (as all-MiniLM-L6-v2 was trained), or the [CLS] output
    (what BLIP-2's text_proj reads)."""
    tok, enc = load_tokenizer(), AutoModel.from_pretrained(str(minilm_dir())).eval()
    out = []
    for i in range(0, len(texts), batch):
        b = tok(texts[i : i + batch], padding=True, truncation=True, max_length=40, return_tensors="pt")
        h = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        m = b["attention_mask"][..., None].float()
        out.append(F.normalize(h[:, 0] if pool == "cls" else (h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="runs/lite0-features", help="stage-1 feature cache of the train split")
    p.add_argument("--work", default="out/frozen_probe")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--text-pool", choices=("mean", "cls"), default="mean",
                   help="MiniLM's mean over tokens, or its [CLS] output (the token BLIP-2's ITC reads)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    keep_freed_memory()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train = load_pairs("flickr8k", a.root, "train")
    dev = load_flickr8k(Path(a.root), "dev")  # the benchmark's dev set: image_paths, texts, img2txt, txt2img
    model = create_model("blip2-tiny-init")  # only its frozen Lite0 tower is used
    for split, directory in ((train, Path(a.cache_dir)), (dev, work / "dev_features")):
        if not (directory / "index.json").is_file():
            FeatureCache.build(model, split.image_paths, directory)
    x_train = tokens(FeatureCache(Path(a.cache_dir)), train.image_paths)
    x_dev = tokens(FeatureCache(work / "dev_features"), dev.image_paths)
    sentences = work / ("sentences.pt" if a.text_pool == "mean" else f"sentences_{a.text_pool}.pt")
    if not sentences.is_file():
        torch.save({"train": sentence_embeddings(train.captions, a.text_pool),
                    "dev": sentence_embeddings(dev.texts, a.text_pool)}, sentences)
    s = torch.load(sentences)
    t_train, t_dev = s["train"], s["dev"]
    img_train = torch.tensor(train.pair_image)

    torch.manual_seed(0)  # here, so that the heads and the batches do not depend on which caches existed
    image_norm, image_proj = torch.nn.LayerNorm(1280), torch.nn.Linear(1280, 256)
    text_head = torch.nn.Sequential(torch.nn.Linear(384, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    params = [*image_norm.parameters(), *image_proj.parameters(), *text_head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    per_epoch = len(t_train) // a.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=a.epochs * per_epoch, pct_start=0.05)

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(image_proj(image_norm(x).mean(1)), dim=-1)  # each token normalised, then pooled

    log, t0 = [], time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        perm = torch.randperm(len(t_train))
        for i in range(per_epoch):
            j = perm[i * a.batch_size : (i + 1) * a.batch_size]
            ii = img_train[j]
            logits = embed_images(x_train[ii]) @ F.normalize(text_head(t_train[j]), dim=-1).t() * logit_scale.exp()
            pos = (ii[:, None] == ii[None]).float()  # captions of the same image are all positives
            pos = pos / pos.sum(1, keepdim=True)
            loss = -((pos * logits.log_softmax(1)).sum(1).mean() + (pos * logits.t().log_softmax(1)).sum(1).mean()) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 0 or epoch == a.epochs:
            with torch.no_grad():
                sims = embed_images(x_dev) @ F.normalize(text_head(t_dev), dim=-1).t()  # [images, texts]
                r = {k: round(v, 2) for k, v in recall_at_k(sims, sims.t(), dev.img2txt, dev.txt2img).items()}
            log.append({"epoch": epoch, "train_loss": round(float(loss.detach()), 4), **r,
                        "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"split": "dev", "text_pool": a.text_pool, "log": log}, indent=1) + "\n")


if __name__ == "__main__":
    main()
