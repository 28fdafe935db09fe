"""The unit files in systemd/, as ``blink install-units`` installs them,
checked by systemd's own tools: ``systemd-analyze verify`` prints nothing
(any output, even a warning about an unknown key, fails), and ``systemd-analyze
security --offline=true`` scores the service at most 2.0."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from vhubd import systemd as sd
from vhubd import units

pytestmark = pytest.mark.systemd

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: systemd)")
MAX_EXPOSURE = 2.0


def install(prefix, variant: str) -> str:
    r = subprocess.run([sys.executable, "-m", "vhubd", "install-units", "--prefix", str(prefix),
                        "--variant", variant], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return os.path.join(prefix, "etc/systemd/system")


def analyze(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"})


@needs_analyze
@pytest.mark.parametrize("variant", units.VARIANTS)
def test_verify_is_silent(tmp_path, variant):
    unit_dir = install(tmp_path, variant)
    r = analyze("verify", "--man=no", *(os.path.join(unit_dir, u) for u in units.UNIT_FILES), cwd=unit_dir)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


@needs_analyze
def test_verify_catches_a_bad_directive(tmp_path):
    """The check above would see a mistake: the same tool on a unit with an unknown key speaks."""
    unit_dir = install(tmp_path, "external")
    path = os.path.join(unit_dir, "blink-vhub.service")
    with open(path, "a") as f:
        f.write("\n[Service]\nNoSuchDirective=yes\n")
    r = analyze("verify", "--man=no", path, cwd=unit_dir)
    assert "NoSuchDirective" in r.stdout + r.stderr


def exposure(unit_path: str, root: str) -> tuple[float, str]:
    r = analyze("security", "--offline=true", f"--root={root}", os.path.basename(unit_path), cwd=root)
    text = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", text)
    assert m, text
    return float(m.group(1)), text


@needs_analyze
@pytest.mark.parametrize("variant", units.VARIANTS)
def test_security_exposure(tmp_path, variant, record_property):
    unit_dir = install(tmp_path, variant)
    score, text = exposure(os.path.join(unit_dir, "blink-vhub.service"), str(tmp_path))
    record_property(f"exposure_{variant}", score)
    sys.stderr.write(f"systemd-analyze security blink-vhub.service ({variant}): {score}\n")
    assert score <= MAX_EXPOSURE, text


@needs_analyze
def test_security_sees_the_dropins(tmp_path):
    """The boxlite drop-in loosens things (network, /dev/kvm): the score must
    move, or the check above was not reading the drop-ins at all."""
    base, _ = exposure(os.path.join(install(tmp_path / "a", "external"), "blink-vhub.service"), str(tmp_path / "a"))
    box, _ = exposure(os.path.join(install(tmp_path / "b", "boxlite"), "blink-vhub.service"), str(tmp_path / "b"))
    assert box > base


def test_units_in_the_tree_are_what_gets_installed(tmp_path):
    """systemd/ holds the sources; install-units only rewrites ExecStart=."""
    src = units.units_source()
    assert src and os.path.samefile(src, os.path.join(os.path.dirname(os.path.dirname(__file__)), "systemd"))
    unit_dir = install(tmp_path, "external")
    for name in units.UNIT_FILES:
        with open(os.path.join(src, name)) as a, open(os.path.join(unit_dir, name)) as b:
            want = [line for line in a if not line.startswith("ExecStart=")]
            got = [line for line in b if not line.startswith("ExecStart=")]
        assert want == got, name


def test_service_directives():
    """What DESIGN §10 and the Blink socket path promise, read from the files."""
    src = units.units_source()

    def keys(name):
        with open(os.path.join(src, name)) as f:
            return [tuple(line.rstrip("\n").split("=", 1)) for line in f if re.match(r"^[A-Z]\w*=", line)]

    pairs = keys("blink-vhub.service")
    svc = dict(pairs)
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main" and svc["Restart"] == "on-failure"
    assert "WatchdogSec" in svc and svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["CapabilityBoundingSet"] == "" and ("SystemCallFilter", "@system-service") in pairs
    assert "blink-vhub.socket" in svc["Sockets"] and "blink-vhub-control.socket" in svc["Sockets"]
    guest = dict(keys("blink-vhub.socket"))
    assert guest["ListenStream"] == "/run/blink/vhub.sock" and guest["FileDescriptorName"] == "vhub"
    assert guest["Symlinks"] == "/tmp/blink-vhub.sock"
    control = dict(keys("blink-vhub-control.socket"))
    assert control["FileDescriptorName"] == "control" and control["SocketMode"] == "0660"
    assert control["SocketGroup"] == "blink"
    for name in ("vhub", "control"):
        assert name in sd.FD_NAMES
