"""Engines in tests run eagerly: compiling long steps' per-token work (seqpar.model.compiled) costs
seconds per engine start, and tests start a hundred engines of tiny models. tests/test_compiled.py
turns it back on and checks the compiled path against the eager one."""

import os

# PyTorch's own switch, read when torch._dynamo is imported; rank processes inherit it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402 - after the switch above

# Without a GPU, Triton's kernels (seqpar.kernels.gpu.triton_decode) run under Triton's interpreter on
# CPU tensors; the switch is read when a kernel is defined, so it is set before any test imports one.
# (Asking CUDA itself: a GPU runtime need not expose /dev/nvidiactl.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
