"""Builds the C codec through cffi (API mode, out-of-line).

``VHUBD_BUILD_EXTENSION=no`` skips it; ``auto`` (default) tries and falls back
to the pure-Python codec if the compiler is missing; ``yes`` makes a failed
build fatal (CI uses it).
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("VHUBD_BUILD_EXTENSION", "auto").lower()


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


setup(
    cffi_modules=[] if MODE == "no" else ["csrc/build_blin.py:ffi"],
    cmdclass={"build_ext": optional_build_ext},
)
