"""The package's shape, read from its source with `ast`: imports flow one way (counting imports
inside functions), nothing but tests and tools imports the test-model writer, and no module or
class grows past the size at which it stops being one thing.

Offenders that exist today are listed by name in the allow-lists below, each removed by the work
that fixes it; any other offender fails, and so does an entry that no longer offends.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stable_diffusion"
MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 250

# Known offenders, each removed by the run-engine redesign (issue 18): delete an entry as it lands.
LONG_MODULES: dict = {}
LONG_CLASSES: dict = {}
# Groups of modules that import each other, as frozensets of names: none today (the circle
# model_io -> single_file -> testing -> single_file is gone).
CYCLES: set = set()


def module_names(package: Path) -> dict:
    """Dotted module name -> source path, for every module of the package (its __init__ as the
    package's own name); compiled extensions (the native module) are modules without source."""
    names = {}
    for path in sorted(package.rglob("*")):
        if path.suffix in (".so", ".pyd"):
            stem = path.name.split(".")[0]
            names[".".join([package.name, *path.relative_to(package).parent.parts, stem])] = None
        elif path.suffix == ".py":
            parts = [package.name, *path.relative_to(package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict) -> set:
    """The package's modules that module `name` imports anywhere in its source: at the top, inside
    functions, relative (`from . import x`, `from .x import y`) or absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target: str, names=()):
        # `from a import b` imports the module a.b where there is one, else a name of a.
        for alias in names:
            if f"{target}.{alias}" in modules:
                found.add(f"{target}.{alias}")
            elif target in modules:
                found.add(target)
        if not names and target in modules:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            add(target, [alias.name for alias in node.names])
    found.discard(name)
    return found


def import_graph(package: Path) -> dict:
    """module -> the package's modules it imports."""
    modules = module_names(package)
    return {name: set() if path is None else imported_modules(name, path, modules)
            for name, path in modules.items()}


def cycles(graph: dict) -> list:
    """Each group of modules that import each other (Tarjan's strongly connected components), as
    one cycle through it: the path a -> b -> ... -> a from its first module, and its members."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_path_through(group, graph), sorted(group)) for group in groups]


def _path_through(group: set, graph: dict) -> list:
    """A cycle inside `group` from its first module back to it (breadth first: a shortest one)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {sorted(group)}")


def classes(path: Path) -> dict:
    """class name (dotted inside its enclosing classes) -> lines, for every class in the file."""
    found = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                found[prefix + child.name] = child.end_lineno - child.lineno + 1
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return found


def check_allowed(offenders: dict, allowed: dict, what: str) -> None:
    """Offenders (name -> lines) must be the allow-list's, no longer than it says: a new or a
    grown one fails, and so does an entry that no longer offends (delete it)."""
    new = {k: v for k, v in offenders.items() if k not in allowed or v > allowed[k]}
    assert not new, f"{what}: {new}; split them along a seam (see STYLE.md)"
    fixed = sorted(set(allowed) - set(offenders))
    assert not fixed, f"{what}: {fixed} no longer offend; remove them from the allow-list in {__file__}"


# --- the checker on a package written for it ---------------------------------------------------------


def write_package(root: Path, files: dict) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checker_sees_every_form_of_import_and_names_the_cycle(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "def lazy():\n    from . import a\n",
        "a.py": "from .b import thing\n",
        "b.py": "import os\n\ndef f():\n    from .c import g\n",
        "c.py": "class C:\n    def m(self):\n        from pkg import a\n",
        "d.py": "from . import leaf, sub\nfrom .sub.deep import x\nimport pkg.leaf\n",
        "leaf.py": "import json\n",
        "e.py": "from . import native\n",
        "native.cpython-311-x86_64-linux-gnu.so": "",
        "sub/__init__.py": "from ..leaf import y\n",
        "sub/deep.py": "from .. import leaf\n",
    })
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"},
                     "pkg.d": {"pkg.leaf", "pkg.sub", "pkg.sub.deep"}, "pkg.leaf": set(),
                     "pkg.e": {"pkg.native"}, "pkg.native": set(),
                     "pkg.sub": {"pkg.leaf"}, "pkg.sub.deep": {"pkg.leaf"}}
    assert cycles(graph) == [(["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.a", "pkg.b", "pkg.c"])]
    assert cycles({**graph, "pkg.c": set()}) == []


def test_the_checker_measures_classes_and_refuses_new_and_stale_offenders(tmp_path):
    path = write_package(tmp_path, {"m.py": "class A:\n    class B:\n        x = 1\n\n    y = 2\n"}) / "m.py"
    assert classes(path) == {"A": 5, "A.B": 2}
    check_allowed({"A": 300}, {"A": 300}, "long classes")
    with pytest.raises(AssertionError, match="'A': 301"):
        check_allowed({"A": 301}, {"A": 300}, "long classes")
    with pytest.raises(AssertionError, match="'B': 260"):
        check_allowed({"A": 300, "B": 260}, {"A": 300}, "long classes")
    with pytest.raises(AssertionError, match=r"\['A'\] no longer offend"):
        check_allowed({}, {"A": 300}, "long classes")


# --- the package ----------------------------------------------------------------------------------


def test_imports_flow_one_way():
    found = cycles(import_graph(PACKAGE))
    new = [(path, group) for path, group in found if frozenset(group) not in CYCLES]
    assert not new, "import cycles (counting imports inside functions): " + "; ".join(
        " -> ".join(path) + (f" (all of {', '.join(group)} import each other)" if len(group) > len(path) - 1 else "")
        for path, group in new)
    fixed = CYCLES - {frozenset(group) for _, group in found}
    assert not fixed, f"cycles {fixed} are gone; remove them from CYCLES in {__file__}"


def test_nothing_but_tests_and_tools_imports_the_test_models():
    graph = import_graph(PACKAGE)
    importers = sorted(m for m, imported in graph.items() if "stable_diffusion.testing" in imported)
    modules = module_names(PACKAGE)
    scripts = [p for p in sorted(ROOT.glob("*.py"))
               if "stable_diffusion.testing" in imported_modules(p.stem, p, modules)]
    assert not importers and not scripts, f"production code imports stable_diffusion.testing: {importers + scripts}"


def test_no_module_is_too_long():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines())
               for name, path in module_names(PACKAGE).items() if path is not None}
    check_allowed({n: k for n, k in lengths.items() if k > MAX_MODULE_LINES}, LONG_MODULES,
                  f"modules over {MAX_MODULE_LINES} lines")


def test_no_class_is_too_long():
    long = {f"{name}.{cls}": n for name, path in module_names(PACKAGE).items() if path is not None
            for cls, n in classes(path).items() if n > MAX_CLASS_LINES}
    check_allowed(long, LONG_CLASSES, f"classes over {MAX_CLASS_LINES} lines")
