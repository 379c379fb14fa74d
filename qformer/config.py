"""Q-Former configuration as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The model qsearch uses when none is named: trained, offline (see qformer/weights/blip2-tiny/MODEL_CARD.md).
DEFAULT_MODEL = "blip2-tiny"


@dataclass(frozen=True)
class QFormerConfig:
    """Sizes of a BLIP-2 Q-Former. Defaults are the paper's BERT-base Q-Former on EVA ViT-g."""

    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    cross_attention_freq: int = 2  # cross-attention in layers 0, f, 2f, ...
    encoder_width: int = 1408  # width C of the frozen image tokens
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection width
    layer_norm_eps: float = 1e-12
    vision_layer_norm_eps: float = 1e-5  # ln_vision (LAVIS: nn.LayerNorm default; transformers: 1e-6)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC], the ITG decoder's first token
    temp_init: float = 0.07

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QFormerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QFormerConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> QFormerConfig:
        return replace(self, **changes)

    @property
    def cross_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i % self.cross_attention_freq == 0]


# The paper's Q-Former: BERT-base with cross-attention every other layer, on EVA ViT-g features.
BERT_BASE = QFormerConfig()

# The offline default's Q-Former: all-MiniLM-L6-v2 sizes, on EfficientNet-Lite features (1280 wide).
MINILM_L6 = QFormerConfig(
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    encoder_width=1280,
)
