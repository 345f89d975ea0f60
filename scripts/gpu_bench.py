"""seqpar on one GPU against transformers (SDPA) on the same GPU, a Llama-3.1-8B-shaped model with random
bf16 weights, in one run: prefill seconds at 8K/32K/64K, decode ms/token at 32K context, 32 x 2K batch
decode tokens/s (seqpar's decode as captured graphs over compiled layers, over eager layers, then without
graphs), SP 2 with both ranks on the one GPU
(prefill and decode at the first length, its greedy tokens against SP 1's), and the paged decode kernel
alone against the memory's rate. Prints and writes JSON ($OUT/bench.json, after every figure).

    PYTHONPATH=. python scripts/gpu_bench.py            # on a GPU machine, ~4-5 minutes on an H200
    SHAPE=tiny LENS=256,512 DEC_CTX=512 KV_GB=0.2 TRITON_INTERPRET=1 python scripts/gpu_bench.py cpu

Knobs (environment): SHAPE (8b | tiny), LENS, DEC_CTX, MB (max_num_batched_tokens), KV_GB, CONFIGS (of
sp1, sp1_uncompiled, sp1_eager: decode as graphs over compiled layers, graphs over eager layers, no
graphs; default all three, prefill figures with sp1 only), SP2 (0 skips SP 2 on the one GPU).
"""

# ruff: noqa: B023 - every closure here is timed at once, inside its loop iteration
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
import traceback

import torch

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SHAPE = os.environ.get("SHAPE", "8b")
OUT = os.environ.get("OUT", tempfile.gettempdir())
LENS = [int(x) for x in os.environ.get("LENS", "8192,32768,65536").split(",")]
DEC_CTX = int(os.environ.get("DEC_CTX", "32768"))
TOP = 5  # log-probs per token for SP 2's check against SP 1
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip
res: dict = {"device": DEV, "shape": SHAPE}


