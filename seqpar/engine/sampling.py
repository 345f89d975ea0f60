"""The rank-side next-token sampler and prompt log-probs (a request's settings: `sampling_params.py`).

Log-probs are reported under the raw model distribution (log_softmax of the
logits before temperature, top-k or top-p), which is what vLLM returns by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from seqpar.engine.outputs import Logprob, LogprobDict
from seqpar.engine.sampling_params import SamplingParams

# Bounds the [rows, V] temporaries of prompt_logprobs: 1024 x 49152 fp32 is 200 MB,
# where a whole 8K prompt at once would be 1.6 GB per copy.
_PROMPT_LOGPROB_CHUNK = 1024


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """The per-request generator (on the device whose logits it samples): seeded requests sample the
    same tokens in any batch."""
    if seed is None:
        return None
    return torch.Generator(device).manual_seed(seed)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [B]
    logprobs: list[float]  # [B] raw log-prob of each chosen token (for cumulative_logprob)
    top_logprobs: list[LogprobDict | None] = field(default_factory=list)  # [B]; None where not asked


def _rank(row_logprobs: Tensor, token: int) -> int:
    """1 + number of strictly more likely tokens, so argmax always has rank 1."""
    return int((row_logprobs > row_logprobs[token]).sum()) + 1


def _logprob_dict(row_logprobs: Tensor, token: int, k: int) -> LogprobDict:
    """The chosen token plus the top-k, as vLLM reports them."""
    out: LogprobDict = {}
    if k > 0:
        vals, ids = torch.topk(row_logprobs, min(k, row_logprobs.numel()))
        for r, (val, tid) in enumerate(zip(vals.tolist(), ids.tolist()), start=1):
            out[tid] = Logprob(val, r)
    if token not in out:
        out = {token: Logprob(float(row_logprobs[token]), _rank(row_logprobs, token)), **out}
    return out


_MAX_TEMPERATURE = 1e4


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Temperature, then top-k, then top-p (vLLM's order) on fp32 logits [B, V]; removed entries -> -inf.

    top_k [B] (<= 0 = off), top_p [B]. Top-p keeps the smallest set of most likely tokens
    whose mass reaches p: a token stays if the mass strictly before it is < p.
    """
    # Past fp32's range a temperature would turn logits into 0 / nan (-inf / inf); at 1e4 the
    # distribution is already uniform to fp32 rounding for any logits a model produces.
    logits = logits / temperature.clamp(max=_MAX_TEMPERATURE).unsqueeze(1)
    B, V = logits.shape
    if bool((top_k <= 0).all()) and bool((top_p >= 1.0).all()):
        return logits
    # Stable descending sort: among equal logits the lower token id ranks first.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [B, V]
    k = torch.where(top_k <= 0, V, top_k.clamp(max=V))
    cols = torch.arange(V, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(cols.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


class Sampler:
    """Picks next tokens for a batch of rows, each with its own params and generator.

    Unseeded rows draw from the sampler's own generator, seeded at construction:
    SP ranks that build the sampler with the same seed and see the same logits
    then agree on every token without a broadcast. `device`: where the logits it gets live (a GPU's
    decode step samples there; its generators draw other numbers than the CPU's for the same seed).
    """

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self._generator = torch.Generator(device).manual_seed(seed)

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        banned: Sequence[Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """`banned[i]`: token ids row i may not draw now (EOS and stop ids before `min_tokens`);
        log-probs stay those of the raw distribution, as vLLM reports them."""
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B = len(params) = {len(params)}, got {list(logits.shape)}")
        B = logits.shape[0]
        gens = list(generators) if generators is not None else [None] * B
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
        if banned is not None and any(banned):
            logits = logits.clone()
            for i, ids in enumerate(banned):
                ids = [t for t in ids if 0 <= t < logits.shape[1]]  # stop ids past the vocabulary never occur
                if ids:
                    logits[i, ids] = float("-inf")
        # torch.argmax returns the first maximum, i.e. the lowest token id on ties.
        tokens = torch.argmax(logits, dim=-1)  # [B]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            dev = logits.device
            sel = torch.tensor(rows, device=dev)
            probs = filter_logits(
                logits[sel],
                torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=dev),
                torch.tensor([params[i].top_k for i in rows], device=dev),
                torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=dev),
            ).softmax(dim=-1)  # [R, V]
            shared = [j for j, i in enumerate(rows) if gens[i] is None]
            if shared:
                drawn = torch.multinomial(probs[shared], 1, generator=self._generator).squeeze(1)
                tokens[sel[shared]] = drawn
            for j, i in enumerate(rows):
                if gens[i] is not None:
                    # One draw per seeded row from its own generator: independent of the batch.
                    tokens[i] = torch.multinomial(probs[j], 1, generator=gens[i])[0]
        chosen_t = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B]
        token_list, chosen = tokens.tolist(), chosen_t.tolist()  # the step's one wait on the device
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        top: list[LogprobDict | None] = [None] * B
        if wanted:  # on the host: a few rows' log-probs, not [B, V]
            lp = logprobs[torch.tensor(wanted, device=logprobs.device)].cpu()
            for j, i in enumerate(wanted):
                top[i] = _logprob_dict(lp[j], token_list[i], params[i].logprobs)
        return SamplerOutput(token_list, chosen, top)


def prompt_logprobs(logits: Tensor, prompt_ids: Sequence[int], k: int) -> list[LogprobDict | None]:
    """Log-probs of each prompt token given the ones before it, like vLLM's prompt_logprobs.

    logits: [T, V] (row t predicts token t + 1; a last row for the first generated
    token is allowed and ignored) or [T - 1, V]. Returns T entries: None for the
    first token, then a dict with the actual token plus the top-k.
    """
    T = len(prompt_ids)
    if k < 0:
        raise ValueError(f"prompt_logprobs k must be >= 0, got {k}")
    if logits.dim() != 2 or logits.shape[0] not in (T, max(T - 1, 0)):
        raise ValueError(f"logits must be [T, V] or [T - 1, V] for T = {T} prompt tokens, got {list(logits.shape)}")
    result: list[LogprobDict | None] = [None] if T else []
    targets = torch.as_tensor(list(prompt_ids[1:]), dtype=torch.int64)
    for start in range(0, T - 1, _PROMPT_LOGPROB_CHUNK):
        stop = min(start + _PROMPT_LOGPROB_CHUNK, T - 1)
        lp = torch.log_softmax(logits[start:stop].float(), dim=-1)  # [chunk, V]
        for r, tok in enumerate(targets[start:stop].tolist()):
            result.append(_logprob_dict(lp[r], tok, k))
    return result


def prompt_logprobs_rows(
    logits_fn: Callable[[Tensor], Tensor], hidden: Tensor, targets: Sequence[int], k: int
) -> list[LogprobDict]:
    """Prompt logprobs from hidden rows [n, hidden] whose next prompt tokens are `targets`.

    Used by SP ranks on their own rows, so no rank ever holds [T, V] logits: the
    vocabulary projection runs _PROMPT_LOGPROB_CHUNK rows at a time.
    """
    out: list[LogprobDict] = []
    for start in range(0, len(targets), _PROMPT_LOGPROB_CHUNK):
        stop = min(start + _PROMPT_LOGPROB_CHUNK, len(targets))
        lp = torch.log_softmax(logits_fn(hidden[start:stop]).float(), dim=-1)  # [chunk, V]
        out += [_logprob_dict(lp[r], tok, k) for r, tok in enumerate(targets[start:stop])]
    return out
