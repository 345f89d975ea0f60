"""FLOP and byte counts: what one step of a Llama-family model costs, and what each sequence-parallel
strategy sends, exactly as seqpar's counted collectives (`seqpar.comm.collectives.STATS`) record it
(each strategy's own formula sits in its module, declared in its `Cost`: `seqpar/strategies/pricing.py`).

Vocabulary: T tokens of a sequence, `counts[r]` the tokens SP rank r holds (its shard), Hq / Hkv
query / KV heads a rank computes (after any tensor parallelism), D head dim, `b` bytes per element
of q/k/v. Byte counts are what one rank sends in one layer's attention.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqpar.model.config import ModelConfig
from seqpar.strategies.pricing import LSE_BYTES
from seqpar.strategies.registry import costs


# ---- compute ----------------------------------------------------------------------------------
def linear_params_per_layer(mc: ModelConfig) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o and the SwiGLU MLP (gate, up, down)."""
    attn = (
        mc.hidden_size * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
        + mc.num_heads * mc.head_dim * mc.hidden_size
    )
    return attn + 3 * mc.hidden_size * mc.intermediate_size


def weight_params(mc: ModelConfig) -> int:
    """Every weight: layers, embedding, and the LM head unless it is tied to the embedding (norms are noise)."""
    embed = mc.vocab_size * mc.hidden_size
    return mc.num_layers * linear_params_per_layer(mc) + embed * (1 if mc.tie_word_embeddings else 2)


def linear_flops(mc: ModelConfig, tokens: int, logit_rows: int = 0) -> int:
    """Multiply-adds x 2 of every layer's matmuls for `tokens` rows, plus the LM head for `logit_rows`
    (prefill needs logits for the last token only)."""
    return 2 * tokens * mc.num_layers * linear_params_per_layer(mc) + 2 * logit_rows * mc.hidden_size * mc.vocab_size


def causal_pairs(new: int, cached: int = 0) -> int:
    """Query-key pairs of `new` tokens after `cached` ones under a causal mask: each new token sees
    every cached one, and the new ones form a triangle with its diagonal."""
    return new * cached + new * (new + 1) // 2


def attention_flops(mc: ModelConfig, pairs: int) -> int:
    """QK^T (2 D per pair and head) and PV (2 D), over every layer and query head."""
    return 4 * mc.head_dim * mc.num_heads * pairs * mc.num_layers


def window_pairs(new: int, cached: int, window: int) -> int:
    """`causal_pairs` under a sliding window: the query at position p sees min(p + 1, window) keys."""

    def upto(n: int) -> int:  # sum of min(x, window) for x in 1..n
        k = min(n, window)
        return k * (k + 1) // 2 + max(0, n - window) * window

    return upto(cached + new) - upto(cached)


def prefill_attention_flops(mc: ModelConfig, new: int, cached: int = 0) -> int:
    """`attention_flops` of `new` tokens after `cached` ones, each layer by its own rule: global
    layers see every earlier key, sliding-window layers the last `window` (Gemma 3: 5 of 6 layers)."""
    per_layer = [
        causal_pairs(new, cached) if (w := mc.window(i)) is None else window_pairs(new, cached, w)
        for i in range(mc.num_layers)
    ]
    return 4 * mc.head_dim * mc.num_heads * sum(per_layer)


def kv_read_bytes(mc: ModelConfig, tp: int, dtype_bytes: int, tokens: int) -> int:
    """K/V bytes one decode step reads from `tokens` cached keys on one TP rank: every key in a global
    layer, at most a window's in a sliding one."""
    per_key = 2 * kv_heads_per_tp_rank(mc, tp) * mc.head_dim * dtype_bytes
    seen = [tokens if (w := mc.window(i)) is None else min(tokens, w) for i in range(mc.num_layers)]
    return per_key * sum(seen)


def kv_heads_per_tp_rank(mc: ModelConfig, tp: int) -> int:
    # TP wider than the KV heads replicates them (vLLM does the same): each rank still holds one.
    return max(1, mc.num_kv_heads // tp)


def kv_bytes_per_token(mc: ModelConfig, tp: int, dtype_bytes: int) -> int:
    """KV cache bytes one TP rank holds per token counting every layer: K and V of its heads (what a
    model without sliding windows holds; `kv_bytes_per_rank` knows windows)."""
    return 2 * mc.num_layers * kv_heads_per_tp_rank(mc, tp) * mc.head_dim * dtype_bytes


def kv_bytes_per_rank(mc: ModelConfig, tp: int, dtype_bytes: int, context: int, cp: int) -> int:
    """KV cache bytes the busiest rank holds for one sequence of `context` tokens over `cp` ranks: a
    global layer's tokens spread over the ranks; a sliding-window layer keeps only its last window
    (the engine's cache frees the rest), which may all lie on one rank."""
    layer = kv_bytes_per_token(mc, tp, dtype_bytes) // mc.num_layers
    windows = [mc.window(i) for i in range(mc.num_layers)]
    global_layers = windows.count(None)
    kept = sum(min(context, w) for w in windows if w is not None)
    return layer * (global_layers * -(-context // cp) + kept)


# ---- communication of one layer's attention, per rank -----------------------------------------
def attention_bytes(strategy: str, counts: Sequence[int], rank: int, hq: int, hkv: int, d: int, b: int) -> int:
    """Bytes `rank` sends in one layer's attention under `strategy` (hq, hkv: the heads of the SP
    group), as the strategy declares them (its `Cost.sent_bytes`); "local" (one rank) sends none."""
    if len(counts) == 1 or strategy == "local":
        return 0
    priced = costs()
    if strategy not in priced:
        raise ValueError(f"no byte formula for strategy {strategy!r}; known: local, {', '.join(priced)}")
    return priced[strategy].sent_bytes(counts, rank, hq, hkv, d, b)


def all_reduce_bytes(nbytes: int, world: int) -> int:
    """A ring all-reduce sends 2 (W - 1) / W of the tensor per rank (reduce-scatter, then all-gather)."""
    return 2 * (world - 1) * nbytes // world if world > 1 else 0


def decode_merge_bytes(hq: int, d: int, world: int, rows: int = 1) -> int:
    """Decode, all-gather merge over the process group: each rank's partial (out and lse, fp32) of
    `rows` decoding tokens to the W - 1 others."""
    return (world - 1) * rows * hq * (d + 1) * LSE_BYTES
