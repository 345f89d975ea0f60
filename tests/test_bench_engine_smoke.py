"""Smoke test of the engine benchmark (`seqpar bench engine --quick`) on a tiny random model:
every row is produced, SP 2 is exact against SP 1, figures are positive. No speed assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seqpar.bench import engine as bench
from test_model_helpers import VOCAB, tiny_hf_model


def _save(tmp: Path) -> str:
    # 12 q heads / 2 kv heads, head_dim 8; context 256 holds the quick sizes.
    model = tiny_hf_model("llama", seed=3, hidden_size=96, num_attention_heads=12, num_key_value_heads=2)
    model.save_pretrained(tmp)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(tmp)
    return str(tmp)


@pytest.mark.timeout(120)
def test_bench_engine_quick(tmp_path, capsys):
    model = _save(tmp_path / "tiny")
    out = tmp_path / "engine.json"
    rc = bench.main(["--quick", "--model", model, "--prompt", "random", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    s = data["summary"]

    # time to first token: every configuration, transformers included, all positive
    assert set(s["ttft"]) == {"sp1-1t", "sp2", "sp1-2t", "hf-2t"}
    for key, row in s["ttft"].items():
        assert row["ttft_s"] > 0, key
    for key in ("sp1-1t", "sp2", "sp1-2t"):
        assert s["ttft"][key]["wall_s"] >= s["ttft"][key]["ttft_s"] > 0

    # decode at both contexts, SP 1 (2 threads) and SP 2 with every merge
    assert sorted(int(c) for c in s["decode"]) == [64, 160]
    for ctx, per in s["decode"].items():
        assert set(per) == {"sp1-2t", "sp2", "sp2-alltoall", "sp2-tree"}, ctx
        for key, d in per.items():
            assert d["ms_per_token"] > 0 and len(d["tokens"]) == 4, (ctx, key)
            comm = d["comm_bytes_per_token_per_rank"]
            assert len(comm) == (1 if key == "sp1-2t" else 2)
            assert all(b > 0 for b in comm) if key != "sp1-2t" else comm == [0]

    # KV cache per rank: SP 2 holds about half of SP 1's; prefill sends bytes at SP 2 only
    kv1, kv2 = s["ttft"]["sp1-1t"]["kv_bytes_per_rank"], s["ttft"]["sp2"]["kv_bytes_per_rank"]
    assert len(kv1) == 1 and len(kv2) == 2 and kv1[0] > 0 and all(b > 0 for b in kv2)
    assert sum(kv2) == kv1[0]
    assert all(b > 0 for b in s["ttft"]["sp2"]["prefill_comm_bytes_per_rank"])
    assert s["ttft"]["sp1-1t"]["prefill_comm_bytes_per_rank"] == [0]

    # exactness: SP 2 greedy tokens equal SP 1's, transformers' first token too
    assert s["exact"] and all(s["exact"].values()), s["exact"]
    assert "first token hf-2t == sp1-1t" in s["exact"]

    # the printed report has every table and the targets
    for text in (
        "Time to first token",
        "Decode",
        "KV cache bytes per rank",
        "Exactness",
        "Targets",
        "seqpar SP 2 (ring, snake)",
        "transformers, 2 threads",
        "decode merge tree",
    ):
        assert text in printed, text
