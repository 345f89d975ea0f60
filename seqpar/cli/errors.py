"""How the command line reports bad input: one `seqpar: error:` line, exit status 2."""

from __future__ import annotations

import sys

from seqpar.engine.args import with_flag_names


class CLIError(ValueError):
    """Bad command-line input, reported as one line."""


def fail(error: BaseException | str) -> int:
    """Print one error line (for a failed rank: its first line and its exception) and return 2."""
    lines = [ln for ln in with_flag_names(str(error)).strip().splitlines() if ln.strip()] or [type(error).__name__]
    msg = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
    print(f"seqpar: error: {msg}", file=sys.stderr)
    return 2
