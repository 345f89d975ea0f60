"""Gemma 3 (text) and sliding-window layers, against transformers: the model's logits, and the
engine's prompt log-probs and greedy tokens at SP 1-4 under each strategy, chunked, with prompts
several windows long, windows shorter than a shard and prompts shorter than the window; Mistral's
window through the same path. Tolerances as in test_model.py / test_engine.py (1e-4 in fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.model import ConfigError, LlamaForCausalLM, ModelConfig, load_model
from seqpar.model.reference import dense_causal_attention
from test_engine import _save, check_against_hf
from test_model_helpers import hf_logits, packed_batch, save_tiny, tiny_hf_model

# 3 layers, the middle one global; head_dim apart from hidden / heads, a query_pre_attn_scalar
# apart from head_dim, RoPE bases apart per layer type: each mistake shows in the logits.
GEMMA3 = dict(
    num_hidden_layers=3,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
    tie_word_embeddings=True,
)
# google/gemma-3-1b-it's config.json, as published (transformers 4.50)
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "vocab_size": 262144,
}


@pytest.mark.parametrize("window", [1, 5, 100])
def test_logits_match_transformers(tmp_path: Path, window: int) -> None:
    hf, path = save_tiny(tmp_path, "gemma3", **{**GEMMA3, "sliding_window": window})
    model, config = load_model(path)
    assert config.architecture == "gemma3" and config.window(0) == window and config.window(1) is None
    batch = packed_batch([17, 3, 9], starts=[0, 0, 0])
    expected = hf_logits(hf, batch)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    with torch.no_grad():
        ours = model.compute_logits(
            model(batch.input_ids, batch.positions, dense_causal_attention(batch.seq_ids, batch.positions, config))
        )
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_published_config_and_key_shapes() -> None:
    config = ModelConfig.from_hf(GEMMA3_1B)
    assert (config.architecture, config.head_dim, config.num_kv_heads, config.hidden_act) == (
        "gemma3",
        256,
        1,
        "gelu_pytorch_tanh",
    )
    assert config.layer_types.count("full_attention") == 4 and config.layer_types[5] == "full_attention"
    assert config.window(0) == 512 and config.window(5) is None and config.attention_scale == 256**-0.5
    assert (config.rope_theta, config.local_rope_theta, config.tie_word_embeddings) == (1e6, 1e4, True)
    with torch.device("meta"):
        state = LlamaForCausalLM(config).state_dict()
    for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm", "self_attn.q_norm"):
        assert f"model.layers.25.{name}.weight" in state
    # transformers 5's layout of the same: rope_parameters per layer type, layer_types listed
    new = {
        k: v for k, v in GEMMA3_1B.items() if k not in ("rope_local_base_freq", "rope_theta", "sliding_window_pattern")
    }
    new["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    }
    new["layer_types"] = list(config.layer_types)
    again = ModelConfig.from_hf(new)
    assert again.layer_types == config.layer_types and again.local_rope_theta == 1e4
    assert again.rope_scaling == {"rope_type": "linear", "factor": 8.0}


def test_gguf_matches_transformers(tmp_path: Path, monkeypatch) -> None:
    """llama.cpp's gemma3 GGUF: norms stored as 1 + weight, the MLP's input norm named ffn_norm, the
    window stored; every 6th layer global, the local RoPE base and the softmax scale as llama.cpp
    assumes them (the config here uses its defaults, which are those)."""
    from test_model_gguf import write_gguf

    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    types = ["sliding_attention"] * 5 + ["full_attention"]
    hf = tiny_hf_model(
        "gemma3",
        num_hidden_layers=6,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=types,
        tie_word_embeddings=True,
    )
    file = write_gguf(hf, tmp_path / "tiny.gguf", "gemma3")
    model, config = load_model(file)
    assert config.layer_types == tuple(types) and config.window(0) == 4 and config.attention_scale == 16**-0.5
    batch = packed_batch([13, 6], starts=[0, 0])
    with torch.no_grad():
        attention = dense_causal_attention(batch.seq_ids, batch.positions, config)
        ours = model.compute_logits(model(batch.input_ids, batch.positions, attention))
    torch.testing.assert_close(ours, hf_logits(hf, batch), atol=1e-4, rtol=0)


def test_what_is_refused_is_named() -> None:
    with pytest.raises(ConfigError, match="soft-capping"):
        ModelConfig.from_hf({**GEMMA3_1B, "final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="Gemma3ForCausalLM"):
        ModelConfig.from_hf({"model_type": "gemma3", "text_config": GEMMA3_1B})
    with pytest.raises(ConfigError, match="causal"):
        ModelConfig.from_hf({**GEMMA3_1B, "use_bidirectional_attention": True})


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("gemma3"), "gemma3", **GEMMA3)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("mistral"), "mistral", sliding_window=4)


# Shards of 8 tokens (blocks of 4, two per shard) against a window of 5; SP 4 with prompts of 1
# and 3 tokens (shorter than the world); chunks smaller than the window and than a block; the
# canonical order of deterministic inference (units of 4 tokens, those before a window skipped).
@pytest.mark.parametrize(
    "fixture, engine",
    [
        ("gemma3", dict(sp_size=1, strategy="ring")),
        ("gemma3", dict(sp_size=2, strategy="ring", block_size=4, shard_blocks=2, max_num_batched_tokens=3)),
        ("gemma3", dict(sp_size=3, strategy="pass_q", decode_merge="alltoall", max_num_batched_tokens=7)),
        ("gemma3", dict(sp_size=4, strategy="allgather", decode_merge="tree", decode_split=False)),
        ("gemma3", dict(sp_size=1, tp_size=2, strategy="ring")),
        ("gemma3", dict(sp_size=2, enable_deterministic_inference=True, max_num_batched_tokens=5)),
        ("mistral", dict(sp_size=2, strategy="ring", max_num_batched_tokens=5)),
    ],
)
def test_engine_matches_hf(request, fixture: str, engine: dict) -> None:
    check_against_hf(*request.getfixturevalue(fixture), **engine)


@pytest.fixture(scope="module")
def all_sliding(tmp_path_factory):  # every layer a window of 4: a step's bytes are the windows' alone
    types = ["sliding_attention"] * 3
    return _save(tmp_path_factory.mktemp("sliding"), "gemma3", **{**GEMMA3, "sliding_window": 4, "layer_types": types})


DOC = list(range(40, 72))
SECOND = DOC[:24] + [5, 6, 7, 8, 9, 10]
WINDOW_OPTS = dict(sp_size=2, block_size=4, shard_blocks=4, kv_cache_gb=2**-12, dtype="float32")
WINDOW_PARAMS = SamplingParams(temperature=0.0, max_tokens=3, logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module")
def second_alone(all_sliding):
    with LLM(model=all_sliding[1], **WINDOW_OPTS) as llm:
        return llm.generate([SECOND], WINDOW_PARAMS)[0]


@pytest.mark.parametrize("strategy, shm", [("ring", True), ("allgather", False)])
def test_window_layers_move_only_what_a_window_reaches(all_sliding, second_alone, strategy: str, shm: bool) -> None:
    """SP 2, shard units of 16 tokens (blocks of 4, 4 per unit): a 32-token document lies [0, 16) on
    rank 0 and [16, 32) on rank 1. A second request reuses its first 24 tokens from the prefix cache
    and computes [24, 30) on rank 1, whose windows reach back to 21: no query's window crosses into
    rank 0's keys, so the step sends no K/V, and its tokens are those of the request alone."""
    opts = dict(model=all_sliding[1], strategy=strategy, shared_memory=shm, **WINDOW_OPTS)
    alone = second_alone
    with LLM(**opts) as llm:
        llm.generate([DOC], WINDOW_PARAMS)
        records = []
        llm.engine.observers.append(records.append)
        out = llm.generate([SECOND], WINDOW_PARAMS)[0]
    assert out.num_cached_tokens == 24
    assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    for a, b in zip(out.outputs[0].logprobs, alone.outputs[0].logprobs):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    prefill = [r for r in records if r.prefill_spans]
    assert [r.prefill_spans for r in prefill] == [[(24, 30)]]
    assert prefill[0].comm_bytes == [0, 0]


