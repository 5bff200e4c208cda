"""The layers read top-down: checked on the source (AST, nothing imported), and the checker itself is checked on a
small tree with a deliberate upward import, an underscore import and a cycle.

Layers, bottom up: zo2.errors and zo2.config · zo2.optim (the definition of z, rounding and the update) ·
zo2_kernels (kernels computing that definition) · zo2.models (adapters, units) · zo2.offload (stores, streamers,
residences) · zo2.parallel · zo2.visit / zo2.engine · zo2.train, zo2.tasks, zo2.integrations · zo2.control ·
zo2_launcher.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [(ROOT / "zo2", "zo2"), (ROOT / "kernels" / "zo2_kernels", "zo2_kernels"),
           (ROOT / "launcher" / "zo2_launcher", "zo2_launcher")]

ONLY_BELOW = {
    # package: the packages it may import besides itself
    "zo2.optim": ("zo2.errors",),
    "zo2_kernels": ("zo2.optim", "zo2.errors"),
    "zo2.models": ("zo2.errors", "zo2.config"),
}
FORBIDDEN = {
    "zo2.offload": ("zo2.engine", "zo2.visit", "zo2.control", "zo2.train"),
    "zo2.parallel": ("zo2.control", "zo2.train"),
    "zo2.engine": ("zo2.control", "zo2.train"),
    "zo2.visit": ("zo2.engine", "zo2.control", "zo2.train"),
}


def modules(sources) -> dict[str, Path]:
    """Module name → file, for every .py under each (folder, package name)."""
    found = {}
    for folder, package in sources:
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import statement in the file, at any depth
    (function-level and ``TYPE_CHECKING`` imports count: they are dependencies all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, None) if full in known else (base, alias.name))
    return out


def owner(target: str, known: dict[str, Path]) -> str | None:
    """The project module that ``target`` (a dotted import) resolves to, or None for third-party ones."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def package_of(module: str, known: dict[str, Path]) -> str:
    return module if known[module].name == "__init__.py" else module.rpartition(".")[0]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def graph(sources) -> tuple[dict[str, set[str]], list[str]]:
    """The project's import graph (module → modules it imports) and the underscore names taken across packages."""
    known = modules(sources)
    edges: dict[str, set[str]] = {m: set() for m in known}
    underscore = []
    for name, path in known.items():
        for target, taken in imports(name, path, known):
            dep = owner(target, known)
            if dep is None or dep == name:
                continue
            edges[name].add(dep)
            if taken and taken.startswith("_") and not taken.startswith("__") and \
                    package_of(name, known) != package_of(dep, known):
                underscore.append(f"{name} imports {taken} from {dep}")
    return edges, underscore


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer."""
    found = []
    for module, deps in edges.items():
        for package, allowed in ONLY_BELOW.items():
            if within(module, package):
                found += [f"{module} imports {d} (above {package})" for d in deps
                          if not within(d, package) and not any(within(d, a) for a in allowed)]
        for package, banned in FORBIDDEN.items():
            if within(module, package):
                found += [f"{module} imports {d}" for d in deps if any(within(d, b) for b in banned)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_layers_read_top_down():
    edges, _ = graph(SOURCES)
    assert "zo2.engine" in edges and "zo2_kernels.reference" in edges and "zo2_launcher.cli" in edges
    assert violations(edges) == []


def test_no_module_takes_another_packages_underscore_names():
    _, underscore = graph(SOURCES)
    assert underscore == []


def test_no_import_cycles():
    edges, _ = graph(SOURCES)
    assert cycles(edges) == []


def test_rounding_constants_agree():
    """zo2_kernels.reference keeps its own copy of the rounding stream's constants (it imports zo2.optim lazily)."""
    import zo2_kernels.reference as reference
    from zo2.optim import rounding

    assert reference.SR_COUNTER_TAG == rounding.SR_COUNTER_TAG
    assert reference.LOW_PRECISION == rounding.LOW_PRECISION


@pytest.fixture
def tree(tmp_path):
    """A small project laid out like this one, clean: optim ← offload ← engine ← control."""
    files = {
        "zo2/__init__.py": "",
        "zo2/errors.py": "",
        "zo2/optim/__init__.py": "",
        "zo2/optim/rng.py": "from zo2.errors import *\n",
        "zo2/offload/__init__.py": "",
        "zo2/offload/store.py": "from zo2.optim import rng\nfrom . import helpers\n",
        "zo2/offload/helpers.py": "from ._private import _fast\n",
        "zo2/offload/_private.py": "_fast = 1\n",
        "zo2/engine.py": "from zo2.offload.store import *\nimport torch\n",
        "zo2/control/__init__.py": "",
        "zo2/control/worker.py": "from zo2.engine import *\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def check(root: Path) -> tuple[list[str], list[str], list[list[str]]]:
    edges, underscore = graph([(root / "zo2", "zo2")])
    return violations(edges), underscore, cycles(edges)


def test_checker_passes_a_clean_tree(tree):
    assert check(tree) == ([], [], [])


def test_checker_finds_an_upward_import(tree):
    store = tree / "zo2" / "offload" / "store.py"
    store.write_text(store.read_text() + "def later():\n    from zo2.engine import ZOEngine\n")
    found, _, loops = check(tree)
    assert found == ["zo2.offload.store imports zo2.engine"]
    assert loops == [["zo2.engine", "zo2.offload.store"]]


def test_checker_finds_a_bottom_layer_importing_up(tree):
    (tree / "zo2" / "optim" / "rng.py").write_text("from zo2.offload import store\n")
    found, _, _ = check(tree)
    assert found == ["zo2.optim.rng imports zo2.offload.store (above zo2.optim)"]


def test_checker_finds_a_relative_cycle_and_underscore_names(tree):
    (tree / "zo2" / "offload" / "_private.py").write_text("from .helpers import *\n_fast = 1\n")
    (tree / "zo2" / "engine.py").write_text("from zo2.offload.helpers import _fast\n")
    _, underscore, loops = check(tree)
    assert underscore == ["zo2.engine imports _fast from zo2.offload.helpers"]
    assert loops == [["zo2.offload._private", "zo2.offload.helpers"]]


MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def oversized(sources, root: Path = ROOT) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES, each a place to split by meaning."""
    found = []
    for name, path in sorted(modules(sources).items()):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            found.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_files_and_functions_read_in_one_sitting():
    assert oversized(SOURCES) == []


def test_size_check_finds_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "zo2").mkdir()
    (tmp_path / "zo2" / "__init__.py").write_text("")
    (tmp_path / "zo2" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert oversized([(tmp_path / "zo2", "zo2")], tmp_path) == [f"zo2/long.py:5 long: {MAX_FUNCTION_LINES + 1} lines"]
