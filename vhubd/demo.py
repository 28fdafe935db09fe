"""The README's main job: one session end to end, in a real VM where this host can boot one.

Picks the backend (``--backend auto``): ``qemu`` where ``qemu-system-x86_64``
and the guest image (``blink build-guest``, which ``./dev`` runs) are
there, under KVM when a probe VM runs on it and TCG otherwise; else the
``local`` backend (the agent as a host process, NOT a sandbox), saying why.
Starts ``blink serve`` with it, then, as a host client: boots session
``demo`` on demand and times it, asks the agent for its details and the
guest's kernel release (host -> guest RPC), serves a host method a command
in the guest calls (guest -> host RPC), runs that command with
``agent.run``, streams its output live, and reports its exit code.
Everything goes through the daemon's real sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .client import Client, Event, Output
from .errors import VhubError

QEMU = "qemu-system-x86_64"
GUEST_SCRIPT = r"""
import os, sys, time
import blink_agent
print("hello from session", os.environ["VHUB_SESSION"], "pid", os.getpid(), "on", os.uname().release, flush=True)
with blink_agent.connect() as hub:
    answer = hub.call("host.greet", {"from": "guest", "pid": os.getpid()})
print("host.greet answered:", answer, flush=True)
for i in range(3):
    print(f"tick {i}", flush=True)
    time.sleep(0.1)
print("a line on stderr", file=sys.stderr, flush=True)
sys.exit(7)
"""


def say(msg: str) -> None:
    sys.stderr.write(f"demo: {msg}\n")
    sys.stderr.flush()


def choose_backend(wanted: str, state_dir: str | None = None) -> tuple[str, list[str], str]:
    """(backend, its ``blink serve`` arguments, why): qemu where QEMU and the
    guest image are there, else local (stated)."""
    if wanted == "local":
        return "local", [], "--backend local"
    from . import guest
    from .paths import default_state_dir

    qemu = shutil.which(QEMU)
    image = None
    why = ""
    if qemu is None:
        why = f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86; ./dev setup does)"
    else:
        cache = guest.default_cache_dir(state_dir or default_state_dir())
        try:
            image = guest.find(cache)
        except guest.GuestImageError:
            why = f"no qemu guest image in {cache} (`blink build-guest` builds it; ./dev does)"
    if image is not None:
        return "qemu", ["--image", image.dir], f"QEMU at {qemu}, guest kernel {image.kernel_release}"
    if wanted == "qemu":
        raise SystemExit(f"demo: error: --backend qemu: {why}")
    return "local", [], f"falling back to the local backend: {why}"


def accelerator(log_path: str) -> str:
    """How the daemon's log says QEMU runs the VM (KVM or TCG, and why)."""
    with open(log_path, errors="replace") as f:
        m = re.search(r"accelerator (\w+) \((.*)\)", f.read())
    return f"under {m.group(1).upper()}: {m.group(2)}" if m else "accelerator unknown"


async def drive(control: str, backend: str, log_path: str) -> int:
    greeted: list = []

    def greet(params):
        greeted.append(params)
        return {"greeting": f"hello {params.get('from')}, this is the host", "time": time.time()}

    t0 = time.monotonic()
    say("connecting to session 'demo' with boot=true (no agent yet: the daemon boots it)")
    c = await Client.connect(control, session="demo", subscribe=["stdout", "stderr", "events"], boot=True)
    boot_s = time.monotonic() - t0
    what = (f"a QEMU microvm booted, {accelerator(log_path)}, and its agent connected" if backend == "qemu"
            else "the agent (a host process) started and connected")
    say(f"boot time: {boot_s:.2f} s ({what}); state={c.hello['session']['state']} "
        f"backend={c.hello['session']['backend']}")
    handler = await Client.connect(control, session="demo", serve={"host.greet": greet})
    info = await c.call("agent.info")
    say(f"agent.info RPC (host -> guest) -> pid={info.get('pid')} python={info.get('python')} "
        f"hostname={info.get('hostname')}")
    python = "python3" if backend == "qemu" else sys.executable
    release, _ = await run(c, ["uname", "-r"], echo=False)
    where = "the guest's" if backend == "qemu" else "the host's (no VM: local backend)"
    say(f"guest kernel: {release.strip()} ({where}; this host runs {os.uname().release})")
    res_out, code = await run(c, [python, "-c", GUEST_SCRIPT], echo=True)
    say(f"the command exited with code {code}; the host served {len(greeted)} guest -> host RPC(s): {greeted}")
    sessions = await c.sessions()
    for s in sessions:
        say(f"session {s['name']}: state={s['state']} backend={s['backend']} agent={s['agent_connected']}")
    await c.close()
    await handler.close()
    ok = code == 7 and len(greeted) == 1 and bool(release.strip()) and "tick 2" in res_out
    if backend == "qemu":
        ok = ok and release.strip() != os.uname().release
    say("end to end OK" if ok else "end to end FAILED")
    return 0 if ok else 1


async def run(c: Client, argv: list[str], echo: bool) -> tuple[str, int | None]:
    """Run ``argv`` in the session with agent.run; its stdout, and its exit code."""
    res = await c.call("agent.run", {"argv": argv})
    eid = res["execution_id"]
    if echo:
        say(f"agent.run started execution {eid}; streaming its output:")
    code = None
    seen = b""
    partial = {"stdout": b"", "stderr": b""}
    while code is None:
        item = await c.next(timeout=120)
        if item is None:
            raise ConnectionError("lost the daemon")
        if isinstance(item, Output) and item.request_id == eid:
            if item.kind == "stdout":
                seen += item.data
            *lines, partial[item.kind] = (partial[item.kind] + item.data).split(b"\n")
            for line in lines if echo else []:
                print(f"  [{item.kind}] {line.decode(errors='replace')}", flush=True)
        elif isinstance(item, Event) and item.data.get("type") == "execution_result":
            if item.data.get("execution_id") == eid:
                code = item.data.get("exit_code")
    return seen.decode(errors="replace"), code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vhubd.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "qemu", "local"],
                    help="auto (default): qemu where QEMU and its guest image are there, else local")
    ap.add_argument("--state-dir", help="where the guest image is (default: blink's state dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, agent log)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    backend, extra, why = choose_backend(args.backend, args.state_dir)
    tmp = tempfile.mkdtemp(prefix="vhub-demo-")
    guest, control = os.path.join(tmp, "guest.sock"), os.path.join(tmp, "control.sock")
    log_path = os.path.join(tmp, "vhubd.log")
    if backend == "qemu":
        say(f"starting blink serve --backend qemu in {tmp}: each session is a real VM ({why})")
    else:
        say(f"starting blink serve --backend local in {tmp}: agents run as host processes, NOT a sandbox ({why})")
    code = 1
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "vhubd", "serve", "--socket", guest, "--control", control,
                                   "--backend", backend, *extra, "--boot-timeout", "180",
                                   "--state-dir", os.path.join(tmp, "state")],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(control):
            if daemon.poll() is not None or time.monotonic() > deadline:
                say("the daemon did not start:\n" + open(log_path).read())
                return 1
            time.sleep(0.05)
        code = asyncio.run(drive(control, backend, log_path))
    except (TimeoutError, OSError, ConnectionError, VhubError) as exc:
        say(f"failed: {exc}")
        code = 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        failed = code != 0 or daemon.returncode != 0
        say(f"daemon stopped (exit {daemon.returncode}); its log: {log_path if args.keep or failed else '(removed)'}")
        if failed:
            say(open(log_path).read()[-6000:])
        if not args.keep and not failed:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"demo took {time.monotonic() - t_start:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
