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
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.comm.collectives import outside_graphs
from seqpar.comm.mesh import ParallelMesh
from seqpar.comm.shm import HostExchange
from seqpar.engine.config import EngineConfig
from seqpar.kernels.packed import ONEDNN, PackedLinear
from seqpar.model import LlamaForCausalLM, load_model, parallelize_tp
from seqpar.model import deterministic as det
from seqpar.model.config import ModelConfig
from seqpar.model.llama import with_mlps
from seqpar.strategies.decode import gather_parts


class _Linear(nn.Module):
    """x @ weight.T + bias over a view of another layer's weight (no copy)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _linear(weight: Tensor, bias: Tensor | None, packed: bool) -> nn.Module:
    """A layer computing with `weight`: a packed private copy, or the view itself."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    return PackedLinear(weight, bias) if packed else _Linear(weight, bias)


def _columns(full: nn.Linear, a: int, b: int, packed: bool) -> nn.Module:
    """Output features [a, b) of a full linear."""
    return _linear(full.weight[a:b], None if full.bias is None else full.bias[a:b], packed)


class _RowsSummed(nn.Module):
    """Input features [a, b) of a full linear; partial products summed over the SP group."""

    def __init__(
        self, full: nn.Linear, a: int, b: int, mesh: ParallelMesh, exchange: HostExchange | None, packed: bool
    ) -> None:
        super().__init__()
        # a copy: a strided view would slow every GEMM
        self.part = _linear(full.weight.detach()[:, a:b].contiguous(), None, packed)
        self.bias = None if full.bias is None else full.bias.detach()
        self.mesh, self.exchange = mesh, exchange

    def forward(self, x: Tensor) -> Tensor:
        out = outside_graphs(self._sum, self.part(x))
        # Added after the sum: before it, each rank's copy would be counted W times.
        return out if self.bias is None else out + self.bias

    def _sum(self, part: Tensor) -> Tensor:
        return gather_parts(part, self.mesh.sp_group, self.exchange).sum(0)


def _even(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def _stacked(layers: list[nn.Module], a: int = 0, b: int | None = None) -> nn.Module:
    """One packed layer computing the output features [a, b) of each of `layers` side by side
    (decode reads q, k, v, or gate and up, in one GEMM: ~2.4 ms less per token, SmolLM2)."""
    weights = [lin.weight.detach()[a:b] for lin in layers]
    biases = [lin.bias for lin in layers]
    bias = None if biases[0] is None else torch.cat([x.detach()[a:b] for x in biases])
    return PackedLinear(torch.cat(weights), bias)


def _packed(full: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """A shallow copy of `full` whose linear layers `names` read packed private copies."""
    new = copy.copy(full)
    new._modules = dict(full._modules)
    for name in names:
        lin = getattr(full, name)
        setattr(new, name, _linear(lin.weight, lin.bias, True))
    return new


def _packed_attention(full: nn.Module) -> nn.Module:
    new = _packed(full, ("o_proj",))
    new.qkv_proj = _stacked([full.q_proj, full.k_proj, full.v_proj])
    return new


def _packed_mlp(full: nn.Module) -> nn.Module:
    new = _packed(full, ("down_proj",))
    new.gate_up_proj = _stacked([full.gate_proj, full.up_proj])
    return new


def split_for_decode(
    model: LlamaForCausalLM, mesh: ParallelMesh, exchange: HostExchange | None, packed: bool = False
) -> LlamaForCausalLM:
    """A shallow copy of `model` whose MLPs compute this SP rank's slice (weights shared, or
    `packed`: this rank's slices and the attention projections packed, private copies)."""
    cfg, world, rank = model.config, mesh.sp_size, mesh.sp_rank
    a, b = _even(cfg.intermediate_size, world, rank)

    def split_mlp(full: nn.Module) -> nn.Module:
        mlp = copy.copy(full)
        mlp._modules = dict(full._modules)
        if packed:
            mlp.gate_up_proj = _stacked([full.gate_proj, full.up_proj], a, b)
        else:
            mlp.gate_proj = _columns(full.gate_proj, a, b, False)
            mlp.up_proj = _columns(full.up_proj, a, b, False)
        mlp.down_proj = _RowsSummed(full.down_proj, a, b, mesh, exchange, packed)
        return mlp

    return with_mlps(model, split_mlp, _packed_attention if packed else None)


def packed_for_decode(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A shallow copy of `model` whose linear layers read packed private copies of the weights."""
    return with_mlps(model, _packed_mlp, _packed_attention)


# The share of a host's memory the packed decode copies of all its ranks may take.
PACKED_SHARE = 0.25


def packed_decode_bytes(config: EngineConfig, mc: ModelConfig) -> int:
    """One rank's packed decode weights: q/k/v/o whole, its MLP slice (whole without the decode
    split), its vocabulary slice of the head."""
    h, n = mc.hidden_size, config.sp_size
    attn = 2 * h * mc.num_heads * mc.head_dim + 2 * h * mc.num_kv_heads * mc.head_dim
    mlp = 3 * h * mc.intermediate_size // (n if config.decode_split and n > 1 else 1)
    head = -(-mc.vocab_size // n) * h
    return (mc.num_layers * (attn + mlp) + head) * config.torch_dtype.itemsize


def decode_packing(config: EngineConfig, mc: ModelConfig) -> tuple[bool, str]:
    """Whether decode steps read packed copies of the weights, and why not where they were asked to.

    Packed where oneDNN runs the dtype on CPU (tp 1; deterministic inference packs everything its
    own way), and where the copies of every rank on this host fit `PACKED_SHARE` of its memory:
    the shared weights are held once per host so that a model as large as half the memory runs,
    and copies per rank would undo that."""
    if not (
        config.packed_decode_weights
        and config.device == "cpu"
        and config.tp_size == 1
        and not config.enable_deterministic_inference
        and ONEDNN
        and config.torch_dtype in (torch.float32, torch.bfloat16)
    ):
        return False, ""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", config.world_size))
    need = ranks * packed_decode_bytes(config, mc)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > PACKED_SHARE * host:
        return False, (
            f"decode weights not packed: {ranks} rank(s)' copies would take {need / 2**30:.1f} GiB, more than "
            f"{PACKED_SHARE:.0%} of this host's {host / 2**30:.1f} GiB (decode reads the shared weights; "
            "--no-packed-decode-weights skips this check)"
        )
    return True, ""


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
        packed = False
        split = config.decode_split and config.sp_size > 1 and config.tp_size == 1
        if config.enable_deterministic_inference:
            # The MLP's intermediate features split and gathered, not partial products summed.
            if split:
                gather = lambda t: gather_parts(t, mesh.sp_group, exchange)  # noqa: E731
                self.decode_model = det.split_for_decode(model, mesh.sp_size, mesh.sp_rank, gather)
            det.make_row_invariant(model)
        else:
            packed, _ = decode_packing(config, model.config)
            if split:
                self.decode_model = split_for_decode(self.model, mesh, exchange, packed)
            elif packed:
                self.decode_model = packed_for_decode(self.model)
        self.packed_decode = self.decode_model is not None and packed

    def decode_head(self, vocab: slice) -> nn.Module | None:
        """The head's rows `vocab` packed for decode rows' logits, where decode steps pack."""
        weight = self.model.head_weight[vocab]
        return PackedLinear(weight) if self.packed_decode and weight.shape[0] else None
