"""Plain-torch causal attention for a packed batch: the single-process reference that the
model, tensor-parallel and sequence-parallel paths are all checked against."""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.model.config import ModelConfig
from seqpar.model.llama import AttentionFn


def dense_causal_attention(
    seq_ids: Tensor, positions: Tensor | None = None, config: ModelConfig | None = None
) -> AttentionFn:
    """Attention where token i sees token j iff they belong to the same sequence and
    position[j] <= position[i].

    seq_ids: [T] sequence id of each token. positions: [T] true positions; when None, each
    sequence's tokens are taken to be in order (position = rank within its sequence).
    Builds a [T, T] mask: for tests and small batches only. `config`: the model's softmax scale and
    its layers' sliding windows (else head_dim ** -0.5, every layer global).
    """
    if positions is None:
        positions = torch.empty_like(seq_ids)
        for s in seq_ids.unique():
            idx = (seq_ids == s).nonzero().squeeze(1)
            positions[idx] = torch.arange(idx.numel(), device=seq_ids.device)
    visible = (seq_ids[:, None] == seq_ids[None, :]) & (positions[None, :] <= positions[:, None])  # [Tq, Tk]

    def attention(layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        window = None if config is None else config.window(layer_idx)
        scale = q.shape[-1] ** -0.5 if config is None else config.attention_scale
        seen = visible if window is None else visible & (positions[None, :] > positions[:, None] - window)
        group = q.shape[1] // k.shape[1]
        # Local q head i reads local kv head i // group (GQA; also the TP head-shard rule).
        k = k.repeat_interleave(group, dim=1)  # [T, Hq, D]
        v = v.repeat_interleave(group, dim=1)  # [T, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [Hq, Tq, Tk]
        scores = scores.masked_fill(~seen.to(q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)  # [Tq, Hq, D]

    return attention
