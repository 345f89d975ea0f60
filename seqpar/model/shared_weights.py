"""One copy of the weights per host: every rank maps the same read-only file.

The first load in a dtype writes the checkpoint's tensors, cast to it, into one safetensors
file in the cache folder (SEQPAR_CACHE_DIR, default ~/.cache/seqpar), every tensor's data at a
64-byte aligned offset (padding tensors `__pad__.N` fill the gaps: the format allows no holes),
keyed by the source files and the dtype. Every later load, in every rank, maps that file
read-only (PROT_READ, MAP_SHARED): the pages live once in the page cache, however many ranks
map them. A write through such a tensor would fault (the rank dies loudly) instead of quietly
copying the page; the model never writes its weights (parameters are only read by F.linear,
embedding lookups and norms; tensor-parallel slices copy or view).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

# Bump when the file layout changes: old files then miss instead of being misread.
_FORMAT = 1
_ALIGN = 64  # CPU GEMMs over misaligned weights run ~7% slower (weights.py `_aligned`)
_PAD = "__pad__."
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint8: "U8"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def weights_file(sources: list[Path], dtype: torch.dtype) -> Path:
    """Where the `dtype` copy of the weights read from `sources` lives (path, size, mtime of each)."""
    root = Path(os.environ.get("SEQPAR_CACHE_DIR") or Path.home() / ".cache" / "seqpar")
    key = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
    digest = hashlib.sha1(f"{key}:{dtype}:v{_FORMAT}".encode()).hexdigest()[:16]
    return root / "weights" / f"{sources[0].stem}-{str(dtype).removeprefix('torch.')}-{digest}.safetensors"


def write_aligned(tensors: Mapping[str, Tensor], file: Path) -> None:
    """A safetensors file with every tensor's data at a 64-byte aligned file offset."""
    header: dict[str, dict] = {}
    parts: list[bytes | Tensor] = []
    offset = 0
    for i, (name, t) in enumerate(sorted(tensors.items())):
        if offset % _ALIGN:
            pad = _ALIGN - offset % _ALIGN
            header[f"{_PAD}{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            parts.append(bytes(pad))
            offset += pad
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        parts.append(t)
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)  # data starts aligned too; trailing spaces are allowed
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for p in parts:
            f.write(p if isinstance(p, bytes) else p.view(torch.uint8).reshape(-1).numpy().tobytes())


def map_readonly(file: Path) -> dict[str, Tensor]:
    """The tensors of an aligned safetensors file as views of one read-only shared mapping."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays mapped while tensors hold it
    start = 8 + size
    out = {}
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point (a write faults).
        warnings.simplefilter("ignore", UserWarning)
        for name, meta in header.items():
            if name.startswith(_PAD) or name == "__metadata__":
                continue
            dtype = _TORCH_DTYPES[meta["dtype"]]
            a, b = meta["data_offsets"]
            count = (b - a) // dtype.itemsize
            t = (
                torch.frombuffer(view, dtype=dtype, count=count, offset=start + a)
                if count
                else torch.empty(0, dtype=dtype)
            )
            out[name] = t.view(meta["shape"])
    return out


def shared_tensors(
    sources: list[Path], dtype: torch.dtype, read: Callable[[], Mapping[str, Tensor]]
) -> dict[str, Tensor] | None:
    """The checkpoint's tensors in `dtype`, mapped from the host's one copy (written first if absent:
    `read()` gives the tensors to cast). None when the cache folder is not writable."""
    file = weights_file(sources, dtype)
    if not file.is_file():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            lock = open(file.with_name(file.name + ".lock"), "w")  # noqa: SIM115 (held until written)
        except OSError:
            return None
        # One writer per host: the ranks of one host start together, and each reading the whole
        # checkpoint at once would hold it N times (an 8B model in bf16 is 16 GB per reader).
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not file.is_file() and not _write(file, dtype, read):
                return None
    return map_readonly(file)


def _write(file: Path, dtype: torch.dtype, read: Callable[[], Mapping[str, Tensor]]) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
    except OSError:
        return False
    try:
        tensors = read()
        if not all(v.is_floating_point() for v in tensors.values()):
            return False  # the strict loader says which tensor is wrong
        write_aligned({k: v.to(dtype) for k, v in tensors.items()}, Path(tmp))
        # link, not rename: if another host's rank published first (a shared folder), its file stays
        os.link(tmp, file)
    except FileExistsError:
        pass
    except OSError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True
