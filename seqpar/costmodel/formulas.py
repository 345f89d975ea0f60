"""FLOP and byte counts: what one step of a Llama-family model costs, and what each sequence-parallel
strategy sends, exactly as seqpar's counted collectives (`seqpar.comm.collectives.STATS`) record it.

Vocabulary: T tokens of a sequence, `counts[r]` the tokens SP rank r holds (its shard), Hq / Hkv
query / KV heads a rank computes (after any tensor parallelism), D head dim, `b` bytes per element
of q/k/v. Byte counts are what one rank sends in one layer's attention.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqpar.model.config import ModelConfig
from seqpar.strategies.ulysses import kv_heads_for

LSE_BYTES = 4  # partial results carry an fp32 log-sum-exp per query and head, whatever the model dtype


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


def kv_heads_per_tp_rank(mc: ModelConfig, tp: int) -> int:
    # TP wider than the KV heads replicates them (vLLM does the same): each rank still holds one.
    return max(1, mc.num_kv_heads // tp)


def kv_bytes_per_token(mc: ModelConfig, tp: int, dtype_bytes: int) -> int:
    """KV cache bytes one TP rank holds per token: K and V of its heads in every layer."""
    return 2 * mc.num_layers * kv_heads_per_tp_rank(mc, tp) * mc.head_dim * dtype_bytes


# ---- communication of one layer's attention, per rank -----------------------------------------
def ring_bytes(counts: Sequence[int], rank: int, hkv: int, d: int, b: int) -> int:
    """Pass-KV: at steps 0 .. W-2 a rank forwards the K and V block it holds (its own first)."""
    w = len(counts)
    return sum(2 * counts[(rank - s) % w] * hkv * d * b for s in range(w - 1))


def pass_q_bytes(counts: Sequence[int], rank: int, hq: int, d: int, b: int) -> int:
    """Pass-Q: Q blocks travel the ring like K/V in pass-KV, then each foreign partial (out and
    lse, fp32) goes home in one all-to-all."""
    w = len(counts)
    ring = sum(counts[(rank - s) % w] * hq * d * b for s in range(w - 1))
    return ring + sum(counts[j] * hq * (d + 1) * LSE_BYTES for j in range(w) if j != rank)


def allgather_bytes(counts: Sequence[int], hkv: int, d: int, b: int) -> int:
    """All-gather K/V: gloo needs equal parts, so the shard is padded to the largest and sent W - 1 times."""
    w = len(counts)
    return (w - 1) * max(counts) * 2 * hkv * d * b if w > 1 else 0


def ulysses_bytes(counts: Sequence[int], rank: int, hq_total: int, hkv_total: int, d: int, b: int) -> int:
    """Ulysses: q, k, v head slices to every other rank, then the output head slices back. KV heads
    fewer than the degree are replicated (`kv_heads_for`), which costs bytes."""
    w = len(counts)
    hq = hq_total // w
    out = sum(
        counts[rank] * (hq + 2 * len(kv_heads_for(hq_total, hkv_total, w, j))) * d * b for j in range(w) if j != rank
    )
    back = sum(counts[j] * hq * d * b for j in range(w) if j != rank)
    return out + back


def attention_bytes(strategy: str, counts: Sequence[int], rank: int, hq: int, hkv: int, d: int, b: int) -> int:
    """Bytes `rank` sends in one layer's attention under `strategy` (hq, hkv: the heads of the SP group)."""
    if len(counts) == 1 or strategy == "local":
        return 0
    if strategy == "ring":
        return ring_bytes(counts, rank, hkv, d, b)
    if strategy == "pass_q":
        return pass_q_bytes(counts, rank, hq, d, b)
    if strategy == "allgather":
        return allgather_bytes(counts, hkv, d, b)
    if strategy == "ulysses":
        return ulysses_bytes(counts, rank, hq, hkv, d, b)
    raise ValueError(f"no byte formula for strategy {strategy!r}; known: local, ring, pass_q, allgather, ulysses")


def all_reduce_bytes(nbytes: int, world: int) -> int:
    """A ring all-reduce sends 2 (W - 1) / W of the tensor per rank (reduce-scatter, then all-gather)."""
    return 2 * (world - 1) * nbytes // world if world > 1 else 0


def decode_merge_bytes(hq: int, d: int, world: int, rows: int = 1) -> int:
    """Decode, all-gather merge over the process group: each rank's partial (out and lse, fp32) of
    `rows` decoding tokens to the W - 1 others."""
    return (world - 1) * rows * hq * (d + 1) * LSE_BYTES
