"""The `seqpar` command line: help, one-line errors with exit 2, JSON output, the torchrun path
(its text must equal the local run's: the same ranks, launched differently), the demo's document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from seqpar.cli import errors as cli_errors
from seqpar.cli import main as cli

PROMPT = "The capital of France is"
GREEDY = ["--max-tokens", "6", "--temperature", "0"]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv", [[], ["generate"], ["bench"], ["demo"]])
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: seqpar")


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("seqpar.bench.engine")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "seqpar.bench.engine", fake)
    assert cli.main(["bench", "engine", "--help", "--tokens", "8"]) == 0
    assert seen == [["--help", "--tokens", "8"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", "hi", "--model", "no-such-model"], "'no-such-model' is neither a known model name"),
        (["--prompt", "hi", "--sp", "0"], "sp_size must be >= 1"),
        (["--prompt-file", "/no/such/prompt.txt"], "cannot read --prompt-file '/no/such/prompt.txt'"),
        (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--kv-cache-gb", "0.000001"], "--kv-cache-gb 1e-06 gives"),  # the flag, not the field
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    rc, out, err = run_main(capsys, ["generate"] + args)
    assert rc == 2 and out == ""
    assert err.startswith("seqpar: error: ") and err.count("\n") == 1 and message in err, err


def test_failed_rank_is_reported_in_one_line(capsys):
    error = (
        "a rank failed; the engine is stopped:\nrank 1:\nTraceback (most recent call last):\n  ...\nValueError: boom\n"
    )
    assert cli_errors.fail(error) == 2
    assert capsys.readouterr().err == "seqpar: error: a rank failed; the engine is stopped: ValueError: boom\n"


def test_world_size_mismatch_under_torchrun(capsys, monkeypatch):
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(var, value)
    rc, _, err = run_main(capsys, ["generate", "--sp", "3", "--prompt", "hi"])
    assert rc == 2 and "WORLD_SIZE=2" in err and "--sp 3 x --tp 1 = 3 ranks" in err


def test_entry_point_error_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "seqpar", "generate", "--prompt", "hi", "--sp", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "seqpar: error: sp_size must be >= 1, got 0"


@pytest.mark.slow
def test_generate_json(capsys):
    rc, out, _ = run_main(capsys, ["generate", "--prompt", PROMPT, "--json"] + GREEDY)
    assert rc == 0
    result = json.loads(out)  # one object, nothing else on stdout
    assert result["finish_reason"] in ("length", "stop") and result["text"].strip()
    assert 1 <= len(result["token_ids"]) == result["output_tokens"] <= 6
    assert result["prompt_tokens"] == 5
    assert result["time_to_first_token_s"] > 0 and len(result["kv_cache_bytes_per_rank"]) == 1
    assert result["dtype"] in ("bfloat16", "float32")  # what dtype auto chose here


@pytest.mark.slow
def test_generate_streams_chat_answer_and_summary(capsys):
    rc, out, err = run_main(capsys, ["generate", "--prompt", "What is the capital of France?", "--chat"] + GREEDY)
    assert rc == 0 and "Paris" in out
    for figure in ("prompt tokens", "time to first token", "tokens/s", "KV cache per rank"):
        assert figure in err


@pytest.mark.slow
def test_torchrun_matches_local_sp2(capsys):
    args = ["generate", "--sp", "2", "--prompt", PROMPT, "--json"] + GREEDY
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # silences torchrun's warning; the CLI sets threads itself
    # --standalone: a free rendezvous port, so parallel test runs do not collide.
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "seqpar"] + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        rc, out, _ = run_main(capsys, args)  # the local executor, meanwhile
        stdout, stderr = torchrun.communicate(timeout=240)
    finally:
        torchrun.kill()
    assert rc == 0 and torchrun.returncode == 0, stderr[-2000:]
    local, distributed = json.loads(out), json.loads(stdout)  # rank 0 alone prints
    assert distributed["text"] == local["text"] and distributed["token_ids"] == local["token_ids"]
    assert len(distributed["kv_cache_bytes_per_rank"]) == 2


def test_demo_document():
    from seqpar.cli import demo
    from seqpar.model import load_tokenizer

    doc, where, paragraphs = demo.document()
    assert doc.count(demo.NEEDLE) == 1 and doc.lower().count("vault") == 1
    assert where == paragraphs // 2 and doc.split("\n\n")[where] == demo.NEEDLE
    tokens = len(load_tokenizer("smollm2-135m").encode(doc, add_special_tokens=False))
    assert 3800 <= tokens <= 4300  # "about 4K tokens", and well inside SmolLM2's 8K context
