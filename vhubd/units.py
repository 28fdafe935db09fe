"""``blink install-units``: the systemd units of systemd/, written with this
installation's ``blink`` in ``ExecStart=`` and the drop-ins a backend variant
and the code's location need."""

from __future__ import annotations

import os
import re
import shutil
import sys

from . import shipped

UNIT_FILES = ("blink-vhub.socket", "blink-vhub-control.socket", "blink-vhub.service")
VARIANTS = ("external", "local", "boxlite", "qemu")
_HOME_DIRS = ("/home", "/root", "/run/user")
_TMP_DIRS = ("/tmp", "/var/tmp")  # hidden by PrivateTmp=yes


def units_source() -> str:
    """The systemd/ directory this installation ships (``vhubd.shipped``)."""
    return shipped.units_dir()


def blink_command() -> list[str]:
    """How to run ``blink`` as installed: the console script beside this
    interpreter, else the one on PATH, else ``python -m vhubd``."""

    beside = os.path.join(os.path.dirname(sys.executable), "blink")
    if os.access(beside, os.X_OK):
        return [os.path.abspath(beside)]
    found = shutil.which("blink")
    if found and "/shims/" not in found:  # a pyenv shim is a shell script that needs $HOME
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "vhubd"]


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == h or path.startswith(h + "/") for h in dirs)


def _under_home(path: str) -> bool:
    return _under(path, _HOME_DIRS)


def code_paths() -> list[str]:
    """Directories the service must read to run this vhubd: the interpreter's
    prefixes and the package's parent (an editable checkout)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    paths.add(os.path.realpath(os.path.dirname(os.path.realpath(sys.executable))))
    for p in sys.path:
        if p and os.path.isdir(p) and "site-packages" in p:
            paths.add(os.path.realpath(p))
    out: list[str] = []
    for p in sorted(paths, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _exec_start(text: str, exe: str) -> str:
    return re.sub(r"^ExecStart=/usr/bin/blink ", lambda m: f"ExecStart={exe} ", text, flags=re.M)


def install_units(prefix: str = "/", variant: str = "external", command: list[str] | None = None) -> list[str]:
    """Write the units under ``prefix`` (``etc/systemd/system``,
    ``etc/sysusers.d``, ``etc/tmpfiles.d``) with ExecStart= pointing at this
    installation; returns the paths written. Code under /home, /root, /tmp or
    /var/tmp (which ProtectHome=/PrivateTmp= hide) is made visible to the
    hardened service, read-only, by a drop-in (ProtectHome=tmpfs where needed
    + BindReadOnlyPaths=)."""
    import shlex

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} ({', '.join(VARIANTS)})")
    src = units_source()
    command = command or blink_command()
    exe = " ".join(shlex.quote(c) for c in command)
    unit_dir = os.path.join(prefix, "etc/systemd/system")
    written = []

    def write(path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)

    for name in UNIT_FILES:
        with open(os.path.join(src, name)) as f:
            text = f.read()
        if name.endswith(".service"):
            text = _exec_start(text, exe)
        write(os.path.join(unit_dir, name), text)
    dropin = os.path.join(unit_dir, "blink-vhub.service.d")
    if variant != "external":
        with open(os.path.join(src, "variants", f"{variant}.conf")) as f:  # a drop-in for blink-vhub.service
            text = f.read()
        write(os.path.join(dropin, f"{variant}.conf"), _exec_start(text, exe))
    hidden_dirs = _HOME_DIRS + _TMP_DIRS
    hidden = [p for p in code_paths() if _under(p, hidden_dirs)]
    in_home = any(_under_home(p) for p in hidden) or any(
        _under_home(os.path.realpath(c)) for c in command if c.startswith("/"))
    if hidden or in_home:
        write(os.path.join(dropin, "code-paths.conf"),
              "# Written by `blink install-units`: this vhubd runs from under a home or temporary\n"
              "# directory, which ProtectHome=yes / PrivateTmp=yes would hide. Only these paths are\n"
              "# shown, read-only.\n[Service]\n" + ("ProtectHome=tmpfs\n" if in_home else "")
              + "".join(f"BindReadOnlyPaths={p}\n" for p in hidden))
    for kind in ("sysusers.d", "tmpfiles.d"):
        with open(os.path.join(src, kind, "blink-vhub.conf")) as f:
            write(os.path.join(prefix, "etc", kind, "blink-vhub.conf"), f.read())
    return written
