"""Which low-precision arithmetic a device runs natively, and the autocast that uses it.

bf16 roughly halves the cost of the matrix products that dominate the Q-Former on hardware with bf16 units:
CUDA GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX (Zen 4 and later, Sapphire Rapids and later);
docs/benchmarks.md has the measured rates. Elsewhere bf16 would be emulated and slower, so "auto" never
switches to it there.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@functools.cache
def cpu_bf16_native() -> bool:
    """True when this CPU computes bf16 dot products in hardware (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in CPU_BF16_FLAGS)


def bf16_native(device: torch.device | str) -> bool:
    """True when `device` runs bf16 matrix products natively (CUDA: compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_native()


PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether `precision` ("auto" | "fp32" | "bf16") means bf16 on `device`: auto is bf16 where native."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and bf16_native(device))


def resolve(device: torch.device | str, precision: str = "auto") -> str:
    """The arithmetic `precision` means on `device`: "bf16" or "fp32" (for manifests and reports)."""
    return "bf16" if use_bf16(device, precision) else "fp32"


def autocast(device: torch.device | str, precision: str = "auto") -> AbstractContextManager:
    """The context an inference pass runs under: bf16 autocast when `use_bf16(device, precision)`, else none."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, precision) else nullcontext()
