"""One read-only copy of the weights per host, mapped by every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from seqpar import LLM, SamplingParams
from seqpar.model import load_model
from seqpar.model.shared_weights import map_readonly, weights_file, write_aligned
from test_model_helpers import save_tiny


def test_aligned_file_is_safetensors_and_maps_aligned(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.randn(2, 3).half()}
    write_aligned(tensors, tmp_path / "w.safetensors")
    back = load_file(str(tmp_path / "w.safetensors"))  # the library reads it: padding tensors are legal
    mapped = map_readonly(tmp_path / "w.safetensors")
    assert set(mapped) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(back[name], t) and torch.equal(mapped[name], t)
        assert mapped[name].data_ptr() % 64 == 0


def test_model_maps_the_file_and_a_write_faults(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    _, path = save_tiny(tmp_path / "m")
    model, _ = load_model(path, torch.bfloat16)
    file = weights_file(sorted(path.glob("*.safetensors")), torch.bfloat16)
    assert file.is_file() and all(p.data_ptr() % 64 == 0 for p in model.parameters())
    again, _ = load_model(path, torch.bfloat16)  # the same file, mapped again: equal weights
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    # Writing a weight through the read-only mapping faults instead of quietly copying the page.
    code = (
        "import torch; from seqpar.model import load_model; "
        f"m, _ = load_model({str(path)!r}, torch.bfloat16); m.lm_head.weight.data.add_(1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**_env(), "SEQPAR_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == -11  # SIGSEGV


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_sp_ranks_share_one_clean_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    _, path = save_tiny(tmp_path / "m")
    with LLM(model=str(path), sp_size=2, dtype="float32", kv_cache_gb=2**-12, block_size=2) as llm:
        llm.generate([[5, 17, 3, 99, 42]], SamplingParams(max_tokens=4, ignore_eos=True))
        file = str(weights_file(sorted(path.glob("*.safetensors")), torch.float32))
        for proc in llm.engine.executor._procs:
            maps = _mapping_of(proc.pid, file)
            assert maps, f"rank {proc.name} does not map {file}"
            assert all(m.get("Private_Dirty", 0) == 0 for m in maps)  # never written


def _mapping_of(pid: int, file: str) -> list[dict[str, int]]:
    """smaps entries (kB fields) of the mappings of `file` in process `pid`."""
    out, current = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            current = {} if parts[-1] == file else None
            if current is not None:
                out.append(current)
        elif current is not None and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
            current[parts[0][:-1]] = int(parts[1])
    return out


def test_ranks_starting_together_read_the_checkpoint_once(tmp_path):
    """The copy is written by one process per host; the others wait for it and map it (three readers
    at once would hold the checkpoint three times while converting)."""
    _, path = save_tiny(tmp_path / "m")
    log = tmp_path / "reads.log"
    code = (
        "import sys, time, torch; from pathlib import Path\n"
        "from seqpar.model.shared_weights import shared_tensors\n"
        "from seqpar.model.weights import read_safetensors_dir\n"
        "src = Path(sys.argv[1])\n"
        "def read():\n"
        "    open(sys.argv[2], 'a').write('read\\n'); time.sleep(1.0)\n"
        "    return read_safetensors_dir(src)\n"
        "t = shared_tensors(sorted(src.glob('*.safetensors')), torch.bfloat16, read)\n"
        "assert t is not None and t['lm_head.weight'].dtype == torch.bfloat16\n"
    )
    env = {**_env(), "SEQPAR_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(log)], env=env) for _ in range(3)]
    try:
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            p.kill()
    assert log.read_text().count("read") == 1
