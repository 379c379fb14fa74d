"""`qformer.malloc.keep_freed_memory`: freed activations are reused, not faulted in afresh every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# allocate, touch and free a 64 MB tensor 40 times (one "step" each); count the page faults of the loop
_STEPS = """
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from qformer.malloc import keep_freed_memory
    assert keep_freed_memory()
torch.ones(16 * 2**20).sum()  # warm-up step
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.ones(16 * 2**20).sum()  # 64 MB, freed at once
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_keep_freed_memory_stops_refaulting_large_blocks() -> None:
    probe = "from qformer.malloc import keep_freed_memory; print(keep_freed_memory())"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() != "True":
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    pages = 64 * 2**20 // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default > 35 * pages  # glibc's default: every step maps and faults in its 64 MB afresh
    assert kept < 10 * pages  # kept: after a few steps the heap's pages are reused (measured: 5 x 64 MB in all)


def test_qsearch_malloc_default_leaves_glibc_alone() -> None:
    code = "from qformer.malloc import keep_freed_memory; print(keep_freed_memory())"
    env = {**os.environ, "QSEARCH_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
