"""Decode attention through a block table: the GPU's decode kernel, and the same in plain torch.

A decode row's keys on a rank are a list of its pages (cache blocks of `page` slots, in key order,
every one full but the last) and a count `lens[b]`; `table [B, max_pages]` int32 holds the pages.
Both kernels below take that and the layer's storage [Hkv, S, D] as it lies, and return this rank's
partial (out [B, Hq, D] fp32, lse [B, Hq] fp32) for the SP merge; a row with no key here gives
out 0, lse -inf.

- `triton_decode.paged_decode`: split over the keys, a KV head read once for its query heads, in
  place (CUDA; Triton's interpreter runs it on CPU tensors in the tests).
- `paged_decode_torch`: gathers every row's keys into a padded block and runs one masked softmax;
  no host synchronisation either, so it serves where Triton is absent and as the reference.
The CPU engine keeps its own decode kernel (`decode.py`: the CPU flash kernel per length bucket).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor


def paged_decode_torch(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    table: Tensor,
    lens: Tensor,
    page: int,
    scale: float,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The same contract as `triton_decode.paged_decode`, in torch ops (fp32 math)."""
    bsz, hq, d = q.shape
    hkv = k_store.shape[0]
    keys = table.shape[1] * page
    j = torch.arange(keys, device=q.device)
    slots = table.long()[:, j // page] * page + j % page  # [B, L]
    k = k_store[:, slots].float()  # [Hkv, B, L, D]
    v = v_store[:, slots].float()
    qg = q.float().view(bsz, hkv, hq // hkv, d).transpose(0, 1)  # [Hkv, B, g, D]
    scores = torch.einsum("hbgd,hbld->hbgl", qg, k) * scale
    visible = j[None, :] < lens[:, None].long()  # [B, L]
    if starts is not None:  # a sliding window's rows: keys from their start on
        visible = visible & (j[None, :] >= starts[:, None].long())
    visible = visible[None, :, None, :]  # [1, B, 1, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, B, g]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hbgl,hbld->hbgd", probs, v)
    return out.transpose(0, 1).reshape(bsz, hq, d), lse.transpose(0, 1).reshape(bsz, hq)


def page_table(pages: list[list[int]], rows: int | None = None) -> Tensor:
    """Rows' pages as a block table [rows, widest] int32 on the host, zero past each row's pages (and in
    rows past `pages`: padding rows of a static step)."""
    table = torch.zeros(len(pages) if rows is None else rows, max(map(len, pages), default=0) or 1, dtype=torch.int32)
    for b, p in enumerate(pages):
        table[b, : len(p)] = torch.tensor(p, dtype=torch.int32)
    return table


def num_splits(rows: int, kv_heads: int, device: torch.device, most: int = 64) -> int:
    """Key ranges per (row, KV head): enough programs to fill the device's SMs about four times
    over, since one program per pair leaves most of a GPU idle at small batches."""
    if device.type != "cuda":
        return 1 if rows * kv_heads >= 8 else 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(most, math.ceil(4 * sms / max(1, rows * kv_heads))))


def decode_attention(
    q: Tensor,
    k_store: Tensor,
    v_store: Tensor,
    table: Tensor,
    lens: Tensor,
    page: int,
    scale: float,
    splits: int,
    use_triton: bool,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One layer's decode rows over their pages (from `starts` on, a sliding window's rows): Triton's
    kernel where asked, else torch's."""
    if use_triton:
        from seqpar.kernels.gpu.triton_decode import paged_decode

        return paged_decode(q, k_store, v_store, table, lens, page, scale, splits, starts=starts)
    return paged_decode_torch(q, k_store, v_store, table, lens, page, scale, starts)


# Before 3.7, Triton's interpreter turned a loaded scalar into a Python int through a 1-element
# array, which numpy 2.4 refuses: the kernel's loop over its row's keys (`range(lo, hi, ...)`) fails.
INTERPRETER_MIN = (3, 7)


def triton_unusable(device: torch.device) -> str | None:
    """Why Triton's kernel cannot run on `device` here, or None: it runs on CUDA tensors, or on CPU
    ones under its interpreter (TRITON_INTERPRET=1, Triton 3.7 or later)."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton compiles for CUDA only, and its interpreter is off (TRITON_INTERPRET=1) on {device.type}"
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if version < INTERPRETER_MIN:
        return (
            f"Triton {triton.__version__}'s interpreter cannot run the kernel's loop (pip install "
            f"'triton>={INTERPRETER_MIN[0]}.{INTERPRETER_MIN[1]}'; compiled for a GPU it runs)"
        )
    return None


def triton_usable(device: torch.device) -> bool:
    """Triton's kernel runs on CUDA tensors, or on CPU ones under its interpreter (`triton_unusable`)."""
    return triton_unusable(device) is None


class PagedDecode:
    """A step's decode rows as a block table on the device, built once, used by every layer (the
    GPU's counterpart of `decode.DecodeBatch`, with the same `attend`)."""

    def __init__(
        self,
        pages: list[list[int]],
        lens: list[int],
        page: int,
        device: torch.device,
        kv_heads: int,
        starts: list[int] | None = None,
        use_triton: bool | None = None,
    ):
        """`pages`, `lens`, `starts`: `StepPlan.decode_table`'s; `use_triton`: the Triton kernel or the
        torch twin (None: Triton wherever it runs)."""
        self.table = page_table(pages).to(device)
        self.lens = torch.tensor(lens, dtype=torch.int32).to(device)
        self.starts = None if starts is None else torch.tensor(starts, dtype=torch.int32).to(device)
        self.page = page
        self.splits = num_splits(len(pages), kv_heads, device)
        self.use_triton = triton_usable(device) if use_triton is None else use_triton

    def attend(self, q: Tensor, kh: Tensor, vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return decode_attention(
            q, kh, vh, self.table, self.lens, self.page, scale, self.splits, self.use_triton, self.starts
        )
