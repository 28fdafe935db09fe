"""The product is the package: ``python -m build`` makes an sdist and, from
that sdist, a wheel; the wheel installs into a fresh venv and works there
without the checkout (the local backend and its guest agent, ``blink run``
with stdin, ``install-units``, ``build-image``, ``build-guest``, the boxlite
backend's missing-extra message).

One build and one venv for the module (pip's cache makes the installs quick).
Runs wherever ``python -m build`` and the package index are reachable; skips
with the reason otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile

import pytest
from harness import Daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _source_files() -> list[str]:
    """The files a fresh clone has (tracked, or new and not ignored)."""
    if os.path.isdir(os.path.join(ROOT, ".git")) or os.path.isfile(os.path.join(ROOT, ".git")):
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=60).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]
    skip = {".venv", ".git", "build", "dist", "__pycache__", ".hypothesis", ".ruff_cache", ".mypy_cache"}
    files = []
    for root, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(root, n), ROOT) for n in names if not n.endswith((".so", ".pyc"))]
    return files


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BLINK_", "VHUBD_", "VHUB_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


class Built:
    def __init__(self, tmp, sdist, wheel, venv):
        self.tmp, self.sdist, self.wheel, self.venv = tmp, sdist, wheel, venv
        self.python = str(venv / "bin" / "python")
        self.blink = str(venv / "bin" / "blink")
        self.elsewhere = tmp / "elsewhere"  # a working directory with no vhubd/ in it
        self.elsewhere.mkdir(exist_ok=True)

    def run(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", _clean_env())
        return subprocess.run([self.blink, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.elsewhere, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("python -m build is not installed (the test extra has it)")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    for rel in _source_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    dist = tmp / "dist"
    env = _clean_env(BLINK_BUILD_EXTENSION="yes")
    # python -m build: the sdist from the tree, then the wheel from that sdist
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], capture_output=True,
                       text=True, timeout=900, env=env, cwd=str(tmp))
    if r.returncode != 0 and re.search(r"Could not find a version|No matching distribution|connection|"
                                       r"Network is unreachable|Temporary failure in name resolution", r.stdout
                                       + r.stderr, re.I):
        pytest.skip("the build requirements cannot be fetched (no package index)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [sdist] = dist.glob("vhubd-*.tar.gz")
    [wheel] = dist.glob("vhubd-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Built(tmp, sdist, wheel, venv)


def test_sdist_has_what_a_wheel_is_built_from(built):
    with tarfile.open(built.sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in ("csrc/build_blin.py", "csrc/blin.h", "csrc/blin.c", "setup.py", "pyproject.toml", "LICENSE",
                 "MANIFEST.in", "guest-agent/blink_agent/_version.py", "guest-agent/pyproject.toml",
                 "systemd/blink-vhub.service", "systemd/variants/qemu.conf", "vhubd/relay/core.py",
                 "vhubd/protocol/connection.py", "tests/harness/daemon.py", "docs/protocol.md",
                 "tools/fetch_xterm.py", "vhubd/api/static/index.html", "vhubd/api/static/vendor/xterm.js",
                 "vhubd/api/static/vendor/VERSIONS"):
        assert need in names, need
    assert not [n for n in names if "__pycache__" in n or n.endswith((".so", ".pyc")) or ".ruff_cache" in n]


def test_wheel_is_abi3_and_carries_the_agent_and_units(built):
    from vhubd import __version__

    assert re.fullmatch(rf"vhubd-{re.escape(__version__)}-cp311-abi3-linux_\w+\.whl", built.wheel.name)
    with zipfile.ZipFile(built.wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"vhubd-{__version__}.dist-info/METADATA").decode()
    assert "vhubd/_blin.abi3.so" in names
    for need in ("vhubd/_shipped/guest-agent/blink_agent/__main__.py",
                 "vhubd/_shipped/guest-agent/blink_agent/_version.py",
                 "vhubd/_shipped/systemd/blink-vhub.service", "vhubd/_shipped/systemd/variants/qemu.conf",
                 "vhubd/_shipped/systemd/tmpfiles.d/blink-vhub.conf", "vhubd/relay/core.py",
                 "vhubd/protocol/connection.py", "vhubd/vhost/vsock.py", f"vhubd-{__version__}.dist-info/licenses/LICENSE",
                 "vhubd/api/app.py", "vhubd/api/static/index.html", "vhubd/api/static/app.js",
                 "vhubd/api/static/app.css", "vhubd/api/static/vendor/xterm.js", "vhubd/api/static/vendor/xterm.css",
                 "vhubd/api/static/vendor/addon-fit.js", "vhubd/api/static/vendor/xterm.LICENSE"):
        assert need in names, need
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "License-Expression: Apache-2.0" in meta
    assert "Requires-Python: >=3.11" in meta
    assert "Requires-Dist: boxlite>=0.10.8; extra == \"boxlite\"" in meta
    assert not re.search(r"^Requires-Dist: boxlite(?!.*extra)", meta, re.M)  # optional, not required


def test_installed_package_runs_without_the_checkout(built):
    probe = ("import vhubd, vhubd.codec, vhubd.shipped as s; print(vhubd.__file__); print(vhubd.__version__); "
             "print(vhubd.codec.BACKEND); print(s.agent_dir()); print(s.units_dir()); "
             "import importlib.util; print(importlib.util.find_spec('boxlite'))")
    r = subprocess.run([built.python, "-c", probe], capture_output=True, text=True, timeout=60,
                       cwd=built.elsewhere, env=_clean_env())
    assert r.returncode == 0, r.stderr
    path, version, codec, agent, units, boxlite = r.stdout.splitlines()
    site = str(built.venv)
    assert path.startswith(site) and agent.startswith(site) and units.startswith(site)
    from vhubd import __version__

    assert version == __version__
    assert codec == "c"
    assert boxlite == "None"  # BoxLite is an extra: not installed by default
    r = built.run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vhubd {__version__}"


def test_local_backend_runs_a_command_end_to_end_from_the_wheel(built, tmp_path):
    d = Daemon(tmp_path / "d", "--backend", "local", python=built.python, tree=str(built.elsewhere),
               env=_clean_env()).start()
    try:
        r = built.run("run", "--control", d.control, "demo", "--", "sh", "-c",
                      "echo out; echo err >&2; wc -l; exit 3", input="a\nb\nc\n")
        assert (r.returncode, r.stdout) == (3, "out\n3\n"), r.stderr + d.log()[-2000:]
        assert r.stderr.startswith("blink: booting session demo (local)\n") and r.stderr.endswith("\nerr\n")
        info = json.loads(built.run("info", "--control", d.control, "--json", "demo").stdout)
        assert info["backend"] == "local" and info["agent_connected"] is True
        assert info["agent"]["version"] == info["daemon"]["version"]  # the agent the wheel ships
        r = built.run("run", "--control", d.control, "demo", "--", "no-such-program-here")
        assert r.returncode == 127 and r.stdout == "", r.stderr
        # ports and files, with the agent the wheel ships
        src = tmp_path / "tree"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f.txt").write_text("from the host\n")
        os.symlink("sub/f.txt", src / "link")
        r = built.run("cp", "--control", d.control, str(src), f"demo:{tmp_path}/in")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "in" / "sub" / "f.txt").read_text() == "from the host\n"
        assert os.readlink(tmp_path / "in" / "link") == "sub/f.txt"
        r = built.run("cp", "--control", d.control, f"demo:{tmp_path}/in", str(tmp_path / "out"))
        assert r.returncode == 0 and (tmp_path / "out" / "sub" / "f.txt").exists(), r.stderr
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            r = built.run("expose", "--control", d.control, "demo", str(srv.getsockname()[1]))
            assert r.returncode == 0, r.stderr
            host, port = r.stdout.strip()[len("http://"):].rstrip("/").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=30) as c:
                conn, _ = srv.accept()
                with conn:
                    c.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
                    conn.sendall(b"pong")
                    assert c.recv(4) == b"pong"
    finally:
        d.stop()


def test_other_backends_from_the_wheel(built, tmp_path):
    d = Daemon(tmp_path / "d", "--backend", "external", python=built.python, tree=str(built.elsewhere),
               env=_clean_env()).start()
    try:
        token = built.run("register", "--control", d.control, "vm1")
        assert token.returncode == 0 and len(token.stdout.strip()) >= 32
    finally:
        d.stop()
    r = built.run("serve", "--backend", "boxlite", "--socket", str(tmp_path / "b.sock"), "--control",
                  str(tmp_path / "c.sock"), "--state-dir", str(tmp_path / "st"), timeout=60)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()[-1:]
    assert "BoxLite" in line and "pip install 'vhubd[boxlite]'" in line, r.stderr


def test_the_http_api_from_the_wheel(built, tmp_path):
    """Without the http extra, --http says how to get it; with it, the API and the
    web page (xterm.js included, from the package, not a CDN) are served."""
    r = built.run("serve", "--http", "127.0.0.1:0", "--socket", str(tmp_path / "g.sock"), "--control",
                  str(tmp_path / "c.sock"), "--state-dir", str(tmp_path / "st"), timeout=60)
    assert r.returncode == 2 and "pip install 'vhubd[http]'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    venv = tmp_path / "venv-http"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=env)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{built.wheel}[http]"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    if r.returncode != 0 and re.search(r"Could not find a version|No matching distribution|connection",
                                       r.stdout + r.stderr, re.I):
        pytest.skip("aiohttp cannot be fetched (no package index)")
    assert r.returncode == 0, r.stderr[-3000:]
    d = Daemon(tmp_path / "d", "--backend", "local", "--http", "127.0.0.1:0", python=str(venv / "bin" / "python"),
               tree=str(built.elsewhere), env=env).start()
    try:
        import urllib.request

        base = f"http://{d.listeners['http']}"
        with urllib.request.urlopen(base + "/", timeout=30) as resp:
            page = resp.read().decode()
        assert "/static/vendor/xterm.js" in page and "cdn" not in page.lower()
        with urllib.request.urlopen(base + "/static/vendor/xterm.js", timeout=30) as resp:
            assert len(resp.read()) > 100_000
        token = (tmp_path / "d" / "state" / "http-token").read_text().strip()
        req = urllib.request.Request(base + "/api/health", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        d.stop()


def test_install_units_and_build_image_from_the_wheel(built, tmp_path):
    r = built.run("install-units", "--prefix", str(tmp_path / "root"), "--variant", "qemu")
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "root/etc/systemd/system/blink-vhub.service").read_text()
    assert f"ExecStart={built.blink} serve" in unit
    assert (tmp_path / "root/etc/systemd/system/blink-vhub.service.d/qemu.conf").is_file()
    assert (tmp_path / "root/etc/tmpfiles.d/blink-vhub.conf").is_file()


def test_build_image_from_the_wheel_is_the_checkouts(built, tmp_path):
    """BoxLite's default image built by the installed package: byte for byte the
    checkout's (the wheel's agent is the checkout's), with the agent inside."""
    from qemu_testing import image_state_dir, require_rootfs_image

    from vhubd.guest import oci

    img = require_rootfs_image()
    state = built.elsewhere / "s"
    (state / "guest").mkdir(parents=True)
    os.symlink(oci.default_debs_dir(image_state_dir()), oci.default_debs_dir(str(state)))  # no new download
    r = built.run("build-image", str(tmp_path / "oci"), "--state-dir", "s", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest_digest"] == img.manifest["manifest_digest"]
    index = json.loads((tmp_path / "oci/index.json").read_text())
    manifest = _blob(tmp_path / "oci", index["manifests"][0]["digest"])
    layer = _blob(tmp_path / "oci", json.loads(manifest)["layers"][-1]["digest"])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        assert "opt/blink-agent/blink_agent/__main__.py" in tf.getnames()


def test_the_demo_from_the_wheel(built):
    """The README's main job from the installed package: the local backend, and a
    real VM where the guest image is there."""
    r = subprocess.run([built.python, "-m", "vhubd.demo", "--backend", "local"],
                       capture_output=True, text=True, timeout=300, cwd=built.elsewhere, env=_clean_env())
    assert r.returncode == 0 and "end to end OK" in r.stderr, r.stderr[-3000:]
    from qemu_testing import guest_cache_dir

    cache = guest_cache_dir()
    if (os.path.basename(cache) == "guest" and os.path.isdir(os.path.join(cache, "current"))
            and shutil.which("qemu-system-x86_64")):
        r = subprocess.run([built.python, "-m", "vhubd.demo", "--state-dir", os.path.dirname(cache)],
                           capture_output=True, text=True, timeout=300, cwd=built.elsewhere, env=_clean_env())
        assert r.returncode == 0 and "end to end OK" in r.stderr, r.stderr[-3000:]
        assert "a QEMU microvm booted" in r.stderr


def test_build_guest_from_the_wheel(built, tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("not a Debian host: build-guest needs apt-get and dpkg-deb")
    # the default cache (what ./dev setup built): the wheel's agent is byte for byte the checkout's,
    # so the image it asks for is the same one
    r = built.run("build-guest", timeout=600)
    if r.returncode != 0 and re.search(r"apt|download|resolve", r.stderr, re.I):
        pytest.skip(f"build-guest could not fetch Debian packages here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr
    assert re.search(r"guest image \w+", r.stderr)


def test_qemu_backend_from_the_wheel(built, tmp_path):
    """A real VM booted by the installed daemon: the guest image is the one the
    wheel's build-guest resolves (the agent inside is the wheel's)."""
    from qemu_testing import require_guest_image

    image = require_guest_image()
    d = Daemon(tmp_path / "d", "--backend", "qemu", "--image", image.dir, "--boot-timeout", "120",
               python=built.python, tree=str(built.elsewhere), env=_clean_env()).start()
    try:
        r = built.run("run", "--control", d.control, "vm1", "--", "sh", "-c", "uname -r; wc -c", input="12345",
                      timeout=180)
        assert r.returncode == 0, r.stderr + d.log()[-2000:]
        assert r.stdout.splitlines() == [image.kernel_release, "5"]
    finally:
        d.stop()


def _python312() -> str | None:
    import glob

    for cand in [shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser(
            "~/.pyenv/versions/3.12*/bin/python3.12")))]:
        if cand and subprocess.run([cand, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                   capture_output=True, timeout=30).returncode == 0:
            return cand
    return None


def test_the_abi3_wheel_installs_on_python_312(built, tmp_path):
    """cp311-abi3: pip on 3.12 takes the same wheel, and the C codec loads there."""
    py312 = _python312()
    if py312 is None:
        pytest.skip("no Python 3.12 interpreter on this machine")
    venv = tmp_path / "v312"
    subprocess.run([py312, "-m", "venv", str(venv)], check=True, timeout=300, env=_clean_env())
    vpy = str(venv / "bin" / "python")
    r = subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-deps", str(built.wheel), "cffi>=1.15"],
                       capture_output=True, text=True, timeout=600, env=_clean_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([vpy, "-c", "import vhubd.codec as c; print(c.BACKEND)"], capture_output=True, text=True,
                       timeout=60, cwd=built.elsewhere, env=_clean_env())
    assert (r.returncode, r.stdout.strip()) == (0, "c"), r.stderr


def _blob(layout, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()
