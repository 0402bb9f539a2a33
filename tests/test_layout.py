"""The rules the package layout keeps (docs/ARCHITECTURE.md): SQL only in opdviz/store, no import circles,
modules of about 400 lines at most, short pages, pure metrics. Each rule is checked on the source itself, so a
change that breaks one fails here with the file and line that broke it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opdviz"
MAX_LINES = 400
MAX_PAGE_LINES = 120
SQL = re.compile(r"^\s*(SELECT|WITH\s+\w+\s+AS|INSERT\s+INTO|CREATE\s|DELETE\s+FROM|UPDATE\s+\w+\s+SET|ALTER\s+TABLE|"
                 r"DROP\s|ATTACH\s|DETACH\s|COPY\s|PRAGMA\s|DESCRIBE\s|CHECKPOINT\b|INSTALL\s|LOAD\s)")


def sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "app.py"])


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def strings(tree: ast.AST):
    """Every string literal, with an f-string's leading text as its value."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            yield node.lineno, str(node.values[0].value)


def test_sql_lives_only_in_the_store():
    found = []
    for path in sources():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("opdviz", "store"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(n == "duckdb" or n.startswith("duckdb.") for n in names):
                    found.append(f"{rel}:{node.lineno}: imports duckdb")
        for line, text in strings(tree):
            if SQL.match(text):
                found.append(f"{rel}:{line}: SQL {text.strip()[:60]!r}")
    assert not found, "SQL or duckdb outside opdviz/store (move it into a function there):\n" + "\n".join(found)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The opdviz modules a file imports anywhere in it (inside functions too), resolved to the most specific
    module that exists; the root package ``opdviz`` (the public face) is left out."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:           # ``if TYPE_CHECKING:`` imports are for annotations, never run
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != "opdviz" and t != here and t.startswith("opdviz"):
                out.add(t)
    return out


def test_no_import_circles():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {m: imports_of(p, known) for m, p in files.items()}
    # Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    # a package's __init__ importing its own submodules is how a package exposes names, not a circle
    sccs = [c for c in sccs if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert not sccs, "import circles (modules that import each other, directly or through others):\n" + \
        "\n".join(" ↔ ".join(c) for c in sccs)


def test_modules_stay_short():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in [*PACKAGE.rglob("*.py"), ROOT / "app.py"]
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_pages_are_short():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in (ROOT / "pages").glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_PAGE_LINES]
    assert not long, (f"pages over {MAX_PAGE_LINES} lines (a page reads its filters, asks opdviz.views and "
                      "renders; move the logic into opdviz/dashboard):\n" + "\n".join(long))


def test_metrics_are_pure():
    """opdviz.metrics computes on tensors: it reads no files and knows no store, engine, view or page."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    bad = []
    for m, p in files.items():
        if m.startswith("opdviz.metrics"):
            for t in imports_of(p, set(files)):
                if not t.startswith(("opdviz.metrics", "opdviz.errors", "opdviz.options")):
                    bad.append(f"{m} imports {t}")
    assert not bad, "\n".join(bad)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module or ""))
    return out


def test_streamlit_only_in_the_dashboard_and_torch_never_in_views():
    """The library outside opdviz/dashboard never imports streamlit (the API and CLI run without a server);
    views, the store and the pages never import torch (a page renders from stored numbers)."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT)
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top == "streamlit" and rel.parts[:2] != ("opdviz", "dashboard"):
                bad.append(f"{rel}:{line}: imports {name}")
            if top == "torch" and rel.parts[:2] in {("opdviz", "views"), ("opdviz", "store"), ("opdviz", "dashboard")}:
                bad.append(f"{rel}:{line}: imports {name}")
    for path in [*(ROOT / "pages").glob("*.py"), ROOT / "app.py"]:
        bad += [f"{path.relative_to(ROOT)}:{line}: imports {name}" for line, name in _imports(path)
                if name.split(".")[0] == "torch"]
    assert not bad, "\n".join(bad)


def test_views_store_and_dashboard_load_without_torch():
    """Importing every module of opdviz/views, opdviz/store and opdviz/dashboard (what a page imports)
    loads no torch, directly or through a package ``__init__`` (the dashboard starts fast, and a view
    cannot compute on tensors by accident)."""
    import subprocess
    import sys

    modules = sorted(module_name(p) for d in ("views", "store", "dashboard") for p in (PACKAGE / d).glob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "loaded = sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.'))\n"
            "assert not loaded, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
