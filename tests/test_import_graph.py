"""The import graph of `matlm/`: no cycles between modules, and no arrow from a lower layer
up to an entry point (DESIGN.md, "Layers of the system").

The graph is read from the source with `ast`, without importing anything, and counts every
import statement wherever it stands: at module level, inside a function, a method or an
`if`. An import inside a function is still an arrow (it is how circles used to be
closed, quietly, at call time).

Edges. `import a.b.c` and `from a.b.c import name` point at module `a.b.c`; `from a.b
import c` points at `a.b.c` when `c` is a submodule, else at `a.b` (a package's
`__init__`); relative imports are resolved against the importing module's package.
The parent packages Python runs on the way (`a`, `a.b` for `import a.b.c`) are not
edges: every module of a package would otherwise "import" its own `__init__`, and an
`__init__` that re-exports its modules would close a circle with each of them.
"""
from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

import pytest

MATLM = Path(__file__).resolve().parents[1] / "matlm"

# Layers (DESIGN.md): the lower layers feed the entry points and must never import them,
# at module level or inside a function. Entry points are siblings on top: they may
# import each other (evaluation decodes with `decoding`), as long as no circle forms.
LOWER_LAYERS = (
    "matlm.model",       # 3. the nested-Transformer body and its families
    "matlm.sharding",    # 4. logical-axis rules -> NamedSharding
    "matlm.data",        # 2. tasks -> packed, per-host batches
    "matlm.training",    # 5.-6. train step, objective, trainer loop and hooks
    "matlm.model_dir",   # 6. the run dir package (layout, typed config, checkpoints)
    # Shared foundations every layer may use.
    "matlm.config_checks", "matlm.fileio", "matlm.messages", "matlm.gin_config",
    "matlm.runtime",
)
ENTRY_POINTS = (  # 7. the packages that read checkpoints or launch runs.
    "matlm.cli", "matlm.evaluation", "matlm.submodels", "matlm.decoding", "matlm.export",
    "matlm.sweep", "matlm.launch", "matlm.retrieval",
)

# Circles found outside the files of the change that added this test, to be removed by
# their owners; each entry is the set of modules of one strongly connected component.
# The test fails on any circle not listed here AND on any entry that no longer exists,
# so the list can only shrink. Goal: empty.
KNOWN_CYCLES_TO_REMOVE: set[frozenset[str]] = set()

