"""Engines in tests run eagerly: compiling long steps' per-token work (seqpar.model.compiled) costs
seconds per engine start, and tests start a hundred engines of tiny models. tests/test_compiled.py
turns it back on and checks the compiled path against the eager one."""

import os

# PyTorch's own switch, read when torch._dynamo is imported; rank processes inherit it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
