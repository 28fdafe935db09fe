"""Where things live by default: the guest socket, the control socket, the
state directory. Plain functions of the environment; imports nothing of the
package, so every layer (CLI, client, daemon, backends) can use it."""

from __future__ import annotations

import os
import sys

DEFAULT_SOCKET = "/tmp/blink-vhub.sock"
DEFAULT_CONFIG = "/etc/blink/vhubd.toml"

# Every variable the host side reads is BLINK_*; the old names still work, with
# one deprecation line on stderr. (The guest agent's VHUB_* variables are the
# guest's contract with the daemon, not settings of this package.)
RENAMED_ENV = {
    "BLINK_CODEC": "VHUBD_CODEC", "BLINK_SYSTEMD": "VHUBD_SYSTEMD", "BLINK_BOXLITE_VMS": "VHUB_BOXLITE_VMS",
    "BLINK_QEMU": "VHUB_QEMU", "BLINK_DEBUG_HANG_ON_SIGUSR2": "VHUBD_DEBUG_HANG_ON_SIGUSR2",
}
_warned: set[str] = set()


def env(name: str, default: str = "") -> str:
    """``$name`` (a ``BLINK_*`` variable), else its old name with a deprecation
    line on stderr (once per process), else ``default``."""
    value = os.environ.get(name)
    if value is not None:
        return value
    old = RENAMED_ENV.get(name)
    if old is not None and old in os.environ:
        if old not in _warned:
            _warned.add(old)
            sys.stderr.write(f"blink: {old} is deprecated; use {name}\n")
        return os.environ[old]
    return default


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
