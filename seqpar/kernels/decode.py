"""Decode rows of many sequences in one kernel call per length bucket, over a paged cache.

A decode row (one new token) sees every cached key of its sequence, so a batch of them is
B queries over B ragged key sets. Called one sequence at a time, 16 sequences of 1K keys cost
16 kernel calls and 16 merges per layer; here each bucket of sequences of similar length gathers
its keys from the cache storage into a padded [n, Hkv, L_max, D] block (padding masked by an
additive -inf) and runs one flash call. The gather (one index_select of K and of V per layer)
is the price of the one call, except where a bucket's keys lie in the storage as one strided view
(each row's slots consecutive, rows evenly spaced: one sequence's blocks as allocated), which the
kernel then reads in place. One layer, SmolLM2's heads (9 q / 3 kv, D=64), 2 threads, AMD EPYC
(Zen 5) shared with other jobs, best of 40 interleaved rounds, prefill blocks in shuffled
stretches of 8: 16 x 1K keys 16.5 -> 8.0 ms in fp32, 6.9 -> 2.1 ms in bf16; 64 x 256 keys
14.8 -> 5.4 ms (fp32), 6.9 -> 2.1 ms (bf16); 4 x 4K 8.8 -> 3.8 ms (fp32). Same results to 3e-7
in fp32.

Buckets: lengths within a factor of 2 share a call, so padding at most doubles the work of
any bucket (one 8K sequence among short ones does not pad them all to 8K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqpar.kernels.attention import new_accumulators
from seqpar.profiling import KERNEL, traced


class DecodeBatch:
    """Where each decode row's keys are in the cache storage, built once per step and used by
    every layer. slots[b]: storage slots of row b's keys (all visible to its one query)."""

    def __init__(self, slots: list[Tensor], workspace: dict[str, Tensor] | None = None) -> None:
        # workspace: gather buffers kept by the caller across steps. A fresh [Hkv, n * L_max, D]
        # per layer would be returned to the OS and faulted in again each time (12 MB per layer in
        # fp32 at 16 x 1K keys, ~10 ms of page faults, measured).
        self.workspace = {} if workspace is None else workspace
        lens = [int(s.numel()) for s in slots]
        self.num_rows = len(slots)
        by_bucket: dict[int, list[int]] = {}
        for b, n in enumerate(lens):
            if n:  # a row with no key on this rank keeps lse = -inf, out = 0
                by_bucket.setdefault(n.bit_length(), []).append(b)
        # per bucket: its rows, the flat gather index [n * L_max] (padding reads slot 0),
        # and which padded keys are real [n, L_max]
        self.buckets: list[tuple[Tensor, Tensor, Tensor]] = []
        # per bucket: (first slot, slots between rows) where its keys can be read in place, else None
        self.in_place: list[tuple[int, int] | None] = []
        for rows in by_bucket.values():
            lmax = max(lens[b] for b in rows)
            idx = torch.zeros(len(rows), lmax, dtype=torch.long)
            real = torch.zeros(len(rows), lmax, dtype=torch.bool)
            for i, b in enumerate(rows):
                idx[i, : lens[b]] = slots[b]
                real[i, : lens[b]] = True
            self.buckets.append((torch.tensor(rows), idx.flatten(), real))
            self.in_place.append(_strided(idx, bool(real.all())))
        self._masks: dict[torch.dtype, list[Tensor]] = {}
        # one bucket of every row in order (one sequence; sequences of like lengths): its result is
        # the output as it is, no accumulators to scatter it into
        self.whole = len(by_bucket) == 1 and next(iter(by_bucket.values())) == list(range(self.num_rows))

    def to(self, device: torch.device) -> DecodeBatch:
        self.buckets = [tuple(t.to(device) for t in b) for b in self.buckets]  # type: ignore[misc]
        return self

    def _mask(self, dtype: torch.dtype) -> list[Tensor]:
        """Additive masks [n, 1, 1, L_max] in the kernel's dtype (it wants q's), made once per step."""
        if dtype not in self._masks:
            zero = torch.zeros((), dtype=dtype)
            self._masks[dtype] = [zero.masked_fill(~real, float("-inf"))[:, None, None] for _, _, real in self.buckets]
        return self._masks[dtype]

    def _gather(self, name: str, storage: Tensor, idx: Tensor) -> Tensor:
        """storage [Hkv, S, D] at slots idx -> [Hkv, len(idx), D], in the workspace's buffer."""
        hkv, _, d = storage.shape
        numel = hkv * idx.numel() * d
        buf = self.workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != storage.dtype or buf.device != storage.device:
            buf = self.workspace[name] = storage.new_empty(max(numel, 0 if buf is None else buf.numel()))
        return torch.index_select(storage, 1, idx, out=buf[:numel].view(hkv, idx.numel(), d))

    @traced(KERNEL)
    def attend(self, q: Tensor, kh: Tensor, vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """q [B, Hq, D]; kh, vh [Hkv, S, D] the cache storage (head-major) -> this rank's
        partial out [B, Hq, D] fp32 and lse [B, Hq] fp32 (-inf, 0 for a row that saw no key)."""
        b, hq, d = q.shape
        hkv = kh.shape[0]
        out, lse = (None, None) if self.whole else new_accumulators(q)
        for (rows, idx, real), mask, at in zip(self.buckets, self._mask(q.dtype), self.in_place):
            n, lmax = real.shape
            # The g query heads of a KV head are g rows against the same keys: [n, Hkv, g, D].
            qb = q.index_select(0, rows).view(n, hkv, hq // hkv, d)
            if at is not None and at[0] + (n - 1) * at[1] + lmax <= kh.shape[1]:
                k, v = (strided_rows(x, *at, n, lmax) for x in (kh, vh))  # [n, Hkv, L_max, D], read in place
            else:
                k = self._gather("k", kh, idx).view(hkv, n, lmax, d).transpose(0, 1)  # [n, Hkv, L_max, D]
                v = self._gather("v", vh, idx).view(hkv, n, lmax, d).transpose(0, 1)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qb, k, v, 0.0, attn_mask=mask, scale=scale
            )
            if self.whole:
                return o.reshape(n, hq, d).float(), l.reshape(n, hq).float()
            out.index_copy_(0, rows, o.reshape(n, hq, d).float())
            lse.index_copy_(0, rows, l.reshape(n, hq).float())
        return out, lse


def _strided(idx: Tensor, all_real: bool) -> tuple[int, int] | None:
    """(first slot, slots from one row's first to the next's) where every row of idx [n, L] holds
    consecutive slots and the rows are evenly spaced (one sequence's blocks as allocated), else
    None. Rows with padding need the gather (their padding reads slot 0)."""
    n, lmax = idx.shape
    if not all_real or not lmax:
        return None
    first = idx[:, :1]
    if not torch.equal(idx, first + torch.arange(lmax)):
        return None
    step = int(idx[1, 0] - idx[0, 0]) if n > 1 else lmax
    if step < lmax or not torch.equal(first.flatten(), idx[0, 0] + step * torch.arange(n)):
        return None
    return int(idx[0, 0]), step


def strided_rows(storage: Tensor, start: int, step: int, n: int, length: int) -> Tensor:
    """storage [Hkv, S, D] -> [n, Hkv, length, D] read in place: row i's keys at slots
    [start + i * step, + length)."""
    hkv, _, d = storage.shape
    s0, s1, s2 = storage.stride()
    return storage.as_strided((n, hkv, length, d), (step * s1, s0, s1, s2), storage.storage_offset() + start * s1)
