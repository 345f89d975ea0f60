"""The model against transformers, and ModelConfig validation.

Tolerance: both sides run the same fp32 ops in a slightly different order (per-sequence
SDPA vs our masked packed attention), which moves logits of size ~1-10 by ~1e-6;
atol 1e-4 leaves ample room and still catches any real mistake (wrong rope, head
mapping or bias gives errors of order 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqpar.model import ConfigError, LlamaForCausalLM, ModelConfig, load_model
from seqpar.model.rope import RotaryEmbedding, apply_rotary
from test_model_helpers import hf_logits, our_logits, packed_batch, save_tiny, tiny_hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 5e5,
}

CASES = {
    "llama_gqa": ("llama", {}),
    "llama_mha_attention_bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True}),
    "llama3_rope_scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama_tied_head_dim": ("llama", {"tie_word_embeddings": True, "head_dim": 16}),
    "qwen2_bias_tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"num_key_value_heads": 1}),
}


@pytest.mark.parametrize("row_tile", [None, 5], ids=["untiled", "tiled"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_on_shuffled_packed_batch(
    tmp_path: Path, case: str, row_tile: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if row_tile is not None:  # a long step's tile-by-tile layer, in tiles that cut sequences anywhere
        monkeypatch.setattr("seqpar.model.llama.ROW_TILE", row_tile)
    kind, overrides = CASES[case]
    hf, path = save_tiny(tmp_path, kind, **overrides)
    model, config = load_model(path)
    # Three ragged sequences, one starting mid-stream at position 40, tokens shuffled.
    batch = packed_batch([7, 13, 3], starts=[0, 40, 0])
    expected = hf_logits(hf, batch)
    ours = our_logits(model, batch)
    assert ours.dtype == torch.float32 and ours.shape == (23, config.vocab_size)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_attention_callable_contract(tmp_path: Path) -> None:
    _, path = save_tiny(tmp_path, "llama")
    model, config = load_model(path)
    seen: list[tuple[int, tuple, tuple, tuple]] = []

    def spy(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return torch.zeros_like(q)

    hidden = model(torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2]), spy)
    assert hidden.shape == (3, config.hidden_size)
    d = config.head_dim
    assert seen == [(i, (3, 4, d), (3, 2, d), (3, 2, d)) for i in range(config.num_layers)]
    with pytest.raises(RuntimeError, match=r"layer 0: attention returned shape \(3, 4\)"):
        model(torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2]), lambda i, q, k, v: q[:, :, 0])
    with pytest.raises(ValueError, match="must both be"):
        model(torch.tensor([3, 4, 5]), torch.tensor([0, 1]), spy)


def test_rotary_depends_on_positions_not_order() -> None:
    config = ModelConfig.from_hf(tiny_hf_model("llama").config.to_dict())
    rope = RotaryEmbedding(config)
    x = torch.randn(5, 2, config.head_dim)
    pos = torch.tensor([7, 0, 300, 2, 9])
    perm = torch.tensor([3, 0, 4, 1, 2])
    cos, sin = rope(pos, torch.float32)
    cos_p, sin_p = rope(pos[perm], torch.float32)
    torch.testing.assert_close(apply_rotary(x[perm], cos_p, sin_p), apply_rotary(x, cos, sin)[perm])
    # Rotation preserves norms and position 0 is the identity.
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x[1:2], cos[1:2], sin[1:2]), x[1:2])


def test_model_has_no_lm_head_when_tied() -> None:
    config = ModelConfig.from_hf(tiny_hf_model("llama", tie_word_embeddings=True).config.to_dict())
    model = LlamaForCausalLM(config)
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()


# ---- ModelConfig -------------------------------------------------------------------------


def _llama_dict(**changes: object) -> dict:
    d = tiny_hf_model("llama").config.to_dict()
    d.update(changes)
    return d


def test_from_hf_reads_transformers4_rope_layout_and_eos_list() -> None:
    d = _llama_dict(
        eos_token_id=[2, 5],
        rope_theta=5e5,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    del d["rope_parameters"]
    config = ModelConfig.from_hf(d)
    assert config.rope_theta == 5e5 and config.eos_token_ids == (2, 5)
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config.head_dim == 12 and config.group_size == 2


def test_from_hf_rejects_unsupported_architecture_by_name() -> None:
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            {"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}},
            "rope scaling type 'longrope' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
            r"llama3 rope scaling lacks \['low_freq_factor', 'high_freq_factor'\]",
        ),
        ({"eos_token_id": 500}, r"special token id 500 is outside the vocabulary \[0, 101\)"),
        ({"num_hidden_layers": 0}, "num_layers must be a positive int"),
    ],
)
def test_from_hf_validation_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(_llama_dict(**changes))


def test_mistral_sliding_window_on_every_layer() -> None:
    d = tiny_hf_model("mistral").config.to_dict()
    assert not ModelConfig.from_hf(d).windowed  # sliding_window None: global
    d["sliding_window"] = 64
    config = ModelConfig.from_hf(d)
    assert [config.window(i) for i in range(config.num_layers)] == [64] * config.num_layers


def test_config_is_frozen_hashable_and_owns_its_rope_dict() -> None:
    scaling = dict(LLAMA3_ROPE)
    config = ModelConfig.from_hf(_llama_dict(rope_parameters=scaling))
    with pytest.raises(AttributeError):
        config.num_heads = 8  # type: ignore[misc]
    scaling["factor"] = 2.0
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0
    again = ModelConfig.from_hf(_llama_dict(rope_parameters=dict(LLAMA3_ROPE)))
    assert again == config and hash(again) == hash(config) and len({config, again}) == 1
