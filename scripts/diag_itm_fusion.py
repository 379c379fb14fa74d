"""Is the ITM head a better ranker of ITC's top k than ITC itself? Flickr8k dev, both directions.

    python scripts/diag_itm_fusion.py --model blip2-tiny --k 8 --out out/itm_diag_v5.json

Rows: ITC alone; ITC+ITM (the paper's score, what search uses); ITM alone inside the top k; and w*ITM + ITC
for a few weights w, a diagnostic only (search keeps the paper's unweighted sum). Entries outside the top k
keep the benchmark's -100, so R@K for K > k is ITC's R@k in every re-ranked row. Also the spread (std) of
the ITM logits and of the ITC cosines over the re-ranked pairs: the sum follows whichever varies more.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qformer.config import DEFAULT_MODEL
from qformer.datasets import load_retrieval_set
from qformer.evaluate import embed_dataset, make_itm_fn
from qformer.factory import create_model
from qformer.malloc import keep_freed_memory
from qformer.retrieval import itc_similarity, recall_at_k, rerank_with_itm

WEIGHTS = (0.01, 0.03, 0.1, 0.3)


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/flickr8k")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--k", type=int, default=8, help="ITC candidates re-ranked per query")
    ap.add_argument("--out")
    args = ap.parse_args()
    data = load_retrieval_set("flickr8k", Path(args.root), args.split)
    model = create_model(args.model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        emb = embed_dataset(model, data, 64, num_workers=2, progress=False, image_precision="auto")
        itc = itc_similarity(emb.image_embeds.float(), emb.text_embeds.float())  # [Ni,Nt]
        i2t, t2i = rerank_with_itm(itc, make_itm_fn(model, emb, precision="auto"), k=args.k, batch_size=128)

    def recall(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return recall_at_k(a, b, data.img2txt, data.txt2img)

    top_i, top_t = i2t > -100, t2i > -100  # the re-ranked pairs
    itm_i = torch.where(top_i, i2t - itc, i2t)  # ITM logit alone on the re-ranked pairs, -100 elsewhere
    itm_t = torch.where(top_t, t2i - itc.t(), t2i)
    out: dict = {"model": model.name, "k": args.k, "itc": recall(itc, itc.t()), "itc+itm": recall(i2t, t2i),
                 "itm_only_in_topk": recall(itm_i, itm_t)}
    for w in WEIGHTS:
        out[f"{w}*itm+itc"] = recall(torch.where(top_i, w * itm_i + itc, i2t), torch.where(top_t, w * itm_t + itc.t(), t2i))
    out["std_in_topk_t2i"] = {"itm_logit": float(itm_t[top_t].std()), "itc_cosine": float(itc.t()[top_t].std())}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
