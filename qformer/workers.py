"""DataLoader worker setup for processes that decode images next to a model on the same CPU."""

from __future__ import annotations

import os

# Niceness added to decoding workers. On a machine with as many busy cores as the model has threads, a
# decoder at normal priority preempts one of the model's OpenMP threads and the whole parallel region
# waits for it; at nice 19 decoders run in the model's idle moments instead, which indexes faster
# (docs/benchmarks.md).
DECODE_NICE = 19


def lower_priority(worker_id: int, nice: int = DECODE_NICE) -> None:
    """`DataLoader(worker_init_fn=...)`: raise this worker process's niceness by `nice` (0: unchanged)."""
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)
