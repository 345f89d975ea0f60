"""Strict weight loading: every expected tensor present, nothing extra, shapes and dtypes
checked, and all problems reported at once with the names involved."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from seqpar.model.config import ModelConfig
from seqpar.model.llama import LlamaForCausalLM

_SHOW = 8  # names listed per problem kind; a wrong architecture can mismatch hundreds


class ModelLoadError(ValueError):
    """Weights or model files that cannot be loaded, with the file or key at fault."""


def _names(items: list[str]) -> str:
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _aligned(t: Tensor) -> Tensor:
    """`t` in 64-byte aligned memory: tensors read from a file can sit at any 8-byte offset, and
    CPU GEMMs over misaligned weights run ~7% slower (measured on SmolLM2's MLP shapes)."""
    return t if t.device.type != "cpu" or t.data_ptr() % 64 == 0 else t.clone()


def build_model(
    config: ModelConfig, tensors: Mapping[str, Tensor], dtype: torch.dtype, source: str
) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding exactly `tensors` (HF names), cast to `dtype`."""
    if not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating type, got {dtype}")
    # Meta device: no time or memory spent on random init that is overwritten anyway.
    # (The rotary buffer is built on CPU explicitly, see rope.py.)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = model.state_dict()
    # HF may keep a stale rotary cache; a tied lm_head copy is just the embedding again.
    given = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        given.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    bad_shape = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    if bad_shape:
        problems.append(f"wrong shapes: {_names(bad_shape)}")
    bad_dtype = [f"{k} {v.dtype}" for k, v in sorted(given.items()) if not v.dtype.is_floating_point]
    if bad_dtype:
        problems.append(f"non-float tensors: {_names(bad_dtype)}")
    if problems:
        raise ModelLoadError(
            f"{source}: weights do not match the {config.architecture} config "
            f"({config.num_layers} layers, hidden {config.hidden_size}): " + "; ".join(problems)
        )
    model.load_state_dict({k: _aligned(v.to(dtype)) for k, v in given.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def read_safetensors_dir(directory: Path) -> dict[str, Tensor]:
    """All tensors of a HF checkpoint directory: sharded (index json), single, or loose files."""
    index = directory / "model.safetensors.index.json"
    expected_in: dict[str, str] = {}
    if index.exists():
        try:
            expected_in = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        files = [directory / f for f in sorted(set(expected_in.values()))]
    elif (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weights found")
    tensors: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if not file.exists():
            raise ModelLoadError(f"{file}: listed in {index.name} but the file does not exist")
        for name, tensor in _read_safetensors_file(file).items():
            if name in tensors:
                raise ModelLoadError(f"tensor {name} appears in both {origin[name]} and {file}")
            tensors[name], origin[name] = tensor, file
    wrong_file = [f"{n} (index: {f})" for n, f in expected_in.items() if n not in origin or origin[n].name != f]
    if wrong_file:
        raise ModelLoadError(f"{directory}: tensors not in the file the index names: {_names(wrong_file)}")
    return tensors


def _read_safetensors_file(file: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise ModelLoadError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def check_safetensors_header(file: Path) -> None:
    """Open a safetensors file without reading tensors: catches truncated or corrupt files."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as e:
        raise ModelLoadError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from e
