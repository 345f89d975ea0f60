"""A converted copy of each GGUF file, made once, so later loads are fast.

Parsing a GGUF's metadata, dequantizing its tensors and rebuilding its tokenizer
take ~20 s for SmolLM2-135M, and every rank would pay it at every start. The first
load writes the dequantized tensors (safetensors, HF names), the config and the
tokenizer into a cache folder keyed by the file's path, size and mtime; later loads
memory-map them. Set SEQPAR_CACHE_DIR to move it (default ~/.cache/seqpar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from seqpar.model.config import ModelConfig
from seqpar.model.gguf_loader import read_gguf

_CONFIG = "seqpar_config.json"
_WEIGHTS = "model.safetensors"


def cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("SEQPAR_CACHE_DIR", Path.home() / ".cache" / "seqpar"))
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{path.stem}-{key}"


def _config_from_json(raw: dict[str, Any]) -> ModelConfig:
    raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    scaling = raw.get("rope_scaling")
    if scaling and "factors" in scaling:
        scaling["factors"] = tuple(scaling["factors"])
    return ModelConfig(**raw)


def _convert(path: Path, target: Path) -> None:
    """Write config, weights and tokenizer to a temporary folder, then move it in place whole."""
    from transformers import AutoTokenizer

    config, tensors = read_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        (tmp / _CONFIG).write_text(json.dumps(dataclasses.asdict(config)))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _WEIGHTS))
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted(path: Path) -> Path:
    target = cache_dir(path)
    if not (target / _WEIGHTS).is_file():
        _convert(path, target)
    return target


def gguf_config(path: Path) -> ModelConfig:
    return _config_from_json(json.loads((converted(path) / _CONFIG).read_text()))


def gguf_tensors(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    folder = converted(path)
    return _config_from_json(json.loads((folder / _CONFIG).read_text())), load_file(str(folder / _WEIGHTS))


def gguf_tokenizer_dir(path: Path) -> Path:
    return converted(path)
