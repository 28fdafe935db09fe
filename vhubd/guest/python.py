"""Python in the guest image: the interpreter, its libraries, the stdlib, the agent.

Owns choosing what of an unpacked ``pythonX.Y-minimal`` /
``libpythonX.Y-stdlib`` goes into the image (``add_python``): the binary,
the part of the standard library the agent can import (modulefinder's
over-approximation, minus ``STDLIB_EXCLUDE``, plus whole packages it
uses), the extension modules whose libraries are present, the closure of
shared libraries and the loader; and ``blink_agent``
(``agent_source_dir``, ``agent_files``; from the copy vhubd ships). Modules go in as reproducible
``.pyc`` (fixed hash seed, unchecked-hash invalidation) when this host's
Python has the guest's X.Y, else as sources.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

from .. import shipped
from ..errors import GuestImageError
from .cpio import Tree
from .elf import MULTIARCH, elf_needed, find_lib, shared_libraries

AGENT_DIR = "opt/blink-agent"
# what the agent never imports, though modulefinder's over-approximation would pull it in
STDLIB_EXCLUDE = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                  "distutils", "unittest", "venv", "sqlite3", "dbm", "curses", "pydoc", "doctest", "pdb",
                  "_pydecimal", "decimal", "zipfile", "lzma", "bz2", "ssl", "http", "email",
                  "urllib", "xml", "html", "xmlrpc", "ftplib", "smtplib", "imaplib", "poplib", "nntplib",
                  "mailbox", "webbrowser", "pickletools", "multiprocessing", "readline", "ctypes")


def agent_source_dir() -> str:
    """The directory holding ``blink_agent``: the copy this vhubd ships (see ``vhubd.shipped``)."""
    try:
        return shipped.agent_dir()
    except shipped.NotShipped as exc:
        raise GuestImageError(str(exc)) from None


def agent_files(src: str) -> list[tuple[str, str]]:
    """(path relative to ``src``, path) of the agent's sources, sorted."""
    out = []
    for root, dirs, files in os.walk(os.path.join(src, "blink_agent")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py") or f == "py.typed":
                path = os.path.join(root, f)
                out.append((os.path.relpath(path, src), path))
    return sorted(out)


def add_python(tree: Tree, root: str, agent_src: str, manifest: dict, say: Callable[[str], object]) -> None:
    """Add to ``tree`` the Python found in the unpacked packages in ``root``
    and the agent from ``agent_src``; record what went in in ``manifest``."""
    root, agent_src = os.path.abspath(root), os.path.abspath(agent_src)  # modulefinder's paths are absolute
    pys = sorted(f for f in os.listdir(os.path.join(root, "usr", "bin")) if re.fullmatch(r"python3\.\d+", f))
    if not pys:
        raise GuestImageError("no python3.X binary in the python package")
    exe = pys[0]
    ver = exe[len("python"):]
    stdlib = os.path.join(root, "usr", "lib", exe)
    dynload = os.path.join(stdlib, "lib-dynload")
    with open(os.path.join(root, "usr", "bin", exe), "rb") as f:
        pybin = f.read()
    tree.file(f"usr/bin/{exe}", pybin, 0o755)
    tree.symlink("usr/bin/python3", exe)
    tree.symlink("usr/bin/python", exe)
    import modulefinder

    # the modules the agent can import (over-approximated by modulefinder)
    finder = modulefinder.ModuleFinder(path=[agent_src, stdlib, dynload], excludes=list(STDLIB_EXCLUDE))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write("import blink_agent, blink_agent.__main__, blink_agent.cli, blink_agent.hub, "
                     "blink_agent.runner, blink_agent.pty, runpy, site, encodings, encodings.aliases, "
                     "encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.idna\n")
    try:
        finder.run_script(script.name)
    finally:
        os.unlink(script.name)
    compile_ = can_compile(ver)
    jobs: list[tuple[str, str, bool]] = []
    files = set()
    for mod in finder.modules.values():
        path = getattr(mod, "__file__", None)
        if path and os.path.abspath(path).startswith(stdlib + os.sep):
            files.add(os.path.abspath(path))
    # a module built into this interpreter may be an extension module in the guest's
    sos = {f.split(".")[0]: os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so")}
    files.update(sos[name] for name in finder.modules if name in sos)
    # every module of a package we use comes along (cheap, and spares surprises)
    for pkg in ("encodings", "asyncio", "json", "concurrent", "logging", "collections", "importlib", "re"):
        d = os.path.join(stdlib, pkg)
        if os.path.isdir(d):
            for dirpath, dirs, fs in os.walk(d):
                dirs[:] = sorted(x for x in dirs if x != "__pycache__")
                files.update(os.path.join(dirpath, x) for x in fs if x.endswith(".py"))
    libs_needed: set[str] = set(elf_needed(pybin)[0])
    exts = []
    skipped = []
    for path in sorted(files):
        rel = os.path.relpath(path, stdlib)
        if path.endswith(".so"):
            with open(path, "rb") as f:
                data = f.read()
            needed = elf_needed(data)[0]
            if any(find_lib(root, n) is None for n in needed):
                skipped.append(rel)
                continue
            libs_needed.update(needed)
            tree.file(f"usr/lib/{exe}/{rel}", data, 0o644)
            exts.append(rel)
        elif path.endswith(".py"):
            jobs.append((path, f"usr/lib/{exe}/{rel}", True))
    # shared libraries: the closure of DT_NEEDED, found in the unpacked packages
    libs = shared_libraries(root, libs_needed, exe)
    for so, path in libs.items():
        with open(path, "rb") as f:
            tree.file(f"lib/{MULTIARCH}/{so}", f.read(), 0o755)
    interp = elf_needed(pybin)[1]
    if interp:
        name = os.path.basename(interp)
        found = find_lib(root, name)
        if found is None:
            raise GuestImageError(f"the dynamic loader {interp} is in none of the packages")
        with open(found, "rb") as f:
            tree.file(f"lib/{MULTIARCH}/{name}", f.read(), 0o755)
        tree.symlink(interp, f"/lib/{MULTIARCH}/{name}")
    # the agent, sources and bytecode
    for rel, path in agent_files(agent_src):
        with open(path, "rb") as f:
            tree.file(f"{AGENT_DIR}/{rel}", f.read())
        if path.endswith(".py"):
            jobs.append((path, f"{AGENT_DIR}/{rel}", False))
    add_modules(tree, jobs, compile_)
    manifest.update(python=exe, python_extensions=exts, python_skipped_extensions=skipped,
                    python_libraries=sorted(libs), pyc=compile_)
    say(f"python {ver}: {len(files)} stdlib files, {len(exts)} extension modules, {len(libs)} libraries"
        + ("" if compile_ else " (no matching compiler: sources only, slower start)"))


_COMPILE = """
import json, py_compile, sys
for src, dfile, out in json.load(sys.stdin):
    try:
        py_compile.compile(src, cfile=out, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        pass
"""


def can_compile(ver: str) -> bool:
    """Whether this interpreter makes .pyc files the guest's Python loads:
    the same X.Y (same magic number)."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}" == ver


def add_modules(tree: Tree, jobs: list[tuple[str, str, bool]], compile_: bool) -> None:
    """Add (source, destination, sourceless) modules, as .pyc when
    ``compile_``. Bytecode comes from one fresh interpreter with a fixed hash
    seed (set constants are marshalled in hash order) and unchecked-hash
    invalidation (no source mtimes): the same sources give the same bytes."""
    jobs = sorted(jobs)
    if not compile_:
        for src, dest, _ in jobs:
            with open(src, "rb") as f:
                tree.file(dest, f.read())
        return
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(src, "/" + dest, os.path.join(tmp, f"{i}.pyc")) for i, (src, dest, _) in enumerate(jobs)]
        subprocess.run([sys.executable, "-I", "-c", _COMPILE], input=json.dumps(todo).encode(), check=True,
                       env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        for (_src, dest, sourceless), (_, _, out) in zip(jobs, todo, strict=True):
            if not os.path.exists(out):
                continue  # a module this Python cannot compile: left out
            with open(out, "rb") as f:
                pyc = f.read()
            if sourceless:
                tree.file(dest[:-3] + ".pyc", pyc)
            else:
                d, base = os.path.split(dest)
                tree.file(f"{d}/__pycache__/{base[:-3]}.{sys.implementation.cache_tag}.pyc", pyc)
