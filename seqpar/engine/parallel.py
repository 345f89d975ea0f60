"""Load the model and apply the engine's tensor parallelism to it (heads and MLP over the tp group)."""

from __future__ import annotations

from seqpar.comm.mesh import ParallelMesh
from seqpar.engine.config import EngineConfig
from seqpar.model import load_model, parallelize_tp


class ShardedModel:
    def __init__(self, config: EngineConfig, mesh: ParallelMesh):
        self.mesh = mesh
        model, _ = load_model(config.model, config.torch_dtype, config.rope_scaling)
        if config.tp_size > 1:
            parallelize_tp(model, mesh.tp_group)
        self.model = model.eval()
        self.num_kv_heads_cached = model.model.layers[0].self_attn.num_kv_heads
