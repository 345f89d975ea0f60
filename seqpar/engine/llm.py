"""The offline API, shaped like vLLM's `LLM`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from seqpar.engine.config import EngineConfig
from seqpar.engine.executor import ProgressFn
from seqpar.engine.llm_engine import LLMEngine
from seqpar.engine.outputs import RequestOutput
from seqpar.engine.sampling_params import SamplingParams
from seqpar.model.loader import DEFAULT_MODEL

Prompt = str | list[int]


class LLM:
    """Exact long-context generation with the KV cache sharded over `sp_size` ranks.

    >>> with LLM(model="smollm2-135m", sp_size=2) as llm:            # doctest: +SKIP
    ...     out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
    """

    def __init__(
        self,
        model: str | EngineConfig = DEFAULT_MODEL,
        sp_size: int = 1,
        tp_size: int = 1,
        strategy: str = "auto",
        *,
        torchrun: bool = False,
        **options: Any,
    ):
        """`model` and any `EngineConfig` field by name (`kv_cache_gb=2`, ...), or a whole `EngineConfig`."""
        if isinstance(model, EngineConfig):
            config = model
        else:
            unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EngineConfig)})
            if unknown:
                known = ", ".join(f.name for f in dataclasses.fields(EngineConfig))
                raise TypeError(f"LLM() got unknown option(s) {', '.join(unknown)}; the engine's options are {known}")
            config = EngineConfig(model=model, sp_size=sp_size, tp_size=tp_size, strategy=strategy, **options)
        self.engine = LLMEngine(config, torchrun=torchrun)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        rids: list[int] = []
        try:
            for p, sp in zip(prompts, per_prompt):
                rids.append(self.engine.add_request(p, sp))
            bar = tqdm(total=len(rids), desc="requests", disable=not use_tqdm)
            pending = set(rids)
            while pending:
                self.engine.step()
                done = {r for r in pending if self.engine.requests[r].detok.finished}
                bar.update(len(done))
                pending -= done
            bar.close()
            return [self.engine.output(r) for r in rids]
        except BaseException:
            self._abort(rids)
            raise
        finally:
            for r in rids:
                self.engine.forget(r)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, on_progress: ProgressFn | None = None
    ) -> Iterator[str]:
        """Yield text as it is generated for one prompt; `on_progress(layer, layers)` during prefill.
        The finished RequestOutput is in `self.last_output` afterwards."""
        rid = self.engine.add_request(prompt, params or SamplingParams())
        try:
            while not self.engine.requests[rid].detok.finished:
                self.engine.step(on_progress)
                yield self.engine.pop_delta(rid)
            self.last_output = self.engine.output(rid)
        except BaseException:
            self._abort([rid])
            raise
        finally:
            self.engine.forget(rid)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt(self, conversation: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass plain prompts to generate()")
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _abort(self, rids: list[int]) -> None:
        if not self.engine.executor.closed:
            self.engine.abort(rids)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
