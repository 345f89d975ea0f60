"""`torchrun -m seqpar serve`: rank 0 serves HTTP and drives the engine, rank 1 serves its
steps; the answers equal a local server's; SIGTERM ends the whole job."""

from __future__ import annotations

import signal
import sys

import openai
import pytest

from server_util import Server, alive, children, save_tiny_chat_model, wait_until

pytestmark = pytest.mark.timeout(240)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
ARGS = ("--sp", "2", "--kv-cache-gb", "0.01", "--served-model-name", "tiny")


def complete(server: Server) -> list[str]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    return [
        client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
        for p in ("w5 w6 w7", "w40")
    ]


def test_torchrun_serve_matches_local_and_stops_on_sigterm(tmp_path):
    model = save_tiny_chat_model(tmp_path / "tiny")
    with Server("--model", model, *ARGS) as local:
        expected = complete(local)
    env = {"OMP_NUM_THREADS": "1"}
    with Server("--model", model, *ARGS, launcher=TORCHRUN, env=env) as server:
        assert server.ready_line == f"seqpar: serving 'tiny' at {server.url}/v1"
        assert complete(server) == expected
        workers = children(server.proc.pid)
        assert len(workers) == 2
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        wait_until(lambda: not any(alive(p) for p in workers), 30, 0.1, "torchrun's workers gone")
