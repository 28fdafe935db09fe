"""The package installs and runs on the pure-Python codec when the C codec
cannot be built, and says so (setup.py's optional build, codec.REASON)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install(tmp_path, env_extra):
    src = tmp_path / "src"
    # symlinks stay links: a link to a directory (a venv's, /usr/bin/X11 -> .) must never be walked
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv*", ".minimal-bin", ".git", "build", "*.so", "*.egg-info",
                                                  "__pycache__", ".hypothesis", "bench", "tests", "dist"))
    venv = tmp_path / "venv"
    # a plain venv: the checkout's own editable install must not leak in
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = str(venv / "bin" / "python")
    env = dict(os.environ, **env_extra)
    env.pop("PYTHONPATH", None)
    # build isolation fetches setuptools/cffi from the package index; --no-deps:
    # vhubd.codec imports only the standard library
    r = subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(src)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = subprocess.run([vpy, "-c", "import vhubd.codec as c; print(c.BACKEND); print(c.REASON)"],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    return r, out.stdout.splitlines()


@pytest.mark.slow
def test_no_compiler_falls_back_to_python_codec(tmp_path):
    r, (backend, reason) = _install(tmp_path, {"CC": "/bin/false", "BLINK_BUILD_EXTENSION": "auto"})
    assert backend == "python"
    assert "not built" in reason and "pure-Python" in reason


@pytest.mark.slow
def test_extension_off_by_switch(tmp_path):
    _, (backend, reason) = _install(tmp_path, {"BLINK_BUILD_EXTENSION": "no"})
    assert backend == "python" and "not built" in reason


def test_forcing_c_when_absent_is_an_import_error():
    r = subprocess.run([sys.executable, "-c", "import vhubd.codec"], capture_output=True, text=True,
                       env=dict(os.environ, BLINK_CODEC="bogus"), timeout=60)
    assert r.returncode != 0 and "BLINK_CODEC must be auto, c or python" in r.stderr


def test_old_variable_names_still_work_with_a_deprecation_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLINK_", "VHUBD_"))}
    r = subprocess.run([sys.executable, "-c", "import vhubd.codec as c; print(c.BACKEND)"], capture_output=True,
                       text=True, env=dict(env, VHUBD_CODEC="python"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "python"
    assert r.stderr.splitlines() == ["blink: VHUBD_CODEC is deprecated; use BLINK_CODEC"]
    r = subprocess.run([sys.executable, "-c", "import vhubd.codec as c; print(c.BACKEND)"], capture_output=True,
                       text=True, env=dict(env, VHUBD_CODEC="c", BLINK_CODEC="python"), timeout=60)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "python", "")  # the new name wins, silently
