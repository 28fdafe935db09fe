"""Where things live by default: the guest socket, the control socket, the
state directory, the guest agent's sources. Plain functions of the
environment; imports nothing of the package, so every layer (CLI, client,
daemon, backends) can use it."""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/tmp/blink-vhub.sock"


def default_state_dir() -> str:
    env = os.environ.get("BLINK_STATE_DIR") or os.environ.get("STATE_DIRECTORY")
    if env:
        return env.split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/blink"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "blink")


def default_control_path() -> str:
    """The control socket every client command uses unless told otherwise."""
    env = os.environ.get("BLINK_CONTROL")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "blink", "control.sock")
    if os.geteuid() == 0:
        return "/run/blink/control.sock"
    return f"/tmp/blink-{os.geteuid()}/control.sock"


def agent_dir() -> str | None:
    """The directory holding the guest agent's ``blink_agent`` sources that
    ship with this vhubd: the checkout's ``guest-agent/``, or the copy a
    wheel carries (``vhubd/_agent``); None if neither is there."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "guest-agent"), os.path.join(here, "_agent")):
        if os.path.isfile(os.path.join(cand, "blink_agent", "__init__.py")):
            return cand
    return None
