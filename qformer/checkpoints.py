"""Reading and writing Q-Former weights: transformers `Blip2ForImageTextRetrieval`, LAVIS `.pth` state
dicts, MiniLM/BERT initialisation, and qsearch's own directory format (JSON config + safetensors).

Nothing here executes pickled code: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from qformer.config import QFormerConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ---- safe writing and reading -----------------------------------------------------------------------
def write_safetensors(tensors: dict[str, Tensor], path: str | Path) -> None:
    """Write tensors as a .safetensors file, whole or not at all (a temporary file renamed into place), with
    the permissions of any new file (safetensors' own save_file creates it readable by its owner only)."""
    path = Path(path)
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---- safe reading ------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt/.bin file read with weights_only=True (a LAVIS
    checkpoint's {"model": ...} wrapper is unwrapped). Anything else is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{path}: refused to load. Only plain tensor state dicts are read (torch.load with "
                f"weights_only=True); this file is corrupt or contains pickled code/objects ({e})"
            ) from e
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors")
        return dict(obj)
    raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r} (use .safetensors or .pth)")


# ---- key tables ----------------------------------------------------------------------------------------
# Per-layer names: ours -> suffixes under the layer prefix, the same in transformers and LAVIS.
_FFN_TEXT = {"fc1": "intermediate.dense", "fc2": "output.dense", "norm": "output.LayerNorm"}
_FFN_QUERY = {"fc1": "intermediate_query.dense", "fc2": "output_query.dense", "norm": "output_query.LayerNorm"}


def qformer_key_table(config: QFormerConfig, style: str) -> dict[str, str]:
    """Map each of our Q-Former parameter names to its name in a transformers ("hf") or LAVIS ("lavis")
    checkpoint. The ITG head and `temp` exist only in LAVIS."""
    if style not in ("hf", "lavis"):
        raise ValueError(f"unknown key style {style!r}")
    hf = style == "hf"
    enc = "qformer.encoder.layer" if hf else "Qformer.bert.encoder.layer"
    emb = "embeddings" if hf else "Qformer.bert.embeddings"
    inner = "attention" if hf else "self"  # transformers: attention.attention.query; LAVIS: attention.self.query
    attn = {"query": f"{inner}.query", "key": f"{inner}.key", "value": f"{inner}.value",
            "out": "output.dense", "norm": "output.LayerNorm"}
    table: dict[str, str] = {
        "query_tokens": "query_tokens",
        "ln_vision.weight": "vision_model.post_layernorm.weight" if hf else "ln_vision.weight",
        "ln_vision.bias": "vision_model.post_layernorm.bias" if hf else "ln_vision.bias",
        "embeddings.word.weight": f"{emb}.word_embeddings.weight",
        "embeddings.position.weight": f"{emb}.position_embeddings.weight",
        "embeddings.norm.weight": "qformer.layernorm.weight" if hf else f"{emb}.LayerNorm.weight",
        "embeddings.norm.bias": "qformer.layernorm.bias" if hf else f"{emb}.LayerNorm.bias",
    }
    for head, (hf_name, lavis_name) in {"vision_proj": ("vision_projection", "vision_proj"),
                                        "text_proj": ("text_projection", "text_proj"),
                                        "itm_head": ("itm_head", "itm_head")}.items():
        for p in ("weight", "bias"):
            table[f"{head}.{p}"] = f"{hf_name if hf else lavis_name}.{p}"
    cross = set(config.cross_layers)
    for i in range(config.num_layers):
        blocks = [("attn", "attention")] + ([("cross", "crossattention")] if i in cross else [])
        for ours, theirs in blocks:
            for o, t in attn.items():
                for p in ("weight", "bias"):
                    table[f"layers.{i}.{ours}.{o}.{p}"] = f"{enc}.{i}.{theirs}.{t}.{p}"
        for ours, names in (("ffn_text", _FFN_TEXT), ("ffn_query", _FFN_QUERY)):
            for o, t in names.items():
                for p in ("weight", "bias"):
                    table[f"layers.{i}.{ours}.{o}.{p}"] = f"{enc}.{i}.{t}.{p}"
    if not hf:
        table.update({
            "lm_head.dense.weight": "Qformer.cls.predictions.transform.dense.weight",
            "lm_head.dense.bias": "Qformer.cls.predictions.transform.dense.bias",
            "lm_head.norm.weight": "Qformer.cls.predictions.transform.LayerNorm.weight",
            "lm_head.norm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
            "lm_head.bias": "Qformer.cls.predictions.bias",
            "temp": "temp",
        })
    return table


