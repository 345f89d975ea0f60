"""GGUF checkpoints: tiny models written the way llama.cpp's converter writes them (q/k
rows permuted for llama, rope_freqs for llama3 scaling), loaded back and compared with
transformers; the conversion cache; GGUF errors. Tolerances as in test_model.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from seqpar.model import ModelConfig, ModelLoadError, gguf_loader, load_config, load_model, load_tokenizer
from seqpar.model.gguf_loader import unpermute_rotary_rows
from test_model_helpers import hf_logits, our_logits, packed_batch, tiny_hf_model

BATCH = dict(lengths=[6, 9, 4], starts=[0, 30, 0])


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh GGUF conversion cache per test, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("gguf_cache")
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(folder))
    return folder


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute: written out here, independent of our inverse.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llamacpp_rope_factors(theta: float, dim: int, s: dict) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (llama3 -> rope_freqs.weight).
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(hf: nn.Module, file: Path, arch: str, extra: dict[str, np.ndarray] | None = None) -> Path:
    """What llama.cpp's converter would write for `hf` (f32, q/k permuted for llama)."""
    import gguf

    c = hf.config
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3: the global layers'
    n_heads, n_kv, theta = c.num_attention_heads, c.num_key_value_heads, rope["rope_theta"]
    w = gguf.GGUFWriter(str(file), arch)
    if arch == "gemma3":
        w.add_sliding_window(c.sliding_window)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and ".q_proj." in name:
            t = _llamacpp_permute(t, n_heads)
        elif arch == "llama" and ".k_proj." in name:
            t = _llamacpp_permute(t, n_kv)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1  # the converter stores Gemma's (1 + weight)
        w.add_tensor(gguf_name, t.float().numpy())
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llama", {}),  # GQA: q and k permuted with different head counts
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 16}),
        ("qwen2", {}),  # not permuted by llama.cpp; q/k/v biases
    ],
)
def test_gguf_matches_transformers(tmp_path: Path, kind: str, overrides: dict) -> None:
    hf = tiny_hf_model(kind, **overrides)
    write_gguf(hf, tmp_path / "tiny.gguf", kind)
    model, config = load_model(tmp_path)  # a directory holding exactly one .gguf
    # GGUF metadata gives the same config as config.json (eps went through float32).
    from_hf = ModelConfig.from_hf(hf.config.to_dict())
    assert config.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(config, rms_norm_eps=from_hf.rms_norm_eps) == from_hf
    batch = packed_batch(**BATCH)
    torch.testing.assert_close(our_logits(model, batch), hf_logits(hf, batch), atol=1e-4, rtol=0)


def test_gguf_llama3_rope_freqs(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 5e5,
    }
    hf = tiny_hf_model("llama", rope_parameters=scaling)
    factors = _llamacpp_rope_factors(5e5, hf.config.head_dim, scaling)
    write_gguf(hf, tmp_path / "tiny.gguf", "llama", extra={"rope_freqs.weight": factors})
    model, config = load_model(tmp_path / "tiny.gguf")
    assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "freq_factors"
    batch = packed_batch(lengths=[6, 9, 4], starts=[0, 120, 0])
    torch.testing.assert_close(our_logits(model, batch), hf_logits(hf, batch), atol=1e-4, rtol=0)


def test_gguf_unknown_tensor_and_truncation(tmp_path: Path) -> None:
    hf = tiny_hf_model("llama")
    file = write_gguf(hf, tmp_path / "odd.gguf", "llama", extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ModelLoadError, match=r"odd\.gguf: .*unexpected keys: blk\.0\.mystery\.weight"):
        load_model(file)
    short = tmp_path / "short.gguf"
    short.write_bytes(file.read_bytes()[: file.stat().st_size * 2 // 3])
    with pytest.raises(ModelLoadError, match=r"short\.gguf: cannot .*truncated or corrupt"):
        load_model(short)


def test_gguf_conversion_is_cached_and_keyed_by_file(
    tmp_path: Path, gguf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = tiny_hf_model("llama")
    file = write_gguf(hf, tmp_path / "tiny.gguf", "llama")
    first, config = load_model(file)
    assert len(list((gguf_cache / "gguf").iterdir())) == 1

    def no_parse(path: Path) -> None:
        raise AssertionError("a cached GGUF was parsed again")

    monkeypatch.setattr("seqpar.model.gguf_cache.read_gguf", no_parse)
    assert load_config(file) == config
    second, _ = load_model(file)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    # A rewritten file (new mtime/size) is a new entry, converted again.
    monkeypatch.setattr("seqpar.model.gguf_cache.read_gguf", gguf_loader.read_gguf)
    write_gguf(tiny_hf_model("llama", seed=1), file, "llama")
    third, _ = load_model(file)
    assert not torch.equal(third.model.norm.weight, first.model.norm.weight)
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf: no usable tokenizer in this GGUF"):
        load_tokenizer(file)


def test_gguf_config_errors() -> None:
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' is not supported; supported: llama, qwen2"):
        ModelConfig.from_gguf({"general.architecture": "gpt2"}, {})
    with pytest.raises(ValueError, match=r"lacks required key 'llama.feed_forward_length'"):
        ModelConfig.from_gguf(
            {"general.architecture": "llama", "llama.embedding_length": 8, "llama.attention.head_count": 2},
            {"token_embd.weight": (10, 8)},
        )


def test_unpermute_inverts_llamacpp_permute() -> None:
    w = torch.randn(6 * 8, 5)
    for n_head in (1, 2, 3, 6):
        assert torch.equal(unpermute_rotary_rows(_llamacpp_permute(w, n_head), n_head), w)
    b = torch.randn(24)
    assert torch.equal(unpermute_rotary_rows(_llamacpp_permute(b, 3), 3), b)
