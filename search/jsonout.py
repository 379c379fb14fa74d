"""JSON for programs: what `qsearch … --json` prints and what `qsearch serve` answers, from one encoder."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any


def json_ready(obj: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, dates ISO 8601 strings, numpy scalars numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return json_ready(obj.item())
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """`obj` (results' `to_dict()`s, info dicts) as a JSON document."""
    return json.dumps(json_ready(obj), indent=indent, ensure_ascii=False, allow_nan=False, default=str)
