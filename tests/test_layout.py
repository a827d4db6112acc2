"""The package's layout rules (docs/architecture.md), read from the source: no import circles, modules of
about 400 lines at most, an internal import inside a function only with its reason, the miniature world
reached by the product's stages only through the judge scorer, and tests/ mirroring the packages."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hgdpo"
MAX_LINES = 420  # "about 400": a module may run a little over while it says one thing
# The modules outside the world that may import it: the judge scorer (the one door; hgdpo.scorers.judge) and
# the runbook that replicates the paper *in* the world (hgdpo.replication: its Table 1 writes the world's
# public set). The embedded model loader reads the world's weights as files and imports none of its code.
WORLD_DOORS = ("hgdpo.scorers.judge", "hgdpo.replication.")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def resolve(name: str) -> str | None:
    """The module of ``name`` (a module, or a name in one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The hgdpo modules an import statement of ``module`` names."""
    assert not getattr(node, "level", 0), f"{module}:{node.lineno}: a relative import; hgdpo imports by full name"
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
    return {m for m in map(resolve, (n for n in names if n.startswith("hgdpo"))) if m and m != module}


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """``module``'s imports of hgdpo modules at its top level, and those inside its functions (line, text)."""
    source = MODULES[module].read_text()
    lines = source.splitlines()
    top: set[str] = set()
    late: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = imported(child, module)
                if names and in_function:
                    late.append((child.lineno, lines[child.lineno - 1]))
                elif names and not (isinstance(child, ast.ImportFrom) and child.module == "__future__"):
                    top.update(names)
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return top, late


GRAPH = {module: imports(module) for module in MODULES}


def test_no_module_imports_itself_back():
    """No import circle among the top-level imports (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v][0]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            connect(module)
    assert not circles, f"import circles: {circles}"


def test_modules_are_about_400_lines_at_most():
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_an_internal_import_inside_a_function_says_why():
    """Imports sit at the top of a module. One of an hgdpo module inside a function (to keep torch or Ray out
    of a config check, say) carries ``# late: <reason>`` on its line, or on the comment line above its block."""
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for lineno, text in GRAPH[module][1]:
            above = lineno - 2
            while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
                above -= 1
            if "# late:" not in text and not (above >= 0 and lines[above].lstrip().startswith("# late:")):
                silent.append(f"{path.relative_to(REPO)}:{lineno}: {text.strip()}")
    assert not silent, "internal imports inside functions without a reason:\n" + "\n".join(silent)


def test_the_stages_reach_the_world_only_through_the_judge_scorer():
    reaching = {module: sorted(m for m in GRAPH[module][0] | {resolve(line.split()[1]) or "" for _, line in
                                                              GRAPH[module][1]} if m.startswith("hgdpo.world"))
                for module in MODULES
                if not module.startswith("hgdpo.world") and not module.startswith(WORLD_DOORS)}
    reaching = {module: names for module, names in reaching.items() if names}
    assert not reaching, f"modules importing the miniature world past its doors {WORLD_DOORS}: {reaching}"
    assert any(m.startswith("hgdpo.world") for m in GRAPH["hgdpo.scorers.judge"][0])  # the door is in use


def test_tests_mirror_the_packages():
    """Every folder of tests/ holding tests is named after a package of hgdpo."""
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    folders = {path.parent.name for path in (REPO / "tests").glob("*/test_*.py")}
    assert folders, "no test folders found"
    assert folders <= packages, f"test folders naming no package: {sorted(folders - packages)}"
