"""The static-buffer decode step (seqpar.engine.decode_graph), run eagerly on CPU: the bookkeeping
a CUDA graph replays (buffers filled and padded to a bucket, padding rows writing only the scratch
slot, block tables of scattered pages, ragged lengths) against the model's own forward with dense
attention over the same cache. On a GPU, tests/test_gpu.py checks the captured graphs.

Tolerance: fp32 on both sides, differing by summation order in attention only: 1e-4 on logits of
magnitude ~10, as the engine's prompt logprobs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.engine.decode_graph import GroupRows, StaticDecode, buckets
from seqpar.engine.kv_cache import KVCache, KVGroups
from seqpar.engine.messages import SeqStep, Step
from seqpar.engine.placement import Placement
from seqpar.engine.step_plan import StepPlan
from seqpar.kernels.attention import reference_block
from seqpar.kernels.gpu.paged import triton_unusable
from seqpar.model.config import ModelConfig
from seqpar.model.llama import LlamaForCausalLM

PAGE, NUM_BLOCKS = 4, 24


def _model(window: int | None = None) -> LlamaForCausalLM:
    """Two layers; with a window, layer 0 attends through it (two layer groups of one layer each)."""
    cfg = ModelConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6, num_kv_heads=2,
        head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_position_embeddings=256,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=1, eos_token_ids=(2,), architecture="llama",
        sliding_window=window, layer_types=("sliding_attention", "full_attention") if window else (),
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return model


def _dense_step(model, cache, ids, positions, groups: list[GroupRows]):
    """The reference: the model's forward, each row attending over its keys (its window's, in a
    sliding-window layer) gathered densely."""
    kv_groups = KVGroups.of([model.config.window(i) for i in range(model.config.num_layers)])

    def attention(layer, q, k, v):
        g, j = kv_groups.where(layer)
        window = kv_groups.windows[g] or 10**9
        cache.write(j, torch.tensor(groups[g].slots), k, v)
        kh, vh = cache.storage(j)
        outs = []
        for b, (pos, ps) in enumerate(zip(positions, groups[g].pages)):
            keys = torch.cat([torch.arange(p * PAGE, p * PAGE + PAGE) for p in ps])[: pos + 1][
                max(0, pos - window + 1) :
            ]
            o, _ = reference_block(q[b : b + 1], kh[:, keys].transpose(0, 1), vh[:, keys].transpose(0, 1), False,
                                   model.config.head_dim**-0.5)  # fmt: skip
            outs.append(o)
        return torch.cat(outs)

    return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), attention))


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("use_triton, window", [(False, None), (True, None), (True, 6)])
@torch.inference_mode()
def test_static_step_matches_the_model_over_the_same_cache(use_triton, window):
    """Without a window: one layer group; with one, layer 0 is a group of its own whose rows read
    from their window's first key on, and whose pages before the window are freed (listed as 0)."""
    if use_triton and (why := triton_unusable(torch.device("cpu"))):
        pytest.skip(why)
    model = _model(window)
    cfg = model.config
    groups = KVGroups.of([cfg.window(i) for i in range(cfg.num_layers)])
    mk = lambda: KVCache(groups.size, NUM_BLOCKS + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)  # noqa: E731
    ours, ref = mk(), mk()
    gen = torch.Generator().manual_seed(1)
    for c in (ours, ref):  # the same "prefilled" cache on both sides
        gen.manual_seed(1)
        c.k.copy_(torch.randn(c.k.shape, generator=gen))
        c.v.copy_(torch.randn(c.v.shape, generator=gen))
    step = StaticDecode(model, ours, PAGE, 8, 8, NUM_BLOCKS * PAGE, cfg.head_dim**-0.5, False, use_triton, groups)
    # scattered pages; positions: the first key, a page boundary, mid-page, several pages
    pages = [[7], [3, 12], [20, 1, 9], [5, 2, 14, 11, 0]]
    positions = [0, 4, 9, 17]
    ids = [5, 17, 33, 90]
    per_group = []
    for w in groups.windows:
        ps = pages if w is None else [[(p + 13) % NUM_BLOCKS for p in row] for row in pages]  # its own pages
        starts = None if w is None else [max(0, p - w + 1) for p in positions]
        if w is not None:  # pages wholly before the window: freed
            ps = [[0 if (i + 1) * PAGE <= st else p for i, p in enumerate(row)] for row, st in zip(ps, starts)]
        slots = [row[p // PAGE] * PAGE + p % PAGE for row, p in zip(ps, positions)]
        per_group.append((slots, ps, starts))
    for n in (3, 4, 1):  # 3 rows pad to the bucket of 4; then a smaller step after a larger one
        rows = [
            GroupRows(sl[:n], ps[:n], [p + 1 for p in positions[:n]], None if st is None else st[:n])
            for sl, ps, st in per_group
        ]
        before = ours.k.clone()
        out = step.run(ids[:n], positions[:n], rows)
        want = _dense_step(model, ref, ids[:n], positions[:n], rows)
        torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=0)
        assert torch.equal(out.greedy, want.argmax(-1))
        torch.testing.assert_close(out.logprob, torch.log_softmax(want, -1).gather(1, out.greedy[:, None])[:, 0])
        # only the rows' own slots and the scratch block changed
        changed = (ours.k != before).any(dim=(0, 1, 3)).nonzero().flatten().tolist()
        written = {x for r in rows for x in r.slots}
        assert set(changed) <= written | set(range(NUM_BLOCKS * PAGE, (NUM_BLOCKS + 1) * PAGE))
        # the K written (layer 1's from layer 0's attention, summed in another order): as the logits
        cached = slice(0, NUM_BLOCKS * PAGE)
        torch.testing.assert_close(ours.k[:, :, cached], ref.k[:, :, cached], atol=1e-5, rtol=0)


aten = torch.ops.aten
# What a CUDA graph cannot capture: ops that make the host wait for the device's result (a value
# read back, an output sized by the data) or that copy host data in (`torch.tensor` of a list).
HOST_BOUND = {
    aten.item.default, aten._local_scalar_dense.default,  # .item(), int(t), float(t)
    aten.is_nonzero.default,  # bool(t), `if t:`
    aten.lift_fresh.default,  # torch.tensor(host data)
    aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor, aten.equal.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class _HostBound(TorchDispatchMode):
    """Records every op dispatched inside it that a CUDA graph could not capture, except while
    `paused` (a Triton kernel under the interpreter: on a GPU it is one launch, no op of torch's)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            bool_index = func in INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
            )
            if func in HOST_BOUND or bool_index:
                self.found.append(str(func) + (" with a boolean mask" if bool_index else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("use_triton, dtype", [(False, torch.float32), (True, torch.bfloat16)])
@torch.inference_mode()
def test_the_static_step_has_nothing_a_cuda_graph_cannot_capture(use_triton, dtype, monkeypatch):
    """What `_forward` runs is what a graph captures on a GPU (the same ops but Triton's launches, run
    here by the interpreter): every op of it is recorded and none may be host-bound. A bf16 model
    takes the logits' refinement path too; layer 0 has a sliding window (its rows' starts)."""
    if use_triton and (why := triton_unusable(torch.device("cpu"))):
        pytest.skip(why)
    model = _model(window=6).to(dtype)
    cfg = model.config
    groups = KVGroups.of([cfg.window(i) for i in range(cfg.num_layers)])
    cache = KVCache(groups.size, NUM_BLOCKS + 1, PAGE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    step = StaticDecode(model, cache, PAGE, 8, 8, NUM_BLOCKS * PAGE, cfg.head_dim**-0.5, False, use_triton, groups)
    rows = [GroupRows([3, 9], [[0], [2, 1]], [1, 6], None if w is None else [0, 1]) for w in groups.windows]
    step.run([5, 6], [0, 5], rows)  # fills the buffers, as run() does before a replay
    recorder = _HostBound()
    if use_triton:
        from seqpar.kernels.gpu import triton_decode

        for name in ("_split_kernel", "_merge_kernel"):
            monkeypatch.setattr(triton_decode, name, _Paused(getattr(triton_decode, name), recorder))
    with recorder:
        step._forward(step.bucket(2))
    assert recorder.found == []


class _Paused:
    """A Triton kernel whose launches the recorder does not see."""

    def __init__(self, kernel, recorder: _HostBound):
        self.kernel, self.recorder = kernel, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recorder.paused = True
            try:
                self.kernel[grid](*args, **kwargs)
            finally:
                self.recorder.paused = False

        return launch


def test_too_many_rows_is_a_clear_error():
    model = _model()
    cfg = model.config
    cache = KVCache(cfg.num_layers, NUM_BLOCKS + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)
    step = StaticDecode(model, cache, PAGE, 8, 2, NUM_BLOCKS * PAGE, 0.3, False, False)
    with pytest.raises(ValueError, match="at most 2"):
        step.run([1, 2, 3], [0, 0, 0], [GroupRows([0, 4, 8], [[0], [1], [2]], [1, 1, 1])])


@pytest.mark.parametrize("world, scheme", [(1, "snake"), (2, "snake"), (3, "striped"), (4, "snake")])
@pytest.mark.parametrize("scattered", [False, True])
def test_decode_table_names_the_same_keys_as_the_slots(world, scheme, scattered):
    """The GPU's view of a rank's decode keys (pages and a count: only the last page partial) lists
    exactly the storage slots the CPU's view holds, in key order, for rows of every length (0 keys
    on a rank, one partial block, many shard units), blocks in storage order or scattered (a run
    each: the slots of many runs at once)."""
    placement = Placement(world, PAGE, 2, scheme)
    gen = torch.Generator().manual_seed(0)
    free = [torch.randperm(40, generator=gen).tolist() if scattered else list(range(40)) for _ in range(world)]
    seqs = []
    for j, start in enumerate([0, 3, 7, 8, 29, 61]):
        blocks = []
        for i in range(start // PAGE + 1):  # each logical block on its owner's next free block
            blocks.append(free[placement.owner(i)].pop(0))
        seqs.append(SeqStep(j, [5], start, [blocks], True, True, start))
    for rank in range(world):
        plan = StepPlan(Step(seqs, "ring"), placement, rank)
        pages, lens, none = plan.decode_table()
        assert none is None
        for slots, ps, n in zip(plan.decode_slots, pages, lens):
            from_pages = [p * PAGE + o for p in ps for o in range(PAGE)][:n]
            assert from_pages == slots.tolist() and len(ps) == -(-n // PAGE)
        for w in (1, 5, 9):  # a sliding window's: the keys from its start are the CPU's window slots
            _, _, starts = plan.decode_table(w)
            for slots, ps, n, st in zip(plan.decode_slots_within(w), pages, lens, starts):
                from_pages = [p * PAGE + o for p in ps for o in range(PAGE)][st:n]
                assert from_pages == slots.tolist()


class _FakeGraph:
    """torch.cuda.CUDAGraph's capture calls, logged (a CPU has no graphs: the ops run as captured)."""

    log: list[str] = []

    def capture_begin(self, pool=None):
        self.name = f"g{sum(e.startswith('begin') for e in self.log)}"
        self.log.append(f"begin {self.name}")

    def capture_end(self):
        self.log.append(f"end {self.name}")

    def replay(self):
        self.log.append(f"replay {self.name}")


