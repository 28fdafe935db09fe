"""``./dev demo``'s main job, ``python -m vhubd.demo``, runs end to end: its own
daemon (local backend), boot on demand, agent.info, agent.run, a guest->host
call, live output, the exit code."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end():
    r = subprocess.run([sys.executable, "-m", "vhubd.demo"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "end to end OK" in r.stdout + r.stderr
