"""Other libraries' sequence-parallel attention, run on the same inputs as seqpar's rows.

- PyTorch context parallel: the private
  `torch.distributed.tensor.experimental._attention._templated_ring_attention`
  (torch >= 2.7; signature `(group, seq_dim, op, query, key, value, is_causal, **kwargs)`,
  tensors [B, H, L_local, D], already sharded) with the CPU flash kernel
  `aten._scaled_dot_product_flash_attention_for_cpu` and its head-tail load balancing
  (`_cp_options.enable_load_balance`): rank i holds chunks i and 2W-1-i of each
  sequence, concatenated, which is exactly seqpar's zigzag shard, so the inputs are cut
  with `ShardPlan(..., scheme="zigzag")`.
- DeepSpeed Ulysses: `deepspeed.sequence.layer.DistributedAttention` around a local
  module that calls the same CPU flash kernel (causal), on contiguous sequence shards
  [S_local, B, H, D] (`batch_dim_idx=1`). DeepSpeed is an optional benchmark
  dependency: without it the row reports the import error.

Each `prepare_*` runs inside one rank of an initialised gloo group, with the whole
batch q [T, Hq, D], k/v [T, Hkv, D] in packed order, and returns a `Prepared`.
Neither library takes a ragged batch: they raise ValueError unless every sequence
has the same length (which becomes their batch dimension).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.sharding.plan import ShardPlan


@dataclass
class Prepared:
    """One rank's part of a benchmark row."""

    forward: Callable[[], Tensor]  # one forward pass on this rank's inputs (what is timed)
    rows: Tensor  # global packed rows of the output this rank holds, in its order
    to_rows: Callable[[Tensor], Tensor]  # forward()'s output -> [len(rows), Hq, D]


def cpu_flash(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """q [B, Hq, L, D], k/v [B, Hkv, L', D] -> out [B, Hq, L, D], lse [B, Hq, L] (GQA native)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal=is_causal, attn_mask=None, scale=None
    )
    return out, lse


def equal_lengths(seq_lens: tuple[int, ...] | list[int], multiple: int, who: str) -> tuple[int, int]:
    """(batch, length) when every sequence has one length divisible by `multiple`."""
    if len(set(seq_lens)) != 1:
        raise ValueError(f"{who} takes a batch of equal-length sequences only, not a ragged batch {list(seq_lens)}")
    if seq_lens[0] % multiple != 0:
        raise ValueError(f"{who} needs the sequence length ({seq_lens[0]}) to be a multiple of {multiple}")
    return len(seq_lens), seq_lens[0]


def prepare_torch_ring(
    rank: int,
    world: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_lens: tuple[int, ...],
    rotate: str = "allgather",
    layout: str = "head-major",
) -> Prepared:
    """PyTorch's ring attention, head-tail balanced, causal.

    rotate: "allgather" (PyTorch's default: one all-gather of K/V) or "alltoall" (a true
    ring: each step permutes K/V to the next rank). layout: "head-major" hands
    it contiguous [B, H, L, D] tensors (its API's own layout, converted before timing);
    "token-major" hands it [B, H, L, D] views of contiguous [B, L, H, D] memory, the memory
    seqpar's [T, H, D] strategies get (a model's q/k/v projections give that layout too).
    """
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _templated_ring_attention,
        set_rotate_method,
    )

    batch, length = equal_lengths(seq_lens, 2 * world, "PyTorch's head-tail ring attention")
    _cp_options.enable_load_balance = True  # head-tail (zigzag) load balancing for causal masks
    _cp_options.convert_to_f32 = True
    set_rotate_method(rotate)
    plan = ShardPlan(seq_lens=seq_lens, world_size=world, scheme="zigzag")  # chunks i and 2W-1-i: head-tail
    idx = plan.local_indices(rank)
    local = length // world

    if layout not in ("head-major", "token-major"):
        raise ValueError(f"layout must be head-major or token-major, got {layout!r}")

    def to_bhld(x: Tensor) -> Tensor:  # packed rows of this rank -> [B, H, L_local, D]
        view = x[idx].view(batch, local, *x.shape[1:]).permute(0, 2, 1, 3)
        return view.contiguous() if layout == "head-major" else view

    ql, kl, vl = to_bhld(q), to_bhld(k), to_bhld(v)
    group = dist.group.WORLD
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def forward() -> Tensor:
        return _templated_ring_attention(group, 2, op, ql, kl, vl, is_causal=True)[0]

    def to_rows(out: Tensor) -> Tensor:  # [B, H, L_local, D] -> [B * L_local, H, D]
        return out.permute(0, 2, 1, 3).reshape(batch * local, out.shape[1], out.shape[3])

    return Prepared(forward, idx, to_rows)


class _LocalFlash(torch.nn.Module):
    """DeepSpeed's local attention: [S, B, h, D] in and out, causal over the whole S."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, _ = cpu_flash(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), True)
        return out.permute(2, 0, 1, 3)


def prepare_deepspeed_ulysses(
    rank: int, world: int, q: Tensor, k: Tensor, v: Tensor, seq_lens: tuple[int, ...]
) -> Prepared:
    """DeepSpeed Ulysses (all-to-all seq <-> heads around a local causal flash attention)."""
    import deepspeed.comm as ds_comm  # ImportError when deepspeed is not installed: reported in the row
    from deepspeed.sequence.layer import DistributedAttention

    batch, length = equal_lengths(seq_lens, world, "DeepSpeed Ulysses")
    ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # adopts torch.distributed
    plan = ShardPlan(seq_lens=seq_lens, world_size=world, scheme="contiguous")
    idx = plan.local_indices(rank)
    local = length // world

    def to_sbhd(x: Tensor) -> Tensor:  # packed rows of this rank -> [S_local, B, H, D]
        return x[idx].view(batch, local, *x.shape[1:]).transpose(0, 1).contiguous()

    ql, kl, vl = to_sbhd(q), to_sbhd(k), to_sbhd(v)
    attn = DistributedAttention(_LocalFlash(), dist.group.WORLD, scatter_idx=2, gather_idx=0)

    def forward() -> Tensor:
        return attn(ql, kl, vl, batch_dim_idx=1)

    def to_rows(out: Tensor) -> Tensor:  # [S_local, B, H, D] -> [B * S_local, H, D]
        return out.transpose(0, 1).reshape(batch * local, out.shape[2], out.shape[3])

    return Prepared(forward, idx, to_rows)
