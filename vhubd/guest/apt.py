"""Debian packages on the host: what apt resolves, the ``.deb`` files, their contents.

Owns the calls to ``apt-cache`` (candidate versions, dependencies),
``apt-get download`` (fetching each ``.deb`` once into a directory) and
``dpkg-deb -x`` (unpacking into a tree), plus ``run``, which runs a host tool
and turns its failure into ``GuestImageError``. Knows nothing of what is
built from the packages (an initramfs, a rootfs).
"""

from __future__ import annotations

import os
import re
import subprocess

from ..errors import GuestImageError


def run(cmd: list[str], **kw) -> str:
    """The standard output of ``cmd``; ``GuestImageError`` if it is missing or fails."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise GuestImageError(f"{cmd[0]} not found: building the guest image needs a Debian host "
                              "(apt-get, apt-cache, dpkg-deb)") from None
    if r.returncode != 0:
        raise GuestImageError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def candidates(pkgs: list[str]) -> dict[str, str]:
    """Package -> the version apt would install now (every one of ``pkgs``)."""
    out = run(["apt-cache", "policy", *pkgs])
    found: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(\S+):$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s+Candidate:\s*(\S+)", line)
        if m and current and m.group(1) != "(none)":
            found[current] = m.group(1)
    missing = [p for p in pkgs if p not in found]
    if missing:
        raise GuestImageError(f"apt knows no candidate for {', '.join(missing)}; run `apt-get update` (the "
                              "package lists may be missing)")
    return found


def depends(pkgs: list[str]) -> dict[str, list[str]]:
    """Package -> the names in its Depends and PreDepends (alternatives included)."""
    out = run(["apt-cache", "depends", *pkgs])
    deps: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = line.strip()
            deps.setdefault(current, [])
            continue
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(\S+)", line)
        if m and current:
            deps[current].append(m.group(1))
    return deps


def dependency(deps: dict[str, list[str]], pkg: str, pattern: str) -> str:
    """The first dependency of ``pkg`` (in ``depends`` output) whose name matches ``pattern``."""
    for d in deps.get(pkg, []):
        if re.fullmatch(pattern, d):
            return d
    raise GuestImageError(f"{pkg} has no dependency matching {pattern!r}; run `apt-get update`?")


def download(packages: dict[str, str], debs_dir: str) -> dict[str, str]:
    """The .deb of each package (downloaded once into ``debs_dir``)."""
    os.makedirs(debs_dir, exist_ok=True)
    found = {}
    missing = []
    for name, version in packages.items():
        path = find_deb(debs_dir, name, version)
        if path:
            found[name] = path
        else:
            missing.append(f"{name}={version}")
    if missing:
        cmd = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            cmd += ["-o", "APT::Sandbox::User=root"]
        run(cmd + missing, cwd=debs_dir)
        for name, version in packages.items():
            if name not in found:
                path = find_deb(debs_dir, name, version)
                if not path:
                    raise GuestImageError(f"apt-get download did not produce {name} {version}")
                found[name] = path
    return found


def find_deb(d: str, name: str, version: str) -> str | None:
    """The .deb of ``name`` at ``version`` in directory ``d`` (apt quotes ``:`` as ``%3a``), if any."""
    quoted = version.replace(":", "%3a")
    for f in sorted(os.listdir(d)):
        if f.startswith(name + "_") and f.endswith(".deb") and f[len(name) + 1:].split("_")[0] in (version, quoted):
            return os.path.join(d, f)
    return None


def extract(debs: dict[str, str], root: str) -> None:
    """Unpack the .deb files (package -> path) into ``root``, in package-name order."""
    for name in sorted(debs):
        run(["dpkg-deb", "-x", debs[name], root])
