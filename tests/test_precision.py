"""dtype="auto": the checkpoint's dtype where this machine computes it fast, float32 where not."""

from __future__ import annotations

import json

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.engine.config import EngineConfig
from seqpar.engine.dtype import resolve_dtype
from seqpar.kernels import precision
from seqpar.kernels.precision import choose_dtype
from seqpar.model import checkpoint_dtype
from test_model_helpers import save_tiny


def never(dtype: torch.dtype) -> float:
    raise AssertionError("flags decide this case: nothing should be measured")


@pytest.mark.parametrize(
    "checkpoint, device, flags, speedup, want",
    [
        (torch.float32, "cpu", {"amx_bf16"}, never, torch.float32),  # float32 stays float32
        (torch.bfloat16, "cpu", {"amx_bf16", "avx512_bf16"}, never, torch.bfloat16),  # AMX: bf16 fast
        (torch.float16, "cpu", {"amx_bf16", "amx_fp16"}, never, torch.float16),
        (torch.bfloat16, "cuda", set(), never, torch.bfloat16),  # GPUs: the checkpoint's dtype
        (torch.float16, "cuda", set(), never, torch.float16),
        (torch.bfloat16, "cpu", {"avx512_bf16"}, lambda d: 5.0, torch.bfloat16),  # Zen 5: measured 5x
        (torch.bfloat16, "cpu", {"avx512_bf16"}, lambda d: 0.5, torch.float32),  # measured slower
        (torch.float16, "cpu", {"amx_bf16", "avx512_fp16"}, lambda d: 0.2, torch.float32),  # no fp16 GEMM
        (torch.bfloat16, "cpu", set(), lambda d: 1.1, torch.float32),  # not worth its rounding
    ],
)
def test_choice_from_flags_then_measurement(checkpoint, device, flags, speedup, want):
    got, why = choose_dtype(checkpoint, device, flags, speedup)
    assert got == want and why


def test_measurement_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "_memo", {})
    first = precision.measured_speedup(torch.bfloat16)
    table = json.loads((tmp_path / "precision.json").read_text())
    assert table[precision.cpu_key()]["torch.bfloat16"] == pytest.approx(first)
    # another process reads it back instead of measuring again
    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.setattr(precision, "_gemm_seconds", never)
    assert precision.measured_speedup(torch.bfloat16) == pytest.approx(first)


def test_checkpoint_dtype(tmp_path):
    _, path = save_tiny(tmp_path / "f32")
    assert checkpoint_dtype(path) == torch.float32
    config = json.loads((path / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):  # older and newer transformers
        config.pop("torch_dtype", None), config.pop("dtype", None)
        (path / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))
        assert checkpoint_dtype(path) == torch.bfloat16
    assert checkpoint_dtype("smollm2-135m") == torch.bfloat16  # a GGUF counts as bf16


def test_config_names_auto_and_refuses_others():
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        EngineConfig(dtype="fp8")


def test_engine_auto_resolves_once_and_says_so(tmp_path, capfd):
    model, path = save_tiny(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(path)  # a bf16 checkpoint
    want = resolve_dtype(EngineConfig(model=str(path)))[0].dtype  # bf16 where fast here, else float32
    with LLM(model=str(path), sp_size=2, kv_cache_gb=2**-12, block_size=2) as llm:
        out = llm.generate([[5, 17, 3, 99]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
        assert llm.engine.config.dtype == want
    assert out.metrics["dtype"] == want and len(out.outputs[0].token_ids) == 3
    assert f"seqpar: dtype auto -> {want} (checkpoint bfloat16" in capfd.readouterr().err
