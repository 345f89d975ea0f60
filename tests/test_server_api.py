"""`seqpar serve` through the real `openai` client: chat and completions, streaming and
not, echo and logprobs against `LLM.generate`, batching that never changes a token,
tokenize / detokenize / models / version. One server (tiny random model, SP 2) per module.

Tolerance: logprobs are compared with 1e-5 absolute: the server and `LLM.generate` run the
same engine configuration, so they differ only by batch composition (row order of fp32
matmuls), ~1e-7 on this model.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from seqpar import LLM, SamplingParams
from server_util import Server, save_tiny_chat_model

pytestmark = pytest.mark.timeout(180)
MAX_MODEL_LEN = 64
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model):
    with Server(
        "--model",
        model,
        "--sp",
        "2",
        "--kv-cache-gb",
        "0.01",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--served-model-name",
        "tiny",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_ready_line_models_version(server, client):
    assert server.ready_line == f"seqpar: serving 'tiny' at {server.url}/v1"
    [m] = client.models.list().data
    assert (m.id, m.owned_by, m.model_extra["max_model_len"]) == ("tiny", "seqpar", MAX_MODEL_LEN)
    assert server.get("/version").json()["version"]
    assert server.get("/health").status_code == 200


def test_chat_streaming_equals_non_streaming_with_usage(server, client):
    messages = [
        {"role": "system", "content": "w10 w11"},
        {"role": "user", "content": [{"type": "text", "text": "w12 "}, {"type": "text", "text": "w13"}]},
    ]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content and streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage == full.usage
    prompt = server.post("/tokenize", json={"messages": messages}).json()
    counts = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert counts == (prompt["count"], 12, prompt["count"] + 12)
    assert usage.prompt_tokens_details.cached_tokens >= 0
    # the template's rendering: w3 content w4 per message, then w5
    assert prompt["tokens"] == [3, 10, 11, 4, 3, 12, 13, 4, 5]


def test_chat_logprobs_seed_and_stop(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "w20"}], max_tokens=8)
    out = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.token == c.top_logprobs[0].token for c in content)  # greedy picks the most likely
    a, b = (client.chat.completions.create(temperature=0.9, seed=7, **kw).choices[0].message.content for _ in range(2))
    assert a == b
    text = out.choices[0].message.content
    stop = " " + text.split()[2] + " "
    stopped = client.chat.completions.create(stop=[stop], **kw, **GREEDY).choices[0]
    assert (stopped.finish_reason, stopped.message.content) == ("stop", text[: text.index(stop)])


def test_min_tokens_defers_stop_token_ids(client):
    kw = dict(model="tiny", prompt="w21", max_tokens=6, logprobs=0, **GREEDY)
    tokens = client.completions.create(**kw).choices[0].logprobs.tokens  # each token's own text, specials too
    stop = tokens[1]
    got = client.completions.create(
        **{**kw, "extra_body": {"ignore_eos": True, "stop_token_ids": [int(stop[1:])], "min_tokens": 3}}
    ).choices[0]
    toks = got.logprobs.tokens
    # As in vLLM: before the 3rd token the stop id cannot be drawn (its logit is masked), so the
    # greedy path leaves the unconstrained one at the 2nd token; after it, the first occurrence of
    # the stop id ends the completion.
    assert stop not in toks[:3] and (tokens[0] == stop or toks[0] == tokens[0])
    if got.finish_reason == "stop":
        assert toks[-1] == stop and toks.count(stop) == 1 and len(toks) > 3
    else:
        assert got.finish_reason == "length" and len(toks) == 6 and stop not in toks


def test_completions_echo_and_logprobs_agree_with_llm_generate(model, client):
    prompt = "w7 w8 w9 w10 w11"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, echo=True, logprobs=2, **GREEDY).choices[
        0
    ]
    with LLM(model=model, sp_size=2, kv_cache_gb=0.01, max_model_len=MAX_MODEL_LEN) as llm:
        ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
        ref = llm.generate(
            ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=2)
        )[0]
    comp = ref.outputs[0]
    assert got.text == prompt + comp.text and got.finish_reason == "length"
    lp = got.logprobs
    entries = ref.prompt_logprobs + comp.logprobs  # [None, prompt positions..., generated...]
    all_ids = ids + comp.token_ids
    assert lp.tokens == [f"w{t}" for t in all_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(all_ids)):
        assert lp.token_logprobs[t] == pytest.approx(entries[t][all_ids[t]].logprob, abs=1e-5)
        assert lp.top_logprobs[t] == pytest.approx({e.decoded_token: e.logprob for e in entries[t].values()}, abs=1e-5)
    assert lp.text_offset == [sum(len(tok) for tok in lp.tokens[:i]) for i in range(len(all_ids))]


def test_completions_batch_of_token_id_prompts(client):
    out = client.completions.create(model="tiny", prompt=[[5, 6], [7, 8, 9]], max_tokens=3, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=3, **GREEDY).choices[0].text
        for p in ([5, 6], [7, 8, 9])
    ]
    assert [c.text for c in out.choices] == alone
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 6
    streamed = list(
        client.completions.create(model="tiny", prompt=[[5, 6], [7, 8, 9]], max_tokens=3, stream=True, **GREEDY)
    )
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) == alone[i]


def test_sixteen_concurrent_greedy_requests_equal_each_alone(server):
    prompts = [" ".join(f"w{(7 * i + j) % 90 + 10}" for j in range(1 + 3 * i % 17)) for i in range(16)]
    lengths = [4 + i % 9 for i in range(16)]

    async def run() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)

        async def one(p: str, n: int) -> tuple[str, int]:
            out = await client.completions.create(model="tiny", prompt=p, max_tokens=n, **GREEDY)
            return out.choices[0].text, out.usage.completion_tokens

        alone = [await one(p, n) for p, n in zip(prompts, lengths)]
        together = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))
        await client.close()
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert [n for _, n in alone] == lengths


def test_tokenize_detokenize(server):
    tok = server.post("/tokenize", json={"prompt": "w5 w6 w99"}).json()
    assert tok == {"count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": [5, 6, 99]}
    assert server.post("/detokenize", json={"tokens": [5, 6, 99]}).json() == {"prompt": "w5 w6 w99"}


def test_prefix_cache_hits_show_in_usage_and_metrics(server, client):
    prompt = [10 + (i * 7) % 80 for i in range(40)]  # two whole 16-token blocks and a part
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    hits = server.metric("seqpar:prefix_cache_hits_total")
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= 32
    assert server.metric("seqpar:prefix_cache_hits_total") - hits >= 32
    assert server.metric("seqpar:prefix_cache_queries_total") >= server.metric("seqpar:prefix_cache_hits_total")


def test_metrics_have_vllm_names_under_seqpar(server, client):
    client.completions.create(model="tiny", prompt="w5 w6", max_tokens=3, **GREEDY)
    text = server.get("/metrics").text
    for name in [
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "num_preemptions_total",
        "engine_restarts_total",
        "sp_bytes_sent_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
    ]:
        assert f"seqpar:{name}{{" in text and 'model_name="tiny"' in text, name
    m = server.metrics()
    kv_labels = {labels for (name, labels) in m if name == "seqpar:kv_cache_usage_perc"}
    assert kv_labels == {(), (("rank", "0"),), (("rank", "1"),)}
    assert m[("seqpar:request_success_total", (("finished_reason", "length"),))] >= 1
    assert m[("seqpar:time_to_first_token_seconds_count", ())] >= 1
    assert m[("seqpar:sp_bytes_sent_total", (("rank", "1"),))] > 0
