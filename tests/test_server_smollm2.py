"""`seqpar serve` on the default model (SmolLM2-135M-Instruct) at SP 2, through the openai
client: the chat template applies, the answer is sensible, and streaming agrees."""

from __future__ import annotations

import openai
import pytest

from server_util import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_smollm2_chat_at_sp2():
    with Server("--model", "smollm2-135m", "--sp", "2", "--kv-cache-gb", "0.05", "--max-model-len", "512") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        out = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0)
        assert "Paris" in out.choices[0].message.content
        chunks = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
        assert server.metric("seqpar:prompt_tokens_total") == 2 * out.usage.prompt_tokens
