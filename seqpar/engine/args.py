"""The engine's command-line flags, generated from `EngineConfig`'s fields.

Each option is declared once, on its field (default, help, choices); every command and
benchmark adds the same flags with `add_engine_args` (a benchmark may move a default or
take a subset) and builds its config with `engine_config`. An engine error that names a
field (`kv_cache_gb=0.001 ...`) is shown with the flag the user typed (`with_flag_names`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from seqpar.engine.config import EngineConfig

_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
ENGINE_FIELDS = tuple(_FIELDS)
_TYPES = typing.get_type_hints(EngineConfig)


def flag(name: str) -> str:
    """The flag that sets field `name` (`sp_size` -> `--sp`, `kv_cache_gb` -> `--kv-cache-gb`)."""
    return _FIELDS[name].metadata.get("flag") or "--" + name.replace("_", "-")


def _json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f'{flag(name)} is not JSON ({e}); e.g. \'{{"rope_type":"yarn","factor":4}}\'') from e
    if not isinstance(value, dict):
        raise ValueError(f"{flag(name)} must be a JSON object, got {text!r}")
    return value


def _scalar(annotation: Any) -> type:
    """`int | None` -> int; `dict[str, Any] | None` -> dict."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return typing.get_origin(base) or base


def add_engine_args(
    parser: Any,
    defaults: Mapping[str, Any] | None = None,
    only: Iterable[str] | None = None,
    torchrun: bool = False,
) -> None:
    """Add one flag per EngineConfig field to `parser` (a parser or an argument group).

    `defaults` moves a field's default (a benchmark's own); `only` keeps a subset of the fields;
    `torchrun`: the command runs under torchrun too, where `--sp` left out means WORLD_SIZE / --tp.
    """
    defaults = dict(defaults or {})
    names = list(_FIELDS) if only is None else list(only)
    for name in names:
        f = _FIELDS[name]
        meta, kind = f.metadata, _scalar(_TYPES[name])
        default = defaults.get(name, f.default)
        help_text = meta["help"].replace("%(default)s", str(default))
        if name in defaults and defaults[name] != f.default:
            help_text = re.sub(r"\(default: [^)]*\)", f"(default here: {default})", help_text)
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": help_text}
        if name == "sp_size" and torchrun:
            kwargs["default"] = None  # resolved by engine_config: 1, or WORLD_SIZE / --tp under torchrun
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str if kind is dict else kind  # JSON, parsed by engine_kwargs
            kwargs["metavar"] = meta.get("metavar") or ("N" if kind is int else None)
            if meta.get("choices") is not None:
                kwargs["choices"] = meta["choices"]
                kwargs.pop("metavar")
        parser.add_argument(flag(name), **kwargs)
    parser.set_defaults(_engine_fields=names)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields `args` carry (ValueError on bad JSON); `--sp` left out is not among them."""
    kwargs = {}
    for name in args._engine_fields:
        value = getattr(args, name)
        if isinstance(value, str) and _scalar(_TYPES[name]) is dict:
            value = _json_object(name, value)
        if value is not None or name != "sp_size":
            kwargs[name] = value
    return kwargs


def engine_config(args: argparse.Namespace, world: int | None = None, **overrides: Any) -> EngineConfig:
    """The EngineConfig `args` ask for, with `overrides` (what a benchmark sweeps); `world` =
    WORLD_SIZE under torchrun, which it must match (`--sp` left out: WORLD_SIZE / --tp)."""
    kwargs = {**engine_kwargs(args), **overrides}
    if world is not None and "sp_size" not in kwargs:
        tp = kwargs.get("tp_size", 1)
        kwargs["sp_size"] = world // tp if tp > 0 else 1
    config = EngineConfig(**kwargs)
    if world is not None and config.world_size != world:
        raise ValueError(
            f"--sp {config.sp_size} x --tp {config.tp_size} = {config.world_size} ranks, but torchrun "
            f"started WORLD_SIZE={world} processes; make them equal"
        )
    return config


def with_flag_names(text: str) -> str:
    """`kv_cache_gb=0.001 gives ...` -> `--kv-cache-gb 0.001 gives ...`: the engine's settings as flags."""
    return re.sub(r"\b([a-z_]+)=", lambda m: f"{flag(m[1])} " if m[1] in _FIELDS else m[0], text)
