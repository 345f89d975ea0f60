"""The Triton kernels compile for the GPUs they are for, checked without one (tests/triton_ahead.py):
the interpreter that runs them in CI (tests/test_paged_decode.py) accepts shapes, dtypes and
shared-memory footprints a GPU's compiler or launch refuses. Every launch `triton_decode.plan` makes
for a GPU is compiled down to a cubin, at the shapes of the models seqpar serves, and checked for
what would fail or slow it there, read from the compiled kernel:
- shared memory within the GPU's per-block limit ('out of resource' at launch otherwise);
- no registers spilled to local memory (a stack frame: every spill a round trip to memory, in a
  kernel whose whole job is streaming K/V at the memory's rate);
- the split kernel's K/V loads software-pipelined (issued ahead as async copies, `num_stages`), which
  Triton does for a `for` loop and not for a `while` loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton (with its NVIDIA backend) is not installed")

# Shared memory a block may use (bytes, opted in): A100, L4/L40S (the smallest of the three), H100/H200.
SHARED_LIMIT = {80: 166_912, 89: 101_376, 90: 232_448}
CASES = [
    # Llama 3 8B / Qwen3 8B: GQA 4, the most key ranges a step launches
    dict(head_dim=128, hq=32, hkv=8, dtype="bf16", splits=64, window=False, archs=[80, 90]),
    # Gemma 3 1B: MQA, 256-dim heads, a sliding window's rows; bf16 and fp32 on the smallest shared memory
    dict(head_dim=256, hq=4, hkv=1, dtype="bf16", splits=1, window=True, archs=[89, 90]),
    dict(head_dim=256, hq=4, hkv=1, dtype="fp32", splits=8, window=False, archs=[89]),
    # fp32 at Llama's shapes (the GPU tests' exactness runs)
    dict(head_dim=128, hq=32, hkv=8, dtype="fp32", splits=8, window=False, archs=[90]),
    # SmolLM2-135M (GQA 3: a group padded to 16 rows) in fp16; the tests' tiny models (D 8, padded to 16)
    dict(head_dim=64, hq=9, hkv=3, dtype="fp16", splits=4, window=False, archs=[90]),
    dict(head_dim=8, hq=6, hkv=2, dtype="fp32", splits=3, window=True, archs=[90]),
]


def test_every_launch_compiles_for_its_gpus_within_their_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = env.get("TRITON_CACHE_DIR") or str(
        Path(os.environ.get("TMPDIR", "/tmp")) / "seqpar-triton-ahead"
    )
    run = subprocess.run(
        [sys.executable, str(root / "tests" / "triton_ahead.py"), json.dumps(CASES)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(compiled) == 2 * sum(len(c["archs"]) for c in CASES)  # a split and a merge kernel per case and GPU
    for c in compiled:
        assert 0 < c["shared"] <= SHARED_LIMIT[c["arch"]], c
        assert c["stack"] == 0, f"registers spilled: {c}"
        assert c["async_copies"] > 0 or c["kernel"] != "_split_kernel", f"K/V loads not pipelined: {c}"
