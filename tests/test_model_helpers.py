"""Shared builders for the model tests (no tests here): tiny random HF models, packed
ragged batches, and HF reference logits. transformers is imported lazily so that
processes spawned by the TP tests, which import this module, start fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

VOCAB = 101


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer random transformers model. kind: llama | qwen2 | qwen3 | mistral | gemma3."""
    import transformers as tf

    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if kind == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields)).eval()
    randomize(model, seed)
    return model


def randomize(model: nn.Module, seed: int) -> None:
    """HF's init (std 0.02) makes every logit ~0, so a wrong model would still pass an
    atol test. Re-draw weights so activations and logits are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # [out, in]: keep each output's variance ~1
                p.copy_(noise * p.shape[1] ** -0.5)


def save_tiny(tmp: Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> tuple[nn.Module, Path]:
    model = tiny_hf_model(kind, seed, **overrides)
    model.save_pretrained(tmp)
    return model, tmp


@dataclass
class PackedBatch:
    """Several sequences in one [T] token stream, shuffled so order carries no meaning."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T] true position of each token within its sequence
    seq_ids: Tensor  # [T]
    per_seq: list[tuple[Tensor, Tensor]]  # (ids [L], positions [L]) in position order
    order: Tensor  # packed index -> index in the unshuffled concatenation


def packed_batch(
    lengths: list[int], starts: list[int], seed: int = 0, shuffle: bool = True, vocab: int = VOCAB
) -> PackedBatch:
    """Sequence i has `lengths[i]` tokens at positions starts[i] .. starts[i]+len-1 (a start
    > 0 stands for a chunk whose earlier tokens are not in this batch)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(torch.randint(0, vocab, (n,), generator=gen), torch.arange(s, s + n)) for n, s in zip(lengths, starts)]
    ids = torch.cat([i for i, _ in per_seq])
    pos = torch.cat([p for _, p in per_seq])
    seq = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])
    order = torch.randperm(len(ids), generator=gen) if shuffle else torch.arange(len(ids))
    return PackedBatch(ids[order], pos[order], seq[order], per_seq, order)


def hf_logits(hf: nn.Module, batch: PackedBatch) -> Tensor:
    """HF logits for each sequence run alone, arranged in the batch's packed order: [T, V]."""
    with torch.no_grad():
        flat = torch.cat([hf(input_ids=i[None], position_ids=p[None]).logits[0] for i, p in batch.per_seq])
    return flat[batch.order]


def our_logits(model: nn.Module, batch: PackedBatch) -> Tensor:
    from seqpar.model import dense_causal_attention

    with torch.no_grad():
        attention = dense_causal_attention(batch.seq_ids, batch.positions)
        return model.compute_logits(model(batch.input_ids, batch.positions, attention))
