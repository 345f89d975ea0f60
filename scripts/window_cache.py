"""KV bytes a Gemma 3 1B-shaped model holds for one long prompt (issue 27), the whole model in the engine.

    python scripts/window_cache.py [TOKENS] [SP]   # default 32000 tokens, SP 1

Builds a random bf16 checkpoint of google/gemma-3-1b-it's shape (26 layers: 22 with a 512-token
window, 4 global; 1 KV head of 256) in a temporary folder, prefills one prompt of TOKENS random
token ids in the engine (chunks of `max_num_batched_tokens`, 2 threads per rank) and draws one token. It prints, as
JSON, the KV bytes the request holds (`metrics["kv_cache_bytes_per_rank"]`) per token against what
the 4 global layers alone need and what every layer would need, and the time to the first token.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time

import torch

from seqpar import LLM, SamplingParams
from seqpar.costmodel.models import PRESETS


def make_model(path: str) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    fields = {k: v for k, v in PRESETS["gemma-3-1b"].items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**fields)).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 32000
    sp = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    path = os.path.join(tempfile.gettempdir(), "seqpar-gemma-3-1b-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        t0 = time.perf_counter()
        make_model(path)
        print(f"random checkpoint in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    prompt = [random.Random(0).randrange(1000, 200000) for _ in range(tokens)]
    with LLM(model=path, dtype="bfloat16", sp_size=sp, enable_prefix_caching=False) as llm:
        mc = llm.engine.model_config
        t0 = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
        ttft = time.perf_counter() - t0
    held = sum(out.metrics["kv_cache_bytes_per_rank"])
    per_layer = 2 * mc.num_kv_heads * mc.head_dim * 2  # K and V of one layer's token, bf16
    global_layers = sum(mc.window(i) is None for i in range(mc.num_layers))
    result = {
        "tokens": tokens,
        "sp": sp,
        "held_bytes": held,
        "held_bytes_per_token": held / tokens,
        "global_layers_bytes_per_token": global_layers * per_layer,
        "every_layer_bytes_per_token": mc.num_layers * per_layer,
        "held_over_global_layers": round(held / tokens / (global_layers * per_layer), 3),
        "held_over_every_layer": round(held / tokens / (mc.num_layers * per_layer), 3),
        "ttft_s": round(ttft, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