def eva_key_table(num_layers: int) -> dict[str, str]:
    """LAVIS EVA ViT (`visual_encoder.*`) names -> transformers `Blip2VisionModel` names. The split
    q_bias/v_bias are folded into qkv.bias separately (`fold_qv_bias`)."""
    table = {
        "visual_encoder.cls_token": "embeddings.class_embedding",
        "visual_encoder.pos_embed": "embeddings.position_embedding",
        "visual_encoder.patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "visual_encoder.patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    for i in range(num_layers):
        a, b = f"visual_encoder.blocks.{i}", f"encoder.layers.{i}"
        for p in ("weight", "bias"):
            table[f"{a}.norm1.{p}"] = f"{b}.layer_norm1.{p}"
            table[f"{a}.norm2.{p}"] = f"{b}.layer_norm2.{p}"
            table[f"{a}.attn.proj.{p}"] = f"{b}.self_attn.projection.{p}"
            table[f"{a}.mlp.fc1.{p}"] = f"{b}.mlp.fc1.{p}"
            table[f"{a}.mlp.fc2.{p}"] = f"{b}.mlp.fc2.{p}"
        table[f"{a}.attn.qkv.weight"] = f"{b}.self_attn.qkv.weight"
    return table


def _take(sd: dict[str, Tensor], table: dict[str, str], source: str, optional: set[str] = frozenset()):
    missing = [theirs for ours, theirs in table.items() if theirs not in sd and ours not in optional]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} expected keys, e.g. {missing[:5]}")
    return {ours: sd[theirs] for ours, theirs in table.items() if theirs in sd}


# ---- transformers Blip2ForImageTextRetrieval -------------------------------------------------------
def qformer_config_from_hf(blip2: dict[str, Any]) -> QFormerConfig:
    """Our config from a transformers `Blip2Config` dict (config.json)."""
    q, v = blip2["qformer_config"], blip2["vision_config"]
    if not q.get("use_qformer_text_input", False):
        raise CheckpointError("this BLIP-2 checkpoint's Q-Former has no text path (use_qformer_text_input is "
                              "false): it is a stage-2/captioning model, not an image-text retrieval one")
    if q.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported Q-Former activation {q['hidden_act']!r}")
    return QFormerConfig(
        vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
        max_position_embeddings=q["max_position_embeddings"],
        cross_attention_freq=q["cross_attention_frequency"],
        encoder_width=q.get("encoder_hidden_size", v["hidden_size"]),
        num_query_tokens=blip2["num_query_tokens"], embed_dim=blip2.get("image_text_hidden_size", 256),
        layer_norm_eps=q["layer_norm_eps"], vision_layer_norm_eps=v["layer_norm_eps"],
        hidden_dropout=q["hidden_dropout_prob"], attention_dropout=q["attention_probs_dropout_prob"],
        pad_token_id=q.get("pad_token_id", 0) or 0, bos_token_id=q["vocab_size"] - 1,
    )