def test_pieces_cut_the_capture_at_each_collective_and_run_it_between_replays(monkeypatch):
    """`Pieces`' bookkeeping on CPU with a logging stand-in for CUDA graphs: the capture ends before
    each `outside_graphs` call and resumes after it; a replay runs graph, collective, graph, ... in
    that order, each collective on the tensors it was captured with, its new result copied into the
    tensor the next piece reads."""
    from seqpar.comm.collectives import outside_graphs
    from seqpar.engine.decode_graph import Pieces

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    _FakeGraph.log = []
    calls = []

    def collective(x):
        calls.append(x)
        _FakeGraph.log.append("collective")
        return x * 10

    a = torch.ones(2)
    pieces = Pieces(pool=None)
    out = pieces.capture(lambda: outside_graphs(collective, outside_graphs(collective, a + 1) + 1))
    assert _FakeGraph.log == [
        "begin g0",
        "end g0",
        "collective",
        "begin g1",
        "end g1",
        "collective",
        "begin g2",
        "end g2",
    ]
    assert out.tolist() == [210.0, 210.0]  # (eagerly here: a CPU computes while it "captures")
    first, second = calls  # the tensors the pieces hold: an input of each collective
    _FakeGraph.log = []
    first.fill_(5)  # what piece 0 would compute at a replay
    pieces.replay()
    assert _FakeGraph.log == ["replay g0", "collective", "replay g1", "collective", "replay g2"]
    assert calls[2] is first and calls[3] is second
    # the first collective's new result (50) went where piece 1 reads it; piece 1 did not run (a
    # fake), so the second collective saw its captured input (21) again
    assert pieces.cuts[0][2].tolist() == [50.0, 50.0] and pieces.cuts[1][2].tolist() == [210.0, 210.0]
    assert outside_graphs(collective, a).tolist() == [10.0, 10.0]  # outside a capture: a plain call

    def broken(x):
        raise RuntimeError("gloo: connection closed by peer")

    _FakeGraph.log = []  # a collective that fails mid-capture: its error, the capture ended once
    with pytest.raises(RuntimeError, match="closed by peer"):
        Pieces(pool=None).capture(lambda: outside_graphs(broken, a + 1))
    assert _FakeGraph.log == ["begin g0", "end g0"]
    assert outside_graphs(collective, a).tolist() == [10.0, 10.0]


