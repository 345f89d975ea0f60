"""A model directory without tokenizer files (vLLM's `skip_tokenizer_init`): it starts, token-id
prompts generate the tokens transformers does (text stays ""), EOS comes from the model config,
and what needs a tokenizer fails with one clear error: a ValueError offline, a 400 from the
server, one line and exit 2 from `seqpar generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqpar import LLM, SamplingParams
from seqpar.engine.detokenize import IncrementalDetokenizer
from seqpar.engine.tokenizer import LazyTokenizer, TokenizerUnavailableError
from seqpar.model import ModelLoadError, load_tokenizer
from server_util import Server
from test_model_helpers import tiny_hf_model

pytestmark = pytest.mark.timeout(120)
PROMPTS = [[5, 17, 3, 99, 42, 8], [9, 4]]
ENGINE = dict(block_size=2, shard_blocks=1, kv_cache_gb=2**-12)  # blocks spread the short prompts over SP 2
HINT = "send prompts as token-id lists, or add tokenizer.json/tokenizer_config.json to the model directory"


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # n tokens, as the engine with ignore_eos
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> tuple[str, dict[str, list[int]]]:
    """The tiny Llama saved without tokenizer files; its EOS is a token greedy decoding of PROMPTS[0]
    draws mid-way, so that stopping at EOS shows the engine took it from the model config."""
    model = tiny_hf_model("llama", seed=3, hidden_size=96, num_attention_heads=12, num_key_value_heads=2)
    ref = {"ids": [hf_greedy(model, p, 8) for p in PROMPTS]}
    first = ref["ids"][0]
    stop_at = next(i for i in range(2, len(first)) if first[i] not in first[:i])
    model.config.eos_token_id = model.generation_config.eos_token_id = first[stop_at]
    ref["until_eos"] = first[: stop_at + 1]  # EOS ends the completion and is its last id
    path = tmp_path_factory.mktemp("bare")
    model.save_pretrained(path)
    assert not any(p.name.startswith(("tokenizer", "vocab", "special_tokens")) for p in Path(path).iterdir())
    return str(path), ref


def test_loader_and_lazy_tokenizer_say_why_and_what_works(bare):
    path, _ = bare
    with pytest.raises(ModelLoadError, match=f"{path} holds no tokenizer files"):
        load_tokenizer(path)
    tok = LazyTokenizer(path)
    assert tok.get_or_none() is None
    with pytest.raises(TokenizerUnavailableError) as e:
        tok.get("a text prompt")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg.startswith("a text prompt needs the model's tokenizer") and path in msg and msg.endswith(HINT)


def test_detokenizer_without_tokenizer_keeps_id_rules():
    d = IncrementalDetokenizer(None, SamplingParams(max_tokens=10, stop_token_ids=[7]), eos_token_id=2)
    assert d.update([5, 6]) == "" and not d.finished
    assert d.update([5, 6, 7]) == "" and (d.finish_reason, d.stop_reason, d.text) == ("stop", 7, "")
    d = IncrementalDetokenizer(None, SamplingParams(max_tokens=10), eos_token_id=2)
    d.update([4, 2])
    assert d.finish_reason == "stop"
    d = IncrementalDetokenizer(None, SamplingParams(max_tokens=3), eos_token_id=2)
    d.update([4, 5, 6])
    assert (d.finish_reason, d.output([4, 5, 6]).text) == ("length", "")


@pytest.mark.parametrize("sp", [1, 2])
def test_token_ids_generate_as_transformers(bare, sp):
    path, ref = bare
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLM(model=path, sp_size=sp, **ENGINE) as llm:
        outs = llm.generate(PROMPTS, greedy)
        assert [o.outputs[0].token_ids for o in outs] == ref["ids"]
        assert all(o.outputs[0].text == "" and o.prompt is None for o in outs)
        if sp > 1:
            return
        # EOS from the model config (there is no tokenizer to say it)
        [stopped] = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))
        assert (stopped.outputs[0].token_ids, stopped.outputs[0].finish_reason) == (ref["until_eos"], "stop")
        # log-probs are computed; their tokens have no text
        [lp] = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=2, logprobs=2, prompt_logprobs=1))
        entries = lp.outputs[0].logprobs + [e for e in lp.prompt_logprobs if e]
        assert len(lp.outputs[0].logprobs) == 2 and all(x.decoded_token is None for e in entries for x in e.values())
        # what needs the tokenizer says so, and the engine keeps serving
        for call, need in [
            (lambda: llm.generate("w5 w6"), "a text prompt"),
            (lambda: llm.generate(PROMPTS[0], SamplingParams(stop=["x"])), "stop strings"),
            (lambda: llm.chat([{"role": "user", "content": "hi"}]), "working with text"),
            (llm.get_tokenizer, "working with text"),
        ]:
            with pytest.raises(TokenizerUnavailableError, match=f"^{need} needs the model's tokenizer.*{HINT}$"):
                call()
        assert llm.generate(PROMPTS[1], greedy)[0].outputs[0].token_ids == ref["ids"][1]


def test_generate_cli_text_prompt_is_one_error_line(bare, capsys):
    from seqpar.cli import main as cli

    path, _ = bare
    assert cli.main(["generate", "--model", path, "--prompt", "hello", "--kv-cache-gb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqpar: error: a text prompt needs the model's tokenizer")
    assert path in err


def test_server_serves_token_ids_and_refuses_text_with_400(bare):
    path, ref = bare
    with Server("--model", path, "--kv-cache-gb", "0.01", "--max-model-len", "64", "--served-model-name", "bare") as s:
        greedy = {"model": "bare", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = s.post("/v1/completions", json={"prompt": PROMPTS, **greedy})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["text"] for c in body["choices"]] == ["", ""]
        assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
        assert body["usage"]["prompt_tokens"] == sum(map(len, PROMPTS)) and body["usage"]["completion_tokens"] == 16
        streamed = s.post("/v1/completions", json={"prompt": PROMPTS[0], "stream": True, **greedy})
        events = streamed.text.replace(" ", "")
        assert streamed.status_code == 200 and '"error"' not in events
        assert events.endswith("data:[DONE]\n\n") and '"finish_reason":"length"' in events
        # what needs the tokenizer: a 400 in OpenAI's error shape, naming the parameter
        refused = [
            ("/v1/completions", {"prompt": "w5 w6", **greedy}, "prompt", "a text prompt"),
            ("/v1/completions", {"prompt": PROMPTS[0], "echo": True, **greedy}, "echo", "echo of a token-id prompt"),
            (
                "/v1/completions",
                {"prompt": PROMPTS[0], "logprobs": 1, **greedy},
                "logprobs",
                "logprobs (their tokens are text)",
            ),
            ("/v1/completions", {"prompt": PROMPTS[0], "stop": ["x"], **greedy}, "stop", "stop strings"),
            (
                "/v1/chat/completions",
                {"model": "bare", "messages": [{"role": "user", "content": "hi"}]},
                "messages",
                "a chat conversation",
            ),
            ("/tokenize", {"prompt": "w5"}, "prompt", "a text prompt"),
            ("/detokenize", {"tokens": [5, 6]}, "tokens", "/detokenize"),
        ]
        for route, payload, param, need in refused:
            r = s.post(route, json=payload)
            assert r.status_code == 400, (route, r.text)
            err = r.json()["error"]
            assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, 400)
            assert err["message"].startswith(f"{need} needs the model's tokenizer") and err["message"].endswith(HINT)
        assert s.get("/health").status_code == 200
