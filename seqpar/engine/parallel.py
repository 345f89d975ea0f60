"""Load the model and apply the engine's parallelism to it.

- Tensor parallelism over the tp group (`parallelize_tp`): heads and MLP split for every step.
- Decode split over the SP group: in a decode step every SP rank holds the same hidden
  states of the new tokens, so without it SP N does N times the linear work of one rank.
  `decode_model` is a second view of the same weights in which each SP rank computes a
  slice of the MLP's intermediate features (gate and up columns, the matching down_proj
  rows, whose partial products are summed across the SP group): 3/4 of a layer's weights.
  Attention stays whole on every rank: q/k/v and o_proj run in full, and the decode merge
  (one shared-memory gather on one host) leaves every rank the whole attention output. Two
  exchanges per layer; splitting the heads as well (gather q, alltoall merge, sum o_proj's
  partial products) saved 1/8 of the weights but cost two more exchanges per layer, and
  measured ~12% slower per token at 1K context on 2 cores.
  Under `--enable-deterministic-inference` the split gathers the intermediate features instead
  of summing down_proj's partial products (`seqpar.model.deterministic.InvariantSplitMLP`): the
  same bits at every SP degree.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.comm.mesh import ParallelMesh
from seqpar.comm.shm import HostExchange
from seqpar.engine.config import EngineConfig
from seqpar.model import LlamaForCausalLM, load_model, parallelize_tp
from seqpar.model import deterministic as det
from seqpar.model.llama import with_mlps
from seqpar.strategies.decode import gather_parts


class _Columns(nn.Module):
    """Output features [a, b) of a full linear (a view: no copy of the weights)."""

    def __init__(self, full: nn.Linear, a: int, b: int) -> None:
        super().__init__()
        self.weight = full.weight.detach()[a:b]
        self.bias = None if full.bias is None else full.bias.detach()[a:b]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _RowsSummed(nn.Module):
    """Input features [a, b) of a full linear; partial products summed over the SP group."""

    def __init__(self, full: nn.Linear, a: int, b: int, mesh: ParallelMesh, exchange: HostExchange | None) -> None:
        super().__init__()
        self.weight = full.weight.detach()[:, a:b].contiguous()  # a strided view would slow every GEMM
        self.bias = None if full.bias is None else full.bias.detach()
        self.mesh, self.exchange = mesh, exchange

    def forward(self, x: Tensor) -> Tensor:
        out = gather_parts(F.linear(x, self.weight), self.mesh.sp_group, self.exchange).sum(0)
        # Added after the sum: before it, each rank's copy would be counted W times.
        return out if self.bias is None else out + self.bias


def _even(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def split_for_decode(model: LlamaForCausalLM, mesh: ParallelMesh, exchange: HostExchange | None) -> LlamaForCausalLM:
    """A shallow copy of `model` whose MLPs compute this SP rank's slice (weights shared)."""
    cfg, world, rank = model.config, mesh.sp_size, mesh.sp_rank
    a, b = _even(cfg.intermediate_size, world, rank)

    def split_mlp(full: nn.Module) -> nn.Module:
        mlp = copy.copy(full)
        mlp._modules = dict(full._modules)
        mlp.gate_proj = _Columns(full.gate_proj, a, b)
        mlp.up_proj = _Columns(full.up_proj, a, b)
        mlp.down_proj = _RowsSummed(full.down_proj, a, b, mesh, exchange)
        return mlp

    return with_mlps(model, split_mlp)


class ShardedModel:
    def __init__(self, config: EngineConfig, mesh: ParallelMesh, exchange: HostExchange | None = None):
        self.mesh = mesh
        model, _ = load_model(config.model, config.torch_dtype, config.rope_scaling)
        if config.tp_size > 1:
            parallelize_tp(model, mesh.tp_group)  # sliced on the host: a GPU never holds the whole model
        if config.device != "cpu":
            model.to(config.device)  # before the decode split, whose views must share the device copy
        self.model = model.eval()
        self.num_kv_heads_cached = model.model.layers[0].self_attn.num_kv_heads
        self.decode_model: LlamaForCausalLM | None = None
        split = config.decode_split and config.sp_size > 1 and config.tp_size == 1
        if config.enable_deterministic_inference:
            # The MLP's intermediate features split and gathered, not partial products summed.
            if split:
                gather = lambda t: gather_parts(t, mesh.sp_group, exchange)  # noqa: E731
                self.decode_model = det.split_for_decode(model, mesh.sp_size, mesh.sp_rank, gather)
            det.make_row_invariant(model)
        elif split:
            self.decode_model = split_for_decode(self.model, mesh, exchange)
