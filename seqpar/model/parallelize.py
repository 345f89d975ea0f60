"""Apply tensor parallelism to a loaded, full LlamaForCausalLM, in place.

The model code stays parallelism-free: these functions swap projections for sharded
ones and shrink each attention module's local head counts. Embeddings, norms and
lm_head stay replicated. The process group is an explicit argument (only its
`size()` / `rank()` are read here; row-parallel layers all-reduce over it in forward).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from seqpar.model.llama import LlamaAttention, LlamaForCausalLM
from seqpar.model.parallel_layers import ColumnParallelLinear, RowParallelLinear, head_rows, head_shard


def parallelize_tp(model: LlamaForCausalLM, group: dist.ProcessGroup) -> LlamaForCausalLM:
    """Megatron-style TP: rank r computes a contiguous block of whole q heads and the kv
    heads they read; o_proj / down_proj all-reduce. Needs both head counts divisible by
    the group size (see parallelize_head_sharded when the kv heads are too few)."""
    cfg, world = model.config, group.size()
    if cfg.num_heads % world or cfg.num_kv_heads % world:
        raise ValueError(
            f"tensor parallelism over {world} ranks needs num_heads ({cfg.num_heads}) and "
            f"num_kv_heads ({cfg.num_kv_heads}) divisible by {world}; use a world size dividing "
            f"{cfg.num_kv_heads}, or parallelize_head_sharded, which replicates kv heads"
        )
    return _apply(model, group)


def parallelize_head_sharded(model: LlamaForCausalLM, group: dist.ProcessGroup) -> LlamaForCausalLM:
    """The head-sharded layout for sequence parallelism (SGLang PR #1436): q heads
    split so each rank holds `group_size // world` heads of every KV group, k/v computed
    for all kv heads, o_proj row-parallel over the same head permutation. When the kv
    heads divide evenly (num_kv_heads % world == 0) this is plain TP; in between, kv heads
    are split as far as they go (see head_shard)."""
    return _apply(model, group)


def _apply(model: LlamaForCausalLM, group: dist.ProcessGroup) -> LlamaForCausalLM:
    cfg, world, rank = model.config, group.size(), group.rank()
    first = model.model.layers[0].self_attn
    if first.num_heads != cfg.num_heads or isinstance(first.q_proj, ColumnParallelLinear):
        raise ValueError("model is already parallelized; load a fresh full model")
    q_ids, kv_ids = head_shard(cfg.num_heads, cfg.num_kv_heads, world, rank)
    # Uneven splits are fine for the MLP: row-parallel sums partial products of any width.
    inter = cfg.intermediate_size
    mlp_rows = list(range(rank * inter // world, (rank + 1) * inter // world))
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, q_ids, kv_ids, cfg.num_kv_heads, group)
        mlp = layer.mlp
        mlp.gate_proj = ColumnParallelLinear(_linear(mlp.gate_proj), mlp_rows)
        mlp.up_proj = ColumnParallelLinear(_linear(mlp.up_proj), mlp_rows)
        mlp.down_proj = RowParallelLinear(_linear(mlp.down_proj), mlp_rows, group)
    return model


def _shard_attention(
    attn: LlamaAttention, q_ids: list[int], kv_ids: list[int], num_kv_heads: int, group: dist.ProcessGroup
) -> None:
    d = attn.head_dim
    q_rows = head_rows(q_ids, d)
    attn.q_proj = ColumnParallelLinear(_linear(attn.q_proj), q_rows)
    # With every kv head local (the head-sharded layout) the full k/v projections stay as they are.
    if len(kv_ids) < num_kv_heads:
        kv_rows = head_rows(kv_ids, d)
        attn.k_proj = ColumnParallelLinear(_linear(attn.k_proj), kv_rows)
        attn.v_proj = ColumnParallelLinear(_linear(attn.v_proj), kv_rows)
    # o_proj input columns follow the same (possibly permuted) q head order as q_proj rows.
    attn.o_proj = RowParallelLinear(_linear(attn.o_proj), q_rows, group)
    attn.num_heads, attn.num_kv_heads = len(q_ids), len(kv_ids)
    attn.q_head_ids, attn.kv_head_ids = list(q_ids), list(kv_ids)


def _linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected a full nn.Linear to shard, got {type(module).__name__}")
    return module
