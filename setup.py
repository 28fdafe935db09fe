"""Builds vhubd: the C codec through cffi (API mode, out-of-line), the
version from the one version file, and the package data the wheel carries.

``BLINK_BUILD_EXTENSION=no`` skips the C codec; ``auto`` (default) tries and
falls back to the pure-Python codec if the compiler is missing; ``yes`` makes a
failed build fatal (CI uses it). The old name ``VHUBD_BUILD_EXTENSION`` still
works. The extension uses the limited API, so the wheel is tagged abi3.

``build_py`` copies ``guest-agent/blink_agent`` and ``systemd/`` into
``vhubd/_shipped/`` in the build: the wheel then runs the local backend,
``install-units``, ``build-image`` and ``build-guest`` without a checkout. It
also runs ``tools/fetch_xterm.py`` (xterm.js for the web page, from the npm
registry, integrity-checked; quick when ``vhubd/api/static/vendor`` is there,
as it is in an sdist).
"""

import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))


def _mode() -> str:
    value = os.environ.get("BLINK_BUILD_EXTENSION")
    if not value and os.environ.get("VHUBD_BUILD_EXTENSION"):
        sys.stderr.write("blink: VHUBD_BUILD_EXTENSION is deprecated; use BLINK_BUILD_EXTENSION\n")
        value = os.environ["VHUBD_BUILD_EXTENSION"]
    return (value or "auto").strip().lower()


MODE = _mode()
SHIPPED = {"guest-agent/blink_agent": "guest-agent/blink_agent", "systemd": "systemd"}


def version() -> str:
    with open(os.path.join(HERE, "guest-agent", "blink_agent", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


class optional_build_ext(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing...
            if MODE == "yes":
                raise
            sys.stderr.write(f"WARNING: C codec not built ({exc}); vhubd will use the pure-Python codec\n")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if MODE == "yes":
                raise
            sys.stderr.write(f"WARNING: C codec not built ({exc}); vhubd will use the pure-Python codec\n")


def _fetch_xterm() -> None:
    """xterm.js for the web page (package data): fetched from the npm registry and
    checked against its pinned integrity, unless already there (an sdist has it)."""
    script = os.path.join(HERE, "tools", "fetch_xterm.py")
    if os.path.exists(script):
        import subprocess

        subprocess.run([sys.executable, script], check=True)


class build_py_shipped(build_py):
    """Also copy the guest agent and the systemd units into vhubd/_shipped/."""

    def run(self):
        _fetch_xterm()
        super().run()
        if self.editable_mode:  # an editable install finds them in the checkout
            return
        for src, dst in SHIPPED.items():
            target = os.path.join(self.build_lib, "vhubd", "_shipped", dst)
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(os.path.join(HERE, src), target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


class sdist_with_xterm(sdist):
    """The sdist carries xterm.js too: a wheel then builds from it offline."""

    def run(self):
        _fetch_xterm()
        super().run()


options = {}
if MODE != "no":
    options["bdist_wheel"] = {"py_limited_api": "cp311"}  # the extension is abi3 (cffi's limited API)

setup(
    version=version(),
    cffi_modules=[] if MODE == "no" else ["csrc/build_blin.py:ffi"],
    cmdclass={"build_ext": optional_build_ext, "build_py": build_py_shipped, "sdist": sdist_with_xterm},
    options=options,
)
