"""The servers `seqpar bench serve` runs: how each is started (seqpar at SP N, llama.cpp, vLLM),
kept in its own session and stopped; and what was measured (seqpar's commit, the bench venv's versions)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seqpar.bench import vllm_baseline

LLAMA_CPP = "llamacpp"
VLLM = "vllm"  # with --vllm-python: vLLM's CPU build (`vllm serve`) from that Python's environment


@dataclasses.dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    health: str  # GET path that answers 200 once the server is ready
    extras: dict[str, Any]  # added to each completion request's body
    engine_args: list[str] | None = None  # seqpar's: the engine flags, for the in-process twin
    env: dict[str, str] | None = None  # the server's environment (default: this one)


class RunningServer:
    """A server subprocess in its own session; SIGTERM on stop (SIGKILL to its group if it hangs)."""

    def __init__(self, spec: ServerSpec, port: int, log_path: Path, timeout: float = 600.0):
        import httpx

        self.spec, self.url = spec, f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            spec.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=spec.env
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{spec.name} exited with {self.proc.returncode} before it was ready; see {log_path}"
                )
            try:
                if httpx.get(self.url + spec.health, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{spec.name} not ready within {timeout:.0f}s; see {log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def server_specs(args: argparse.Namespace, port: int, eos_ids: list[int]) -> list[ServerSpec]:
    specs = []
    for name in args.servers.split(","):
        if name.startswith("sp"):
            sp = int(name[2:])
            engine = [
                "--model",
                args.model,
                "--sp",
                str(sp),
                "--num-threads",
                str(max(1, args.cores // sp)),
                "--kv-cache-gb",
                str(args.kv_cache_gb / sp),
                "--no-enable-prefix-caching",
            ]
            cmd = [
                sys.executable,
                "-m",
                "seqpar",
                "serve",
                *engine,
                "--port",
                str(port),
                "--served-model-name",
                "bench",
            ]
            specs.append(ServerSpec(name, cmd, "/health", {}, engine))
        elif name == LLAMA_CPP:
            cmd = [
                str(Path(args.bench_venv) / "bin" / "python"),
                "-m",
                "llama_cpp.server",
                "--model",
                args.gguf,
                "--model_alias",
                "bench",
                "--n_threads",
                str(args.cores),
                "--n_threads_batch",
                str(args.cores),
                "--n_ctx",
                "8192",
                "--interrupt_requests",
                "False",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            specs.append(ServerSpec(name, cmd, "/v1/models", {"logit_bias": {str(t): -1000 for t in eos_ids}}))
        elif name == VLLM:
            cmd, env = vllm_baseline.serve_command(
                args.vllm_python, args.vllm_model, args.vllm_dtype, port, args.workdir or tempfile.gettempdir()
            )
            specs.append(ServerSpec(name, cmd, "/health", {}, env=env))
        else:
            raise SystemExit(f"seqpar bench serve: unknown server {name!r} (sp1, sp2, ..., {LLAMA_CPP}, {VLLM})")
    return specs


def eos_token_ids(tokenizer: Any) -> list[int]:
    """What llama.cpp's requests forbid in place of `ignore_eos`."""
    candidates = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return sorted({t for t in candidates if isinstance(t, int) and t != tokenizer.unk_token_id})


def code_version() -> str:
    """The seqpar commit measured (+dirty if its seqpar/ has uncommitted changes); $SEQPAR_COMMIT outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        git = ["git", "-C", str(root)]
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "seqpar"], capture_output=True, text=True, check=True
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SEQPAR_COMMIT", "unknown")


def bench_versions(venv: str) -> dict[str, str]:
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        return {}
    code = (
        "import importlib.metadata as m, json\nv = {}\nfor p in ('guidellm', 'llama_cpp_python', 'torch'):\n"
        "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))"
    )
    try:
        return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return {}
