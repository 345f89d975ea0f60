"""A converted copy of each GGUF file, made once, so later loads are fast.

Parsing a GGUF's metadata and dequantizing its tensors take ~10 s for SmolLM2-135M, and
rebuilding its tokenizer ~5 s more; every rank would pay that at every start. The first
load writes the dequantized tensors (safetensors, HF names) and the config into a cache
folder keyed by the file's path, size and mtime and by the conversion format; later loads
memory-map them. The tokenizer is converted only when one is asked for (a GGUF need not
carry one). Set SEQPAR_CACHE_DIR to move the cache (default ~/.cache/seqpar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from seqpar.model.config import ModelConfig
from seqpar.model.gguf_loader import read_gguf
from seqpar.model.weights import ModelLoadError

# Bump whenever read_gguf's output changes (names, layout, config fields): old entries
# then miss instead of silently serving weights converted by older code.
_FORMAT = 1
_CONFIG = "seqpar_config.json"
_WEIGHTS = "model.safetensors"
_TOKENIZER = "tokenizer"


def cache_dir(path: Path) -> Path:
    root = Path(os.environ.get("SEQPAR_CACHE_DIR") or Path.home() / ".cache" / "seqpar")
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{_FORMAT}"
    return root / "gguf" / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _config_from_json(raw: dict[str, Any]) -> ModelConfig:
    # JSON turned the tuples into lists; ModelConfig wants them back.
    raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
    raw["layer_types"] = tuple(raw.get("layer_types", ()))
    scaling = raw.get("rope_scaling")
    if scaling and "factors" in scaling:
        scaling["factors"] = tuple(scaling["factors"])
    return ModelConfig(**raw)


def _publish(target: Path, write: Callable[[Path], None]) -> bool:
    """Fill a fresh temporary folder and rename it to `target` whole, so a reader never
    sees half a cache entry. False if the cache is not writable or full (the caller goes
    on without it). Concurrent ranks may both convert; the first rename wins."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError:
        return False
    try:
        write(tmp)
        tmp.rename(target)
    except OSError:  # disk full, or another process published it first: target tells
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target.exists()


def gguf_tensors(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and fp32 tensors (HF names) of a GGUF file, through the cache."""
    folder = cache_dir(path)
    if not (folder / _WEIGHTS).is_file():
        config, tensors = read_gguf(path)  # raises ModelLoadError on bad files: nothing cached

        def write(tmp: Path) -> None:
            (tmp / _CONFIG).write_text(json.dumps(dataclasses.asdict(config)))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _WEIGHTS))

        if not _publish(folder, write):
            return config, tensors
    try:
        config = _config_from_json(json.loads((folder / _CONFIG).read_text()))
        return config, load_file(str(folder / _WEIGHTS))
    except Exception as e:  # a damaged cache entry must not look like a damaged model
        raise ModelLoadError(
            f"{folder}: damaged cache entry for {path}; delete the folder to convert again ({e})"
        ) from e


def gguf_config(path: Path) -> ModelConfig:
    folder = cache_dir(path)
    if (folder / _CONFIG).is_file():
        return _config_from_json(json.loads((folder / _CONFIG).read_text()))
    return gguf_tensors(path)[0]  # converts once; the ranks loading weights next reuse it


def gguf_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer as a transformers tokenizer, saved in HF format on first use."""
    from transformers import AutoTokenizer  # slow import, only when a tokenizer is wanted

    folder = cache_dir(path).with_name(cache_dir(path).name + "-" + _TOKENIZER)
    if not folder.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except Exception as e:  # transformers raises KeyError etc. when the vocab is absent
            raise ModelLoadError(f"{path}: no usable tokenizer in this GGUF ({type(e).__name__}: {e})") from e
        if not _publish(folder, lambda tmp: tokenizer.save_pretrained(str(tmp))):
            return tokenizer  # cache not writable: use it unsaved
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
