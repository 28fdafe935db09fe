"""The shape of the blink_agent package: one job per module, imports that point down,
one frame producer, one error tree, modules of a readable size."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_peer import AGENT_SRC, agent_env

PACKAGE = AGENT_SRC / "blink_agent"
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}

#: Lowest layer first; a module may import only modules listed before it.
LAYERS = [
    "_version",
    "errors",
    "wire",
    "tarcopy",
    "protocol",
    "outbox",
    "address",
    "link",
    "rpc",
    "output",
    "async_hub",
    "blocking",
    "hub",
    "execution",
    "stdin",
    "pty",
    "runner",
    "channels",
    "copies",
    "cli",
    "__main__",
    "__init__",
]

MAX_LINES = 400


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _package_imports(name: str) -> set[str]:
    """blink_agent modules that ``name`` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "blink_agent":
                    continue
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names if a.name in MODULES)
            elif node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "blink_agent" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    assert sorted(MODULES) == sorted(LAYERS)


def test_imports_point_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{name} imports {dep}"
        for name in MODULES
        for dep in sorted(_package_imports(name))
        if rank[dep] >= rank[name]
    ]
    assert not upward, upward


@pytest.mark.parametrize("name", ["pty", "stdin", "runner", "execution", "link", "async_hub", "blocking", "hub", "cli"])
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    """Imported first, a module of a cycle would find its partner half-initialised."""
    code = f"import blink_agent.{name} as m, sys; print(sorted(k for k in sys.modules if k.startswith('blink_agent')))"
    res = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env(),
        cwd=str(AGENT_SRC.parent),
    )
    assert res.returncode == 0, res.stderr
    assert f"blink_agent.{name}" in res.stdout


def test_modules_are_small_or_say_why():
    """No module beyond MAX_LINES lines unless its docstring says why ("400 lines")."""
    too_long = []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(_tree(name)) or ""
        if lines > MAX_LINES and f"{MAX_LINES} lines" not in doc:
            too_long.append(f"{name}.py: {lines} lines")
    assert not too_long, too_long


def test_every_module_says_what_it_owns():
    missing = [name for name in MODULES if len(ast.get_docstring(_tree(name)) or "") < 40]
    assert not missing, missing


def test_one_frame_producer():
    """Frames are built by wire.py / protocol.py only: no header packing elsewhere."""
    allowed = {"wire", "protocol"}
    offenders = []
    for name, path in MODULES.items():
        if name in allowed:
            continue
        text = path.read_text()
        for needle in ("encode_header", "encode_frame", "HEADER.pack", "<IBBHIQ"):
            if needle in text:
                offenders.append(f"{name}.py uses {needle}")
    assert not offenders, offenders


def test_one_error_tree():
    """Every exception class defined in blink_agent derives from AgentError."""
    errors = importlib.import_module("blink_agent.errors")
    outside = []
    for name in MODULES:
        if name == "__main__":
            continue
        module = importlib.import_module("blink_agent" if name == "__init__" else f"blink_agent.{name}")
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("blink_agent")
                and not issubclass(obj, errors.AgentError)
            ):
                outside.append(f"{name}.{attr}")
    assert not outside, outside
    defined = [
        node.name
        for name in MODULES
        if name != "errors"
        for node in ast.walk(_tree(name))
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases)
    ]
    assert not defined, f"exception classes outside errors.py: {defined}"


def test_hub_keeps_its_public_names():
    hub = importlib.import_module("blink_agent.hub")
    for name in ("AsyncHub", "Hub", "connect", "aconnect", "backoff_delays", "STREAM_CHUNK"):
        assert hasattr(hub, name), name
    assert hub.STREAM_CHUNK == 64 * 1024
    import blink_agent

    assert blink_agent.connect is hub.connect and blink_agent.AsyncHub is hub.AsyncHub


def test_layout_table_in_readme_lists_every_module():
    readme = (AGENT_SRC / "README.md").read_text()
    missing = [n for n in LAYERS if not n.startswith("_") and f"`{n}.py`" not in readme]
    assert not missing, missing


def test_source_tree_is_the_one_imported():
    import blink_agent

    assert Path(blink_agent.__file__).resolve().parent == PACKAGE.resolve()
