"""Qwen3 dense: per-head q/k RMSNorm before RoPE and a head_dim that is not hidden / heads, against
transformers' Qwen3ForCausalLM, from HF safetensors and from GGUF, in the model and in the engine.
Tolerances as in test_model.py and test_engine.py (1e-4 absolute in fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqpar.model import LlamaForCausalLM, ModelConfig, ModelLoadError, load_model
from seqpar.model.weights import build_model
from test_engine import _save, check_against_hf
from test_model_gguf import write_gguf
from test_model_helpers import hf_logits, our_logits, packed_batch, save_tiny, tiny_hf_model

# head_dim 32 over hidden 64 / 4 heads = 16: q_proj is wider than hidden, as in Qwen3-0.6B.
QWEN3 = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
# Qwen/Qwen3-0.6B's config.json, as published (transformers 4.51).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("row_tile", [None, 5], ids=["untiled", "tiled"])
def test_logits_match_transformers(tmp_path: Path, tied: bool, row_tile: int | None, monkeypatch) -> None:
    if row_tile is not None:  # a long step's tile-by-tile layer, in tiles that cut sequences anywhere
        monkeypatch.setattr("seqpar.model.llama.ROW_TILE", row_tile)
    hf, path = save_tiny(tmp_path, "qwen3", **QWEN3, tie_word_embeddings=tied)
    model, config = load_model(path)
    assert config.architecture == "qwen3" and config.qk_norm and config.head_dim == 32
    assert config.rope_theta == 1e6 and (model.lm_head is None) == tied
    batch = packed_batch([7, 13, 3], starts=[0, 40, 0])
    expected = hf_logits(hf, batch)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(our_logits(model, batch), expected, atol=1e-4, rtol=0)
    # The norms matter: without them the logits are far off (a guard against a no-op norm).
    for layer in model.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = None
    assert (our_logits(model, batch) - expected).abs().max() > 1e-2


def test_published_config_and_key_shapes() -> None:
    config = ModelConfig.from_hf(QWEN3_06B)
    assert (config.architecture, config.head_dim, config.num_heads, config.hidden_size) == ("qwen3", 128, 16, 1024)
    assert config.qk_norm and not config.attention_bias and not config.o_proj_bias and config.tie_word_embeddings
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    with torch.device("meta"):
        state = LlamaForCausalLM(config).state_dict()
    assert state["model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    assert state["model.layers.27.self_attn.k_norm.weight"].shape == (128,)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (16 * 128, 1024)
    assert "lm_head.weight" not in state
    # Other families keep their key sets: no norms on q/k.
    llama = ModelConfig.from_hf({**QWEN3_06B, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with torch.device("meta"):
        assert not any("q_norm" in k for k in LlamaForCausalLM(llama).state_dict())


def test_sliding_window_only_when_used() -> None:
    # A window named but switched off (many Qwen configs) is full attention.
    off = ModelConfig.from_hf({**QWEN3_06B, "sliding_window": 4096})
    assert off.architecture == "qwen3" and not off.windowed
    # On: the layers from max_window_layers on slide (transformers' rule), or those layer_types name.
    on = ModelConfig.from_hf({**QWEN3_06B, "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 20})
    assert [on.window(i) for i in (19, 20, 27)] == [None, 4096, 4096]
    types = ["full_attention", "sliding_attention"] * 14
    listed = ModelConfig.from_hf(
        {**QWEN3_06B, "sliding_window": 4096, "use_sliding_window": True, "layer_types": types}
    )
    assert [listed.window(i) for i in range(3)] == [None, 4096, None]


def test_missing_norm_is_a_load_error(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen3", **QWEN3)
    state = {k: v for k, v in hf.state_dict().items() if "k_norm" not in k}
    with pytest.raises(ModelLoadError, match=r"missing keys: model\.layers\.0\.self_attn\.k_norm\.weight"):
        build_model(ModelConfig.from_hf(hf.config.to_dict()), state, torch.float32, "test")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_matches_transformers(tmp_path: Path, tied: bool, monkeypatch) -> None:
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    hf = tiny_hf_model("qwen3", **QWEN3, tie_word_embeddings=tied)
    file = write_gguf(hf, tmp_path / "tiny.gguf", "qwen3")
    model, config = load_model(file)
    assert config.qk_norm and config.head_dim == 32 and config.tie_word_embeddings == tied
    batch = packed_batch(lengths=[6, 9, 4], starts=[0, 30, 0])
    torch.testing.assert_close(our_logits(model, batch), hf_logits(hf, batch), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("qwen3"), "qwen3", **QWEN3)


@pytest.fixture(scope="module")
def qwen3_tied(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("qwen3_tied"), "qwen3", **QWEN3, tie_word_embeddings=True)


# SP 1, 2 and 4 (prompts of 1 and 3 tokens: shorter than the world), TP 2 (heads sharded, norms
# replicated, tied embeddings); decode with the MLP split over the ranks (SP 4: decode_split's default)
# and without (SP 2).
@pytest.mark.parametrize(
    "fixture, engine",
    [
        ("qwen3", dict(sp_size=1, strategy="ring")),
        ("qwen3", dict(sp_size=2, strategy="ring", decode_split=False, max_num_batched_tokens=3)),
        ("qwen3", dict(sp_size=4, strategy="allgather", decode_merge="tree")),
        ("qwen3_tied", dict(sp_size=1, tp_size=2, strategy="ring")),
    ],
)
def test_engine_matches_hf(request, fixture: str, engine: dict) -> None:
    check_against_hf(*request.getfixturevalue(fixture), **engine)
