"""Bad client input: each kind gets a 4xx in OpenAI's error shape naming what is wrong,
and the server keeps serving; then a schemathesis fuzz of the OpenAPI schema finds no 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server_util import Server, save_tiny_chat_model

pytestmark = pytest.mark.timeout(240)
MAX_MODEL_LEN = 48
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "w5 w6"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"))
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


def chat(**kw):
    return {"model": "tiny", "messages": USER, "max_tokens": 4, **kw}


def comp(**kw):
    return {"model": "tiny", "prompt": "w5 w6", "max_tokens": 4, **kw}


# (id, method, path, json body or raw bytes, status, param or None, words the message must contain)
CASES = [
    ("bad-json", "POST", CHAT, b'{"messages": [', 400, None, "not valid JSON"),
    ("body-is-a-list", "POST", CHAT, [], 400, None, "object"),
    ("empty-body", "POST", COMP, b"", 400, "prompt", "required"),
    ("missing-messages", "POST", CHAT, {"model": "tiny"}, 400, "messages", "required"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "w5"}]), 400, "messages[0].role", ""),
    (
        "content-wrong-type",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        "",
    ),
    (
        "content-part-not-text",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
        400,
        "messages[0].content",
        "",
    ),
    ("negative-max-tokens", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    ("huge-max-tokens", "POST", CHAT, chat(max_tokens=10**12), 400, "max_tokens", f"{MAX_MODEL_LEN} tokens"),
    ("max-tokens-not-int", "POST", COMP, comp(max_tokens="ten"), 400, "max_tokens", ""),
    ("negative-temperature", "POST", CHAT, chat(temperature=-0.5), 400, "temperature", ""),
    ("temperature-above-2", "POST", CHAT, chat(temperature=2.5), 400, "temperature", "less than or equal to 2"),
    ("temperature-1e308", "POST", COMP, comp(temperature=1e308), 400, "temperature", ""),
    ("top-p-0", "POST", COMP, comp(top_p=0), 400, "top_p", "greater than 0"),
    ("max-tokens-0", "POST", COMP, comp(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("penalty-above-2", "POST", COMP, comp(frequency_penalty=2.5), 400, "frequency_penalty", "less than or equal"),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs: true"),
    ("too-many-stop-strings", "POST", COMP, comp(stop=["x"] * 65), 400, "stop", "at most 64"),
    ("too-many-stop-token-ids", "POST", COMP, comp(stop_token_ids=[3] * 102), 400, "stop_token_ids", "101"),
    ("nan-temperature", "POST", COMP, b'{"prompt": "w5", "temperature": NaN}', 400, "temperature", ""),
    ("top-p-above-1", "POST", CHAT, chat(top_p=1.5), 400, "top_p", ""),
    ("top-k-below-minus-1", "POST", COMP, comp(top_k=-5), 400, "top_k", ""),
    ("top-logprobs-over-20", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", ""),
    ("logprobs-over-20", "POST", COMP, comp(logprobs=21), 400, "logprobs", ""),
    ("n-2", "POST", CHAT, chat(n=2), 400, "n", "use n=1"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-17"), 404, "model", "does not exist"),
    ("token-ids-outside-vocab", "POST", COMP, comp(prompt=[5, 1000]), 400, "prompt", "[0, 101)"),
    ("negative-token-id", "POST", COMP, comp(prompt=[5, -1]), 400, "prompt", ""),
    ("prompt-over-the-limit", "POST", COMP, comp(prompt="w5 " * 60), 400, "prompt", f"{MAX_MODEL_LEN} tokens"),
    ("missing-prompt", "POST", COMP, {"model": "tiny"}, 400, "prompt", "required"),
    ("empty-prompt", "POST", COMP, comp(prompt=""), 400, "prompt", "empty"),
    ("empty-prompt-list", "POST", COMP, comp(prompt=[]), 400, "prompt", "empty"),
    ("empty-stop-string", "POST", CHAT, chat(stop=[""]), 400, "stop", "non-empty"),
    ("negative-stop-token-id", "POST", COMP, comp(stop_token_ids=[-1]), 400, "stop_token_ids[0]", ""),
    ("min-tokens-over-max-tokens", "POST", COMP, comp(min_tokens=9), 400, "min_tokens", "exceeds"),
    ("seed-not-int", "POST", COMP, comp(seed="abc"), 400, "seed", ""),
    ("stream-not-bool", "POST", CHAT, chat(stream=[1]), 400, "stream", ""),
    ("penalty-unsupported", "POST", CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    ("wrong-method", "GET", COMP, None, 405, None, ""),
    ("unknown-route", "POST", "/v1/embeddings", {"input": "x"}, 404, None, ""),
    ("detokenize-outside-vocab", "POST", "/detokenize", {"tokens": [7, 500]}, 400, "tokens", "[0, 101)"),
    ("tokenize-nothing", "POST", "/tokenize", {}, 400, "prompt", "exactly one"),
]


@pytest.mark.parametrize("name, method, path, body, status, param, words", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_4xx_in_openai_shape(server, name, method, path, body, status, param, words):
    json_bytes = {"content": body, "headers": {"content-type": "application/json"}}
    kw = json_bytes if isinstance(body, bytes) else {"json": body}
    r = server.get(path) if method == "GET" else server.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["param"] == param and words in err["message"], err


def test_server_keeps_serving_after_bad_input(server):
    assert len(CASES) >= 20
    assert server.get("/health").status_code == 200
    r = server.post(COMP, json=comp(temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_fuzz_openapi_schema_finds_no_server_error(server):
    """Positive and negative examples for every operation (schemathesis); a bounded budget."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    errors: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(base_url=server.url, timeout=60)
                if response.status_code >= 500:
                    # check() runs within this iteration, so op and mode are the current ones
                    errors.append(
                        f"{op.label} {mode.value}: {response.status_code} {response.text[:200]} "  # noqa: B023
                        f"for {case.body!r:.300}"
                    )

            try:
                check()
            except Unsatisfiable:  # no negative example exists for an operation without inputs
                assert mode is GenerationMode.NEGATIVE
    assert not errors, "\n".join(errors[:5])
    assert server.get("/health").status_code == 200
