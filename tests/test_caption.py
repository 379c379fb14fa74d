"""The Q-Former ITG captioner: KV-cached decoding, greedy and beam search, length limits, the repetition guard,
training sanity; and the degenerate-caption count of the captioning benchmark."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer.captioner import is_degenerate
from qformer.config import QFormerConfig
from qformer.encoders import ImageEncoder
from qformer.factory import Blip2Retriever
from qformer.itg_decoder import ITGDecoder, caption_images, generate_captions, generate_token_ids
from qformer.model import QFormer
from qformer.tokenizer import load_tokenizer, tokenize

TINY = QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, num_query_tokens=4,
                     embed_dim=16, encoder_width=16, vocab_size=30523)
BOS, SEP, CLS = TINY.bos_token_id, 102, 101


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model() -> QFormer:
    """A random tiny Q-Former with larger-than-BERT weights, so that next-token distributions are peaked and
    depend on the image (with std 0.02 everything is near uniform and image-independent)."""
    torch.manual_seed(0)
    m = QFormer(TINY).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, mod.in_features**-0.5)
        m.embeddings.word.weight.normal_(0.0, 0.3)
        m.query_tokens.normal_(0.0, 1.0)
    return m


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(4, 5, TINY.encoder_width, generator=torch.Generator().manual_seed(1))  # [4,N,C]


def naive_greedy(m: QFormer, image: Tensor, max_length: int, min_length: int) -> list[int]:
    """Argmax loop re-running `itg_logits` on the whole growing sequence; image [1,N,C]."""
    ids = [BOS]
    while len(ids) < max_length:
        x = torch.tensor([ids])
        logits = m.itg_logits(image, x, torch.ones_like(x))[0, -1]  # [V]
        if len(ids) < min_length:
            logits[SEP] = -torch.inf
        ids.append(int(logits.argmax()))
        if ids[-1] == SEP:
            break
    return ids[1:]


def sequence_score(m: QFormer, image: Tensor, tokens: list[int]) -> float:
    """Length-normalised log-prob of the generated tokens after [DEC] (the beam search objective)."""
    ids = torch.tensor([[BOS, *tokens]])
    logp = F.log_softmax(m.itg_logits(image, ids[:, :-1], torch.ones_like(ids[:, :-1])), dim=-1)[0]  # [n,V]
    return float(logp.gather(1, ids[0, 1:, None]).sum()) / len(tokens)


def ends_early(m: QFormer) -> QFormer:
    """The model with a [SEP] bias that lets it compete with words: beams finish at different lengths."""
    m = copy.deepcopy(m)
    m.lm_head.bias[SEP] = 8.0
    return m


@torch.no_grad()
def test_kv_cache_matches_full_itg_logits(model, images):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 29000, (8, 9), generator=g)  # [R,L]: 2 rows per image
    ids[:, 0] = BOS
    rows_img = torch.arange(4).repeat_interleave(2)  # image of each row
    dec = ITGDecoder(model, images, rows_per_image=2, max_text=9)
    for t in range(4):
        logits = dec.step(ids[:, t])
        full = model.itg_logits(images[rows_img], ids[:, : t + 1], torch.ones_like(ids[:, : t + 1]))[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    # beam-style reorder within images, then dropping images 0 and 2: the cache follows its rows
    swap = torch.tensor([1, 0, 2, 2, 5, 4, 7, 6])
    ids[:, :4] = ids[swap, :4]
    dec.reorder(swap)
    keep = torch.tensor([2, 3, 6, 7])
    ids, rows_img = ids[keep], rows_img[keep]
    dec.keep(keep)
    for t in range(4, 9):
        logits = dec.step(ids[:, t])
        full = model.itg_logits(images[rows_img], ids[:, : t + 1], torch.ones_like(ids[:, : t + 1]))[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_equals_naive_argmax_loop(model, images):
    for m, max_length, min_length in ((model, 30, 10), (model, 12, 1), (ends_early(model), 30, 10)):
        got = generate_token_ids(m, images, SEP, num_beams=1, max_length=max_length, min_length=min_length)
        want = [naive_greedy(m, images[i : i + 1], max_length, min_length) for i in range(len(images))]
        assert got == want
        assert len({tuple(x) for x in got}) > 1, "captions should depend on the image"


@pytest.mark.parametrize("early", [False, True])
@torch.no_grad()
def test_beam_search_beats_greedy_and_is_batch_invariant(model, images, early):
    m = ends_early(model) if early else model
    beam = generate_token_ids(m, images, SEP, num_beams=3)
    greedy = generate_token_ids(m, images, SEP, num_beams=1)
    assert early == all(x[-1] == SEP for x in beam)
    beam_scores = [sequence_score(m, images[i : i + 1], b) for i, b in enumerate(beam)]
    greedy_scores = [sequence_score(m, images[i : i + 1], g) for i, g in enumerate(greedy)]
    assert all(b >= g - 1e-5 for b, g in zip(beam_scores, greedy_scores, strict=True))
    assert any(b > g + 1e-3 for b, g in zip(beam_scores, greedy_scores, strict=True)), "beam never helped"
    # images finishing at different steps leave the batch; the others' results must not change
    assert generate_token_ids(m, images[:3], SEP, num_beams=3) == beam[:3]
    assert [generate_token_ids(m, images[i : i + 1], SEP, num_beams=3)[0] for i in range(3)] == beam[:3]


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_min_and_max_length(model, images, num_beams):
    eager = copy.deepcopy(model)  # [SEP] as soon as it is allowed
    eager.lm_head.bias[SEP] = 50.0
    for min_length in (1, 5, 10):
        out = generate_token_ids(eager, images, SEP, num_beams, max_length=30, min_length=min_length)
        # [DEC] + (min_length - 1) word pieces + [SEP] = min_length + 1 tokens
        assert all(len(x) == max(min_length, 1) and x[-1] == SEP and SEP not in x[:-1] for x in out)
    never = copy.deepcopy(model)  # never [SEP]: stops at max_length tokens, [DEC] included
    never.lm_head.bias[SEP] = -50.0
    for max_length in (2, 7, 30):
        out = generate_token_ids(never, images, SEP, num_beams, max_length=max_length, min_length=1)
        assert all(len(x) == max_length - 1 and SEP not in x for x in out)
    out = generate_token_ids(model, images, SEP, num_beams, max_length=12, min_length=10)
    assert all(9 <= len(x) <= 11 and SEP not in x[:9] for x in out)


@torch.no_grad()
def test_captions_skip_special_tokens(model, images, tok):
    special = copy.deepcopy(model)  # prefers [CLS], then [DEC], over any word
    special.lm_head.bias[CLS] = 40.0
    special.lm_head.bias[BOS] = 39.0
    ids = generate_token_ids(special, images, SEP, num_beams=3, max_length=8)
    assert all(set(x) <= {CLS, BOS} for x in ids) and any(BOS in x for x in ids)
    assert generate_captions(special, images, tok, num_beams=3, max_length=8) == [""] * len(images)
    ids = generate_token_ids(model, images, SEP, num_beams=3)
    captions = generate_captions(model, images, tok)
    assert captions == tok.batch_decode(ids, skip_special_tokens=True)
    specials = ("[CLS]", "[SEP]", "[PAD]", "[DEC]", "[cls]", "[sep]", "[pad]", "[dec]")
    assert all(c and not any(sp in c for sp in specials) for c in captions)


class PatchEncoder(ImageEncoder):
    """A stand-in frozen tower: 8×8 pixels -> 4 patch tokens of width 16."""

    width, image_size, mean, std = 16, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, self.width, kernel_size=4, stride=4)
        self._freeze()

    def forward(self, pixels: Tensor) -> Tensor:  # [B,3,8,8] -> [B,4,16]
        return self.proj(pixels.to(self.dtype)).flatten(2).transpose(1, 2)


def test_caption_images_batches(model, tok):
    torch.manual_seed(3)
    retriever = Blip2Retriever(PatchEncoder(), model, tok)
    g = torch.Generator().manual_seed(4)
    pics = [PIL.Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(5)]
    got = caption_images(retriever, pics, batch_size=2, max_length=12)
    pixels = torch.stack([retriever.preprocess()(p) for p in pics])
    assert got == generate_captions(model, retriever.image_tokens(pixels), tok, max_length=12)
    assert len(got) == 5


def test_trained_decoder_captions_its_images(tok):
    """ITG-only training on two images with distinct captions: decoding must recover each image's caption,
    which it can only do by attending to the image (both start from the same [DEC])."""
    torch.manual_seed(0)
    m = QFormer(TINY)
    images = torch.randn(2, 5, TINY.encoder_width)  # [2,N,C]
    captions = ["a red square on a white wall", "two dogs run on the green grass"]
    ids, mask = tokenize(tok, captions)  # [CLS] ... [SEP] (pad)
    ids = ids.clone()
    ids[:, 0] = BOS
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [2,L-1]
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    m.train()
    for _ in range(100):  # the captions are reproduced from about step 40 on
        logits = m.itg_logits(images, ids, mask)  # [2,L,V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    m.eval()
    assert generate_captions(m, images, tok, num_beams=3, min_length=1) == captions
    assert generate_captions(m, images, tok, num_beams=1, min_length=1) == captions
    assert generate_captions(m, images.flip(0), tok, min_length=1) == captions[::-1]


@torch.no_grad()
def test_beam_search_matches_transformers_generate(model, images):
    """Same tokens as transformers' own beam search (length_penalty 1, early_stopping False) run on the
    full-recompute `itg_logits` with a [DEC] prompt, including beams that end early at [SEP]."""
    from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class ITGWrapper(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self, qformer: QFormer, image: Tensor):
            super().__init__(PretrainedConfig())
            self.qformer, self.image = qformer, image  # image [1,N,C]

        def forward(self, input_ids: Tensor, **kw) -> CausalLMOutput:  # input_ids [R,t] (R beams)
            image = self.image.expand(input_ids.shape[0], -1, -1)
            return CausalLMOutput(logits=self.qformer.itg_logits(image, input_ids, torch.ones_like(input_ids)))

        def prepare_inputs_for_generation(self, input_ids: Tensor, **kw) -> dict[str, Tensor]:
            return {"input_ids": input_ids}

    early = ends_early(model)
    for m, max_length, min_length, guard in ((model, 30, 10, 0), (early, 30, 10, 0), (early, 12, 1, 0),
                                             (model, 30, 10, 2), (early, 30, 10, 2)):
        ours = generate_token_ids(m, images, SEP, num_beams=3, max_length=max_length, min_length=min_length,
                                  no_repeat_ngram_size=guard)
        config = GenerationConfig(num_beams=3, do_sample=False, max_length=max_length, min_length=min_length,
                                  eos_token_id=SEP, pad_token_id=0, bos_token_id=BOS, use_cache=False,
                                  no_repeat_ngram_size=guard)
        for i, got in enumerate(ours):
            hf = ITGWrapper(m, images[i : i + 1]).eval().generate(torch.tensor([[BOS]]), generation_config=config)
            assert got == hf[0, 1:].tolist()


def has_repeated_ngram(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("num_beams", [1, 3])
@torch.no_grad()
def test_no_repeat_ngram_guard_on_crafted_logits(model, images, monkeypatch, num_beams):
    """Crafted logits that loop over three word pieces, a fresh fallback second best at each step: without
    the guard the caption loops; with n = 3 greedy takes the fallback exactly where a 3-gram would repeat."""
    cycle, fresh = [2000, 2001, 2002], list(range(3000, 3030))
    length, n = 12, 3

    def crafted_step(self: ITGDecoder, tokens: Tensor) -> Tensor:  # [R] -> [R,V]
        j = self.length
        self.length += 1
        logits = torch.zeros(len(tokens), TINY.vocab_size)
        logits[:, cycle[j % 3]] = 10.0
        logits[:, fresh[j]] = 5.0
        return logits

    monkeypatch.setattr(ITGDecoder, "step", crafted_step)
    run = {g: generate_token_ids(model, images[:2], SEP, num_beams, max_length=length + 1, min_length=1,
                                 no_repeat_ngram_size=g) for g in (0, n)}
    loop = [cycle[j % 3] for j in range(length)]
    assert run[0] == [loop, loop] and has_repeated_ngram(loop, n)
    expected: list[int] = []  # the rule written out: the loop's piece unless it would complete a seen 3-gram
    for j in range(length):
        seen = {tuple(expected[i : i + n]) for i in range(len(expected) - n + 1)}
        piece = cycle[j % 3]
        expected.append(fresh[j] if tuple([*expected[-(n - 1):], piece]) in seen else piece)
    assert expected != loop
    if num_beams == 1:
        assert run[n] == [expected, expected]
    else:  # beam search may trade a step's best for a better whole; it still never repeats (test above: = HF's)
        assert all(len(row) == length and not has_repeated_ngram(row, n) for row in run[n])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate_token_ids(model, images[:1], SEP, no_repeat_ngram_size=-1)


def test_is_degenerate():
    assert is_degenerate("a person wearing a helmet wearing a helmet wearing a helmet")
    assert is_degenerate("A dog, a dog. A dog, a dog!")  # words as scored: case and punctuation do not count
    assert not is_degenerate("a person wearing a helmet wearing a helmet")  # twice is not enough
    assert not is_degenerate("a dog runs and a dog jumps and a cat sits")  # "a dog" twice, no 3-gram thrice
    assert not is_degenerate("") and not is_degenerate("dog dog")
