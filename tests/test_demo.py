"""The README's first command, `./dev demo` (python -m vhubd.demo): a real
VM where QEMU and the guest image are there (the qemu backend, KVM or TCG),
the local backend as a stated fallback, every step shown and checked."""

import os
import subprocess
import sys

import pytest
from harness import ROOT
from qemu_testing import guest_cache_dir, require_guest_image


def demo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vhubd.demo", *args], capture_output=True, timeout=timeout,
                          cwd=ROOT)


def check_steps(r):
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err[-4000:]
    assert "end to end OK" in err and "boot time: " in err and "guest kernel: " in err
    assert "agent.info RPC (host -> guest)" in err and "exited with code 7" in err
    assert "1 guest -> host RPC(s)" in err
    for line in ("[stdout] tick 2", "[stdout] host.greet answered:", "[stderr] a line on stderr"):
        assert line in out, out
    return out, err


@pytest.mark.slow
def test_the_demo_boots_a_real_vm():
    img = require_guest_image()
    cache = guest_cache_dir()
    if os.path.basename(cache) != "guest":
        pytest.skip(f"the guest image cache {cache} is not STATE_DIR/guest")
    r = demo("--state-dir", os.path.dirname(cache))
    out, err = check_steps(r)
    assert "--backend qemu" in err and "each session is a real VM" in err and "NOT a sandbox" not in err
    assert "a QEMU microvm booted, under " in err
    assert f"guest kernel: {img.kernel_release} (the guest's" in err
    assert f"on {img.kernel_release}" in out  # the command ran in the guest


def test_the_demo_falls_back_to_the_local_backend_saying_why(tmp_path):
    r = demo("--state-dir", str(tmp_path))
    out, err = check_steps(r)
    first = err.splitlines()[0]
    assert "--backend local" in first and "NOT a sandbox" in first and "falling back to the local backend" in first
    assert "no qemu guest image" in first or "not installed" in first
    assert f"guest kernel: {os.uname().release} (the host's" in err


def test_the_demo_asked_for_qemu_where_it_cannot_says_so(tmp_path):
    r = demo("--backend", "qemu", "--state-dir", str(tmp_path))
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: error: --backend qemu: "), lines
