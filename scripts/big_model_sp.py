"""A Llama-3.1-8B-shaped model (random bf16 weights, ~16 GB) prefilling an 8K-token prompt at SP 2
on one host: the ranks map one shared copy of the weights, where two copies do not fit in 24 GiB.

    python scripts/big_model_sp.py --dir /path/with/35GB/free [--sp 2] [--tokens 8192]

Writes the checkpoint once (`--dir/llama-3.1-8b-random`: config.json and model.safetensors,
streamed tensor by tensor, so writing it needs ~1 GB of memory), then runs seqpar on it with
token-id prompts (the model has no tokenizer). Prints the prefill time, the summed proportional
set size of the driver and every rank, and this host's memory. Weights are random: the output
tokens mean nothing; this measures memory and time only.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

from seqpar import LLM, SamplingParams
from seqpar.costmodel.models import PRESETS


def tensors(cfg: dict) -> dict[str, list[int]]:
    """The Llama checkpoint's tensor names and shapes for config `cfg`."""
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": [q, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, q],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    return out


def write_checkpoint(folder: Path, cfg: dict) -> None:
    """config.json and a bf16 model.safetensors of random weights, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensors(cfg)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    gen = torch.Generator().manual_seed(0)
    tmp = folder / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).reshape(-1).numpy().tobytes())
    tmp.rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the ~16 GB checkpoint is written once")
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    folder = args.dir / "llama-3.1-8b-random"
    if not (folder / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_checkpoint(folder, dict(PRESETS["llama-3.1-8b"]))
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    t0 = time.perf_counter()
    with LLM(
        model=str(folder),
        sp_size=args.sp,
        dtype="bfloat16",
        max_model_len=args.tokens + 16,
        max_num_batched_tokens=args.tokens,
        kv_cache_gb=1.5,
        strategy="ring",
        enable_prefix_caching=False,
    ) as llm:
        start = time.perf_counter() - t0
        prompt = torch.randint(0, 128000, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        t0 = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        prefill = time.perf_counter() - t0
        pids = [os.getpid(), *llm.engine.rank_pids()]
        pss = sum(pss_mib(p) for p in pids)
        print(
            json.dumps(
                {
                    "sp": args.sp,
                    "prompt_tokens": args.tokens,
                    "start_s": round(start, 1),
                    "prefill_s": round(prefill, 1),
                    "pss_mib_all_processes": round(pss),
                    "host_gib": round(host, 1),
                    "weights_gib": round(
                        2
                        * sum(int(torch.tensor(s).prod()) for s in tensors(dict(PRESETS["llama-3.1-8b"])).values())
                        / 2**30,
                        1,
                    ),
                    "first_token": out[0].outputs[0].token_ids[0],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
