"""Tiers for full KV blocks beyond the paged cache: host memory (`kv_store_host_gb`, the tier a GPU
rank offloads to) and files in a local directory, so a long document is prefilled once, not after
every restart (`kv_store_dir`, bounded by `kv_store_gb`). Either or both; a block is looked for in
host memory first.

Host memory: each rank keeps the blocks it holds as CPU tensors, keyed by chained hash. The driver
decides what they hold: it mirrors every rank's tier as a least-recently-used list of hashes, sends
the blocks to copy with the step that fills them and the hashes to drop when a tier is full, so its
view is exact and a host block never fails to load.

A block's file is named by its chained hash (`block_manager.chain_hash`: every token up to the
block's end) under a fingerprint of everything else that changes its bits (model files, dtype,
RoPE scaling, block size, placement, SP and TP degrees, deterministic mode, device), one folder
per rank: `DIR/<fingerprint>/rank<r>/<hash hex>.kv`. The rank that holds a block writes it, on a
background thread between steps (a step never waits on the disk, and at most one block's write runs
into a step), through a temporary file and an atomic rename; the driver only asks `os.path.exists`
which following blocks are there, and the ranks load them. A file that fails any check is deleted
and counts as a miss: the block is computed again.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.engine.kv_cache import kv_groups
from seqpar.kernels.backends import named
from seqpar.model import load_config
from seqpar.model.loader import resolve_model

if TYPE_CHECKING:
    from seqpar.engine.config import EngineConfig
    from seqpar.engine.kv_cache import KVCache
    from seqpar.engine.messages import KVLoad
    from seqpar.model.config import ModelConfig

log = logging.getLogger(__name__)

MAGIC = b"SPKV"
VERSION = 1
_HEAD = struct.Struct("<4sII")  # magic, format version, bytes of the JSON header that follows
SUFFIX = ".kv"


Entry = tuple[int, int, bytes]  # (SP rank, physical block, chained hash)


class BadBlock(ValueError):
    """A block file that must not be used (damaged, truncated, or written for something else)."""


def fingerprint(config: EngineConfig) -> str:
    """What a block's bits depend on besides its tokens; a new value means a new folder (old files
    age out by the size bound). `config.dtype` must be resolved (not auto)."""
    path = resolve_model(config.model)
    weights = [] if path.is_file() else [f for f in path.iterdir() if f.suffix == ".safetensors"]
    files = [path] if path.is_file() else sorted([*weights, path / "config.json"])
    model = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    parts = {
        "format": VERSION,
        "model": model,
        "dtype": config.dtype,
        "rope_scaling": config.rope_scaling,
        "block_size": config.block_size,
        "shard_blocks": config.shard_blocks,
        "scheme": config.scheme,
        "sp": config.sp_size,
        "tp": config.tp_size,
        "deterministic": config.enable_deterministic_inference,
        "device": config.device,
        "attention": named(config.attention_backend, config.device).name,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def rank_dir(root: str, fp: str, sp_rank: int, tp_rank: int = 0, tp_size: int = 1) -> Path:
    name = f"rank{sp_rank}" if tp_size == 1 else f"rank{sp_rank}-tp{tp_rank}"
    return Path(root).expanduser() / fp / name


def encode_parts(fp: str, h: bytes, k: Tensor, v: Tensor) -> list[memoryview | bytes]:
    """A block file as the buffers to write one after the other: header (magic, version, JSON:
    fingerprint, hash, shape, dtype, payload size and checksum), then K and V raw. K and V are not
    copied into one payload: hashing and writing views of them keep the writer thread's own work
    (and its hold on the GIL, which the rank's step needs) small."""
    parts = [memoryview(t.contiguous().view(torch.uint8).numpy()) for t in (k, v)]
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)  # releases the GIL for buffers this size
    meta = {
        "fingerprint": fp,
        "hash": h.hex(),
        "shape": list(k.shape),
        "dtype": str(k.dtype).removeprefix("torch."),
        "payload": sum(p.nbytes for p in parts),
        "blake2b": digest.hexdigest(),
    }
    head = json.dumps(meta, sort_keys=True).encode()
    return [_HEAD.pack(MAGIC, VERSION, len(head)) + head, *parts]


