"""Q-Former behaviour: MiniLM initialisation, the three attention masks, the public task functions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from qformer.config import MINILM_L6, QFormerConfig
from qformer.factory import minilm_qformer
from qformer.model import QFormer, attention_mask
from qformer.recall import itc_similarity
from qformer.tokenizer import load_tokenizer, minilm_dir, tokenize

SMALL = QFormerConfig(vocab_size=200, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                      max_position_embeddings=40, encoder_width=48, num_query_tokens=6, embed_dim=16)


@pytest.fixture(scope="module")
def small() -> QFormer:
    torch.manual_seed(0)
    return QFormer(SMALL).eval()


def rand_text(b=3, length=9, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_minilm_text_path_reproduces_minilm():
    tok = load_tokenizer()
    texts = ["a dog runs across the grass .", "two children play football on a sunny beach", "cat"]
    ids, mask = tokenize(tok, texts)
    bert = AutoModel.from_pretrained(str(minilm_dir())).eval()
    qformer = minilm_qformer(MINILM_L6)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = qformer.encode(ids, mask)
    real = mask.bool()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)


def test_tokenizer_has_dec_bos():
    tok = load_tokenizer()
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == MINILM_L6.bos_token_id == 30522
    assert len(tok) == MINILM_L6.vocab_size


def test_mask_shapes_and_rules():
    text_mask = torch.tensor([[1, 1, 0]])
    uni = attention_mask("unimodal", 2, text_mask)[0, 0]
    bi = attention_mask("bidirectional", 2, text_mask)[0, 0]
    causal = attention_mask("causal", 2, text_mask)[0, 0]
    assert uni.shape == (5, 5)
    expected_uni = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    expected_bi = torch.tensor([[1, 1, 1, 1, 0]] * 5)
    expected_causal = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert torch.equal(uni.int(), expected_uni)
    assert torch.equal(bi.int(), expected_bi)
    assert torch.equal(causal.int(), expected_causal)


def test_unimodal_joint_pass_equals_separate_itc_passes(small):
    image = torch.randn(3, 10, SMALL.encoder_width)
    ids, mask = rand_text()
    with torch.no_grad():
        kv = small.image_kv(image)
        joint = small.encode(ids, mask, kv=kv, mask_kind="unimodal")
        queries_alone = small.encode(kv=kv)
        text_alone = small.encode(ids, mask)
    q = SMALL.num_query_tokens
    torch.testing.assert_close(joint[:, :q], queries_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(joint[:, q:][mask.bool()], text_alone[mask.bool()], atol=1e-5, rtol=0)


def test_causal_mask_queries_ignore_text_and_text_ignores_future(small):
    image = torch.randn(1, 10, SMALL.encoder_width)
    ids, mask = rand_text(b=1)
    mask[:] = 1
    changed = ids.clone()
    changed[0, 6:] = 7  # change only the future of position 5
    with torch.no_grad():
        a = small.encode(ids, mask, kv=small.image_kv(image), mask_kind="causal")
        b = small.encode(changed, mask, kv=small.image_kv(image), mask_kind="causal")
        c = small.encode(ids, mask, kv=small.image_kv(image), mask_kind="bidirectional")
        d = small.encode(changed, mask, kv=small.image_kv(image), mask_kind="bidirectional")
    q = SMALL.num_query_tokens
    torch.testing.assert_close(a[:, : q + 6], b[:, : q + 6], atol=1e-6, rtol=0)
    assert (a[:, q + 6 :] - b[:, q + 6 :]).abs().max() > 1e-3
    assert (c[:, :q] - d[:, :q]).abs().max() > 1e-3  # ITM queries do see the text


def test_public_functions_shapes_and_normalisation(small):
    image = torch.randn(2, 10, SMALL.encoder_width)
    ids, mask = rand_text()
    with torch.no_grad():
        img = small.encode_image(image)
        txt = small.encode_text(ids, mask)
        sim = itc_similarity(img, txt)
        itm = small.itm_logits(image[[0, 1, 0]], ids, mask)
        match = small.itm_match_logit(small.image_kv(image[:1]), ids, mask)
        itg = small.itg_logits(image[[0, 1, 0]], ids, mask)
    assert img.shape == (2, SMALL.num_query_tokens, SMALL.embed_dim)
    assert txt.shape == (3, SMALL.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2, SMALL.num_query_tokens))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    naive = torch.stack([torch.stack([(img[i] @ txt[t]).max() for t in range(3)]) for i in range(2)])
    torch.testing.assert_close(sim, naive)
    assert itm.shape == (3, 2) and match.shape == (3,)
    torch.testing.assert_close(match[0], itm[0, 1], atol=1e-5, rtol=0)
    assert itg.shape == (3, ids.shape[1], SMALL.vocab_size)


def test_padding_does_not_change_outputs(small):
    image = torch.randn(1, 10, SMALL.encoder_width)
    ids, mask = rand_text(b=1, length=6)
    mask[:] = 1
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)], 1)
    with torch.no_grad():
        torch.testing.assert_close(small.encode_text(ids, mask), small.encode_text(padded, pmask), atol=1e-6, rtol=0)
        torch.testing.assert_close(small.itm_logits(image, ids, mask), small.itm_logits(image, padded, pmask),
                                   atol=1e-6, rtol=0)


def test_one_text_against_many_images_shares_the_first_self_attention_exactly(small):
    images = torch.randn(5, 10, SMALL.encoder_width)
    ids, mask = rand_text(b=1, length=7)
    rows_seen: list[int] = []
    hook = small.layers[0].attn.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        with torch.no_grad():
            batched = small.itm_logits(small.image_kv(images), ids.expand(5, -1), mask.expand(5, -1))  # [5,2]
            rows_seen_batched, rows_seen[:] = list(rows_seen), []
            one_by_one = torch.cat([small.itm_logits(images[i : i + 1], ids, mask) for i in range(5)])
            two_texts = small.itm_logits(small.image_kv(images[:2]), torch.cat([ids, ids.flip(1)]),
                                         mask.expand(2, -1))
    finally:
        hook.remove()
    assert rows_seen_batched == [1]  # the shared pass ran on one row ...
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)  # ... and changed nothing
    assert rows_seen[-1] == 2 and not torch.equal(two_texts[0], two_texts[1])  # different texts: no sharing


def test_itm_skips_the_last_layers_text_outputs_and_changes_nothing(small):
    images = torch.randn(3, 10, SMALL.encoder_width)
    ids, mask = rand_text(b=3)
    with torch.no_grad():
        itm = small.itm_logits(images, ids, mask)
        full = small.encode(ids, mask, kv=small.image_kv(images))  # every position through every layer
        reference = small.itm_head(full[:, : SMALL.num_query_tokens]).mean(1)
    assert full.shape[1] > SMALL.num_query_tokens
    torch.testing.assert_close(itm, reference, atol=1e-6, rtol=0)


def test_bf16_autocast_keeps_itm_and_itc_close_and_the_heads_in_fp32(small):
    images = torch.randn(4, 10, SMALL.encoder_width)
    ids, mask = rand_text(b=4)
    with torch.no_grad():
        ref_itm, ref_img, ref_txt = small.itm_logits(images, ids, mask), small.encode_image(images), small.encode_text(
            ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            itm, img, txt = small.itm_logits(images, ids, mask), small.encode_image(images), small.encode_text(ids, mask)
    assert itm.dtype == img.dtype == txt.dtype == torch.float32  # heads and normalisation outside autocast
    assert not torch.equal(itm, ref_itm)  # bf16 really ran
    torch.testing.assert_close(itm, ref_itm, atol=0.05 * float(ref_itm.std()) + 1e-3, rtol=0)
    assert float((img * ref_img).sum(-1).min()) > 0.999 and float((txt * ref_txt).sum(-1).min()) > 0.999


def test_config_round_trip():
    assert QFormerConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown"):
        QFormerConfig.from_dict({**SMALL.to_dict(), "nope": 1})


def test_compact_checkpoint_is_smaller_and_scores_alike(small_model_dir, tmp_path):
    """save_pretrained(compact=True): int8 matrices + fp16, under a third of the fp32 size, same rankings."""
    from qformer.factory import create_model

    model = create_model(small_model_dir)
    compact = create_model(model.save_pretrained(tmp_path / "compact", compact=True))
    full_size = (small_model_dir / "qformer.safetensors").stat().st_size
    assert (tmp_path / "compact" / "qformer.safetensors").stat().st_size < full_size / 3
    torch.manual_seed(1)
    tokens = torch.randn(6, 49, 1280)
    texts = ["a dog on the grass", "a red car", "two people walking", "a cat", "a boat at sea", "snow"]
    with torch.inference_mode():
        sims = [itc_similarity(m.qformer.encode_image(tokens), m.embed_texts(texts)) for m in (model, compact)]
    assert (sims[0] - sims[1]).abs().max() < 0.02
    assert torch.equal(sims[0].argmax(1), sims[1].argmax(1))


def test_saved_checkpoint_files_have_the_usual_permissions(small_model_dir, tmp_path):
    """save_pretrained writes whole files that others may read as the umask allows (safetensors' own save_file
    would leave the weights readable by their owner only, e.g. unusable from a shared model directory)."""
    import os

    from qformer.factory import create_model

    old = os.umask(0o022)
    try:
        d = create_model(small_model_dir).save_pretrained(tmp_path / "m", compact=True)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in d.iterdir() if f.is_file()}
    assert modes == {"qformer.safetensors": 0o644, "qsearch.json": 0o644}, modes


def test_bf16_itm_copy_on_cpu_fuses_the_bias_into_onednn_and_gives_the_same_bits(small_model_dir):
    import copy

    from qformer.factory import create_model
    from qformer.packed import OneDnnBf16Linear, onednn_linear_available
    from qformer.precision import cpu_bf16_native

    if not (onednn_linear_available() and cpu_bf16_native()):
        pytest.skip("no oneDNN linear or no native bf16 here: the bf16 copy keeps nn.Linear")
    model = create_model(small_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # a random model's biases are zero: make them count
        for m in model.qformer.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.5)
    fused = model.itm_encoder("bf16")
    assert sum(isinstance(m, OneDnnBf16Linear) for m in fused.modules()) > 10
    plain = copy.deepcopy(model.qformer).eval()
    plain.to(torch.bfloat16).itm_head.float()  # the copy as nn.Linear layers would compute it
    torch.manual_seed(0)
    tokens = torch.randn(6, 9, model.qformer.config.encoder_width).bfloat16()
    ids, mask = model.tokenize(["a dog on the grass"])
    with torch.inference_mode():
        got, ref = (q.itm_match_logit(q.image_kv(tokens), ids.expand(6, -1), mask.expand(6, -1))
                    for q in (fused, plain))
    assert torch.equal(got, ref) and ref.std() > 0


def test_bf16_itm_encoder_is_a_bf16_copy_that_follows_weight_changes(small_model_dir):
    """ITM re-ranking in bf16 runs a bf16 copy of the Q-Former (no autocast): close to fp32, its ITM head in
    fp32, rebuilt when the weights change, never in the state dict; fp32 runs the Q-Former itself."""
    from qformer.factory import create_model

    model = create_model(small_model_dir)
    assert model.itm_encoder("fp32") is model.qformer
    itm = model.itm_encoder("bf16")
    assert itm.ln_vision.weight.dtype == torch.bfloat16 and itm.itm_head.weight.dtype == torch.float32
    assert model.itm_encoder("bf16") is itm and not itm.training
    torch.manual_seed(0)
    tokens = torch.randn(6, 9, model.qformer.config.encoder_width)
    ids, mask = model.tokenize(["a dog on the grass"])

    def logits(q: QFormer) -> torch.Tensor:
        with torch.inference_mode():
            kv = q.image_kv(tokens.to(q.ln_vision.weight.dtype))
            return q.itm_match_logit(kv, ids.expand(6, -1), mask.expand(6, -1))

    ref, got = logits(model.qformer), logits(itm)
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.05 * (ref.max() - ref.min()) + 1e-2
    keys = set(model.state_dict())
    with torch.no_grad():
        model.qformer.itm_head.bias.add_(1.0)
    assert model.itm_encoder("bf16") is not itm
    assert (logits(model.itm_encoder("bf16")) - got).mean() == pytest.approx(1.0, abs=0.02)
    assert set(model.state_dict()) == keys


def test_cpu_text_embeddings_use_packed_fp16_weights_and_follow_weight_changes(small_model_dir):
    """On CPU, embed_texts runs the text path with fbgemm-packed fp16 weights (qformer/packed.py): within
    2e-4 of the fp32 Q-Former, rebuilt when the weights change, and never part of the state dict."""
    from qformer.factory import create_model
    from qformer.packed import packed_fp16_available

    if not packed_fp16_available():
        pytest.skip("this torch build has no fbgemm fp16 linear")
    model = create_model(small_model_dir)
    texts = ["a dog on the grass", "a red car parked by a house", "two people walking"]
    ids, mask = model.tokenize(texts)

    def fp32() -> torch.Tensor:
        with torch.inference_mode():
            return model.qformer.encode_text(ids, mask)

    got = model.embed_texts(texts)
    assert model.text_encoder() is not model.qformer
    assert (got - fp32()).abs().max() < 2e-4
    keys = set(model.state_dict())
    with torch.no_grad():  # as an optimiser step or load_state_dict would
        model.qformer.layers[0].ffn_text.fc1.weight.mul_(3.0)
    changed = model.embed_texts(texts)
    assert (changed - got).abs().max() > 1e-3
    assert (changed - fp32()).abs().max() < 2e-4
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("kind", ["unimodal", "bidirectional", "causal"])
def test_cpu_attention_matches_sdpa_under_every_mask(kind):
    # bf16 inference on CPU computes attention itself (two products around a softmax); it must agree with
    # torch's fp32 attention to bf16 rounding under each mask, with padded keys never attended
    import torch.nn.functional as F

    from qformer.model import cpu_attention

    torch.manual_seed(0)
    ids, text_mask = rand_text()
    mask = attention_mask(kind, 6, text_mask)  # [3,1,15,15]
    q, k, v = (2 * torch.randn(3, 4, 15, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.08, rtol=0.02)
    unmasked = F.scaled_dot_product_attention(q, k, v)
    assert (unmasked - ref).abs().max() > 0.5  # the mask matters at this size, so the comparison can fail
    assert torch.equal(cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None),
                       cpu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.ones_like(mask)))


def test_dropout_drops_p_scales_the_rest_and_follows_the_seed():
    # the CPU dropout of training (a cheaper mask than F.dropout's): same law, same gradient, seeded by torch
    from qformer.model import cpu_attention, dropout

    x = torch.randn(64, 12, 50, 50, requires_grad=True)
    torch.manual_seed(1)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002  # 1.5M draws: the drop rate is 0.1
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    # independent elements, also the four that share one 64-bit random word: P(>= 2 of 4 dropped) = 0.0523
    two_or_more = ((~kept).reshape(-1, 4).sum(dim=1) >= 2).float().mean().item()
    assert abs(two_or_more - (1 - 0.9**4 - 4 * 0.1 * 0.9**3)) < 0.003
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.1, True), y)  # resume replays the same masks
    assert not torch.equal(dropout(x, 0.1, True), y)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    # attention dropout: each row of probabilities keeps its mass in expectation (dropped, the rest scaled)
    q, k, v = torch.randn(2, 4, 30, 16), torch.randn(2, 4, 30, 16), torch.ones(2, 4, 30, 16)
    mass = cpu_attention(q, k, v, None, 0.1)[..., 0]  # v = 1: each output is the row's kept probability mass
    assert abs(mass.mean().item() - 1) < 0.05 and mass.std().item() > 0.01 and mass.max() <= 1 / 0.9 + 1e-5
    torch.testing.assert_close(cpu_attention(q, k, v, None, 0.0)[..., 0], torch.ones(2, 4, 30))
