"""The package's shape: imports point down (no cycles, even through imports
inside functions), client code loads neither uvloop nor the daemon, and no
module grows past about 400 lines without saying why."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "vhubd")
DAEMON_SIDE = ("uvloop", "vhubd.server", "vhubd.relay", "vhubd.daemon", "vhubd.boot", "vhubd.backends")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(_read(path))
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def resolve(mod: str) -> None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            found.add(mod)

    def visit(node) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                resolve(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from . import x" may name a submodule
                sub = f"{mod}.{a.name}"
                resolve(sub if sub in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_imports_form_no_cycle():
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is the one edge allowed upward:
    # drop submodule -> its own package edges when the package only re-exports
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules (re-exports)
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("code", [
    "import vhubd.client",
    "import vhubd.cli as c; c.build_parser()",
    "import vhubd.cli as c; c.main(['sessions', '--control', '/nonexistent/control.sock'])",
    "import vhubd.cli as c; c.main(['run', '--control', '/nonexistent/control.sock', 'x', '--', 'true'])",
])
def test_client_code_loads_no_daemon_side(code):
    probe = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             f"print([m for m in {DAEMON_SIDE!r} if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_no_module_over_400_lines_without_saying_why():
    long = []
    for name, path in modules().items():
        text = _read(path)
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > 420 and "lines" not in doc:
            long.append(f"{name}: {n} lines")
    assert not long, long


def test_every_module_says_what_it_owns():
    missing = [name for name, path in modules().items()
               if not ast.get_docstring(ast.parse(_read(path))) and os.path.getsize(path) > 200]
    assert not missing, missing


def test_every_exception_is_under_the_root():
    from vhubd import errors

    strays = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(_read(path))):
            if isinstance(node, ast.ClassDef) and name != "vhubd.errors":
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"Exception", "ValueError", "RuntimeError", "OSError", "ConnectionError"}:
                    strays.append(f"{name}.{node.name}")
    assert not strays, strays
    assert all(issubclass(c, errors.VhubError) for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == "vhubd.errors")
