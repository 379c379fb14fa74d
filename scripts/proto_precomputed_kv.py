"""Prototype: what ITM@128 would gain if the index stored each image's cross-attention keys/values.

    python scripts/proto_precomputed_kv.py --index out/bench_ui/index --images 2000 --pairs 60

Computes, with the ITM re-ranker's bf16 copy, the keys and values of every cross layer for the first
--images images of --index (from their stored fp16 tokens, exactly as search does) and writes them as bf16
bits into a uint16 memory map under --work. Then it alternates, query by query, the engine's current path
(read tokens, `image_kv`, ITM) with reading the precomputed keys/values (ITM only) on 128 random images of
that set, and reports both p50s, the paired saving, and whether the logits are bit-equal. Not wired into
the indexer: this measures the lever before the store format changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from indexer.index import Index
from qformer.factory import create_model
from qformer.malloc import keep_freed_memory

TEXTS = ["a dog runs through the grass", "two children playing on the beach", "a man riding a bike",
         "a woman in a red dress"]


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="out/bench_ui/index")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--work", default="out/proto_kv")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    idx = Index.open(args.index)
    src = idx.manifest["model"].get("source") or idx.manifest["model"]["name"]
    model = create_model(src)
    itm = model.itm_encoder("auto")
    n = min(args.images, len(idx))
    ids_all = idx.image_ids()[:n]
    with torch.inference_mode():
        probe = itm.image_kv(idx.features(ids_all[:1], itm.ln_vision.weight.dtype))
    layers, (_, heads, tokens, head_dim) = len(probe), probe[0][0].shape
    width = heads * head_dim
    Path(args.work).mkdir(parents=True, exist_ok=True)
    path = Path(args.work) / "kv.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n, layers, 2, tokens, width))
    with torch.inference_mode():
        for i in range(0, n, 128):
            kv = itm.image_kv(idx.features(ids_all[i : i + 128], itm.ln_vision.weight.dtype))
            arr = torch.stack([torch.stack([k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], 1)
                               for k, v in kv], 1)  # [b,layers,2,N,H]
            mm[i : i + 128] = arr.contiguous().view(torch.int16).numpy().view(np.uint16)
    mm.flush()
    del mm
    stored = np.load(path, mmap_mode="r")

    def read_kv(pos: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = torch.from_numpy(np.ascontiguousarray(stored[pos]).view(np.int16)).view(torch.bfloat16)
        split = [a[:, i, j].unflatten(-1, (heads, -1)).transpose(1, 2) for i in range(layers) for j in (0, 1)]
        return list(zip(split[0::2], split[1::2], strict=True))

    def from_tokens(pos: np.ndarray, text: str) -> torch.Tensor:
        ids, mask = model.tokenize([text])
        with torch.inference_mode():
            kv = itm.image_kv(idx.features(ids_all[pos], itm.ln_vision.weight.dtype))
            return itm.itm_match_logit(kv, ids.expand(len(pos), -1), mask.expand(len(pos), -1))

    def from_kv(pos: np.ndarray, text: str) -> torch.Tensor:
        ids, mask = model.tokenize([text])
        with torch.inference_mode():
            return itm.itm_match_logit(read_kv(pos), ids.expand(len(pos), -1), mask.expand(len(pos), -1))

    rng = np.random.default_rng(args.seed)
    first = np.sort(rng.choice(n, min(128, n), replace=False))
    equal = all(torch.equal(from_tokens(first, t), from_kv(first, t)) for t in TEXTS)
    times: dict[str, list[float]] = {"tokens": [], "kv": []}
    for r in range(args.pairs):
        pos, text = np.sort(rng.choice(n, min(128, n), replace=False)), TEXTS[r % len(TEXTS)]
        order = (("tokens", from_tokens), ("kv", from_kv)) if r % 2 == 0 else (("kv", from_kv), ("tokens", from_tokens))
        for name, f in order:
            t0 = time.perf_counter()
            f(pos, text)
            times[name].append(time.perf_counter() - t0)
    saving = np.array(times["tokens"]) - np.array(times["kv"])
    print(json.dumps({"images": n, "pairs": args.pairs, "logits_bit_equal": equal,
                      "kv_bytes_per_image": int(np.prod(stored.shape[1:])) * 2,
                      "token_bytes_per_image": int(np.prod(idx.manifest["token_shape"])) * 2,
                      "tokens_p50_ms": round(1e3 * float(np.median(times["tokens"])), 1),
                      "kv_p50_ms": round(1e3 * float(np.median(times["kv"])), 1),
                      "paired_saving_median_ms": round(1e3 * float(np.median(saving)), 1),
                      "kv_faster_fraction": round(float(np.mean(saving > 0)), 2)}, indent=1))


if __name__ == "__main__":
    main()
