"""The model's per-token work made row-invariant, for deterministic inference.

`make_row_invariant` swaps every linear layer for one whose rows do not depend on the rows
computed with them (`seqpar.kernels.invariant.linear`) and the MLP's SiLU for one whose bits do
not depend on where an element sits. The rest of the per-token work already is row-invariant
(measured: RMSNorm's fused fp32 op and its bf16 path, RoPE's cos / sin / multiply-adds, the
embedding gather, the residual adds). Attention is the caller's (seqpar.kernels.canonical).
"""

from __future__ import annotations

from torch import Tensor, nn

from seqpar.kernels import invariant
from seqpar.model.layers import SwiGLUMLP
from seqpar.model.llama import LlamaForCausalLM


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
        h = invariant.silu_(self.gate_proj(x))
        return self.down_proj(h.mul_(self.up_proj(x)))


def make_row_invariant(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Rewrite `model` in place (same weights) so that a token's hidden states are the same bits
    whatever rows share its step; returns it."""
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, InvariantLinear(getattr(attn, name)))
        mlp = layer.mlp
        mlp.__class__ = InvariantSwiGLU
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, InvariantLinear(getattr(mlp, name)))
    return model


def logits(model: LlamaForCausalLM, hidden: Tensor, vocab: slice = slice(None)) -> Tensor:
    """`model.compute_logits` through `invariant.linear`: hidden [N, hidden] -> [N, vocab] fp32
    (the head's rows for `vocab` packed at first use, kept on the model)."""
    heads = model.__dict__.setdefault("_packed_heads", {})
    key = (vocab.start, vocab.stop)
    if key not in heads:
        weight = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        heads[key] = invariant.pack(weight[vocab])
    return invariant.linear(hidden, heads[key]).float()