# Arrows from a lower layer up to an entry point, likewise listed until removed:
# (importing module, imported module).
KNOWN_UPWARD_ARROWS_TO_REMOVE: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under `root` (the directory of `package`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module `from <level dots><name> import ...` names inside `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_edges(module: str, path: Path, known: set[str]) -> list[Edge]:
    """Every import in the file (any depth) that points at a module in `known`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = []

    def add(target: str, line: int) -> None:
        # `import a.b.c` where a.b.c is not a module (a typo, a name): its longest known prefix.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != module:
            edges.append(Edge(module, target, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base, node.lineno)
    return edges


def import_graph(root: Path, package: str) -> list[Edge]:
    modules = module_names(root, package)
    known = set(modules)
    return [edge for name, path in modules.items() for edge in import_edges(name, path, known)]


def strongly_connected_components(edges: list[Edge]) -> list[frozenset[str]]:
    """Tarjan's algorithm, iterative (no recursion limit whatever the graph's depth)."""
    successors: dict[str, list[str]] = {}
    for e in edges:
        successors.setdefault(e.source, []).append(e.target)
        successors.setdefault(e.target, [])
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in sorted(successors):
        if start in index:
            continue
        work = [(start, iter(successors[start]))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = lowlink[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors[child])))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(frozenset(component))
    return components


def import_cycles(edges: list[Edge]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (every circle lies
    inside one of them)."""
    return sorted((c for c in strongly_connected_components(edges) if len(c) > 1), key=sorted)


def describe_cycle(component: frozenset[str], edges: list[Edge], root: Path) -> str:
    """The modules of a component and the imports (file:line) that tie them together."""
    inside = sorted({(e.source, e.target, e.line) for e in edges
                     if e.source in component and e.target in component})
    lines = [f"  {source} -> {target}  ({_file_of(source, root)}:{line})"
             for source, target, line in inside]
    return f"circle of {len(component)} modules {sorted(component)}:\n" + "\n".join(lines)


def _file_of(module: str, root: Path) -> str:
    parts = module.split(".")[1:]
    as_package = root.joinpath(*parts, "__init__.py")
    path = as_package if as_package.is_file() else root.joinpath(*parts).with_suffix(".py")
    return str(path.relative_to(root.parent))


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def upward_arrows(edges: list[Edge]) -> list[Edge]:
    """Imports from a lower layer into an entry-point package."""
    return sorted({e for e in edges if _in(e.source, LOWER_LAYERS) and _in(e.target, ENTRY_POINTS)},
                  key=lambda e: (e.source, e.target, e.line))


# ---------------------------------------------------------------------------- matlm itself


@pytest.fixture(scope="module")
def matlm_edges() -> list[Edge]:
    return import_graph(MATLM, "matlm")


def test_matlm_has_no_import_cycles(matlm_edges):
    cycles = import_cycles(matlm_edges)
    new = [c for c in cycles if c not in KNOWN_CYCLES_TO_REMOVE]
    assert not new, ("import circles between matlm modules (give the shared piece its own "
                     "lower module):\n" + "\n".join(describe_cycle(c, matlm_edges, MATLM)
                                                    for c in new))
    gone = KNOWN_CYCLES_TO_REMOVE - set(cycles)
    assert not gone, f"remove these from KNOWN_CYCLES_TO_REMOVE, they are gone: {gone}"


def test_lower_layers_never_import_entry_points(matlm_edges):
    arrows = upward_arrows(matlm_edges)
    new = [e for e in arrows if (e.source, e.target) not in KNOWN_UPWARD_ARROWS_TO_REMOVE]
    assert not new, "lower layers importing entry points:\n" + "\n".join(
        f"  {e.source} -> {e.target}  ({_file_of(e.source, MATLM)}:{e.line})" for e in new)
    gone = KNOWN_UPWARD_ARROWS_TO_REMOVE - {(e.source, e.target) for e in arrows}
    assert not gone, f"remove these from KNOWN_UPWARD_ARROWS_TO_REMOVE, they are gone: {gone}"


def test_every_matlm_package_is_in_a_layer():
    """A new top-level package must be placed in the table above, or it escapes the check."""
    top = {f"matlm.{p.stem}" for p in MATLM.iterdir()
           if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py"}
    top -= {"matlm.__init__"}
    unplaced = sorted(m for m in top if not _in(m, LOWER_LAYERS + ENTRY_POINTS))
    assert not unplaced, f"add these to LOWER_LAYERS or ENTRY_POINTS: {unplaced}"


def test_the_graph_sees_known_imports(matlm_edges):
    """The parser finds the imports it must: a module-level `from pkg import submodule`,
    an import of a package `__init__`, and an import inside a function."""
    pairs = {(e.source, e.target) for e in matlm_edges}
    assert ("matlm.data.pipeline", "matlm.data.packing") in pairs
    assert ("matlm.data", "matlm.data.tf_setup") in pairs  # The package __init__'s own edges.
    assert ("matlm.evaluation.scoring", "matlm.model") in pairs  # `from matlm.model import X`
    # Inside SubmodelScorer.__init__ (a function-level import).
    assert ("matlm.evaluation.scoring", "matlm.decoding.generate") in pairs


# ----------------------------------------------------------- the check on synthetic packages


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_a_cycle_closed_inside_a_function_is_reported(tmp_path):
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "low.py": """
            def helper():
                from pkg.high import thing  # The circle's hidden half.
                return thing
        """,
        "high.py": "from pkg import low\nthing = 1\n",
        "alone.py": "import os\n",
    })
    edges = import_graph(root, "pkg")
    assert import_cycles(edges) == [frozenset({"pkg.low", "pkg.high"})]
    message = describe_cycle(frozenset({"pkg.low", "pkg.high"}), edges, root)
    assert "pkg.low -> pkg.high  (pkg/low.py:3)" in message
    assert "pkg.high -> pkg.low  (pkg/high.py:1)" in message


def test_relative_dotted_and_package_imports_are_edges(tmp_path):
    root = _write_package(tmp_path / "pkg", {
        "__init__.py": "from .sub import a\n",     # Relative, from a package __init__.
        "sub/__init__.py": "X = 1\n",
        "sub/a.py": "from .. import top\n",        # Two dots: the parent package.
        "sub/b.py": "from . import a\nimport pkg.sub.a\n",
        "top.py": "import pkg.sub.b\n",            # Dotted import of a module.
        "user.py": "from pkg.sub import X\n",      # A name of a package: its __init__.
    })
    edges = {(e.source, e.target) for e in import_graph(root, "pkg")}
    assert edges == {("pkg", "pkg.sub.a"), ("pkg.sub.a", "pkg.top"),
                     ("pkg.sub.b", "pkg.sub.a"), ("pkg.top", "pkg.sub.b"),
                     ("pkg.user", "pkg.sub")}
    cycles = import_cycles(import_graph(root, "pkg"))
    assert cycles == [frozenset({"pkg.sub.a", "pkg.top", "pkg.sub.b"})]


def test_an_upward_arrow_is_reported():
    edges = [Edge("matlm.training.trainer", "matlm.evaluation.runner", 7),
             Edge("matlm.evaluation.runner", "matlm.training.trainer", 3),
             Edge("matlm.cli.train", "matlm.data.pipeline", 1)]
    assert upward_arrows(edges) == [edges[0]]
