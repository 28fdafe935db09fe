"""What the vhubd distribution carries besides its code: the guest agent's
sources (``blink_agent``, for the local backend's PYTHONPATH, the BoxLite
mount, ``build-image`` and ``build-guest``), the systemd units, and the one
version string they share.

In a wheel these are package data under ``vhubd/_shipped/`` (setup.py copies
``guest-agent/blink_agent`` and ``systemd/`` there at build time), found with
``importlib.resources``; in a checkout (an editable install, or ``./dev``) they
are the checkout's own ``guest-agent/`` and ``systemd/``. The version lives in
one file, ``guest-agent/blink_agent/_version.py``: the agent reads it, vhubd's
build reads it for the wheel's metadata and ``vhubd.__version__`` reads it here.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotShipped(FileNotFoundError):
    """This installation lacks a file it should carry (a broken or partial install)."""


def _packaged(*parts: str) -> str | None:
    ref = importlib.resources.files("vhubd").joinpath("_shipped", *parts)
    # a filesystem install: the resource is a real path (zip imports are not supported)
    return str(ref) if isinstance(ref, os.PathLike) and ref.is_dir() else None


@functools.cache
def agent_dir() -> str:
    """The directory that holds the ``blink_agent`` package (put it on
    PYTHONPATH, mount it into a guest, copy it into an image)."""
    for cand in (_packaged("guest-agent"), os.path.join(_CHECKOUT, "guest-agent")):
        if cand and os.path.isfile(os.path.join(cand, "blink_agent", "__main__.py")):
            return cand
    raise NotShipped("the guest agent (blink_agent) is missing from this vhubd installation; "
                     "reinstall vhubd from its wheel or sdist")


@functools.cache
def units_dir() -> str:
    """The directory of the systemd units (``blink-vhub.service``, ``variants/``...)."""
    for cand in (_packaged("systemd"), os.path.join(_CHECKOUT, "systemd")):
        if cand and os.path.isfile(os.path.join(cand, "blink-vhub.service")):
            return cand
    raise NotShipped("the systemd unit files are missing from this vhubd installation; "
                     "reinstall vhubd from its wheel or sdist")


def read_version(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if not m:
        raise ValueError(f"no __version__ in {path}")
    return m.group(1)


@functools.cache
def version() -> str:
    try:
        return read_version(os.path.join(agent_dir(), "blink_agent", "_version.py"))
    except (OSError, ValueError):
        return "0+unknown"
