"""The model's per-token work made row-invariant, for deterministic inference.

`make_row_invariant` swaps every linear layer for one whose rows do not depend on the rows
computed with them (`seqpar.kernels.invariant.linear`) and the MLP's activation (SiLU, Gemma's
GELU-tanh) for one whose bits do not depend on where an element sits. The rest of the per-token
work already is row-invariant (measured: RMSNorm's fused fp32 op and its bf16 path, RoPE's cos /
sin / multiply-adds, the embedding gather, the residual adds). Attention is the caller's (seqpar.kernels.canonical).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqpar.kernels import invariant
from seqpar.model.layers import SwiGLUMLP
from seqpar.model.llama import REFINE, LlamaForCausalLM, with_mlps


class InvariantLinear(nn.Module):
    """A linear layer through `invariant.linear`, its weight packed (`invariant.pack`: a copy,
    the replaced layer's weight is dropped with it)."""

    def __init__(self, full: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = invariant.pack(full.weight), full.bias

    def forward(self, x: Tensor) -> Tensor:
        return invariant.linear(x, self.weight, self.bias)


class InvariantSwiGLU(SwiGLUMLP):
    def forward(self, x: Tensor) -> Tensor:
        h = invariant.activation_(self.act)(self.gate_proj(x))
        return self.down_proj(h.mul_(self.up_proj(x)))


def make_row_invariant(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Rewrite `model` in place (same weights) so that a token's hidden states are the same bits
    whatever rows share its step; returns it."""
    invariant.call_rows(model.model.embed_tokens.weight.dtype)  # probed now, at the rank's threads
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, InvariantLinear(getattr(attn, name)))
        invariant_mlp(layer.mlp)
    return model


def invariant_mlp(mlp: SwiGLUMLP) -> InvariantSwiGLU:
    """`mlp` rewritten in place (same weights) by `make_row_invariant`; returns it."""
    mlp.__class__ = InvariantSwiGLU
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, InvariantLinear(getattr(mlp, name)))
    return mlp  # type: ignore[return-value]


class InvariantSplitMLP(nn.Module):
    """A decode step's MLP split over the SP ranks with the whole MLP's bits: this rank computes
    intermediate features [a, b) (gate and up columns: a slice's columns are the whole's), the
    slices are gathered (a copy, where the default split sums down_proj's partial products over
    the ranks: another order at every SP degree), and every rank runs down_proj whole. One
    exchange per layer, as the default split; 2/3 of the MLP's weights read per rank at SP 2."""

    def __init__(self, mlp: SwiGLUMLP, bounds: list[tuple[int, int]], rank: int, gather) -> None:
        super().__init__()
        a, b = bounds[rank]
        self.gate = invariant.pack(mlp.gate_proj.weight.detach()[a:b])
        self.up = invariant.pack(mlp.up_proj.weight.detach()[a:b])
        self.full = mlp  # its down_proj (made row-invariant after the split is built)
        self.bounds, self.gather = bounds, gather
        self.width = max(hi - lo for lo, hi in bounds)

    def forward(self, x: Tensor) -> Tensor:
        h = invariant.activation_(self.full.act)(invariant.linear(x, self.gate)).mul_(invariant.linear(x, self.up))
        padded = h.new_zeros(h.shape[0], self.width)
        padded[:, : h.shape[1]] = h
        parts = self.gather(padded)  # [W, B, width]
        h = torch.cat([parts[r, :, : hi - lo] for r, (lo, hi) in enumerate(self.bounds)], dim=1)
        return self.full.down_proj(h)


def split_for_decode(model: LlamaForCausalLM, world: int, rank: int, gather) -> LlamaForCausalLM | None:
    """A shallow copy of `model` (before `make_row_invariant`, whose layers it shares but for the
    MLPs) for decode-only steps: MLPs `InvariantSplitMLP`; `gather(t)` stacks every SP rank's t.
    None where a slice's columns might not be the whole's (oneDNN not run; slices < 2 wide)."""
    cfg = model.config
    bounds = [(r * cfg.intermediate_size // world, (r + 1) * cfg.intermediate_size // world) for r in range(world)]
    dtype = model.model.embed_tokens.weight.dtype
    if not invariant.ONEDNN or dtype not in (torch.float32, torch.bfloat16) or min(b - a for a, b in bounds) < 2:
        return None
    return with_mlps(model, lambda mlp: InvariantSplitMLP(mlp, bounds, rank, gather))


def logits(model: LlamaForCausalLM, hidden: Tensor, vocab: slice = slice(None)) -> Tensor:
    """`model.compute_logits` through `invariant.linear`: hidden [N, hidden] (fp32, the final
    norm's) -> [N, vocab] fp32 (the head's rows for `vocab` packed at first use, kept on the
    model). The head runs in the model's dtype; in a half type a whole vocabulary's rows are then
    refined (`refine`), a slice's are not: the caller refines them once gathered whole."""
    heads = model.__dict__.setdefault("_packed_heads", {})
    key = (vocab.start, vocab.stop)
    if key not in heads:
        heads[key] = (invariant.pack(model.head_weight[vocab]), model.head_weight.dtype)
    packed, dtype = heads[key]
    out = invariant.linear(hidden.to(dtype), packed).float()
    whole = range(model.config.vocab_size)
    return refine(model, out, hidden) if whole[vocab] == whole else out


# Rows refined at once: bounds the gathered weight rows ([rows, REFINE, hidden] fp32, ~4.7 MB).
REFINE_ROWS = 64


def refine(model: LlamaForCausalLM, logits: Tensor, hidden: Tensor) -> Tensor:
    """compute_logits' fp32 refinement, row-invariant: each row's `REFINE` largest logits
    (logits [N, vocab], whole rows: a vocabulary slice's top would be another set at every SP
    degree) recomputed in fp32 from hidden [N, hidden] fp32, in place; returns logits.

    compute_logits' einsum is a batched GEMM whose bits depend on the batch; here each logit is
    its row's fp32 products summed alone (`invariant.row_dots`), and topk picks a row's columns
    from that row alone, so a row gets the same bits alone (a decode step) or among a prompt's."""
    weight = model.head_weight
    if weight.dtype == torch.float32 or not logits.shape[-1]:
        return logits
    k = min(REFINE, logits.shape[-1])
    for a in range(0, logits.shape[0], REFINE_ROWS):
        rows = logits[a : a + REFINE_ROWS]
        top = rows.topk(k, dim=-1).indices  # [n, k]
        rows.scatter_(-1, top, invariant.row_dots(hidden[a : a + REFINE_ROWS].float(), weight[top].float()))
    return logits
