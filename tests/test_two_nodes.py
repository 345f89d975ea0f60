"""Two torchrun agents on this machine acting as two nodes (--nnodes 2, c10d rendezvous on
localhost, one process each, so the SP 2 group spans the "nodes"), with the same-host shortcut off
(--no-shared-memory: decode merges and step results travel over gloo as between hosts). Greedy
tokens must equal a local run's: the same ranks, launched as a cluster would launch them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from seqpar.cli import main as cli
from seqpar.comm.launch import free_port
from test_model_helpers import VOCAB, tiny_hf_model

# Blocks of 2 tokens, one block per shard unit: the 24-token prompt alternates between the two ranks.
ENGINE = [
    "--sp",
    "2",
    "--block-size",
    "2",
    "--shard-blocks",
    "1",
    "--kv-cache-gb",
    "0.01",
    "--num-threads",
    "1",
    "--no-shared-memory",
]
PROMPT = " ".join(
    f"w{i}" for i in (5, 17, 3, 99, 42, 8, 8, 23, 61, 7, 14, 30, 31, 32, 33, 90, 12, 77, 6, 4, 19, 50, 2, 11)
)
REQUEST = ["--prompt", PROMPT, "--json", "--max-tokens", "8", "--temperature", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("two_nodes")
    tiny_hf_model("llama", seed=7).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(path)
    return str(path)


def agent(model: str, port: int, run_id: str, log: Path) -> subprocess.Popen:
    """One torchrun agent = one node. Both name the same c10d endpoint; the first to bind it hosts the store."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "--max-restarts",
        "0",
        "-m",
        "seqpar",
        "generate",
        "--model",
        model,
        *ENGINE,
        *REQUEST,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("RANK", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)


def test_two_torchrun_nodes_equal_a_local_run(tiny, tmp_path, capsys):
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [agent(tiny, port, run_id, log) for log in logs]
    try:
        # ~10 s alone; four processes importing torch and joining a rendezvous take far longer on a
        # loaded 2-core machine, so the wait is long (the local run below still fits pytest's 300 s)
        outs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # a no-op once they have exited; no agent outlives the test
    detail = "\n".join(
        f"--- node {i} (rc {n.returncode}) ---\n{log.read_text()[-2000:]}"
        for i, (n, log) in enumerate(zip(nodes, logs))
    )
    assert all(n.returncode == 0 for n in nodes), detail
    printed = [o for o in outs if o.strip()]
    assert len(printed) == 1, detail  # global rank 0 alone drives and prints, on whichever node it landed
    distributed = json.loads(printed[0])

    rc = cli.main(["generate", "--model", tiny, *ENGINE, *REQUEST])  # the local launcher, same engine flags
    local = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert distributed["prompt_tokens"] == local["prompt_tokens"] >= 24
    assert distributed["token_ids"] == local["token_ids"] and len(local["token_ids"]) == 8
    assert len(distributed["kv_cache_bytes_per_rank"]) == 2 and all(distributed["kv_cache_bytes_per_rank"])
