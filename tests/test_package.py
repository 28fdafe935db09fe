"""The product is the package: a wheel built from the sdist, installed in a
clean venv away from the checkout, runs the main job (the demo, on a real VM
where the guest image is there), builds BoxLite's default image byte for
byte like the checkout does (the guest agent ships inside the wheel), and
installs the systemd units."""

import json
import os
import subprocess
import sys

import pytest
from harness import ROOT
from qemu_testing import guest_cache_dir, image_state_dir, require_rootfs_image

from vhubd.guest import oci

pytestmark = pytest.mark.slow


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    dist = tmp / "dist"
    sh([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), ROOT])
    (sdist,) = dist.glob("vhubd-*.tar.gz")
    # the wheel from the sdist, not from the checkout (pip builds it in isolation)
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(sdist)],
       env=dict(os.environ, VHUBD_BUILD_EXTENSION="yes"), cwd=str(tmp))
    (wheel,) = dist.glob("vhubd-*.whl")
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    # the wheel and what the daemon imports (boxlite, 110 MB, only for its backend)
    sh([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel), "uvloop", "msgspec", "cffi"], cwd=str(tmp))
    return venv


def run_in(venv, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True, timeout=300,
                          cwd=str(cwd), env=env)


def test_the_wheel_runs_the_demo(venv, tmp_path):
    r = run_in(venv, "-c", "import vhubd, vhubd.codec as c, vhubd.relay, vhubd.protocol; print(vhubd.__file__, "
                           "c.BACKEND)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, codec = r.stdout.split()
    assert where.startswith(str(venv)) and codec == "c"
    r = run_in(venv, "-m", "vhubd.demo", "--backend", "local", cwd=tmp_path)
    assert r.returncode == 0 and "end to end OK" in r.stderr, r.stderr[-3000:]
    cache = guest_cache_dir()
    if os.path.basename(cache) == "guest" and os.path.isdir(os.path.join(cache, "current")):
        r = run_in(venv, "-m", "vhubd.demo", "--state-dir", os.path.dirname(cache), cwd=tmp_path)
        assert r.returncode == 0 and "end to end OK" in r.stderr, r.stderr[-3000:]
        assert "a QEMU microvm booted" in r.stderr


def test_the_wheel_builds_the_same_image_as_the_checkout(venv, tmp_path):
    img = require_rootfs_image()
    (tmp_path / "s" / "guest").mkdir(parents=True)
    os.symlink(oci.default_debs_dir(image_state_dir()), oci.default_debs_dir(str(tmp_path / "s")))
    r = run_in(venv, "-m", "vhubd", "build-image", "--state-dir", "s", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert built["layout"].startswith(str(tmp_path))
    assert built["manifest_digest"] == img.manifest["manifest_digest"]


def test_the_wheel_installs_the_units(venv, tmp_path):
    r = run_in(venv, "-m", "vhubd", "install-units", "--prefix", str(tmp_path / "root"), "--variant", "boxlite",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    unit_dir = tmp_path / "root" / "etc" / "systemd" / "system"
    assert (unit_dir / "blink-vhub.socket").is_file()
    assert "--backend boxlite" in (unit_dir / "blink-vhub.service.d" / "boxlite.conf").read_text()
