"""The per-token work of long steps through `torch.compile` (inductor): norms, projections, RoPE,
residual adds and the MLP of each full row tile, fused around the GEMMs.

Eager, that work is a dozen passes over a tile's activations besides the GEMMs (casts, the norm's
statistics, RoPE's multiply-adds, SiLU, the gate product, residual adds): ~0.5 s of a 4K-token
prefill of SmolLM2 in bf16 (Xeon with AMX, 2 cores), a quarter of the step. Inductor fuses them
into the GEMMs' neighbours. Decode rows are left eager: compiled code measured no faster at 1 and
16 rows, where the GEMMs' per-call cost dominates.

On CPU only full tiles (`ROW_TILE` rows) take the compiled path, so exactly one graph per function
is compiled (static shapes; a step's last, shorter tile runs eager) and every layer reuses it (the
layer is an input, its weights are not baked in). Inductor caches the compiled code on disk: the
first start on a machine compiles (~16 s on 2 cores), later ones load it (~3 s).

On CUDA a layer runs a chunk's rows whole (a GPU's GEMMs want every row at once), so the functions
are compiled with the row count symbolic (one graph for every chunk of `ROW_TILE` rows or more);
inductor writes Triton kernels for the fused norms, RoPE, SiLU-gate and residual adds around the
cuBLAS GEMMs. A decode step captured as CUDA graphs (engine/decode_graph.py) runs its rows through
the same functions (`fused`; a row count of 1 compiles once more, dynamo specialising sizes 0 and
1): inside a graph every small eager kernel still costs its launch and a pass over the rows, some
dozen a layer. Uncaptured decode rows stay eager.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from seqpar.model.layers import RMSNorm, SwiGLUMLP
from seqpar.model.llama import ROW_TILE, LlamaDecoderLayer, LlamaForCausalLM, tile_post, tile_pre


def _plain(layer: nn.Module) -> bool:
    """The layer holds only the plain modules the compiled functions were written for (not tensor-
    parallel projections with collectives inside, not deterministic GEMMs)."""
    attn = layer.self_attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    return (
        type(layer) is LlamaDecoderLayer
        and all(type(m) is nn.Linear for m in linears)
        and type(layer.mlp) is SwiGLUMLP
        and all(type(m) is nn.Linear for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
        and type(layer.input_layernorm) is RMSNorm
        and type(layer.post_attention_layernorm) is RMSNorm
    )


def why_eager(model: LlamaForCausalLM) -> str | None:
    """Why the tiles of this model cannot be compiled here, or None."""
    if torch._dynamo.config.disable:
        return "torch.compile is disabled in this process (TORCH_COMPILE_DISABLE)"
    if model.device.type not in ("cpu", "cuda"):
        return f"compiled per-token work is for CPU and CUDA ranks; this model is on {model.device.type}"
    if not all(_plain(layer) for layer in model.model.layers):
        return "the layers are not plain Llama layers (tensor-parallel or deterministic projections)"
    return None


def compile_tiles(model: LlamaForCausalLM) -> tuple[float | None, str | None]:
    """Compile the per-token work of full row tiles for every layer of `model` and warm it up on
    one zero tile. Returns (seconds the warm-up took, None), or (None, why not) with the layers
    left eager: nothing that fails here fails a step later."""
    why = why_eager(model)
    if why is not None:
        return None, why
    # CPU: full tiles, static shapes; CUDA: whole chunks, the row count symbolic
    rows_vary = model.device.type == "cuda"
    pre = torch.compile(tile_pre, dynamic=rows_vary)
    post = torch.compile(tile_post, dynamic=rows_vary)
    layer = model.model.layers[0]
    weight = model.model.embed_tokens.weight
    x = torch.zeros(ROW_TILE, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            cos, sin = model.model.rotary_emb(torch.arange(ROW_TILE, device=x.device), x.dtype)
            q, _, _ = pre(layer, x, cos, sin)
            post(layer, x, q.reshape(ROW_TILE, -1))
    except Exception as e:  # a missing C++ compiler, an unsupported op: eager is always there
        return None, f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    tiles: tuple[Callable, Callable] = (pre, post)
    for layer in model.model.layers:
        layer.tiles = tiles
    return time.perf_counter() - start, None
