"""A decode step over static buffers, replayed as a CUDA graph per batch bucket.

An eager decode step of an 8B model launches ~2,800 kernels from Python, one after the other, and
the GPU waits on the host between them (measured: 38-50 ms a token at 32K context against a ~4.7 ms
memory floor). Here the whole step (embeddings, every layer with its cache write and paged
attention, the final norm, the logits and the greedy token) reads and writes fixed buffers only:

    ids [R], positions [R], and per layer group (`KVGroups`: one for a model without sliding
    windows) write slots [R], table [R, P] int32, lens [R] int32, window starts [R] int32
    (R = max rows)

so it is captured once per bucket of row counts (1, 2, 4, 8, then steps of 16) and replayed with
one launch. A step of n rows fills the first n rows of each buffer and pads up to its bucket with
rows that read no key (lens 0: out 0, lse -inf) and write their K/V to a scratch slot past every
block the driver hands out, so a padded row can never touch a sequence's cache.

Nothing inside synchronises with the host; what comes back is one small copy (greedy tokens and
their log-probs) plus the logits of rows that sample otherwise. On CPU (`capture=False`) the same
buffers and padding run eagerly, which is how CI tests this bookkeeping; the CPU engine keeps its
own decode path (kernels/decode.py).

At SP > 1 a step holds collectives: each layer's decode merge (every rank's partial over its share
of the keys, merged by LSE) and the split MLP's sum. Their host work (gloo's staging, the
shared-memory exchange) cannot be captured, so the step is captured as pieces cut at them
(`Pieces`, vLLM's piecewise graphs cut at collectives rather than at attention): two graphs a layer,
each collective run eagerly between its pieces at every replay. Each rank then has its slice of
the vocabulary's logits, which go to rank 0 to be sampled as in an eager step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from seqpar.comm.collectives import cut_by, outside_graphs
from seqpar.engine.kv_cache import KVCache, KVGroups
from seqpar.kernels.gpu.paged import decode_attention, num_splits, page_table
from seqpar.model.llama import LlamaForCausalLM


def buckets(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: 1, 2, 4, 8, then every 16 up to max_rows (vLLM's shape)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


@dataclass
class GroupRows:
    """One layer group's side of a decode step, a row each: where the new K/V goes, the pages in key
    order, the key count, and (a sliding window's) the keys before the window."""

    slots: list[int]
    pages: list[list[int]]
    lens: list[int]
    starts: list[int] | None = None


@dataclass
class DecodeOut:
    """A step's results for its n real rows (views of the static outputs: read before the next run)."""

    logits: Tensor  # [n, V] fp32 (at SP > 1: [n, this rank's slice of V])
    greedy: Tensor | None  # [n] int64: argmax, lowest id on ties (None at SP > 1)
    logprob: Tensor | None  # [n] fp32: the greedy token's raw log-prob (None at SP > 1)


class Pieces:
    """A step captured as CUDA graphs cut at its collectives (`collectives.outside_graphs`), replayed
    in order with each collective run eagerly between its two pieces; without collectives, one graph.

    A collective's inputs are outputs of the piece before it, in the graphs' memory pool; what it
    returned at capture is the tensor the next piece reads, so each replay copies its new result
    there. Capture runs every collective once on inputs no kernel has written yet (a capture records
    kernels, it does not run them): every rank does the same, so they still pair up."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[tuple[Callable[..., Tensor], tuple[Tensor, ...], Tensor]] = []
        self.capturing = False

    def capture(self, forward: Callable[[], DecodeOut]) -> DecodeOut:
        """Capture `forward()` (on a side stream, as torch.cuda.graph does); its result's tensors are
        those every replay rewrites."""

        def cut(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
            self._end()
            out = fn(*args)
            self.cuts.append((fn, args, out))
            self._begin()
            return out

        self._begin()
        try:
            with cut_by(cut):
                return forward()
        finally:
            self._end()  # (a no-op if a collective raised between two pieces)

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.graphs.append(graph)
        graph.capture_begin(pool=self.pool)
        self.capturing = True

    def _end(self) -> None:
        if self.capturing:
            self.capturing = False
            self.graphs[-1].capture_end()

    def replay(self) -> None:
        for graph, cut in zip(self.graphs, self.cuts + [None]):
            graph.replay()
            if cut is not None:
                fn, args, out = cut
                out.copy_(fn(*args))


class StaticDecode:
    """The decode step of one rank at tp 1 over static buffers; `capture` on CUDA. At SP > 1,
    `merge(out, lse)` merges a layer's partials over the SP group into its whole output, and
    `vocab` (with `head`, the packed head rows where decode steps pack) is this rank's slice of
    the logits."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: KVCache,
        page: int,
        max_pages: int,
        max_rows: int,
        scratch_slot: int,
        scale: float,
        capture: bool,
        use_triton: bool,
        groups: KVGroups | None = None,
        merge: Callable[[Tensor, Tensor], Tensor] | None = None,
        vocab: slice = slice(None),
        head: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.model, self.cache, self.page, self.scale = model, cache, page, scale
        self.merge, self.vocab, self.head = merge, vocab, head
        self.whole_vocab = vocab == slice(None) or (vocab.start in (0, None) and vocab.stop == model.config.vocab_size)
        self.capture, self.use_triton = capture, use_triton
        # captured steps run their rows through the layers' compiled functions (seqpar.model.compiled,
        # where the worker compiled them): a few fused kernels a layer in the graph, not dozens
        self.fused = capture
        self.scratch_slot = scratch_slot
        self.groups = groups or KVGroups.of([None] * model.config.num_layers)
        self.sizes = buckets(max_rows)
        dev = cache.k.device
        n = len(self.groups)
        self.ids = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.slots = torch.full((n, max_rows), scratch_slot, dtype=torch.long, device=dev)
        self.table = torch.zeros(n, max_rows, max_pages, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n, max_rows, dtype=torch.int32, device=dev)
        self.starts = torch.zeros(n, max_rows, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[Pieces, DecodeOut]] = {}
        self.pool = None
        self.width = max_pages  # pages an uncaptured step's tables hold (its widest row's)

    def bucket(self, n: int) -> int:
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"{n} decode rows: the static step holds at most {self.sizes[-1]} (max_num_seqs)")

    def _forward(self, rows: int) -> DecodeOut:
        """The step over the first `rows` rows of the buffers: nothing here may sync with the host."""
        cache = self.cache
        # a graph reads the whole static table (the Triton kernel reads only a row's pages); an eager step
        # only as many pages as its widest row (the torch twin reads every page listed)
        width = self.table.shape[2] if self.capture else self.width
        slots, table, lens = self.slots[:, :rows], self.table[:, :rows, :width], self.lens[:, :rows]
        starts = [None if w is None else self.starts[g, :rows] for g, w in enumerate(self.groups.windows)]
        splits = num_splits(rows, cache.num_kv_heads, cache.k.device)

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            g, j = self.groups.where(layer)
            cache.write(j, slots[g], k, v)
            kh, vh = cache.storage(j)
            out, lse = decode_attention(
                q, kh, vh, table[g], lens[g], self.page, self.scale, splits, self.use_triton, starts[g]
            )
            if self.merge is not None:  # every rank's partial over its keys: the whole output
                out = outside_graphs(self.merge, out, lse)
            return out.to(q.dtype)

        hidden = self.model(self.ids[:rows], self.positions[:rows], attention, fused=self.fused)
        logits = self.model.compute_logits(hidden, self.vocab, self.head)  # [rows, V or a slice] fp32
        if not self.whole_vocab:  # a slice: rank 0 samples the gathered slices
            return DecodeOut(logits, None, None)
        greedy = logits.argmax(dim=-1)
        logprob = logits.gather(1, greedy[:, None])[:, 0] - logits.logsumexp(dim=-1)
        return DecodeOut(logits, greedy, logprob)

    def run(self, ids: list[int], positions: list[int], groups: list[GroupRows]) -> DecodeOut:
        """One decode step of n = len(ids) rows; in each layer group's layers row b writes its new K/V
        at slots[b] and attends over the first lens[b] keys of its pages (the new one included),
        from starts[b] on where given."""
        n = len(ids)
        rows = self.bucket(n)
        pad = rows - n
        # Host-side staging in one tensor per buffer, then one copy each: padding rows included,
        # so what a previous, larger step left there is overwritten.
        self.ids[:rows].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:rows].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.width = 1
        for g, grp in enumerate(groups):
            table = page_table(grp.pages, rows)
            width = table.shape[1]
            if width > self.table.shape[2]:
                raise ValueError(f"a decode row holds {width} blocks; the static table has {self.table.shape[2]}")
            self.width = max(self.width, width)
            self.slots[g, :rows].copy_(torch.tensor(grp.slots + [self.scratch_slot] * pad), non_blocking=True)
            self.lens[g, :rows].copy_(torch.tensor(grp.lens + [0] * pad, dtype=torch.int32))
            if grp.starts is not None:  # a window group's (a global group's layers never read them)
                self.starts[g, :rows].copy_(torch.tensor(grp.starts + [0] * pad, dtype=torch.int32))
            self.table[g, :rows, :width].copy_(table, non_blocking=True)
        if self.capture and rows not in self.graphs:
            try:
                self.graphs[rows] = self._capture(rows)
            except RuntimeError as e:
                if self.merge is not None:  # every rank must run the same collectives: none goes on alone
                    raise RuntimeError(
                        f"capturing the decode step's CUDA graphs failed at SP > 1: {e}; "
                        "run with enforce_eager=True (--enforce-eager)"
                    ) from e
                # SP 1: the same step eagerly from now on, and why, once
                print(f"seqpar: decode steps run eagerly: capturing a CUDA graph failed: {e}", file=sys.stderr)
                self.capture = self.fused = False
        if not self.capture:
            out = self._forward(rows)
        else:
            pieces, out = self.graphs[rows]
            pieces.replay()
        first = lambda t: None if t is None else t[:n]  # noqa: E731
        return DecodeOut(out.logits[:n], first(out.greedy), first(out.logprob))

    def _capture(self, rows: int) -> tuple[Pieces, DecodeOut]:
        """Warm up once (Triton compiles, cuBLAS picks its kernels) then capture; every bucket's
        graphs share one memory pool, as only one bucket replays at a time."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(rows)
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        pieces = Pieces(self.pool)
        with torch.cuda.stream(stream):
            out = pieces.capture(lambda: self._forward(rows))
        torch.cuda.synchronize()
        return pieces, out  # (a capture computes nothing: run() replays it next)
