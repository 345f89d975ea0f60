"""Engines in tests run eagerly: compiling long steps' per-token work (seqpar.model.compiled) costs
seconds per engine start, and tests start a hundred engines of tiny models. tests/test_compiled.py
turns it back on and checks the compiled path against the eager one."""

import os

# PyTorch's own switch, read when torch._dynamo is imported; rank processes inherit it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

# Without a GPU, Triton's kernels (seqpar.kernels.gpu.triton_decode) run under Triton's interpreter on
# CPU tensors; the switch is read when a kernel is defined, so it is set before any test imports one.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