def split_hf_state_dict(sd: dict[str, Tensor], config: QFormerConfig, source: str = "checkpoint"):
    """A `Blip2ForImageTextRetrieval` state dict -> (our Q-Former state dict, Blip2VisionModel state dict)."""
    qformer = _take(sd, qformer_key_table(config, "hf"), source)
    vision = {k[len("vision_model."):]: t for k, t in sd.items()
              if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")}
    return qformer, vision


def to_hf_state_dict(qformer: dict[str, Tensor], vision: dict[str, Tensor], config: QFormerConfig):
    """Inverse of `split_hf_state_dict` (the ITG head and temp have no transformers counterpart)."""
    table = qformer_key_table(config, "hf")
    out = {theirs: qformer[ours] for ours, theirs in table.items()}
    out.update({f"vision_model.{k}": t for k, t in vision.items() if not k.startswith("post_layernorm.")})
    return out


# ---- LAVIS -----------------------------------------------------------------------------------------------
def fold_qv_bias(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """EVA attention keeps q_bias and v_bias (no k bias); transformers has one qkv bias = [q, 0, v]."""
    out = {}
    for i in range(num_layers):
        q = sd[f"visual_encoder.blocks.{i}.attn.q_bias"]
        v = sd[f"visual_encoder.blocks.{i}.attn.v_bias"]
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    return out


def lavis_vision_state_dict(sd: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """LAVIS `visual_encoder.*` (EVA ViT) -> Blip2VisionModel state dict; {} if the checkpoint has no
    visual encoder (LAVIS drops frozen weights when it saves)."""
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("visual_encoder.blocks.")}
    if not blocks:
        return {}
    n = max(blocks) + 1
    vision = _take(sd, {hf: lavis for lavis, hf in eva_key_table(n).items()}, source)
    vision.update(fold_qv_bias(sd, n))
    return vision


def to_lavis_state_dict(qformer: dict[str, Tensor], vision: dict[str, Tensor], config: QFormerConfig):
    """Our weights under LAVIS `Blip2Qformer` names (EVA visual encoder included when given)."""
    table = qformer_key_table(config, "lavis")
    out = {theirs: qformer[ours] for ours, theirs in table.items()}
    out["Qformer.cls.predictions.decoder.weight"] = qformer["embeddings.word.weight"]
    out["Qformer.cls.predictions.decoder.bias"] = qformer["lm_head.bias"]
    if vision:
        n = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        for lavis, hf in eva_key_table(n).items():
            out[lavis] = vision[hf]
        for i in range(n):
            qkv_bias = vision[f"encoder.layers.{i}.self_attn.qkv.bias"]
            q, k, v = qkv_bias.chunk(3)
            if k.abs().max() > 0:
                raise CheckpointError(f"layer {i}: EVA attention has no key bias, but it is non-zero")
            out[f"visual_encoder.blocks.{i}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{i}.attn.v_bias"] = v
    return out


def qformer_config_from_lavis(sd: dict[str, Tensor], num_heads: int | None = None) -> QFormerConfig:
    """Infer Q-Former sizes from LAVIS tensor shapes. Head count is not in the shapes: BERT's 64-wide
    heads are assumed unless num_heads is given."""
    p = "Qformer.bert."
    try:
        vocab, hidden = sd[p + "embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(p + "encoder.layer."))
        cross = sorted({int(k.split(".")[4]) for k in sd if ".crossattention." in k and k.startswith(p)})
        return QFormerConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers,
            num_heads=num_heads or hidden // 64,
            intermediate_size=sd[p + "encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            max_position_embeddings=sd[p + "embeddings.position_embeddings.weight"].shape[0],
            cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else layers,
            encoder_width=sd["ln_vision.weight"].shape[0],
            num_query_tokens=sd["query_tokens"].shape[1],
            embed_dim=sd["vision_proj.weight"].shape[0],
            bos_token_id=vocab - 1,
        )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a LAVIS Blip2Qformer state dict (missing or odd key: {e})") from e


def split_lavis_state_dict(sd: dict[str, Tensor], config: QFormerConfig, source: str = "checkpoint"):
    """A LAVIS `Blip2Qformer` state dict -> (our Q-Former state dict, Blip2VisionModel state dict or {})."""
    qformer = _take(sd, qformer_key_table(config, "lavis"), source, optional={"temp"})
    return qformer, lavis_vision_state_dict(sd, source)


# ---- BERT / MiniLM initialisation ---------------------------------------------------------------------
def qformer_state_from_bert(bert: dict[str, Tensor], config: QFormerConfig) -> dict[str, Tensor]:
    """Initialise from a BERT encoder (`BertModel` names): self-attention, text FFN and embeddings are
    copied; the query FFN starts as a copy of the text FFN; cross-attention and heads stay new.

    BERT adds token-type embedding 0 to every text token; the Q-Former has no token types, so that row
    is folded into the word embeddings (exact for single-segment text). The extra `[DEC]` row starts as
    the mean word embedding.
    """
    prefix = "bert." if any(k.startswith("bert.") for k in bert) else ""
    b = {k[len(prefix):]: t for k, t in bert.items() if k.startswith(prefix)}
    word = b["embeddings.word_embeddings.weight"] + b["embeddings.token_type_embeddings.weight"][0]
    if word.shape[0] > config.vocab_size:
        raise CheckpointError(f"BERT vocabulary {word.shape[0]} larger than config.vocab_size {config.vocab_size}")
    extra = config.vocab_size - word.shape[0]
    word = torch.cat([word, word.mean(0, keepdim=True).expand(extra, -1)]) if extra else word
    out = {
        "embeddings.word.weight": word,
        "embeddings.position.weight": b["embeddings.position_embeddings.weight"],
        "embeddings.norm.weight": b["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": b["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_layers):
        s = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for o, t in (("query", "attention.self.query"), ("key", "attention.self.key"),
                         ("value", "attention.self.value"), ("out", "attention.output.dense"),
                         ("norm", "attention.output.LayerNorm")):
                out[f"layers.{i}.attn.{o}.{p}"] = b[s + t + "." + p]
            for ffn in ("ffn_text", "ffn_query"):
                out[f"layers.{i}.{ffn}.fc1.{p}"] = b[s + "intermediate.dense." + p].clone()
                out[f"layers.{i}.{ffn}.fc2.{p}"] = b[s + "output.dense." + p].clone()
                out[f"layers.{i}.{ffn}.norm.{p}"] = b[s + "output.LayerNorm." + p].clone()
    return out


# ---- compact storage: int8 matrices (one scale per row), fp16 for the rest --------------------------------
INT8_SCALE = ".int8_scale"  # key suffix of the per-row scales [rows, 1] of an int8-stored matrix
INT8_MIN_ELEMENTS = 65_536  # smaller tensors (biases, norms, small projections) are kept in fp16


def compact_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Halve or quarter a state dict for release: every float matrix with >= INT8_MIN_ELEMENTS entries
    becomes int8 with a symmetric fp32 scale per row (key + INT8_SCALE); other float tensors become fp16.

    Row-wise (per output channel / per token) weight-only int8, dequantised to fp32 on load
    (`expand_state_dict`)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if not v.is_floating_point():
            out[k] = v
        elif v.ndim >= 2 and v.numel() >= INT8_MIN_ELEMENTS:
            w = v.float().reshape(v.shape[0], -1)
            scale = (w.abs().amax(1, keepdim=True) / 127.0).clamp_min(1e-12)  # [rows,1]
            out[k] = torch.round(w / scale).clamp(-127, 127).to(torch.int8).reshape(v.shape)
            out[k + INT8_SCALE] = scale
        else:
            out[k] = v.half()
    return out


def expand_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The fp32 state dict of a `compact_state_dict` (a plain state dict passes through, fp16 -> fp32)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE):
            continue
        scale = state.get(k + INT8_SCALE)
        if scale is not None:
            out[k] = (v.float().reshape(v.shape[0], -1) * scale.float()).reshape(v.shape)
        else:
            out[k] = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return out


# ---- qsearch's own format ----------------------------------------------------------------------------------
NATIVE_CONFIG = "qsearch.json"
NATIVE_WEIGHTS = "qformer.safetensors"
NATIVE_ENCODER_WEIGHTS = "encoder.safetensors"
FORMAT_VERSION = 1


def write_native(
    directory: str | Path,
    qformer_state: dict[str, Tensor],
    config: QFormerConfig,
    encoder_spec: dict[str, Any],
    encoder_state: dict[str, Tensor] | None = None,
    extra: dict[str, Any] | None = None,
    compact: bool = False,
) -> Path:
    """Write a qsearch checkpoint directory: qsearch.json + qformer.safetensors (+ encoder.safetensors
    when the frozen encoder is not reproducible from its spec). compact: Q-Former weights stored with
    `compact_state_dict` (int8 matrices + fp16), for releases."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if compact:
        qformer_state = compact_state_dict(qformer_state)
    write_safetensors(qformer_state, d / NATIVE_WEIGHTS)
    if encoder_state:
        write_safetensors(encoder_state, d / NATIVE_ENCODER_WEIGHTS)
    meta = {"format": "qsearch", "version": FORMAT_VERSION, "qformer": config.to_dict(),
            "encoder": encoder_spec, "encoder_weights": bool(encoder_state),
            "weights": "int8-rows+fp16" if compact else "fp32", **(extra or {})}
    (d / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def read_native(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None]:
    """(metadata, Q-Former state dict, encoder state dict or None) of a qsearch checkpoint directory."""
    d = Path(directory)
    try:
        meta = json.loads((d / NATIVE_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / NATIVE_CONFIG}: not a readable qsearch config ({e})") from e
    if meta.get("format") != "qsearch":
        raise CheckpointError(f"{d / NATIVE_CONFIG}: not a qsearch checkpoint")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{d}: written by a newer qsearch (format {meta['version']})")
    qformer = expand_state_dict(read_state_dict(d / NATIVE_WEIGHTS))
    encoder = read_state_dict(d / NATIVE_ENCODER_WEIGHTS) if meta.get("encoder_weights") else None
    return meta, qformer, encoder
