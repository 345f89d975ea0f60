"""Load the model and apply the engine's parallelism to it: TP over the tp group, or
the seed's coupled layout (heads sharded over the SP group itself)."""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.comm.mesh import ParallelMesh
from seqpar.comm.shm import HostExchange
from seqpar.engine.config import EngineConfig
from seqpar.kernels.layout import TokenLayout
from seqpar.model import head_shard, load_model, parallelize_head_sharded, parallelize_tp
from seqpar.strategies.decode import gather_heads, local_partial, merge_partials


class ShardedModel:
    def __init__(self, config: EngineConfig, mesh: ParallelMesh):
        self.mesh = mesh
        model, mc = load_model(config.model, config.torch_dtype)
        self.kv_head_ids: list[int] | None = None
        layers = model.model.layers
        if config.strategy == "head_sharded" and config.sp_size > 1:
            # The seed: q_proj / o_proj / MLP sharded over the SP group, hidden states replicated.
            # K/V shards travel the ring between ranks that read different kv heads, so every
            # rank projects all kv heads (for its own tokens only they get cached).
            full_kv = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
            parallelize_head_sharded(model, mesh.sp_group)
            for layer, (k_proj, v_proj) in zip(layers, full_kv):
                attn = layer.self_attn
                attn.k_proj, attn.v_proj = k_proj, v_proj
                attn.num_kv_heads = mc.num_kv_heads
                attn.kv_head_ids = list(range(mc.num_kv_heads))
            _, self.kv_head_ids = head_shard(mc.num_heads, mc.num_kv_heads, config.sp_size, mesh.sp_rank)
            order = [h for r in range(config.sp_size) for h in head_shard(mc.num_heads, mc.num_kv_heads, config.sp_size, r)[0]]
            self.head_order = torch.tensor(order)  # global head ids in rank-concatenated order
            self.head_order_inv = torch.argsort(self.head_order)
        elif config.tp_size > 1:
            parallelize_tp(model, mesh.tp_group)
        self.model = model.eval()
        self.num_kv_heads_cached = layers[0].self_attn.num_kv_heads

    def seed_decode(self, q: Tensor, kh: Tensor, vh: Tensor, q_layout: TokenLayout, k_layout: TokenLayout,
                    merge: str, scale: float, exchange: HostExchange | None = None) -> Tensor:
        """Decode in the seed layout: q [B, Hq_local, D] -> out [B, Hq_local, D] for this rank's heads.

        Query heads are all-gathered (the seed's decode), attended over this rank's
        cached tokens (all kv heads), and merged; `alltoall` returns each rank just
        its heads, the seed's noted improvement.
        """
        group, world, me = self.mesh.sp_group, self.mesh.sp_size, self.mesh.sp_rank
        hq = q.shape[1]
        q_cat = gather_heads(q, hq * world, group, exchange)  # [B, Hq, D], rank order (equal shares)
        out, lse = local_partial(q_cat[:, self.head_order_inv], kh, vh, q_layout, k_layout, scale)  # natural head order
        out, lse = out[:, self.head_order].contiguous(), lse[:, self.head_order].contiguous()  # chunk r = rank r's heads
        merged = merge_partials(out, lse, group, merge, exchange)
        if merge != "alltoall":
            merged = merged[:, me * hq : (me + 1) * hq]
        return merged.to(q.dtype)
