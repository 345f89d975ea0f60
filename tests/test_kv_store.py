"""The KV store (kv_store_dir): full blocks survive a restart, bit for bit; bad files never come back.

Engines run deterministic fp32 on a tiny model, so a request whose prefix was loaded from disk
must give the bits of the cold run that computed it (the mode's promise for cached prefixes).
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.engine.block_manager import chain_hash
from seqpar.engine.config import EngineConfig
from seqpar.engine.kv_store import BadBlock, DriverStore, RankStore, decode, encode, evict, fingerprint, rank_dir
from test_engine import _save
from test_model_helpers import VOCAB

pytestmark = pytest.mark.timeout(300)
BS = 4
OPTS = dict(block_size=BS, shard_blocks=2, kv_cache_gb=2**-12, dtype="float32", enable_deterministic_inference=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, ignore_eos=True)


def _prompt(seed: int, n: int = 101) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _bits(out) -> tuple:
    gen = out.outputs[0]
    return gen.token_ids, [sorted((t, lp.logprob) for t, lp in e.items()) for e in gen.logprobs]


def _hashes(prompt: list[int]) -> list[bytes]:
    hs, h = [], None
    for i in range(len(prompt) // BS):
        h = chain_hash(h, prompt[i * BS : (i + 1) * BS])
        hs.append(h)
    return hs


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("llama"), "llama")[1]


# ---- the files ----------------------------------------------------------------------------------
def test_encode_decode_and_every_check():
    k, v = torch.randn(2, 3, BS, 8), torch.randn(2, 3, BS, 8)
    h, shape = b"\x01" * 16, (2, 3, BS, 8)
    data = encode("fp", h, k, v)
    k2, v2 = decode(data, "fp", h, shape, torch.float32)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    flipped = bytearray(data)
    flipped[-7] ^= 1
    bad = {
        "truncated": data[:-1],
        "header only": data[:10],
        "flipped byte": bytes(flipped),
        "magic": b"XXXX" + data[4:],
        "version": data[:4] + (99).to_bytes(4, "little") + data[8:],
        "another fingerprint": encode("other", h, k, v),
        "another hash": encode("fp", b"\x02" * 16, k, v),
        "another dtype": encode("fp", h, k.double(), v.double()),
    }
    for why, blob in bad.items():
        with pytest.raises(BadBlock):
            decode(blob, "fp", h, shape, torch.float32)
            pytest.fail(why)
    with pytest.raises(BadBlock):
        decode(data, "fp", h, (2, 3, BS, 4), torch.float32)  # another shape


class _Cache:
    def __init__(self, blocks: int) -> None:
        self.dtype = torch.float32
        self.k = torch.randn(2, 1, blocks * BS, 8)
        self.v = torch.randn(2, 1, blocks * BS, 8)


def test_rank_store_write_load_and_lru_bound(model, tmp_path):
    one = len(encode("x" * 32, b"\0" * 16, torch.zeros(2, 1, BS, 8), torch.zeros(2, 1, BS, 8)))
    config = EngineConfig(model=model, kv_store_dir=str(tmp_path), kv_store_gb=3.5 * one / 2**30, **OPTS)
    store, cache = RankStore(config, 0), _Cache(8)
    hs = [bytes([i]) * 16 for i in range(6)]
    old = time.time() - 1000
    for i in range(3):
        store.save(cache, [(0, i, hs[i]), (1, i, hs[i])])  # rank 1's entries are not this rank's
        store.flush()
        os.utime(store.path(hs[i]), (old + i, old + i))
    assert DriverStore(config).has(0, hs[0]) and not DriverStore(config).has(0, hs[5])
    fresh = _Cache(8)
    assert store.load_one(fresh, 5, hs[0])  # loaded: now the most recently used
    assert torch.equal(fresh.k[:, :, 5 * BS : 6 * BS], cache.k[:, :, 0:BS])
    assert torch.equal(fresh.v[:, :, 5 * BS : 6 * BS], cache.v[:, :, 0:BS])
    for i in (3, 4):
        store.save(cache, [(0, i, hs[i])])
        store.flush()
    # 3 files fit: the two least recently used (1, then 2) are gone, the loaded one stays
    assert [store.path(h).exists() for h in hs[:5]] == [True, False, False, True, True]
    assert not store.load_one(fresh, 0, hs[1]) and store.stats["missing"] == 1
    store.path(hs[3]).write_bytes(store.path(hs[3]).read_bytes()[:-5])
    assert not store.load_one(fresh, 0, hs[3]) and not store.path(hs[3]).exists()  # bad: deleted
    store.close()
    assert evict(str(tmp_path), 0) == 0 and not list(tmp_path.glob("*/*/*.kv"))


def test_bad_configuration(model, tmp_path):
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        EngineConfig(model=model, kv_store_dir=str(afile))
    with pytest.raises(ValueError, match="cannot be created"):
        EngineConfig(model=model, kv_store_dir=str(afile / "sub"))
    with pytest.raises(ValueError, match="kv_store_gb"):
        EngineConfig(model=model, kv_store_dir=str(tmp_path), kv_store_gb=0)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(model=model, kv_store_dir=str(tmp_path), enable_prefix_caching=False)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            EngineConfig(model=model, kv_store_dir=str(ro))
    # what changes the bits changes the folder
    base = fingerprint(EngineConfig(model=model, **OPTS))
    assert base == fingerprint(EngineConfig(model=model, **OPTS))
    for change in (dict(block_size=8), dict(sp_size=2), dict(dtype="bfloat16"), dict(scheme="striped")):
        assert fingerprint(EngineConfig(model=model, **{**OPTS, **change})) != base


# ---- engines ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [1, 2])
def test_restart_loads_the_prefix_bit_equal(model, tmp_path, sp):
    prompt = _prompt(sp)
    opts = dict(model=model, sp_size=sp, kv_store_dir=str(tmp_path), **OPTS)
    with LLM(**opts) as llm:
        cold = llm.generate([prompt], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    stored = (len(prompt) - 1) // BS * BS  # every full block but the one holding the last token
    with LLM(**opts) as llm:
        warm = llm.generate([prompt], GREEDY)[0]
        assert llm.engine.stats().kv_store_hits == stored
    assert warm.num_cached_tokens == warm.num_stored_tokens == stored
    assert _bits(warm) == _bits(cold)


def test_bad_files_are_recomputed(model, tmp_path):
    prompts = [_prompt(10 + i) for i in range(3)]
    opts = dict(model=model, sp_size=2, kv_store_dir=str(tmp_path), **OPTS)
    with LLM(**opts) as llm:
        cold = llm.generate(prompts, GREEDY)
    config = EngineConfig(**opts)
    fp, owner = fingerprint(config), config.placement().owner

    def path(p: int, i: int):
        return rank_dir(str(tmp_path), fp, owner(i)) / (_hashes(prompts[p])[i].hex() + ".kv")

    truncated, flipped, foreign = path(0, 3), path(1, 6), path(2, 2)  # on ranks 1, 0, 1
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    k = torch.zeros(2, 2, BS, 8)
    foreign.write_bytes(encode("0" * 32, _hashes(prompts[2])[2], k, k))  # another fingerprint's file
    with LLM(**opts) as llm:
        warm = llm.generate(prompts, GREEDY)
    assert [o.num_cached_tokens for o in warm] == [o.num_stored_tokens for o in warm] == [3 * BS, 6 * BS, 2 * BS]
    assert [_bits(o) for o in warm] == [_bits(o) for o in cold]
    for f in (truncated, flipped, foreign):  # recomputed, and written again whole
        decode(f.read_bytes(), fp, bytes.fromhex(f.stem), (2, 2, BS, 8), torch.float32)


# ---- host memory (kv_store_host_gb) ------------------------------------------------------------
def test_host_tier_follows_the_driver(model):
    """The driver's mirror decides: blocks copied as they fill, the least recently used dropped, a
    lookup makes a block the most recently used; the rank holds exactly what the mirror says."""
    config = EngineConfig(model=model, kv_store_host_gb=1.0, **OPTS)
    driver, store, cache = DriverStore(config), RankStore(config, 0), _Cache(8)
    driver.host_capacity = 3  # blocks per rank
    hs = [bytes([i]) * 16 for i in range(6)]
    save, drop = driver.plan_saves([(0, i, hs[i]) for i in range(3)])
    assert len(save) == 3 and drop == []
    store.save(cache, save, drop)
    assert driver.has(0, hs[0])  # found: now the most recently used
    save, drop = driver.plan_saves([(0, 3, hs[3]), (0, 4, hs[4])])
    assert drop == [(0, hs[1]), (0, hs[2])]
    store.save(cache, save, drop)
    assert set(store.host) == set(driver.host[0]) == {hs[0], hs[3], hs[4]}
    assert driver.plan_saves([(0, 3, hs[3])]) == ([], [])  # held already: nothing to copy
    fresh = _Cache(8)
    assert store.load_one(fresh, 7, hs[0]) and store.stats["host_loaded"] == 1
    assert torch.equal(fresh.k[:, :, 7 * BS :], cache.k[:, :, :BS])
    assert torch.equal(fresh.v[:, :, 7 * BS :], cache.v[:, :, :BS])
    want = cache.k[:, :, 3 * BS : 4 * BS].clone()
    cache.k.zero_()  # the host copy is a copy, not a view of the cache
    assert store.load_one(fresh, 6, hs[3]) and torch.equal(fresh.k[:, :, 6 * BS : 7 * BS], want)
    assert not store.load_one(fresh, 0, hs[1]) and store.stats["missing"] == 1  # dropped, no disk behind it
    assert driver.counters()["kv_store_host_bytes"] == 3 * driver.host_block_bytes


DOCS = [_prompt(20 + i, 181) for i in range(2)]


@pytest.fixture(scope="module")
def docs_alone(model):
    """Each document alone (deterministic mode: the same bits at every SP degree, cached or not)."""
    with LLM(model=model, **OPTS) as llm:
        return {i: _bits(llm.generate([doc], GREEDY)[0]) for i, doc in enumerate(DOCS)}


@pytest.mark.parametrize("sp", [2])  # SP 1's bookkeeping is the same per rank (the mirror's test above)
def test_host_tier_returns_evicted_documents_bit_equal(model, docs_alone, tmp_path, sp):
    """A cache too small for two documents, asked about in turn: each return loads its prefix from host
    memory (nothing on disk), with the bits of the request alone; a host tier too small for a document
    leaves the rest to the disk behind it."""
    docs, alone = DOCS, docs_alone
    small = {**OPTS, "kv_cache_gb": 64 * 1024 / sp / 2**30}  # 64 blocks of this model over the ranks
    stored = (len(docs[0]) - 1) // BS * BS
    with LLM(model=model, sp_size=sp, kv_store_host_gb=1.0, **small) as llm:
        assert llm.engine.capacity < 2 * len(docs[0])  # the cache cannot hold both
        outs = [llm.generate([docs[i % 2]], GREEDY)[0] for i in range(4)]
        stats = llm.engine.stats()
    assert [_bits(o) for o in outs] == [alone[i % 2] for i in range(4)]
    # a return finds the head of its document still cached (tails are evicted first), the rest in host memory
    assert [o.num_cached_tokens for o in outs] == [0, 0, stored, stored]
    host = [o.num_host_tokens for o in outs]
    assert host == [o.num_stored_tokens for o in outs] and host[:2] == [0, 0] and min(host[2:]) > 0
    assert stats.kv_store_host_hits == sum(host) // BS and stats.kv_store_bytes_read == 0
    # a host tier of 50 blocks in front of the disk, after a restart: blocks loaded from disk are copied
    # to host memory too; a document evicted from both tiers in part comes back from both
    opts = dict(model=model, sp_size=sp, kv_store_dir=str(tmp_path), **small)
    with LLM(**opts) as llm:
        llm.generate(docs, GREEDY)  # both documents on disk (the writes finish as the engine closes)
    with LLM(**opts, kv_store_host_gb=1.0) as llm:
        llm.engine.kv_store.host_capacity = 50 // sp  # per rank
        outs = [llm.generate([docs[i % 2]], GREEDY)[0] for i in range(3)]
    assert [_bits(o) for o in outs] == [alone[i % 2] for i in range(3)]
    assert [(o.num_stored_tokens, o.num_host_tokens) for o in outs[:2]] == [(stored, 0)] * 2  # all from disk
    # the third: docs[0]'s head still in the cache, the middle (dropped from host memory by docs[1]'s
    # blocks) from disk, the last blocks from host memory
    assert outs[2].num_cached_tokens == stored and 0 < outs[2].num_host_tokens < outs[2].num_stored_tokens
