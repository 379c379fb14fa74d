"""Model identity: a fingerprint that changes whenever the embeddings an index holds would change."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from qformer.factory import Blip2Retriever


def model_identity(model: Blip2Retriever) -> dict[str, Any]:
    """JSON-able description of what determines a model's image embeddings (minus the weights)."""
    enc = model.encoder
    return {
        "name": model.name,
        "source": model.source,  # what `create_model` loads it from
        "encoder": enc.spec(),
        "image_size": int(enc.image_size),
        "mean": list(enc.mean),
        "std": list(enc.std),
        "qformer": model.qformer.config.to_dict(),
    }


def model_fingerprint(model: Blip2Retriever) -> str:
    """sha256 over the Q-Former's state dict (names, dtypes, shapes, bytes) and `model_identity` minus
    the name and source (a renamed copy of the same weights gets the same fingerprint)."""
    h = hashlib.sha256()
    ident = model_identity(model)
    ident.pop("name"), ident.pop("source")
    h.update(json.dumps(ident, sort_keys=True).encode())
    for name, t in sorted(model.qformer.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
