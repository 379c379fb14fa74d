"""Benchmark: qsearch's Q-Former against transformers' Blip2ForImageTextRetrieval on the same weights.

BERT-base-size Q-Former (random weights) on ViT-g-size image features ([B,257,1408], random), both
implementations fed the same features (transformers' own forward would re-run the ViT every call).

Measures
- query-embedding throughput (images/s): features -> normalised ITC query embeddings [B,32,256];
- ITM of 128 pairs: one image against 128 captions (i2t re-ranking), and one caption against 128 images
  (t2i re-ranking), each checked for identical outputs.

    python scripts/bench_qformer.py                      # CPU fp32
    python scripts/bench_qformer.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from qformer import checkpoints as ckpt
from qformer.malloc import keep_freed_memory
from qformer.model import QFormer
from qformer.tokenizer import load_tokenizer, tokenize

CAPTIONS = [
    "a dog runs across the grass", "two children play football on a sunny beach",
    "a man in a red jacket climbs a steep rock face", "a woman rides a bicycle down a city street at night",
    "a group of people stand outside a building", "a black and white dog jumps to catch a frisbee",
    "a little girl in a pink dress is climbing up a set of stairs in an entry way",
    "a surfer rides a large wave",
]


def build(device: str, dtype: torch.dtype) -> tuple[Blip2ForImageTextRetrieval, QFormer]:
    torch.manual_seed(0)
    vision = dict(hidden_size=1408, num_hidden_layers=1, num_attention_heads=16, intermediate_size=64,
                  image_size=28, patch_size=14)  # the ViT itself is not run: features are given
    qformer = dict(use_qformer_text_input=True, vocab_size=30523, encoder_hidden_size=1408)
    hf = Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision, qformer_config=qformer,
                                                num_query_tokens=32, image_text_hidden_size=256)).eval()
    with torch.no_grad():
        hf.query_tokens.normal_(0, 0.02)
    config = ckpt.qformer_config_from_hf(hf.config.to_dict())
    q_state, _ = ckpt.split_hf_state_dict(hf.state_dict(), config)
    ours = QFormer(config).eval()
    ours.load_state_dict(q_state, strict=False)
    return hf.to(device, dtype), ours.to(device, dtype)


def hf_query_embeds(hf: Blip2ForImageTextRetrieval, feats: torch.Tensor) -> torch.Tensor:
    image = hf.vision_model.post_layernorm(feats)
    q = hf.query_tokens.expand(feats.shape[0], -1, -1)
    ones = torch.ones(image.shape[:-1], dtype=torch.long, device=feats.device)
    h = hf.qformer(query_embeds=q, encoder_hidden_states=image, encoder_attention_mask=ones).last_hidden_state
    return F.normalize(hf.vision_projection(h), dim=-1)


def hf_itm(hf: Blip2ForImageTextRetrieval, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exactly Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=True) after the ViT."""
    image = hf.vision_model.post_layernorm(feats)
    q = hf.query_tokens.expand(feats.shape[0], -1, -1)
    att = torch.cat([torch.ones(q.shape[:-1], dtype=mask.dtype, device=mask.device), mask], dim=1)
    ones = torch.ones(image.shape[:-1], dtype=torch.long, device=feats.device)
    x = hf.embeddings(input_ids=ids, query_embeds=q)
    h = hf.qformer(query_embeds=x, query_length=q.shape[1], attention_mask=att, encoder_hidden_states=image,
                   encoder_attention_mask=ones).last_hidden_state
    return hf.itm_head(h[:, : q.shape[1]]).mean(dim=1)[:, 1]


def timeit(fn, repeats: int, device: str) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    keep_freed_memory()  # as the qsearch CLI and the UI do
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--images", type=int, default=32, help="batch for the query-embedding throughput")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    ap.add_argument("--out", help="write results as JSON")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    hf, ours = build(args.device, dtype)
    hf.set_attn_implementation(args.attn)
    tok = load_tokenizer()
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.pairs)]
    ids, mask = tokenize(tok, texts)
    ids = F.pad(ids, (0, 35 - ids.shape[1])).to(args.device)  # LAVIS evaluation pads to 35 tokens
    mask = F.pad(mask, (0, 35 - mask.shape[1])).to(args.device)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(max(args.images, args.pairs), 257, 1408, generator=g).to(args.device, dtype)
    res: dict[str, object] = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                              "transformers_attn": args.attn}
    with torch.inference_mode():
        x = feats[: args.images]
        t_hf, e_hf = timeit(lambda: hf_query_embeds(hf, x), args.repeats, args.device)
        t_us, e_us = timeit(lambda: ours.encode_image(x), args.repeats, args.device)
        res["query_embeds"] = {"images": args.images, "hf_images_per_s": args.images / t_hf,
                               "ours_images_per_s": args.images / t_us, "speedup": t_hf / t_us,
                               "max_abs_diff": float((e_hf.float() - e_us.float()).abs().max())}
        one = feats[:1]
        t_hf, m_hf = timeit(lambda: hf_itm(hf, one.expand(args.pairs, -1, -1), ids, mask), args.repeats, args.device)
        t_us, m_us = timeit(lambda: ours.itm_match_logit(ours.image_kv(one), ids, mask), args.repeats, args.device)
        res["itm_i2t"] = {"pairs": args.pairs, "hf_ms": 1e3 * t_hf, "ours_ms": 1e3 * t_us, "speedup": t_hf / t_us,
                          "max_abs_diff": float((m_hf.float() - m_us.float()).abs().max())}
        many = feats[: args.pairs]
        one_text_ids, one_text_mask = ids[:1].expand(args.pairs, -1), mask[:1].expand(args.pairs, -1)
        t_hf, m_hf = timeit(lambda: hf_itm(hf, many, one_text_ids, one_text_mask), args.repeats, args.device)
        t_us, m_us = timeit(lambda: ours.itm_match_logit(many, one_text_ids, one_text_mask), args.repeats, args.device)
        res["itm_t2i"] = {"pairs": args.pairs, "hf_ms": 1e3 * t_hf, "ours_ms": 1e3 * t_us, "speedup": t_hf / t_us,
                          "max_abs_diff": float((m_hf.float() - m_us.float()).abs().max())}
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
