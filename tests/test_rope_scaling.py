"""RoPE scaling overrides (vLLM's --rope-scaling): YaRN and linear, equal to transformers with the
same override, at positions past the model's trained context.

Tolerance: the rotary tables are computed by the same fp32 ops in the same order as transformers,
so they are compared for equality. Logits: 1e-4 absolute in fp32 (as tests/test_engine.py: the
same arithmetic in a different order over 2 layers moves them by ~1e-6; a wrong angle by >1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.model import ConfigError, ModelConfig, load_config, load_model, with_rope_scaling
from seqpar.model.rope import RotaryEmbedding
from test_model_helpers import VOCAB, tiny_hf_model

TRAINED = 64  # the tiny model's "native" context; the overrides reach 4x that
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}
OVERRIDES = [
    YARN,
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": TRAINED, "beta_fast": 16, "beta_slow": 2},
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": TRAINED,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "truncate": False,
    },
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": TRAINED, "attention_factor": 1.3},
    {"rope_type": "linear", "factor": 4.0},
]


def hf_rope(scaling: dict, head_dim: int = 16, theta: float = 10000.0):
    """transformers' rotary module for a config with this override, and the config it reads."""
    import transformers as tf
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tf.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TRAINED * int(scaling["factor"]),
        rope_parameters={**scaling, "rope_theta": theta},
    )
    return LlamaRotaryEmbedding(config)


def ours(scaling: dict, head_dim: int = 16, theta: float = 10000.0) -> ModelConfig:
    base = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=4 * head_dim,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        rope_scaling=None,
        max_position_embeddings=TRAINED,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=None,
        eos_token_ids=(),
        architecture="llama",
    )
    return with_rope_scaling(base, scaling)


@pytest.mark.parametrize("scaling", OVERRIDES, ids=lambda s: json.dumps(s, sort_keys=True))
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 100000.0), (128, 500000.0)])
def test_rotary_tables_equal_transformers(scaling, head_dim, theta):
    hf = hf_rope(scaling, head_dim, theta)
    mine = RotaryEmbedding(ours(scaling, head_dim, theta))
    positions = torch.cat([torch.arange(0, 8), torch.arange(TRAINED - 4, TRAINED * 4)])  # far past the trained 64
    assert torch.equal(mine.inv_freq, hf.inv_freq.float())
    assert mine.attention_scaling == hf.attention_scaling
    cos_hf, sin_hf = hf(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = mine(positions, torch.float32)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


def test_context_grows_by_the_factor_as_in_vllm():
    assert ours(YARN).max_position_embeddings == 4 * TRAINED
    assert ours({"rope_type": "linear", "factor": 2}).max_position_embeddings == 2 * TRAINED
    assert ours({"type": "linear", "factor": 2}).rope_scaling["rope_type"] == "linear"  # transformers 4 spelling
    assert ours({"rope_type": "default"}).rope_scaling is None


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "dynamic", "factor": 2}, "dynamic NTK rope scaling is not supported"),
        ({"rope_type": "yarn", "factor": 0, "original_max_position_embeddings": 8}, "positive 'factor'"),
        ({"rope_type": "yarn", "factor": 2, "beta": 3}, "unknown keys ['beta']"),
        ({"rope_type": "su", "factor": 2}, "rope scaling type 'su' is not supported"),
    ],
)
def test_bad_override_names_the_problem(scaling, message):
    with pytest.raises(ConfigError) as info:
        ours(scaling)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint trained (nominally) to 64 positions, and transformers' model of the same weights with YaRN."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("rope")
    base = tiny_hf_model("llama", seed=5, max_position_embeddings=TRAINED)
    base.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(path)
    ref = tiny_hf_model(
        "llama",
        seed=5,
        max_position_embeddings=4 * TRAINED,
        rope_parameters={**YARN, "rope_theta": base.config.rope_parameters["rope_theta"]},
    )
    ref.load_state_dict(base.state_dict())
    return str(path), ref


def test_model_logits_equal_transformers_past_the_trained_context(tiny):
    from seqpar.model import dense_causal_attention

    path, ref = tiny
    model, config = load_model(path, rope_scaling=YARN)
    assert config.max_position_embeddings == 4 * TRAINED
    ids = torch.randint(0, VOCAB, (3 * TRAINED,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(len(ids))
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
        got = model.compute_logits(model(ids, positions, dense_causal_attention(torch.zeros_like(ids), positions)))
    assert (got - expected).abs().max().item() < 1e-4
    plain, _ = load_model(path)  # without the override the angles differ: the test can see them
    with torch.no_grad():
        unscaled = plain.compute_logits(plain(ids, positions, dense_causal_attention(torch.zeros_like(ids), positions)))
    assert (unscaled - expected)[TRAINED:].abs().max().item() > 1e-2


def test_engine_sp2_with_yarn_equals_transformers(tiny):
    path, ref = tiny
    assert load_config(path).max_position_embeddings == TRAINED
    prompt = torch.randint(3, VOCAB, (3 * TRAINED,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=1, ignore_eos=True)
    with LLM(
        model=path,
        sp_size=2,
        rope_scaling=YARN,
        block_size=4,
        shard_blocks=2,
        kv_cache_gb=2**-10,
        max_num_batched_tokens=64,
    ) as llm:  # chunked prefill: later chunks attend over cached, scaled keys
        assert llm.engine.max_model_len == 4 * TRAINED  # the prompt (192 tokens) fits only thanks to the override
        out = llm.generate([prompt], params)[0]
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), dim=-1)
        ref.generation_config.eos_token_id = None
        ids = torch.tensor([prompt])
        greedy = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    expected = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor([out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))])
    assert (got - expected).abs().max().item() < 1e-4
    assert out.outputs[0].token_ids == greedy


@pytest.mark.parametrize(
    "value, message",
    [
        ("{yarn", "--rope-scaling is not JSON"),
        ('["yarn"]', "--rope-scaling must be a JSON object"),
    ],
)
def test_cli_flag_errors_in_one_line(capsys, value, message):
    from seqpar.cli import main as cli

    rc = cli.main(["generate", "--prompt", "hi", "--rope-scaling", value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("seqpar: error: ") and err.count("\n") == 1 and message in err, err


def test_cli_flag_reaches_the_engine_config():
    from seqpar.cli import main as cli
    from seqpar.engine.args import engine_config

    args = cli.build_parser().parse_args(
        ["generate", "--prompt", "hi", "--no-shared-memory", "--rope-scaling", json.dumps(YARN)]
    )
    config = engine_config(args)
    assert config.rope_scaling == YARN and config.shared_memory is False