@torch.inference_mode()
def test_a_fused_step_runs_each_layer_through_its_compiled_functions():
    """A captured step (`fused`, on CUDA) runs every layer's rows through `layer.tiles` (what the worker
    compiled), whatever the row count; the same logits as the eager layers. Here the tiles are the
    plain functions behind a counter (the CUDA test in test_compiled.py compiles them)."""
    from seqpar.model.llama import tile_post, tile_pre

    model = _model()
    cfg = model.config
    calls = []

    def counted(fn, name):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    mk = lambda: KVCache(cfg.num_layers, NUM_BLOCKS + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)  # noqa: E731
    caches = [mk(), mk()]
    rows = [GroupRows([3, 9], [[0], [2, 1]], [1, 6])]
    outs = []
    for cache, fused in zip(caches, (False, True)):
        step = StaticDecode(model, cache, PAGE, 8, 8, NUM_BLOCKS * PAGE, cfg.head_dim**-0.5, False, False)
        step.fused = fused
        for layer in model.model.layers:
            layer.tiles = (counted(tile_pre, "pre"), counted(tile_post, "post"))
        outs.append(step.run([5, 6], [0, 5], rows).logits.clone())
        for layer in model.model.layers:
            layer.tiles = None
    assert calls == ["pre", "post"] * cfg.num_layers  # the fused step only
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
