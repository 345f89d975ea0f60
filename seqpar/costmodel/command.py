"""`seqpar plan`: predicted prefill time, decode time and memory of every layout of a cluster.

seqpar plan --model llama-3.1-405b --context 1048576 --gpus 128 --gpus-per-node 8 --hardware h100
seqpar plan --model path/to/config.json --context 32768 --gpus 2 --hardware my-profile.json --json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from seqpar.costmodel.hardware import PRESETS as HARDWARE
from seqpar.costmodel.hardware import resolve_hardware
from seqpar.costmodel.models import PRESETS as MODELS
from seqpar.costmodel.models import resolve_model_config
from seqpar.costmodel.predict import WEIGHT_BYTES, LayoutChoice, Prediction, choose_layout

SUMMARY_KEYS = ("layout", "strategy", "ttft_s", "decode_ms_per_token", "kv_bytes_per_rank", "max_context_tokens")


def add_plan_args(p: Any) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_CONFIG",
        help=f"a preset ({', '.join(MODELS)}), a HF config.json, or a directory holding one",
    )
    p.add_argument("--context", required=True, type=int, metavar="TOKENS", help="prompt length to prefill, tokens")
    p.add_argument("--gpus", required=True, type=int, metavar="N", help="devices in all")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="devices per node (default: 8)")
    p.add_argument(
        "--hardware",
        default="h100",
        metavar="NAME_OR_JSON",
        help=f"a preset ({', '.join(HARDWARE)}) or a JSON hardware profile (default: h100)",
    )
    p.add_argument(
        "--tp", type=int, default=None, metavar="K", help="consider only this TP degree (default: every one)"
    )
    p.add_argument(
        "--weight-dtype",
        default="bf16",
        choices=tuple(WEIGHT_BYTES),
        help="weight storage, for memory and decode reads (default: bf16)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: chosen, layouts")


def summary(p: Prediction) -> dict[str, Any]:
    d = p.as_dict()
    return {**{k: d[k] for k in SUMMARY_KEYS}, **{k: v for k, v in d.items() if k not in SUMMARY_KEYS}}


def to_json(result: LayoutChoice) -> dict[str, Any]:
    out: dict[str, Any] = {"chosen": summary(result.chosen), "layouts": [summary(p) for p in result.layouts]}
    if result.note:
        out["note"] = result.note
    return out


def _size(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def to_table(result: LayoutChoice, header: str) -> str:
    lines = [
        header,
        f"{'':2}{'layout':<14}{'strategy':<11}{'TTFT s':>10}{'decode ms':>11}{'KV/rank':>11}{'max context':>13}  fits",
    ]
    for p in result.layouts:
        mark = "* " if p == result.chosen else "  "
        lines.append(
            f"{mark}{p.layout:<14}{p.strategy:<11}{p.ttft_s:>10.3f}{p.decode_ms_per_token:>11.2f}"
            f"{_size(p.kv_bytes_per_rank):>11}{p.max_context_tokens:>13,}  {'yes' if p.fits else 'no'}"
        )
    c = result.chosen
    lines.append(
        f"chosen: {c.layout}, {c.strategy}: TTFT {c.ttft_s:.3f} s (linear {c.linear_s:.3f}, TP comm "
        f"{c.tp_comm_s:.3f}, attention {c.attention_s:.3f}, exposed CP comm {c.cp_comm_exposed_s:.3f}), "
        f"decode {c.decode_ms_per_token:.2f} ms/token"
    )
    if result.note:
        lines.append(f"note: {result.note}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """Raises ValueError (PlanError) for impossible requests; the CLI prints it as one line."""
    mc = resolve_model_config(args.model)
    hw = resolve_hardware(args.hardware)
    result = choose_layout(mc, hw, args.context, args.gpus, args.gpus_per_node, args.tp, args.weight_dtype)
    if args.json:
        print(json.dumps(to_json(result)))
    else:
        print(
            to_table(
                result,
                f"{args.model} at {args.context:,} tokens on {args.gpus} x {hw.name} "
                f"({args.gpus_per_node} per node), {args.weight_dtype} weights",
            )
        )
    return 0