def save() -> None:
    with open(os.path.join(OUT, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 2) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def kernel_rates(cfg) -> None:
    """The paged decode kernel alone: bytes of K/V read per second, at B=1 x 32K and 32 x 2K keys, by
    tile (keys a program's loop step takes) and warps a program (the engine's: 64 keys, 4 warps)."""
    from seqpar.kernels.gpu.paged import num_splits
    from seqpar.kernels.gpu.triton_decode import plan

    hq, hkv, d, page = cfg["num_attention_heads"], cfg["num_key_value_heads"], 128, 16
    for rows, keys in [(1, DEC_CTX), (32, 2048)] if SHAPE == "8b" else [(1, 256), (4, 128)]:
        pages = rows * keys // page
        k = torch.randn(hkv, pages * page, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(rows, hq, d, device=DEV, dtype=torch.bfloat16)
        table = torch.randperm(pages, device=DEV).to(torch.int32).view(rows, -1)
        lens = torch.full((rows,), keys, dtype=torch.int32, device=DEV)
        splits = num_splits(rows, hkv, torch.device(DEV))
        for block_n in (32, 64, 128):
            launches = plan(q, k, v, table, lens, page, 0.088, splits, block_n)[2]  # the same at any warps
            for warps in (4, 8):

                def run():
                    for kernel, grid, args, constexprs in launches:  # as paged_decode launches them
                        kernel[grid](*args, **constexprs, num_warps=warps)

                run()  # compiles
                n = 20 if DEV == "cuda" else 1
                s = timed(lambda: [run() for _ in range(n)]) / n
                gbs = 2 * k.numel() * k.element_size() / s / 1e9
                tag = f"kernel_{rows}x{keys}_bn{block_n}_w{warps}"
                res[f"{tag}_us"], res[f"{tag}_GBs"] = round(s * 1e6, 1), round(gbs)
                log("paged decode", tag, f"{s * 1e6:.1f} us, {gbs:.0f} GB/s")
        save()


def make_model(cfg_fields):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_fields, max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      tie_word_embeddings=False)  # fmt: skip
    path = os.path.join(tempfile.gettempdir(), f"seqpar-bench-{SHAPE}")
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    res["make_model_s"] = round(time.time() - t0, 1)
    return cfg, model, path


def main() -> None:
    try:
        kernel_rates(SHAPES[SHAPE])
    except Exception as e:  # noqa: BLE001 - recorded; the engine's figures still run
        res["kernel_error"] = repr(e)[:400]
        traceback.print_exc()
        save()
    cfg, model, path = make_model(SHAPES[SHAPE])
    V, L, H = cfg.vocab_size, cfg.num_hidden_layers, cfg.num_attention_heads
    hd = cfg.hidden_size // H
    n_params = sum(p.numel() for p in model.parameters())

    def tflops(t: int, s: float) -> float:  # causal prefill, logits of the last token only
        lin = 2 * (n_params - 2 * V * cfg.hidden_size) * t + 2 * V * cfg.hidden_size
        return round((lin + 2 * 2 * L * H * hd * t * t / 2) / s / 1e12, 1)

    ids = torch.randint(100, V - 100, (1, max(LENS + [DEC_CTX, 5300])), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            model(ids[:, :1024].to(DEV), logits_to_keep=1)
            for t in LENS:
                s = timed(lambda: model(ids[:, :t].to(DEV), use_cache=True, logits_to_keep=1))
                res[f"hf_prefill_{t}_s"], res[f"hf_prefill_{t}_tflops"] = round(s, 4), tflops(t, s)
                log("transformers prefill", t, s)
                save()
            x = ids[:, :DEC_CTX].to(DEV)
            full = timed(lambda: model.generate(x, max_new_tokens=33, min_new_tokens=33, do_sample=False), 1)
            pre = timed(lambda: model(x, use_cache=True, logits_to_keep=1), 1)
            res[f"hf_decode_{DEC_CTX}_ms"] = round((full - pre) / 32 * 1000, 2)
            log("transformers decode", res[f"hf_decode_{DEC_CTX}_ms"])
            save()
    except Exception as e:  # noqa: BLE001 - a baseline's failure is recorded, seqpar still runs
        res["hf_error"] = repr(e)[:400]
        traceback.print_exc()
    model = None  # noqa: F841 - its memory back before seqpar starts
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    from seqpar import LLM, SamplingParams

    mb = int(os.environ.get("MB", "16384"))
    kv = float(os.environ.get("KV_GB", "30"))
    first = ids[0, : LENS[0]].tolist()
    sp1_tokens = None

    def generate(llm, prompts, n, logprobs=None):
        return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs))

    # sp1: decode steps as CUDA graphs over compiled layers; sp1_uncompiled: the same graphs over eager
    # layers (the ranks start with TORCH_COMPILE_DISABLE); sp1_eager: no graphs
    for tag in os.environ.get("CONFIGS", "sp1,sp1_uncompiled,sp1_eager").split(","):
        eager = tag == "sp1_eager"
        if tag == "sp1_uncompiled":
            os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read by each rank process at its start
        try:
            t0 = time.time()
            opts = dict(sp_size=1, dtype="bfloat16", kv_cache_gb=kv, max_model_len=131072, max_num_batched_tokens=mb,
                        enable_prefix_caching=False, max_num_seqs=64, enforce_eager=eager)  # fmt: skip
            with LLM(model=path, device=DEV, **opts) as llm:  # shut down on any error too
                res[f"{tag}_start_s"] = round(time.time() - t0, 1)

                def gen(prompts, n):
                    return generate(llm, prompts, n)

                gen([ids[0, :1024].tolist()], 4)
                if tag == "sp1":
                    sp1_tokens = generate(llm, [first], 16, TOP)[0].outputs[0]
                for t in LENS if tag == "sp1" else []:
                    s = timed(lambda: gen([ids[0, :t].tolist()], 1))
                    res[f"{tag}_prefill_{t}_s"], res[f"{tag}_prefill_{t}_tflops"] = round(s, 4), tflops(t, s)
                    log(tag, "prefill", t, s)
                    save()
                p = [ids[0, :DEC_CTX].tolist()]
                full, pre = timed(lambda: gen(p, 33), 1), timed(lambda: gen(p, 1), 1)
                res[f"{tag}_decode_{DEC_CTX}_ms"] = round((full - pre) / 32 * 1000, 2)
                log(tag, "decode", res[f"{tag}_decode_{DEC_CTX}_ms"])
                save()
                n = min(2048, ids.shape[1] - 3200)
                ps = [ids[0, i * 100 : i * 100 + n].tolist() for i in range(32)]
                gen(ps, 3)  # the 32-row bucket's graphs captured before the clock runs
                full, pre = timed(lambda: gen(ps, 65), 1), timed(lambda: gen(ps, 1), 1)
                res[f"{tag}_batch32x{n}_tok_s"] = round(32 * 64 / (full - pre), 1)
                log(tag, "batch", res[f"{tag}_batch32x{n}_tok_s"])
                save()
        except Exception as e:  # noqa: BLE001 - recorded; the next configuration still runs
            res[f"{tag}_error"] = repr(e)[:600]
            traceback.print_exc()
            save()
        os.environ.pop("TORCH_COMPILE_DISABLE", None)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    if os.environ.get("SP2", "1") == "1":
        sp2_one_gpu(path, first, sp1_tokens, generate, dict(dtype="bfloat16", kv_cache_gb=kv / 2, max_model_len=131072,
                    max_num_batched_tokens=mb, enable_prefix_caching=False))  # fmt: skip
    log("done")
    print(json.dumps(res))


def sp2_one_gpu(path, prompt, sp1_tokens, generate, opts) -> None:
    """SP 2 with both ranks on the one GPU (gloo, CUDA tensors through host memory): a check that SP's
    CUDA code runs at W = 2, with its prefill and decode times beside SP 1's (not a speed-up: the
    two ranks share one GPU and every exchange crosses the host)."""
    from seqpar import LLM

    tag, t = "sp2_one_gpu", len(prompt)
    try:
        with LLM(model=path, device=DEV, sp_size=2, **opts) as llm:  # shut down on any error too
            got = generate(llm, [prompt], 16, TOP)[0].outputs[0]
            if sp1_tokens is not None:  # vLLM's check_logprobs_close (tests/test_bf16.py)
                want = sp1_tokens
                part = next((i for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)) if a != b), None)
                res[f"{tag}_tokens_equal_to_sp1"] = len(got.token_ids) if part is None else part
                res[f"{tag}_logprobs_close_to_sp1"] = part is None or (
                    want.token_ids[part] in got.logprobs[part] and got.token_ids[part] in want.logprobs[part]
                )
            s = timed(lambda: generate(llm, [prompt], 1))
            res[f"{tag}_prefill_{t}_s"] = round(s, 4)
            full = timed(lambda: generate(llm, [prompt], 33), 1)
            res[f"{tag}_decode_{t}_ms"] = round((full - s) / 32 * 1000, 2)
            log(tag, res[f"{tag}_prefill_{t}_s"], res[f"{tag}_decode_{t}_ms"])
    except Exception as e:  # noqa: BLE001 - recorded
        res[f"{tag}_error"] = repr(e)[:600]
        traceback.print_exc()
    save()


if __name__ == "__main__":
    main()
