"""blink-agent installs into a bare venv and runs there: standard library only,
Python >= 3.8."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent_peer import AGENT_SRC, AgentProcess, HostPeer, short_socket_path

PACKAGE = AGENT_SRC / "blink_agent"
MODULES = sorted(PACKAGE.glob("*.py"))


# -- static checks --------------------------------------------------------------------


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def test_only_stdlib_imports():
    assert len(MODULES) >= 8
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in MODULES:
        for name, line in _imports(path):
            if name not in stdlib and name != "__future__":
                bad.append(f"{path.name}:{line} imports {name}")
    assert not bad, bad


def test_sources_parse_as_python_38():
    for path in MODULES:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def test_version_is_written_once():
    """blink_agent/_version.py is the one place: both builds and vhubd read it."""
    import vhubd

    pyproject = (AGENT_SRC / "pyproject.toml").read_text()
    assert not re.search(r'^version = "', pyproject, re.M)
    assert 'version = { attr = "blink_agent._version.__version__" }' in pyproject
    code = re.search(r'__version__ = "([^"]+)"', (PACKAGE / "_version.py").read_text()).group(1)
    assert vhubd.__version__ == code
    root = AGENT_SRC.parent
    assert not re.search(r'^version = "', (root / "pyproject.toml").read_text(), re.M)
    hits = [p for p in [*root.glob("vhubd/**/*.py"), *PACKAGE.glob("*.py"), root / "setup.py"]
            if re.search(r'^__version__ = "', p.read_text(), re.M)]
    assert hits == [PACKAGE / "_version.py"], hits
    assert 'requires-python = ">=3.8"' in pyproject
    assert "dependencies = []" in pyproject
    assert 'blink-agent = "blink_agent.cli:main"' in pyproject


# -- a real install -------------------------------------------------------------------


def _python38():
    candidates = [shutil.which("python3.8")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8"))
    )
    for cand in candidates:
        if not cand:
            continue
        try:
            out = subprocess.run(
                [cand, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                capture_output=True,
                timeout=20,
                text=True,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return cand
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of guest-agent/ (the source tree stays clean)."""
    tmp = tmp_path_factory.mktemp("agent-wheel")
    src = tmp / "src"
    shutil.copytree(AGENT_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    dist = tmp / "dist"
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    res = subprocess.run(
        base[:5] + ["--no-build-isolation"] + base[5:], capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:  # this interpreter lacks setuptools>=61: let pip fetch it
        res = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    [whl] = dist.glob("blink_agent-*.whl")
    return whl


def _venv_with(python: str, whl: Path, where: Path) -> Path:
    """A venv holding blink-agent and nothing else (not even pip when possible)."""
    venv = where / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(vpy),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(whl),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:  # a pip without --python: give the venv its own pip
        # (Python 3.8's ensurepip has no -q; a recent pip's --python refuses 3.8 targets)
        subprocess.run([str(vpy), "-m", "ensurepip"], check=True, timeout=300, capture_output=True)
        res = subprocess.run(
            [str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(whl)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert res.returncode == 0, res.stdout + res.stderr
    return venv


def _clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VHUB_", "PYTHON")) and k not in ("VIRTUAL_ENV",)
    }


@pytest.mark.parametrize("which", ["current", "py38"])
def test_install_into_bare_venv_and_connect(which, wheel, tmp_path):
    python = sys.executable if which == "current" else _python38()
    if python is None:
        pytest.skip("no Python 3.8 interpreter on this machine")
    venv = _venv_with(python, wheel, tmp_path)
    vpy = str(venv / "bin" / "python")
    site = subprocess.run(
        [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env=_clean_env(),
    ).stdout.strip()
    installed = sorted(
        p for p in os.listdir(site) if not p.startswith(("_distutils_hack", "distutils-precedence"))
    )
    third_party = [
        p for p in installed
        if not p.startswith(("blink_agent", "pip", "setuptools", "pkg_resources", "__pycache__"))
    ]
    assert third_party == [], installed
    assert "blink_agent" in installed

    res = subprocess.run(
        [str(venv / "bin" / "blink-agent"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
    )
    assert res.returncode == 0 and "serve" in res.stdout and "run" in res.stdout

    # Every module imports with no third-party module loaded (isolated mode: -I).
    probe = (
        "import sys, blink_agent, blink_agent.cli, blink_agent.runner, blink_agent.hub\n"
        "names = {m.split('.')[0] for m in sys.modules}\n"
        "std = set(getattr(sys, 'stdlib_module_names', ()))\n"
        "print(sorted(n for n in names if std and n not in std and n != 'blink_agent' and not n.startswith('_')))\n"
        "print(blink_agent.__file__)\n"
    )
    res = subprocess.run(
        [vpy, "-I", "-c", probe], capture_output=True, text=True, timeout=30, env=_clean_env()
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "[]", lines
    assert lines[1].startswith(site), lines  # the installed copy, not the source tree

    # A real connection: the installed console script against the in-test peer.
    peer = HostPeer(short_socket_path(tmp_path))
    env = _clean_env()
    env.update(VHUB_ADDR=peer.addr, VHUB_SESSION="venv", VHUB_TOKEN="tok")
    agent = AgentProcess(["serve", "--log-level", "debug"], tmp_path / "agent.log", env=env, python=vpy)
    try:
        conn = peer.accept(timeout=20)
        body = json.loads(conn.handshake(hello=True))
        assert (body["session"], body["token"], body["pid"]) == ("venv", "tok", agent.pid)
        conn.request(2, "agent.info")
        info = json.loads(conn.expect(lambda f: f.request_id == 2).payload)
        expected = "3.8" if which == "py38" else "{}.{}".format(*sys.version_info[:2])
        assert info["python"].startswith(expected + ".")
        conn.request(3, "agent.run", {"argv": ["sh", "-c", "echo from-venv; echo e >&2; exit 4"]})
        reply = json.loads(conn.expect(lambda f: f.request_id == 3).payload)
        out = conn.collect_execution(reply["execution_id"], ack_every=1)
        assert out["stdout"] == b"from-venv\n" and out["stderr"] == b"e\n"
        assert out["result"]["exit_code"] == 4
    finally:
        agent.stop()
        peer.close()
    log = agent.log()
    assert "Traceback" not in log and "ResourceWarning" not in log, log
