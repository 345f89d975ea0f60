"""The optional vLLM baseline of the benchmarks: without vLLM it fails early and clearly (vLLM itself is
never needed by the test suite)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest

from seqpar.bench import vllm_baseline


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    vllm_baseline.add_arguments(p)
    args = p.parse_args(argv)
    vllm_baseline.check_arguments(p, args)
    return args


def test_no_option_no_baseline():
    args = _parse([])
    assert vllm_baseline.start(args) is None


def test_option_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--vllm-python", sys.executable])  # no --vllm-model
    assert "--vllm-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--vllm-python", str(tmp_path / "nope"), "--vllm-model", str(tmp_path)])
    assert "no such executable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--vllm-python", sys.executable, "--vllm-model", str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
@pytest.mark.timeout(60)
def test_python_without_vllm_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(vllm_baseline.VLLMUnavailable, match="cannot import vllm"):
        vllm_baseline.VLLMBaseline(sys.executable, str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("bench", ["engine", "decode"])
def test_benchmarks_stop_early_without_vllm(bench, tmp_path, capsys):
    """`seqpar bench engine|decode --vllm-python P` with no vLLM at P: exit status 2 and the reason,
    before any seqpar engine is built."""
    import importlib

    (tmp_path / "config.json").write_text("{}")
    main = importlib.import_module(f"seqpar.bench.{bench}").main
    rc = main(["--quick", "--vllm-python", sys.executable, "--vllm-model", str(tmp_path)])
    assert rc == 2
    assert "cannot import vllm" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_serve_command_without_vllm(tmp_path):
    with pytest.raises(vllm_baseline.VLLMUnavailable, match="no vLLM installed"):
        vllm_baseline.serve_command(sys.executable, str(tmp_path), "bfloat16", 8000, str(tmp_path))
