"""The package's dependency rules (DESIGN §1), checked on the source: no import cycle, no lower
layer importing a higher one, no torch where there must be none.

The checker reads every module under ecoserve/ with `ast`: each `import` and `from ... import`,
relative ones resolved, with whether it runs at import time (module level, class bodies, and
`try`/`if` blocks there, but not `if TYPE_CHECKING:`) or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1] / "ecoserve"

LOWER = ("ecoserve.params", "ecoserve.latency", "ecoserve.kernels", "ecoserve.kv_cache", "ecoserve.model")
HIGHER = ("ecoserve.engine", "ecoserve.sim", "ecoserve.coordinator", "ecoserve.bench", "ecoserve.cli",
          "ecoserve.runtime", "ecoserve.prefill", "ecoserve.decode", "ecoserve.demo")
NO_TORCH = ("ecoserve.coordinator", "ecoserve.predictor", "ecoserve.sim")
TORCH_ALLOWED = ("ecoserve.predictor.training",)  # trains with torch-side tools
# (importer, imported) pairs allowed to reach into ecoserve.bench from outside it.
BENCH_USERS = (
    # The product demo drives its load with the serving benchmark (`ecoserve demo` ends with
    # `bench serve`'s table), so it may use ecoserve.bench.serve, and nothing else of bench.
    ("ecoserve.demo", "ecoserve.bench.serve"),
)


class Edge(NamedTuple):
    target: str  # a module name: "ecoserve.sim.experiment", "torch.distributed"
    eager: bool  # runs when the importing module is imported (not inside a function)
    line: int


Graph = dict[str, list[Edge]]  # module -> the imports written in it


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> list[Edge]:
    """Every import in `tree` (the module `name`), resolved to module names."""
    package = name if is_package else name.rpartition(".")[0]
    edges: list[Edge] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, False)
            for stmt in node.orelse:
                visit(stmt, eager)
            return
        if isinstance(node, ast.Import):
            edges.extend(Edge(alias.name, eager, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from ecoserve.sim import compare` imports the module ecoserve.sim.compare
                sub = f"{base}.{alias.name}"
                edges.append(Edge(sub if sub in modules else base, eager, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(tree, True)
    return edges


def build_graph(root: Path = ROOT) -> Graph:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {
        module_name(p, root): _imports(ast.parse(p.read_text(), str(p)), module_name(p, root), p.name == "__init__.py", modules)
        for p in paths
    }


def find_cycles(graph: Graph) -> list[list[str]]:
    """Import cycles among the package's modules through imports run at import time (Tarjan)."""
    succ = {m: sorted({e.target for e in edges if e.eager and e.target in graph and e.target != m})
            for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            connect(v)
    return cycles


def layer_violations(graph: Graph) -> list[str]:
    """Imports, at any level, that break a layering rule: one line each, naming the edge."""
    out = []
    for mod, edges in sorted(graph.items()):
        for e in edges:
            where = f"{mod}:{e.line} imports {e.target}"
            if any(within(mod, lo) for lo in LOWER) and any(within(e.target, hi) for hi in HIGHER):
                out.append(f"{where}: a lower layer ({', '.join(LOWER)}) imports a higher one")
            for a, b in (("ecoserve.prefill", "ecoserve.decode"), ("ecoserve.decode", "ecoserve.prefill")):
                if within(mod, a) and within(e.target, b):
                    out.append(f"{where}: {a} and {b} meet only in shared modules")
            if within(e.target, "ecoserve.cli") and not within(mod, "ecoserve.cli"):
                out.append(f"{where}: nothing imports the command line")
            if (within(e.target, "ecoserve.bench") and not within(mod, "ecoserve.bench")
                    and not within(mod, "ecoserve.cli")
                    and not any(within(mod, a) and within(e.target, b) for a, b in BENCH_USERS)):
                out.append(f"{where}: only the command line uses the benchmarks")
    return out


def torch_violations(graph: Graph) -> list[str]:
    """Modules of NO_TORCH whose import-time imports reach torch, with the chain that does."""
    out = []
    for mod in sorted(graph):
        if not any(within(mod, p) for p in NO_TORCH) or any(within(mod, p) for p in TORCH_ALLOWED):
            continue
        chain = _torch_chain(graph, mod)
        if chain:
            out.append(f"{mod} imports torch at import time: {' -> '.join(chain)}")
    return out


def _torch_chain(graph: Graph, start: str) -> list[str] | None:
    """The shortest import-time path from `start` to torch, through the package's own modules and
    the packages (__init__) each import also runs; None if there is none."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        mod = queue.pop(0)
        targets = [e.target for e in graph.get(mod, []) if e.eager]
        for target in targets:
            if within(target, "torch"):
                path: list[str] = [target]
                at: str | None = mod
                while at is not None:
                    path.append(at)
                    at = parent[at]
                return path[::-1]
            pieces = target.split(".")
            for i in range(1, len(pieces) + 1):  # importing a.b.c runs a, a.b, then a.b.c
                name = ".".join(pieces[:i])
                if name in graph and name not in parent:
                    parent[name] = mod
                    queue.append(name)
    return None


# -- the rules on this tree ------------------------------------------------------------------


def test_the_package_has_no_import_cycle() -> None:
    cycles = find_cycles(build_graph())
    assert not cycles, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_lower_layer_imports_a_higher_one() -> None:
    violations = layer_violations(build_graph())
    assert not violations, "\n".join(violations)


def test_coordinator_predictor_and_sim_import_no_torch() -> None:
    violations = torch_violations(build_graph())
    assert not violations, "\n".join(violations)


def test_the_graph_sees_the_package() -> None:
    # A guard on the checker's input: the package's known imports are in the graph.
    graph = build_graph()
    assert "ecoserve.cli" in graph and "ecoserve.sim.commands" in graph
    assert ("ecoserve.config", True) in {(e.target, e.eager) for e in graph["ecoserve.serve"]}
    demo = {e.target for e in graph["ecoserve.demo.cluster"]}
    assert "ecoserve.bench.serve.run" in demo  # the whitelisted edge is real


# -- the checker catches what it should -------------------------------------------------------


def test_the_checker_catches_planted_violations() -> None:
    graph: Graph = {
        "ecoserve.a": [Edge("ecoserve.b", True, 1)],
        "ecoserve.b": [Edge("ecoserve.c", True, 1)],
        "ecoserve.c": [Edge("ecoserve.a", True, 1)],  # a -> b -> c -> a
        "ecoserve.d": [Edge("ecoserve.e", False, 1)],
        "ecoserve.e": [Edge("ecoserve.d", True, 1)],  # d <-> e, but d's import is inside a function
        "ecoserve.model.llama": [Edge("ecoserve.engine.llm", False, 7)],  # lower -> higher, function-local
        "ecoserve.engine.llm": [],
        "ecoserve.prefill.worker": [Edge("ecoserve.decode.worker", True, 3)],
        "ecoserve.decode.worker": [],
        "ecoserve.coordinator.server": [Edge("ecoserve.bench.serve", False, 4), Edge("ecoserve.kv_cache", True, 5)],
        "ecoserve.kv_cache": [Edge("torch", True, 1)],
        "ecoserve.sim.simulator": [Edge("torch", False, 9)],  # inside a function: allowed
        "ecoserve.predictor.training.train": [Edge("torch", True, 1)],  # allowed
        "ecoserve.demo.cluster": [Edge("ecoserve.bench.serve.run", True, 2), Edge("ecoserve.bench.soak", True, 3)],
        "ecoserve.bench.serve.run": [],
        "ecoserve.bench.soak": [Edge("ecoserve.cli", False, 1)],
    }
    assert find_cycles(graph) == [["ecoserve.a", "ecoserve.b", "ecoserve.c"]]
    violations = layer_violations(graph)
    assert [v.split(":")[0] + ":" + v.split(":")[1].split()[0] for v in violations] == [
        "ecoserve.bench.soak:1",
        "ecoserve.coordinator.server:4",
        "ecoserve.demo.cluster:3",
        "ecoserve.model.llama:7",
        "ecoserve.prefill.worker:3",
    ], violations
    assert torch_violations(graph) == [
        "ecoserve.coordinator.server imports torch at import time: ecoserve.coordinator.server -> ecoserve.kv_cache -> torch"
    ]


def test_the_parser_resolves_relative_and_local_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "ecoserve"
    (pkg / "sim").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "params.py").write_text("")
    (pkg / "sim" / "__init__.py").write_text("from . import compare\n")
    (pkg / "sim" / "compare.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ..params import X\nif TYPE_CHECKING:\n    import torch\n"
        "class C:\n    import json\ndef f():\n    from ecoserve.sim import compare\n"
    )
    graph = build_graph(pkg)
    assert graph["ecoserve.sim"] == [Edge("ecoserve.sim.compare", True, 1)]
    assert graph["ecoserve.sim.compare"] == [
        Edge("typing", True, 1), Edge("ecoserve.params", True, 2), Edge("torch", False, 4), Edge("json", True, 6),
        Edge("ecoserve.sim.compare", False, 8),
    ]