def test_bf16_sp_stays_close_to_sp1(gemma3) -> None:
    """bf16, vLLM's check (test_bf16.py): SP 2 against SP 1, prompts several windows long."""
    from test_bf16 import TOP, check_logprobs_close
    from test_engine import SMALL

    prompts = [[5, 17, 3, 99, 42, 8, 8, 23, 61, 7, 14] * 3, [9, 4], list(range(30, 72))]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=TOP)
    outs = {}
    for sp in (1, 2):
        with LLM(model=gemma3[1], sp_size=sp, dtype="bfloat16", **SMALL) as llm:
            outs[sp] = [o.outputs[0] for o in llm.generate(prompts, params)]
    for want, got in zip(outs[1], outs[2]):
        check_logprobs_close(want, got, "SP 2")


def test_window_groups_free_their_blocks_and_the_store_restores_them(gemma3, tmp_path) -> None:
    """The cache keeps a window layer's blocks only while some later query can see them (the tiny
    Gemma 3: layers [window 5, global, window 5], one layer per block group), at SP 2 in chunks of 8
    tokens; a restart loads the document's blocks from the KV store (every global block, the window
    groups' last window) and generates what the first engine did, within fp32's reordering."""
    from seqpar.engine.kv_cache import block_bytes

    prompt = [(7 * i) % 97 + 3 for i in range(61)]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1, ignore_eos=True)
    bs, w = 4, 5
    opts = dict(sp_size=2, block_size=bs, shard_blocks=1, max_num_batched_tokens=8, dtype="float32")
    with LLM(model=gemma3[1], kv_store_dir=str(tmp_path), **opts) as llm:
        cold = llm.generate([prompt], params)[0]
        mc = llm.engine.model_config
        page = block_bytes(1, mc.num_kv_heads, mc.head_dim, torch.float32, bs)
    n = len(prompt) + 3  # positions computed when the last token was drawn
    held = -(-n // bs) + 2 * (-(-n // bs) - (n - w + 1) // bs)  # every global block; the windows' last
    assert sum(cold.metrics["kv_cache_bytes_per_rank"]) == held * page
    with LLM(model=gemma3[1], kv_store_dir=str(tmp_path), **opts) as llm:
        warm = llm.generate([prompt], params)[0]
    assert warm.num_stored_tokens == (len(prompt) - 1) // bs * bs
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    for a, b in zip(warm.outputs[0].logprobs, cold.outputs[0].logprobs):
        assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
