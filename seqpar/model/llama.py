"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3) in plain torch.

The model knows nothing about parallelism or KV caches: tokens of a packed batch only
meet inside the `attention` callable the caller passes to `forward`. Module and
parameter names mirror transformers' so checkpoint keys map one to one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqpar.model.config import ModelConfig
from seqpar.model.layers import GemmaRMSNorm, RMSNorm, SwiGLUMLP
from seqpar.model.rope import RotaryEmbedding, apply_rotary

# attention(layer_idx, q [T, Hq_local, D], k [T, Hkv_local, D], v [T, Hkv_local, D])
#   -> out [T, Hq_local, D]; q and k already rotated; the softmax scale is the config's
#   `attention_scale`, the layer's window `config.window(layer_idx)`.
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def norm(config: ModelConfig, size: int) -> RMSNorm:
    """The family's RMSNorm over `size` features (Gemma's scales by 1 + weight)."""
    return (GemmaRMSNorm if config.architecture == "gemma3" else RMSNorm)(size, config.rms_norm_eps)


class LlamaAttention(nn.Module):
    """Projections around a caller-supplied attention.

    `num_heads` / `num_kv_heads` are the heads this rank computes; tensor-parallel
    rewriting (seqpar.model.parallelize) shrinks them together with the projections.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        # Global ids of the local heads, kept for the engine (e.g. KV-cache layout).
        self.q_head_ids: list[int] = list(range(config.num_heads))
        self.kv_head_ids: list[int] = list(range(config.num_kv_heads))
        hidden, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj: nn.Module = nn.Linear(hidden, config.num_heads * d, bias=bias)
        self.k_proj: nn.Module = nn.Linear(hidden, config.num_kv_heads * d, bias=bias)
        self.v_proj: nn.Module = nn.Linear(hidden, config.num_kv_heads * d, bias=bias)
        self.o_proj: nn.Module = nn.Linear(config.num_heads * d, hidden, bias=config.o_proj_bias)
        # Qwen3's per-head norms: over head_dim, so the same for every head and never sharded. None
        # for the other families, whose checkpoints have no such keys.
        self.q_norm: nn.Module | None = norm(config, d) if config.qk_norm else None
        self.k_norm: nn.Module | None = norm(config, d) if config.qk_norm else None
        # q, k and v as one layer of their weights stacked, where a copy of the model sets it (the
        # engine's decode copies: seqpar.engine.parallel): one GEMM reads the three.
        self.qkv_proj: nn.Module | None = None

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden] -> rotated q [T, Hq, D], rotated k and v [T, Hkv, D]."""
        t, d = x.shape[0], self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        # Here, the one place q and k are rotated, so every copy of a layer (tiled, compiled, packed
        # for decode, tensor-parallel) normalizes them too.
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attention: AttentionFn) -> Tensor:
        out = attention(self.layer_idx, q, k, v)
        if out.shape != q.shape:
            raise RuntimeError(
                f"layer {self.layer_idx}: attention returned shape {tuple(out.shape)}, "
                f"expected {tuple(q.shape)} ([T, Hq_local, D])"
            )
        return out

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        out = self.attend(q, k, v, attention)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = norm(config, config.hidden_size)
        self.post_attention_layernorm = norm(config, config.hidden_size)
        # Gemma 3's "sandwich": the attention's and the MLP's outputs are normed too before their
        # residual adds, and the MLP's input by its own norm.
        self.sandwich = config.architecture == "gemma3"
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(config, config.hidden_size)
            self.post_feedforward_layernorm = norm(config, config.hidden_size)

    # (tile_pre, tile_post) compiled, for full tiles: set by seqpar.model.compiled.
    tiles: tuple[Callable, Callable] | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn, fused: bool = False) -> Tensor:
        """`fused`: the rows through the compiled functions whatever their count (a decode step a CUDA
        graph captures: inductor's fused kernels instead of a dozen small ones a layer)."""
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attention))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if x.shape[0] < ROW_TILE and not fused:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
            return x + self.mlp(self.post_attention_layernorm(x))
        if x.device.type != "cpu" or fused:  # a GPU's GEMMs want the whole chunk: its per-token work compiled whole
            pre, post = self.tiles or (tile_pre, tile_post)
            q, k, v = pre(self, x, cos, sin)
            return post(self, x, self.self_attn.attend(q, k, v, attention).reshape(x.shape[0], -1))
        # Many tokens: everything but attention runs tile by tile, so each tile's activations
        # (the MLP's [rows, intermediate] above all) stay in cache between the ops that use them.
        attn, t = self.self_attn, x.shape[0]
        compiled = self.tiles or (tile_pre, tile_post)
        q = x.new_empty(t, attn.num_heads, attn.head_dim)
        k = x.new_empty(t, attn.num_kv_heads, attn.head_dim)
        v = torch.empty_like(k)
        for a, b in _tiles(t):
            pre = compiled[0] if b - a == ROW_TILE else tile_pre  # compiled for full tiles only
            q[a:b], k[a:b], v[a:b] = pre(self, x[a:b], cos[a:b], sin[a:b])
        out = attn.attend(q, k, v, attention).reshape(t, -1)
        y = torch.empty_like(x)
        for a, b in _tiles(t):
            post = compiled[1] if b - a == ROW_TILE else tile_post
            y[a:b] = post(self, x[a:b], out[a:b])
        return y


