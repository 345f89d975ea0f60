"""What every benchmark's main shares: the `--json` flag and file, one-line summaries, markdown tables.

Each benchmark keeps its own results' shape (`args` or `config`, its parts); this module only
writes them, so every results file is indented alike and a value JSON lacks (a path, a dtype)
is written as its string instead of failing the run at its end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def add_json_arg(p: argparse.ArgumentParser, help: str = "write the results here as JSON") -> None:
    p.add_argument("--json", default=None, metavar="PATH", help=help)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments, less where its results go."""
    return {k: v for k, v in vars(args).items() if k != "json"}


def write_json(path: str | None, results: dict[str, Any]) -> None:
    """Write `results` to `path`; nothing when no path was given (None or '')."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


def summary_line(label: str, result: dict[str, Any], skip: Iterable[str] = ("pairs",)) -> str:
    """`label: {...}` on one line: a part's results less its raw samples, printed as the run goes."""
    skip = set(skip)
    return f"{label}: " + json.dumps({k: v for k, v in result.items() if k not in skip}, default=str)


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """A markdown table; the columns numbered in `numeric` are right-aligned."""
    right = set(numeric)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "".join("---:|" if i in right else "---|" for i in range(len(head))),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
