"""Deterministic benchmark prompts: the same token ids for every configuration of a run."""

from __future__ import annotations

import random
from typing import Any

import torch

_NOUNS = ("lighthouse", "orchard", "bridge", "library", "harbour", "mill", "observatory", "market", "canal", "garden")
_ADJS = ("old", "northern", "quiet", "famous", "restored", "wooden", "busy", "small", "stone", "hidden")
_CITIES = (
    "Lisbon",
    "Oslo",
    "Turin",
    "Ghent",
    "Krakow",
    "Porto",
    "Lyon",
    "Bergen",
    "Utrecht",
    "Graz",
    "Seville",
    "Tartu",
)


def prompt_text(num_facts: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    facts = []
    for i in range(num_facts):
        facts.append(
            f"Record {i}: the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} of {rng.choice(_CITIES)} was built in "
            f"{rng.randint(1200, 1990)} and welcomes {rng.randint(10, 9000)} visitors a week."
        )
    return " ".join(facts)


def make_prompt(tokenizer: Any, vocab_size: int, num_tokens: int, source: str, seed: int = 0) -> list[int]:
    """`num_tokens` deterministic token ids, the same for every configuration."""
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()
    facts = max(8, num_tokens // 20)
    while True:
        ids = tokenizer.encode(prompt_text(facts, seed), add_special_tokens=False)
        if len(ids) >= num_tokens:
            return [int(t) for t in ids[:num_tokens]]
        facts *= 2
