"""The tree keeps its floors: imports point down, no module imports one that imports it back, and
the front door (`seqpar/cli/`) is imported by nothing in the package (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "seqpar"
# Lowest first; a module may import from its own floor or any below it.
FLOORS = [
    {"profiling", "data"},
    {"kernels"},
    {"sharding", "comm"},
    {"strategies", "model"},
    {"costmodel"},
    {"engine"},
    {"server", "bench", "(root)"},
    {"cli"},
    {"__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the seqpar modules it imports anywhere in its body (lazy imports included);
    `from pkg import sub` counts as importing `pkg.sub` when that is a module."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("seqpar"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs if len(subs) == len(node.names) else {node.module, *subs}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("seqpar")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _floor(module: str) -> int:
    package = module.split(".")[1] if "." in module else "(root)"  # seqpar/profiling.py counts as "profiling"
    return next(i for i, names in enumerate(FLOORS) if package in names)


def test_every_package_has_a_floor():
    for module in _modules():
        _floor(module)  # StopIteration names a package missing from FLOORS


def test_imports_point_down():
    graph = _imports(_modules())
    upward = [f"{a} imports {b}" for a, targets in graph.items() for b in sorted(targets) if _floor(b) > _floor(a)]
    assert not upward, upward


def test_front_door_is_imported_by_nothing_below_it():
    graph = _imports(_modules())
    users = sorted(
        a
        for a, targets in graph.items()
        for b in targets
        if b.startswith("seqpar.cli") and not a.startswith(("seqpar.cli", "seqpar.__main__"))
    )
    assert not users, users


def test_no_import_circles():
    graph = _imports(_modules())
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target) :] + [module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, circles


# What a benchmark may import from the engine: the public API and the options; of placement and
# kv_cache, only what sizes `kv_cache_gb` for a sequence. Everything else it observes through `observers`.
BENCH_ENGINE_API = {
    "seqpar.engine.llm": None,
    "seqpar.engine.llm_engine": {"LLMEngine", "kv_blocks_per_rank"},
    "seqpar.engine.outputs": None,
    "seqpar.engine.sampling_params": None,
    "seqpar.engine.args": None,
    "seqpar.engine.config": None,
    "seqpar.engine.placement": {"Placement"},
    "seqpar.engine.kv_cache": {"block_bytes"},
}
# The engine's own state, never a benchmark's to read or replace (`args.requests` is a flag).
ENGINE_STATE = {"requests", "scheduler", "blocks", "executor", "auto", "detok", "seq"}


def test_benchmarks_use_the_engines_public_surface():
    found = []
    for name, path in _modules().items():
        if not name.startswith("seqpar.bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seqpar.engine"):
                allowed = BENCH_ENGINE_API.get(node.module, set())
                for a in node.names:
                    if a.name.startswith("_") or (allowed is not None and a.name not in allowed):
                        found.append(f"{where}: {node.module}.{a.name}")
            elif isinstance(node, ast.Attribute) and not (
                isinstance(node.value, ast.Name) and node.value.id in {"self", "args"}
            ):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if node.attr in ENGINE_STATE or (private and not (isinstance(root, ast.Name) and root.id == "torch")):
                    found.append(f"{where}: .{node.attr}")
    assert not found, found