def encode(fp: str, h: bytes, k: Tensor, v: Tensor) -> bytes:
    """A block file's bytes (`encode_parts` joined)."""
    return b"".join(encode_parts(fp, h, k, v))


def decode(data: bytes, fp: str, h: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """K, V of a block file, or BadBlock: every field must be what this reader expects."""
    if len(data) < _HEAD.size:
        raise BadBlock("truncated header")
    magic, version, n = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BadBlock(f"magic {magic!r} version {version}")
    try:
        meta = json.loads(data[_HEAD.size : _HEAD.size + n])
    except ValueError:
        raise BadBlock("unreadable header") from None
    payload = data[_HEAD.size + n :]
    want = {"fingerprint": fp, "hash": h.hex(), "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    for key, val in want.items():
        if not isinstance(meta, dict) or meta.get(key) != val:
            raise BadBlock(f"{key}: {meta.get(key) if isinstance(meta, dict) else meta!r}, expected {val!r}")
    half = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if meta.get("payload") != 2 * half or len(payload) != 2 * half:
        raise BadBlock(f"payload of {len(payload)} bytes, expected {2 * half}")
    if hashlib.blake2b(payload, digest_size=16).hexdigest() != meta.get("blake2b"):
        raise BadBlock("checksum mismatch")
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return raw[:half].view(dtype).reshape(shape), raw[half:].view(dtype).reshape(shape)


def evict(root: str, max_bytes: int) -> int:
    """Delete the least recently used block files (by mtime: loads touch theirs) of every fingerprint
    under `root` until they fit `max_bytes`; returns the bytes left. Files gone meanwhile (another
    rank evicting) are skipped."""
    files = []
    for f in Path(root).expanduser().glob(f"*/rank*/*{SUFFIX}"):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime_ns, st.st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files, key=lambda t: t[0]):
        if total <= max_bytes:
            break
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        total -= size
    return total


def sweep_temporaries(folder: Path) -> None:
    """Delete the temporary files of writers that died mid-write (kill -9): never renamed, so never
    read, but they would hold disk space outside the size bound forever."""
    for f in folder.glob("*.tmp*"):
        try:
            os.kill(int(f.suffix.removeprefix(".tmp")), 0)
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's process
            pass


class DriverStore:
    """The driver's view: which blocks each rank holds in host memory (exactly: the driver decides), which
    are on disk (existence only; the ranks verify on load), and the store's counters for metrics, kept
    here because the driver sends every load and every write."""

    def __init__(self, config: EngineConfig, mc: ModelConfig | None = None) -> None:
        self.root, self.tp_size = config.kv_store_dir, config.tp_size
        self.fp = fingerprint(config) if self.root else ""
        self.dirs = (
            [
                [rank_dir(self.root, self.fp, r, t, config.tp_size) for t in range(config.tp_size)]
                for r in range(config.sp_size)
            ]
            if self.root
            else None
        )
        mc = mc or load_config(config.model, config.rope_scaling)
        zeros = torch.zeros(kv_groups(mc).size, mc.num_kv_heads // config.tp_size, config.block_size, mc.head_dim)
        zeros = zeros.to(config.torch_dtype)
        # A block's files (one per TP rank): the header's length does not depend on the K/V in it.
        self.file_bytes = len(encode(self.fp, bytes(16), zeros, zeros)) * config.tp_size
        # Host memory: the bound split evenly over every rank; a block takes K and V on each TP rank.
        self.host_capacity = int(config.kv_store_host_gb * 2**30 / config.world_size) // (2 * zeros.nbytes)
        self.host_block_bytes = 2 * zeros.nbytes * config.tp_size  # one block, all TP ranks together
        self.host: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(config.sp_size)]
        self.misses = self.bytes_read = self.bytes_written = 0  # misses: listed blocks that failed to load
        self.host_hits = self.host_bytes_written = 0  # blocks loaded from host memory; bytes copied there
        self.load_seconds = 0.0

    def plan_saves(self, entries: list[Entry]) -> tuple[list[Entry], list[tuple[int, bytes]]]:
        """Of the (SP rank, physical block, hash) entries a step fills: those some tier lacks (the ranks
        copy them out after the step), and the (SP rank, hash) blocks host memory drops to make room,
        least recently used first (applied after the copies). Disk writes are counted as sent (a rank
        whose disk refuses one logs it)."""
        save, drop = [], []
        for r, b, h in entries:
            to_host = self.host_capacity > 0 and h not in self.host[r]
            to_disk = self.dirs is not None and not self._on_disk(r, h)
            if to_host or to_disk:
                save.append((r, b, h))
            if to_disk:
                self.bytes_written += self.file_bytes
            if self.host_capacity > 0:
                if to_host:
                    self.host_bytes_written += self.host_block_bytes
                self.host[r][h] = None
                self.host[r].move_to_end(h)
                while len(self.host[r]) > self.host_capacity:
                    drop.append((r, self.host[r].popitem(last=False)[0]))
        return save, drop

    def counters(self) -> dict[str, int | float]:
        """EngineStats' fields of the store (besides kv_store_hits, the block manager's)."""
        return {
            "kv_store_misses": self.misses,
            "kv_store_bytes_read": self.bytes_read,
            "kv_store_bytes_written": self.bytes_written,
            "kv_store_load_seconds": self.load_seconds,
            "kv_store_host_hits": self.host_hits,
            "kv_store_host_bytes": sum(map(len, self.host)) * self.host_block_bytes,
            "kv_store_host_bytes_written": self.host_bytes_written,
        }

    def loaded(self, listed: int, failed: int, host: int, seconds: float) -> None:
        """Count one KVLoad: `listed` blocks asked for, `host` of them held in host memory, `failed` of
        the others missing or damaged on disk."""
        self.misses += failed
        self.host_hits += host
        self.bytes_read += (listed - host - failed) * self.file_bytes
        self.load_seconds += seconds

    def in_host(self, sp_rank: int, h: bytes) -> bool:
        return h in self.host[sp_rank]

    def has(self, sp_rank: int, h: bytes) -> bool:
        """Whether rank `sp_rank` can load block `h`; a block found in host memory becomes its most
        recently used (it is about to be loaded)."""
        if h in self.host[sp_rank]:
            self.host[sp_rank].move_to_end(h)
            return True
        return self.dirs is not None and self._on_disk(sp_rank, h)

    def _on_disk(self, sp_rank: int, h: bytes) -> bool:
        name = h.hex() + SUFFIX
        return all(os.path.exists(d / name) for d in self.dirs[sp_rank])


class RankStore:
    """One rank's tiers: its blocks in host memory (what the driver says to keep), and its folder,
    written in the background, loaded and checked on demand."""

    def __init__(self, config: EngineConfig, sp_rank: int, tp_rank: int = 0) -> None:
        self.sp_rank, self.block_size = sp_rank, config.block_size
        self.host: dict[bytes, tuple[Tensor, Tensor]] | None = {} if config.kv_store_host_gb > 0 else None
        self.stats = {"written": 0, "loaded": 0, "missing": 0, "bad": 0, "host_loaded": 0}
        self.idle = threading.Event()
        self.idle.set()
        self.root = config.kv_store_dir
        if self.root is None:
            return
        self.fp = fingerprint(config)
        self.dir = rank_dir(self.root, self.fp, sp_rank, tp_rank, config.tp_size)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(config.kv_store_gb * 2**30)
        # Every rank writes into the same bound, but each sees only its own writes until it rescans:
        # assume the others write as much, so the bound is checked no later than it is crossed.
        self.writers = config.world_size
        self.estimate = evict(self.root, self.max_bytes)
        sweep_temporaries(self.dir)
        self.pending: set[bytes] = set()
        # Copies waiting for the disk are held in memory: past this many bytes new blocks are skipped
        # (a cache may forget; a step never waits and the rank never runs out of memory).
        self.max_queued, self.queued, self._lock = 1 << 30, 0, threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        # `idle` is set between steps: the writer hashes and writes only then, so it never takes a core
        # from a step's parallel regions (a decode on 2 cores ran 3-9% slower while writes overlapped it).
        self._thread = threading.Thread(target=self._writer, name="kv-store-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a shut-down engine's last blocks still reach the disk

    def path(self, h: bytes) -> Path:
        return self.dir / (h.hex() + SUFFIX)

    def save(self, cache: KVCache, blocks: list[tuple[int, int, bytes]], drop: list[tuple[int, bytes]] = ()) -> None:
        """This rank's blocks of (sp rank, physical block, hash): copied out now (the cache slots may be
        reused by the next step) into host memory and the disk's queue; then host memory drops `drop`'s
        (sp rank, hash) blocks (the driver's choice)."""
        bs = self.block_size
        for r, b, h in blocks:
            if r != self.sp_rank:
                continue
            kv = self.host.get(h) if self.host is not None else None
            if kv is None:
                kv = tuple(t[:, :, b * bs : (b + 1) * bs].to("cpu", copy=True) for t in (cache.k, cache.v))
            if self.host is not None:
                self.host[h] = kv
            # no stat here: the driver sent only blocks not on disk (DriverStore.plan_saves), and the
            # writer checks again before writing
            if self.root is None or h in self.pending or self.queued > self.max_queued:
                continue
            self.pending.add(h)
            with self._lock:
                self.queued += 2 * kv[0].nbytes
            self._queue.put((h, *kv))
        for r, h in drop:
            if r == self.sp_rank and self.host is not None:
                self.host.pop(h, None)

    def _writer(self) -> None:
        # The lowest CPU priority for this thread alone (Linux takes a thread id here): a write still
        # running when the next step starts yields the core to the step's threads (hashing and file
        # writes release the GIL). Elsewhere the thread keeps the process's priority.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (item := self._queue.get()) is not None:
            h, k, v = item
            self.idle.wait()
            try:
                self._write(h, k, v)
            except OSError as e:  # a full or read-only disk costs recomputation, never a step
                log.warning("kv store: could not write %s: %s", self.path(h), e)
            finally:
                with self._lock:
                    self.queued -= 2 * k.nbytes
                self.pending.discard(h)
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, h: bytes, k: Tensor, v: Tensor) -> None:
        path = self.path(h)
        if path.exists():
            return
        parts = encode_parts(self.fp, h, k, v)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            # No fsync: os.replace gives readers the whole file or none (kill -9 included); what a power
            # loss could tear, the checksum refuses on reading. An fsync per block is work on the cores
            # the running decode needs, for durability alone.
            with open(tmp, "wb") as f:
                f.writelines(parts)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.stats["written"] += 1
        self.estimate += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) * self.writers
        if self.estimate > self.max_bytes:
            self.estimate = evict(self.root, self.max_bytes)

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        if self.root is not None:
            self._queue.join()

    def close(self) -> None:
        if self.root is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def load_one(self, cache: KVCache, b: int, h: bytes) -> bool:
        """Block `b` of the cache from host memory, else from the file of hash `h`; False (and a bad file
        deleted) if it cannot be."""
        bs = self.block_size
        kv = self.host.get(h) if self.host is not None else None
        if kv is not None:
            with torch.no_grad():
                cache.k[:, :, b * bs : (b + 1) * bs] = kv[0].to(cache.k.device)
                cache.v[:, :, b * bs : (b + 1) * bs] = kv[1].to(cache.v.device)
            self.stats["host_loaded"] += 1
            return True
        if self.root is None:
            self.stats["missing"] += 1
            return False
        path = self.path(h)
        shape = (cache.k.shape[0], cache.k.shape[1], bs, cache.k.shape[3])
        try:
            data = path.read_bytes()
        except OSError:
            self.stats["missing"] += 1
            return False
        try:
            k, v = decode(data, self.fp, h, shape, cache.dtype)
        except BadBlock as e:
            log.warning("kv store: %s ignored (%s)", path, e)
            self.stats["bad"] += 1
            path.unlink(missing_ok=True)
            return False
        with torch.no_grad():
            cache.k[:, :, b * bs : (b + 1) * bs] = k.to(cache.k.device)
            cache.v[:, :, b * bs : (b + 1) * bs] = v.to(cache.v.device)
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        self.stats["loaded"] += 1
        return True

    def load(self, cache: KVCache, msg: KVLoad) -> list[int]:
        """Load this rank's entries of `msg.blocks`; every rank learns which entries failed anywhere
        (a collective: every rank runs it)."""
        failed = [j for j, (r, b, h) in enumerate(msg.blocks) if r == self.sp_rank and not self.load_one(cache, b, h)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every: list[list[int] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(every, failed)
            failed = sorted({j for part in every for j in part or []})
        return failed
