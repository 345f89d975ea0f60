"""Every sequence-parallel attention strategy, declared once, in its own module.

A strategy module ends with `register(Strategy(...))`: its name, what it runs on (whole
prompts through `sp_attention`, chunks over the engine's sharded KV cache, or both), and
what it needs of the heads, and what it costs (`pricing.py`). The library's `sp_attention`,
the engine's config and CLI choices, the cost model and the benchmarks all read this table,
so adding a strategy touches its own module and its test (the recipe: docs/architecture.md).
The modules of this package are imported on first lookup, so a new file registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from seqpar.strategies.pricing import Cost

# whole(q_local, k_local, v_local, plan, group, causal, scale, **options) -> out_local [T_local, Hq, D]
WholeFn = Callable[..., Tensor]
# over_cache(q_local, q_layouts, kh, vh, keys, group, scale, exchange) -> out [T_local, Hq, D] fp32
CacheFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line: what travels
    whole: WholeFn | None = None  # sequence shards of whole prompts (seqpar.sp_attention)
    over_cache: CacheFn | None = None  # a chunk's queries over every rank's paged KV cache (the engine)
    options: tuple[str, ...] = ()  # keyword arguments `whole` takes beyond the common signature
    heads_divide_degree: bool = False  # swaps heads for sequence (Ulysses): heads must divide by the degree
    cost: Cost | None = None  # what it sends and takes, for the cost model (pricing.py); None: not priced
    # How to call it when neither path above applies (a layout of its own), for error messages.
    entry_point: str | None = None


_TABLE: dict[str, Strategy] = {}
_loaded = False


def register(strategy: Strategy) -> Strategy:
    """Declare `strategy` (once: a second declaration of a name is an error)."""
    if strategy.name in _TABLE:
        raise RuntimeError(f"strategy {strategy.name!r} is registered twice")
    _TABLE[strategy.name] = strategy
    return strategy


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import seqpar.strategies as package

        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


def strategies() -> dict[str, Strategy]:
    """Every registered strategy, by name (in name order: the modules register in import order)."""
    _load()
    return dict(sorted(_TABLE.items()))


def whole_prompt_names() -> tuple[str, ...]:
    """Strategies `sp_attention` runs (sequence shards of whole prompts)."""
    return tuple(n for n, s in strategies().items() if s.whole is not None)


def over_cache_names() -> tuple[str, ...]:
    """Strategies the engine runs (chunks over the sharded KV cache)."""
    return tuple(n for n, s in strategies().items() if s.over_cache is not None)


def costs() -> dict[str, Cost]:
    """Every priced strategy's cost, by name: the cost model's `choose_layout` (`seqpar plan`) and `auto` read these."""
    return {n: s.cost for n, s in strategies().items() if s.cost is not None}


def where_it_runs(name: str) -> str:
    """How to call strategy `name`, for an error that sends the user there."""
    s = strategies()[name]
    if s.whole is not None:
        return f"seqpar.sp_attention(..., strategy={name!r}) on whole sequences"
    return s.entry_point or f"strategy {name!r}"


def get(name: str, over_cache: bool = False) -> Strategy:
    table = strategies()
    usable = over_cache_names() if over_cache else whole_prompt_names()
    if name not in usable:
        where = " over a KV cache" if over_cache else ""
        known = f" ({name!r} runs as {where_it_runs(name)})" if name in table else ""
        raise ValueError(f"unknown strategy {name!r}{where}; choose one of {', '.join(usable)}{known}")
    return table[name]
