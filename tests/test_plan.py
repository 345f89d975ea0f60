"""`seqpar plan` on presets: the JSON shape, monotonic in context and in GPUs, and one-line errors
for impossible layouts."""

from __future__ import annotations

import json

import pytest

from seqpar.cli import main as cli
from seqpar.costmodel import PlanError, choose_layout, preset_config
from seqpar.costmodel.hardware import H100, H200

KEYS = {"layout", "strategy", "ttft_s", "decode_ms_per_token", "kv_bytes_per_rank", "max_context_tokens"}


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"])
def test_json_shape(capsys, model):
    rc, out, _ = run_plan(
        capsys, "--model", model, "--context", "131072", "--gpus", "16", "--weight-dtype", "fp8", "--json"
    )
    assert rc == 0
    result = json.loads(out)
    assert KEYS <= set(result["chosen"]) and result["layouts"]
    assert all(KEYS <= set(row) for row in result["layouts"])
    assert result["chosen"] in result["layouts"]
    layouts = {row["layout"] for row in result["layouts"]}
    assert "TP8 x CP2" in layouts  # TP inside a node, CP across the two nodes
    strategies = {row["strategy"] for row in result["layouts"] if row["layout"] == "TP8 x CP2"}
    assert strategies == {"ring", "pass_q", "allgather", "ulysses"}
    fitting = [row for row in result["layouts"] if row["fits"]]
    assert result["chosen"]["ttft_s"] == min(row["ttft_s"] for row in fitting)


def test_table_marks_the_chosen_layout(capsys):
    rc, out, _ = run_plan(capsys, "--model", "llama-3.1-70b", "--context", "32768", "--gpus", "8", "--hardware", "h200")
    assert rc == 0 and out.count("\n* ") == 1 and "chosen: " in out


def test_hf_config_file_works_like_the_preset(tmp_path, capsys):
    from seqpar.costmodel.models import PRESETS

    path = tmp_path / "config.json"
    path.write_text(json.dumps(PRESETS["llama-3.1-8b"]))
    outs = [
        json.loads(run_plan(capsys, "--model", m, "--context", "4096", "--gpus", "8", "--json")[1])
        for m in (str(path), str(tmp_path), "llama-3.1-8b")
    ]
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.1-405b"])
def test_monotonic_in_context_and_gpus(model):
    mc = preset_config(model)
    weights = "fp8" if "405b" in model else "bf16"
    contexts = [8192, 32768, 131072, 524288, 1048576]
    by_context = [choose_layout(mc, H100, c, 64, 8, weight_dtype=weights).chosen for c in contexts]
    for a, b in zip(by_context, by_context[1:]):
        assert a.ttft_s < b.ttft_s and a.kv_bytes_per_rank < b.kv_bytes_per_rank
        assert a.decode_ms_per_token <= b.decode_ms_per_token
    by_gpus = [choose_layout(mc, H100, 1048576, g, 8, weight_dtype=weights) for g in (8, 16, 32, 64, 128)]
    for a, b in zip(by_gpus, by_gpus[1:]):
        assert b.chosen.ttft_s < a.chosen.ttft_s
        assert max(p.max_context_tokens for p in b.layouts) > max(p.max_context_tokens for p in a.layouts)
    assert by_gpus[-1].chosen.fits
    same = choose_layout(mc, H100, 131072, 16, 8, tp=8, weight_dtype=weights)
    assert (
        choose_layout(mc, H200, 131072, 16, 8, tp=8, weight_dtype=weights).chosen.max_context_tokens
        > same.chosen.max_context_tokens
    )  # more memory, longer contexts


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "llama-3.1-8b", "--context", "8", "--gpus", "16", "--tp", "1"],
            "CP 16 ranks but only 8 tokens: some rank would hold none; use at most 8 CP ranks",
        ),
        (
            ["--model", "smollm2-135m", "--context", "4096", "--gpus", "8", "--tp", "2"],
            "9 attention heads cannot split over TP 2: use a TP degree dividing 9 (1, 3)",
        ),
        (
            ["--model", "llama-3.1-8b", "--context", "4096", "--gpus", "12"],
            "--gpus 12 is not a multiple of --gpus-per-node 8: nodes must be whole; use --gpus 8 or 16",
        ),
        (
            ["--model", "llama-3.1-8b", "--context", "4096", "--gpus", "8", "--tp", "16", "--gpus-per-node", "8"],
            "--tp 16 does not divide --gpus 8",
        ),
        (
            ["--model", "llama-3.1-8b", "--context", "4096", "--gpus", "16", "--tp", "16"],
            "TP 16 spans more than one node of 8 GPUs",
        ),
        (["--model", "smollm2-135m", "--context", "2", "--gpus", "16"], "no layout of 16 GPUs can serve 2 tokens"),
        (["--model", "no-such-model", "--context", "8", "--gpus", "8"], "'no-such-model' is neither a preset"),
        (
            ["--model", "llama-3.1-8b", "--context", "8", "--gpus", "8", "--hardware", "tpu"],
            "'tpu' is neither a preset",
        ),
    ],
)
def test_impossible_layouts_exit_2_naming_problem_and_fix(capsys, argv, message):
    rc, out, err = run_plan(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("seqpar: error: ") and err.count("\n") == 1 and message in err, err


def test_when_nothing_fits_the_plan_says_so():
    result = choose_layout(preset_config("llama-3.1-405b"), H100, 131072, 8, 8)  # bf16 weights: 101 GB per GPU at TP 8
    assert not result.chosen.fits and "no layout holds 131072 tokens" in result.note
    # the choice is then the layout closest to holding it: the most memory for KV
    assert result.chosen.max_context_tokens == max(p.max_context_tokens for p in result.layouts)
    with pytest.raises(PlanError, match="weight dtype 'int3'"):
        choose_layout(preset_config("llama-3.1-8b"), H100, 8, 8, 8, weight_dtype="int3")