def tile_pre(layer: LlamaDecoderLayer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A tile's work before attention: rotated q, k and v of its rows."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)


def tile_post(layer: LlamaDecoderLayer, x: Tensor, attn_out: Tensor) -> Tensor:
    """A tile's work after attention: o_proj, the residual adds and the MLP."""
    h = x + layer.self_attn.o_proj(attn_out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


# Rows per tile of the per-token work (projections, norms, RoPE, MLP) in a long step: a tile's
# activations (the MLP's [rows, intermediate] above all) stay in cache between the ops that use
# them. Measured on SmolLM2's layer (2-core machine, interleaved rounds): 4,096 rows on one
# thread 9% faster than untiled, 8,192 rows on two threads 16%; 512-row tiles gain less.
ROW_TILE = 1024


def _tiles(t: int) -> list[tuple[int, int]]:
    return [(a, min(a + ROW_TILE, t)) for a in range(0, t, ROW_TILE)]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = norm(config, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        # Gemma 3: the sliding layers' own RoPE base, unscaled
        self.local_rotary_emb: RotaryEmbedding | None = None
        if config.local_rope_theta is not None:
            self.local_rotary_emb = RotaryEmbedding(
                replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
            )


# Logits per row recomputed in fp32 when the model runs in a half type (compute_logits).
REFINE = 32


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: no lm_head module at all, so the checkpoint key set and state_dict agree
        # and loading cannot untie the two.
        self.lm_head: nn.Linear | None = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn, fused: bool = False) -> Tensor:
        """input_ids, positions: [T] (a packed batch, any token order) -> hidden [T, hidden]
        after the final norm, in fp32 (it feeds only the logits). `fused`: see LlamaDecoderLayer."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [T]; got {tuple(input_ids.shape)} and {tuple(positions.shape)}"
            )
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        if self.config.architecture == "gemma3":  # scaled by sqrt(hidden), rounded to the dtype first (as HF)
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        cos, sin = self.model.rotary_emb(positions, x.dtype)  # [T, D] each, shared by all layers
        local = self.model.local_rotary_emb
        cos_l, sin_l = (cos, sin) if local is None else local(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            sliding = self.config.window(i) is not None
            x = layer(x, cos_l if sliding else cos, sin_l if sliding else sin, attention, fused)
        return self.model.norm(x, fp32_out=True)

    @property
    def head_weight(self) -> Tensor:
        """The output head's weight [vocab, hidden] (the embeddings when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(
        self, hidden: Tensor, vocab: slice = slice(None), head: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32 (sampling wants fp32); `vocab`: only
        those token ids' columns (a vocab-parallel head).

        A half-precision GEMM rounds every logit to 8 significant bits: steps of 0.125 at 16-32,
        so the top tokens tie and their log-probs move in steps; greedy decoding then follows
        the tie-break, and any rounding upstream (another SP degree) flips it. The `REFINE`
        largest logits of each row, which decide greedy tokens, top log-probs and nearly all
        the softmax mass, are recomputed in fp32 from the fp32 final norm. A row's true top
        tokens are among its rounded top `REFINE` unless more than that many tie within a step.
        `head`, when given, computes the rounded product (the same weights, packed).
        """
        weight = self.head_weight[vocab]
        x = hidden.to(weight.dtype)
        logits = (F.linear(x, weight) if head is None else head(x)).float()  # [N, V_slice]
        if weight.dtype == torch.float32 or logits.shape[-1] == 0:
            return logits
        top = logits.topk(min(REFINE, logits.shape[-1]), dim=-1).indices  # [N, k]
        exact = torch.einsum("nd,nkd->nk", hidden.float(), weight[top].float())  # [N, k]: k rows of W each
        return logits.scatter_(-1, top, exact)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device


def with_mlps(
    model: LlamaForCausalLM,
    make_mlp: Callable[[nn.Module], nn.Module],
    make_attn: Callable[[nn.Module], nn.Module] | None = None,
) -> LlamaForCausalLM:
    """A shallow copy of `model` sharing every weight, each layer's MLP replaced by `make_mlp(mlp)`
    (and its attention by `make_attn(self_attn)` when given).

    Shallow copies share their `_modules` dict with the original: each copy gets its own before
    children are replaced, so `model` is left exactly as it was.
    """
    copy_ = copy.copy(model)
    copy_._modules = dict(model._modules)
    copy_.model = copy.copy(model.model)
    copy_.model._modules = dict(model.model._modules)
    copy_.model.layers = nn.ModuleList()
    for layer in model.model.layers:
        new = copy.copy(layer)
        new._modules = dict(layer._modules, mlp=make_mlp(layer.mlp))
        if make_attn is not None:
            new.self_attn = make_attn(layer.self_attn)
        copy_.model.layers.append(new)
    return copy_
