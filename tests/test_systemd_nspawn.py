"""The installed units under a real systemd as PID 1, in ``systemd-nspawn``.

One boot of this host's own /usr (``-D / --volatile=yes``) with the units
from ``blink install-units`` bind-mounted as /etc/systemd/system and a
oneshot test unit that runs ``scenario()`` (this file, run as a script
inside the container) and powers off. The scenario writes what it saw to a
bind-mounted directory; the tests below read it:

* the daemon is started by the first guest connection (socket activation),
  and a guest and a client talk through it;
* across ``systemctl restart`` clients that connect are never refused (the
  sockets stay open in PID 1) and those that come in the gap are served by
  the new daemon;
* a hung event loop (the debug SIGUSR2 hook, enabled by a runtime drop-in)
  is killed by the watchdog and the service restarted;
* journald holds the daemon's entries with VHUB_* fields.

Skipped, with the reason, only where nspawn cannot run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NSPAWN = shutil.which("systemd-nspawn")
BOOT_TIMEOUT = 150 + 10 * int(os.environ.get("VHUB_RESTARTS", "3"))  # the stress test: 3 restarts, or VHUB_RESTARTS
SCENARIO_UNIT = "vhub-scenario.service"

pytestmark = pytest.mark.systemd


# --- inside the container -------------------------------------------------------------

def scenario(out_dir: str) -> None:
    res: dict = {}
    try:
        _scenario(res)
    except BaseException:
        res["error"] = traceback.format_exc()
    finally:
        try:
            if "journal" not in res:
                res["journal"] = _journal()
        except Exception:
            res["journal_error"] = traceback.format_exc()
        with open(os.path.join(out_dir, "result.json.tmp"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(os.path.join(out_dir, "result.json.tmp"), os.path.join(out_dir, "result.json"))


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _show(unit: str, *props: str) -> dict:
    out = _run("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _journal() -> list[dict]:
    _run("journalctl", "--sync")
    out = _run("journalctl", "-o", "json", "--no-pager", "-u", "blink-vhub.service").stdout
    keep = ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "_PID", "_UID", "_COMM", "CODE_FUNC")
    entries = []
    for line in out.splitlines():
        e = json.loads(line)
        entries.append({k: v for k, v in e.items() if k in keep or k.startswith("VHUB_")})
    return entries


def _scenario(res: dict) -> None:
    import grp
    import stat

    from harness import RawGuest

    from vhubd.frames import MsgType

    _wait(lambda: _show("blink-vhub.socket", "ActiveState")["ActiveState"] == "active", 30, "blink-vhub.socket")
    res["before"] = {
        "service": _show("blink-vhub.service", "ActiveState")["ActiveState"],
        "sockets": [_show(u, "ActiveState")["ActiveState"] for u in ("blink-vhub.socket",
                                                                     "blink-vhub-control.socket")],
        "symlink": os.readlink("/tmp/blink-vhub.sock"),
    }
    for name in ("vhub", "control"):
        st = os.stat(f"/run/blink/{name}.sock")
        res["before"][f"{name}_sock"] = {"mode": oct(stat.S_IMODE(st.st_mode)), "group": grp.getgrgid(st.st_gid).gr_name}

    # 1. the first guest connection starts the daemon; a guest and a client talk through it
    t0 = time.monotonic()
    g = RawGuest("/tmp/blink-vhub.sock", timeout=30)  # Blink's path, a symlink made by the socket unit
    hs = g.handshake(b"")
    svc = _show("blink-vhub.service", "ActiveState", "MainPID", "NRestarts", "StatusText", "TriggeredBy")
    main_pid = int(svc["MainPID"])
    with open(f"/proc/{main_pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    res["first_guest"] = {"handshake": hs[0], "payload": hs[1].decode() if hs[0] == "ok" else hs[1:],
                          "seconds": time.monotonic() - t0, "service": svc, "daemon_uid": uid}
    c = RawGuest("/run/blink/control.sock", timeout=20)
    chs = c.handshake({"role": "client", "session": "default", "subscribe": ["stdout"]})
    g.send(MsgType.STDOUT, 0, b"hello through systemd")
    out = c.next_frame()
    c.send(MsgType.RPC_REQUEST, 7, {"method": "agent.echo", "params": {"n": 1}})
    req = g.next_frame()
    g.send(MsgType.RPC_RESPONSE, req.request_id, {"echo": 1})
    resp = c.next_frame()
    status = _wait(lambda: (s := _show("blink-vhub.service", "StatusText")["StatusText"]) and "1 clients" in s and s,
                   10, "STATUS= with one client")
    res["talk"] = {"client_handshake": chs[0], "stdout": bytes(out.payload).decode(),
                   "rpc_request": json.loads(bytes(req.payload)), "rpc_response_id": resp.request_id,
                   "rpc_response": json.loads(bytes(resp.payload)), "status_text": status}
    c.close()
    g.close()

    # 2. systemctl restart while clients keep connecting
    inodes = {p: os.stat(p).st_ino for p in ("/run/blink/vhub.sock", "/run/blink/control.sock")}
    old_pid = int(_show("blink-vhub.service", "MainPID")["MainPID"])
    outcomes: list[tuple[float, str, int]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                s = RawGuest("/run/blink/control.sock", timeout=30)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                outcomes.append((t, f"refused:{type(exc).__name__}", 0))
                time.sleep(0.01)
                continue
            try:
                r = s.handshake({"role": "client", "session": "*"})
                if r[0] == "ok":
                    pid = json.loads(r[1])["daemon"]["pid"]
                    outcomes.append((t, "served", pid))
                else:
                    outcomes.append((t, f"{r[0]}:{r[1]}", 0))
            except Exception as exc:
                outcomes.append((t, f"failed:{type(exc).__name__}:{exc}", 0))
            finally:
                s.close()
            time.sleep(0.01)

    guest_in_gap: dict = {}

    def late_guest() -> None:
        # connect while the service is stopping or starting: nobody accepts right now
        try:
            guest_in_gap["state"] = _wait(
                lambda: (st := _show("blink-vhub.service", "ActiveState", "MainPID"))["ActiveState"] != "active"
                and f"{st['ActiveState']} pid={st['MainPID']}", 30, "the restart to begin")
        except TimeoutError:
            guest_in_gap["state"] = "missed"
        t = time.monotonic()
        try:
            gg = RawGuest("/tmp/blink-vhub.sock", timeout=30)
            r = gg.handshake(b"")
            guest_in_gap["handshake"] = [r[0], r[1].decode() if isinstance(r[1], bytes) else r[1]]
            guest_in_gap["seconds"] = time.monotonic() - t
            gg.close()
        except Exception as exc:
            guest_in_gap["error"] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=hammer) for _ in range(4)] + [threading.Thread(target=late_guest)]
    for t in threads[:4]:
        t.start()
    time.sleep(0.3)
    t_restart = time.monotonic()
    threads[4].start()
    r = _run("systemctl", "restart", "blink-vhub.service")
    t_restarted = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(40)
    new_pid = int(_show("blink-vhub.service", "MainPID")["MainPID"])
    during = [o for o in outcomes if t_restart <= o[0] <= t_restarted]
    res["restart"] = {
        "systemctl_rc": r.returncode, "systemctl_stderr": r.stderr, "seconds": t_restarted - t_restart,
        "old_pid": old_pid, "new_pid": new_pid,
        "attempts": len(outcomes), "during": len(during),
        "refused": sum(1 for o in outcomes if o[1].startswith("refused")),
        "served_by_old": sum(1 for o in outcomes if o[1] == "served" and o[2] == old_pid),
        "served_by_new": sum(1 for o in outcomes if o[1] == "served" and o[2] == new_pid),
        "during_served_by_new": sum(1 for o in during if o[1] == "served" and o[2] == new_pid),
        "other": sorted({o[1] for o in outcomes if o[1] != "served"}),
        "other_count": sum(1 for o in outcomes if o[1] != "served"),
        "guest_in_gap": guest_in_gap,
        "inodes_kept": all(os.stat(p).st_ino == ino for p, ino in inodes.items()),
        "sockets": [_show(u, "ActiveState")["ActiveState"] for u in ("blink-vhub.socket",
                                                                     "blink-vhub-control.socket")],
    }

    # 3. a hung event loop is killed by the watchdog, and the service restarted
    os.makedirs("/run/systemd/system/blink-vhub.service.d", exist_ok=True)
    with open("/run/systemd/system/blink-vhub.service.d/50-watchdog-test.conf", "w") as f:
        # and the stdlib notify/listen_fds under a real systemd (the first daemon used libsystemd where installed)
        f.write("[Service]\nEnvironment=BLINK_DEBUG_HANG_ON_SIGUSR2=1 BLINK_SYSTEMD=stdlib\nWatchdogSec=2s\n")
    _run("systemctl", "daemon-reload")
    _run("systemctl", "restart", "blink-vhub.service")
    svc = _show("blink-vhub.service", "MainPID", "NRestarts", "WatchdogUSec", "ActiveState")
    pid1, n1 = int(svc["MainPID"]), int(svc["NRestarts"])
    time.sleep(3.0)  # longer than WatchdogSec: a daemon that did not pet would be gone by now
    alive = _show("blink-vhub.service", "MainPID", "ActiveState")
    t_hang = time.monotonic()
    _run("systemctl", "kill", "--kill-who=main", "--signal=SIGUSR2", "blink-vhub.service")

    def restarted():
        s = _show("blink-vhub.service", "MainPID", "NRestarts", "ActiveState", "SubState")
        return s if s["MainPID"] not in ("0", str(pid1)) and s["ActiveState"] == "active" else None

    after = _wait(restarted, 30, "the watchdog restart")
    res["watchdog"] = {
        "watchdog_usec": svc["WatchdogUSec"], "pid": pid1, "restarts_before": n1,
        "alive_after_3s": alive["MainPID"] == str(pid1) and alive["ActiveState"] == "active",
        "new_pid": int(after["MainPID"]), "restarts_after": int(after["NRestarts"]),
        "seconds_to_restart": time.monotonic() - t_hang,
    }
    os.unlink("/run/systemd/system/blink-vhub.service.d/50-watchdog-test.conf")
    _run("systemctl", "daemon-reload")

    # 4. journald: wait until the entries are there (they are, but the journal may lag)
    _wait(lambda: any("VHUB_EVENT" in e for e in _journal()), 10, "VHUB_ entries in the journal")

    res["journal"] = _journal()  # before the stress run's hundred thousand connections

    # 5. restarts under load: clients hammering, agents streaming, a subscriber following
    res["stress"] = _restart_stress(int(os.environ.get("VHUB_RESTARTS", "3")))


AGENT = """
import os, sys, time, blink_agent
hub = blink_agent.connect(heartbeat_interval=1.0)
i = 0
while not os.path.exists(sys.argv[1]):
    hub.stdout(b"%s %d\\n" % (os.environ["VHUB_SESSION"].encode(), i))
    i += 1
    time.sleep(0.001)
hub.flush(60)
print(i, flush=True)
hub.close(30)
"""


def _ranges(nums: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in nums:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def _follow(session: str, got: list, stop: threading.Event, errors: list, log: list | None = None) -> None:
    """A subscriber that follows ``session`` across restarts: on shutting_down it
    connects again, with replay (the new daemon's scrollback holds what it got
    before we were back)."""
    from harness import RawGuest

    from vhubd.frames import MsgType

    while not stop.is_set():
        try:
            s = RawGuest("/run/blink/control.sock", timeout=30)
            r = s.handshake({"role": "client", "session": session, "subscribe": ["stdout"], "replay": True})
            if r[0] != "ok":
                errors.append(f"subscribe: {r}")
                s.close()
                time.sleep(0.05)
                continue
            first = len(got)
            why = "?"
            pid = json.loads(r[1])["session"] and r[1][:0]
            while True:
                ev = s.next_event(timeout=60)
                if ev is None:
                    why = "eof"
                    break  # closed: follow the next daemon
                if getattr(ev, "code", None) is not None:
                    why = ev.code
                    if ev.code != "shutting_down":
                        errors.append(f"subscriber got {ev.code}")
                    break
                if getattr(ev, "msg_type", None) == MsgType.STDOUT:
                    got.extend(bytes(ev.payload).splitlines())
            if log is not None:
                log.append([first, len(got), why, got[first][-8:].decode() if len(got) > first else "",
                            got[-1][-8:].decode() if got else "", str(pid)])
            s.close()
        except Exception as exc:
            if not stop.is_set():
                errors.append(f"subscriber: {type(exc).__name__}: {exc}")
                time.sleep(0.05)


def _restart_stress(restarts: int) -> dict:
    """``restarts`` x ``systemctl restart`` while 4 client threads handshake and
    call, 2 agents stream numbered lines and a subscriber per agent follows.
    Every outcome is counted; the lines must arrive exactly once."""
    from harness import RawGuest, control_call

    # systemd refuses a unit started more than 5 times in 10 s (StartLimitBurst): lift that for the run
    os.makedirs("/run/systemd/system/blink-vhub.service.d", exist_ok=True)
    limit = "/run/systemd/system/blink-vhub.service.d/40-stress.conf"
    with open(limit, "w") as f:
        f.write("[Unit]\nStartLimitIntervalSec=0\n")
    _run("systemctl", "daemon-reload")
    tokens = {n: control_call("/run/blink/control.sock", "vhub.register", {"session": n})["token"]
              for n in ("stress-a", "stress-b")}
    stop_file = "/tmp/vhub-stress-stop"
    agents = {}
    for name, token in tokens.items():
        env = dict(os.environ, VHUB_ADDR="unix:/run/blink/vhub.sock", VHUB_SESSION=name, VHUB_TOKEN=token,
                   PYTHONPATH=os.path.join(ROOT, "guest-agent"))
        agents[name] = subprocess.Popen([sys.executable, "-c", AGENT, stop_file], env=env, stdout=subprocess.PIPE,
                                        stderr=open(f"/out/agent-{name}.log", "wb"))
    outcomes: dict = {}
    pids: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def count(what: str) -> None:
        with lock:
            outcomes[what] = outcomes.get(what, 0) + 1

    def hammer() -> None:
        while not stop.is_set():
            try:
                s = RawGuest("/run/blink/control.sock", timeout=30)
            except (ConnectionRefusedError, FileNotFoundError):
                count("refused")
                time.sleep(0.01)
                continue
            except OSError as exc:
                count(f"broken:{type(exc).__name__}")
                continue
            try:
                r = s.handshake({"role": "client", "session": "*"})
                if r[0] == "error" and r[1] == "shutting_down":  # told so in answer to its handshake
                    count("shutting_down")
                    continue
                if r[0] != "ok":
                    count(f"{r[0]}:{r[1]}")
                    continue
                pid = json.loads(r[1])["daemon"]["pid"]
                s.send(MsgType.RPC_REQUEST, 2, {"method": "vhub.ping", "params": {}})
                f = s.next_frame(timeout=30)
                if f is not None and getattr(f, "msg_type", None) == MsgType.RPC_RESPONSE:
                    count(f"served:{pid}")
                elif f is not None and getattr(f, "code", None) == "shutting_down":
                    count("shutting_down")
                else:
                    count(f"broken:{f!r}"[:80])
            except (BrokenPipeError, ConnectionResetError) as exc:
                count(f"broken:{type(exc).__name__}")
            except Exception as exc:
                count(f"broken:{type(exc).__name__}:{exc}"[:120])
            finally:
                s.close()

    from vhubd.frames import MsgType

    got = {n: [] for n in tokens}
    follow_errors: list = []
    follow_log: dict = {n: [] for n in tokens}
    followers = [threading.Thread(target=_follow, args=(n, got[n], stop, follow_errors, follow_log[n]), daemon=True)
                 for n in tokens]
    hammers = [threading.Thread(target=hammer) for _ in range(4)]
    for t in followers + hammers:
        t.start()
    t0 = time.monotonic()
    rcs = []
    for _ in range(restarts):
        time.sleep(0.5)
        pids.append(int(_show("blink-vhub.service", "MainPID")["MainPID"]))
        rcs.append(_run("systemctl", "restart", "blink-vhub.service").returncode)
    pids.append(int(_show("blink-vhub.service", "MainPID")["MainPID"]))
    time.sleep(0.5)
    with open(stop_file, "w"):
        pass
    sent = {}
    for name, p in agents.items():
        out, _ = p.communicate(timeout=120)
        sent[name] = int(out.split()[-1]) if out.split() else -1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(len(set(got[n])) < sent[n] for n in tokens):
        time.sleep(0.1)
    stop.set()
    for t in hammers:
        t.join(40)
    # the followers wait on a socket: the last daemon stopping would end them; wake them with a restart-free close
    for t in followers:
        t.join(5)
    os.unlink(limit)
    _run("systemctl", "daemon-reload")
    served_old = sum(v for k, v in outcomes.items() if k.startswith("served:") and int(k[7:]) in pids[:-1])
    served_new = sum(v for k, v in outcomes.items() if k.startswith("served:") and int(k[7:]) == pids[-1])
    lines = {}
    for name in tokens:
        seen = got[name]
        want = [f"{name} {i}".encode() for i in range(sent[name])]
        missing = sorted(int(x.split()[1]) for x in set(want) - set(seen))
        lines[name] = {"sent": sent[name], "received": len(seen), "distinct": len(set(seen)),
                       "missing": len(missing), "missing_ranges": _ranges(missing)[:10],
                       "duplicates": len(seen) - len(set(seen)),
                       "in_order": seen == sorted(seen, key=lambda x: int(x.split()[1]))}
    return {"restarts": restarts, "systemctl_rcs": rcs, "seconds": round(time.monotonic() - t0, 1),
            "pids": pids, "outcomes": {
                "served_by_old": served_old, "served_by_new": served_new,
                "shutting_down": outcomes.get("shutting_down", 0), "refused": outcomes.get("refused", 0),
                "broken": sum(v for k, v in outcomes.items() if k.startswith("broken")),
                "other": {k: v for k, v in outcomes.items() if not k.startswith(("served:", "shutting_down",
                                                                                 "refused", "broken"))},
                "broken_kinds": sorted(k for k in outcomes if k.startswith("broken"))},
            "lines": lines, "follow_errors": follow_errors[:10], "follow_log": follow_log}


# --- on the host ----------------------------------------------------------------------

def _nspawn_unavailable() -> str | None:
    if NSPAWN is None:
        return "systemd-nspawn is not installed (Debian: systemd-container; ./dev installs it)"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    if not os.path.exists("/usr/lib/systemd/systemd") and not os.path.exists("/lib/systemd/systemd"):
        return "no systemd to boot in the container (/lib/systemd/systemd)"
    return None


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    why = _nspawn_unavailable()
    if why:
        pytest.skip(why)
    from vhubd import systemd as sd
    from vhubd import units

    base = tmp_path_factory.mktemp("nspawn")
    prefix = base / "root"
    units.install_units(str(prefix), "external")
    unit_dir = prefix / "etc/systemd/system"
    (unit_dir / SCENARIO_UNIT).write_text(
        "[Unit]\nDescription=V-Hub systemd scenario (test)\n"
        "Wants=blink-vhub.socket blink-vhub-control.socket\n"
        "After=blink-vhub.socket blink-vhub-control.socket systemd-journald.service\n"
        "SuccessAction=poweroff\nFailureAction=poweroff\n\n"
        "[Service]\nType=oneshot\nTimeoutStartSec=600\n"
        f"Environment=VHUB_RESTARTS={int(os.environ.get('VHUB_RESTARTS', '3'))}\n"
        f"ExecStart={sys.executable} {os.path.abspath(__file__)} scenario /out\n"
        "StandardOutput=append:/out/scenario.log\nStandardError=append:/out/scenario.log\n\n"
        "[Install]\nWantedBy=multi-user.target\n")
    for target, unit in (("multi-user.target.wants", SCENARIO_UNIT), ("sockets.target.wants", "blink-vhub.socket"),
                         ("sockets.target.wants", "blink-vhub-control.socket")):
        (unit_dir / target).mkdir(exist_ok=True)
        (unit_dir / target / unit).symlink_to(f"../{unit}")
    out = base / "out"
    out.mkdir()
    code = sorted(set(units.code_paths()) | {ROOT})
    code = [p for p in code if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in code)]
    cmd = [NSPAWN, "-D", "/", "--volatile=yes", "-b", "--register=no", "--keep-unit", "--console=passive",
           f"--machine=vhub-test-{os.getpid()}",
           f"--bind-ro={unit_dir}:/etc/systemd/system",
           f"--bind-ro={prefix}/etc/sysusers.d:/etc/sysusers.d",
           f"--bind-ro={prefix}/etc/tmpfiles.d:/etc/tmpfiles.d",
           f"--bind={out}:/out",
           *(f"--bind-ro={p}" for p in code if not p.startswith("/usr/")),
           "systemd.firstboot=off"]
    console = base / "console.log"
    t0 = time.monotonic()
    with open(console, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # nspawn asks the container to halt
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            rc = None
    seconds = time.monotonic() - t0
    result_path = out / "result.json"
    tail = console.read_text(errors="replace")[-4000:]
    scenario_log = (out / "scenario.log").read_text(errors="replace") if (out / "scenario.log").exists() else ""
    if rc is None:
        pytest.fail(f"the container did not power off within {BOOT_TIMEOUT} s\n{scenario_log}\n{tail}")
    if not result_path.exists():
        pytest.fail(f"no result from the scenario (nspawn exit {rc})\n{scenario_log}\n{tail}")
    res = json.loads(result_path.read_text())
    res["boot_seconds"] = seconds
    try:
        sd.impl("libsystemd")
        res["host_impl"] = "libsystemd"  # what the service's BLINK_SYSTEMD=auto picks with this interpreter
    except ImportError:
        res["host_impl"] = "stdlib"
    res["console_tail"] = tail
    res["scenario_log"] = scenario_log
    sys.stderr.write(f"\nnspawn boot: {seconds:.1f} s; restart: {json.dumps(res.get('restart'))}\n"
                     f"watchdog: {json.dumps(res.get('watchdog'))}\n")
    return res


def _ok(res: dict, key: str) -> dict:
    assert "error" not in res or key in res, res.get("error", "") + res["scenario_log"] + res["console_tail"]
    return res[key]


def test_socket_activation_on_first_guest_connection(boot):
    before = _ok(boot, "before")
    assert before["service"] == "inactive" and before["sockets"] == ["active", "active"]
    assert before["symlink"] == "/run/blink/vhub.sock"
    assert before["control_sock"] == {"mode": "0o660", "group": "blink"}
    first = _ok(boot, "first_guest")
    assert first["handshake"] == "ok" and first["payload"] == "blink-vhub-ready", first
    assert first["service"]["ActiveState"] == "active"
    assert "blink-vhub.socket" in first["service"]["TriggeredBy"]
    assert first["daemon_uid"] != 0  # User=blink


def test_guest_and_client_talk_through_the_activated_daemon(boot):
    talk = _ok(boot, "talk")
    assert talk["client_handshake"] == "ok"
    assert talk["stdout"] == "hello through systemd"
    assert talk["rpc_request"] == {"method": "agent.echo", "params": {"n": 1}}
    assert talk["rpc_response_id"] == 7 and talk["rpc_response"] == {"echo": 1}
    assert "1 clients" in talk["status_text"]  # STATUS= as systemctl shows it


def test_restart_refuses_no_client(boot):
    r = _ok(boot, "restart")
    assert r["systemctl_rc"] == 0, r
    assert r["new_pid"] != r["old_pid"]
    assert r["refused"] == 0, r
    assert r["during"] > 0 and r["during_served_by_new"] > 0, r  # some came in the gap and were served
    assert r["served_by_old"] > 0 and r["served_by_new"] > 0, r
    # the only other outcome allowed: a client the old daemon had accepted is told it is shutting down
    assert set(r["other"]) <= {"error:shutting_down"}, r
    assert r["inodes_kept"] and r["sockets"] == ["active", "active"], r
    gap = r["guest_in_gap"]
    assert gap["state"] != "missed" and gap.get("handshake") == ["ok", "blink-vhub-ready"], r


def test_watchdog_kills_a_hung_loop_and_systemd_restarts_it(boot):
    w = _ok(boot, "watchdog")
    assert w["watchdog_usec"] in ("2s", "2000000"), w
    assert w["alive_after_3s"], w  # the loop pets WATCHDOG=1 under real systemd
    assert w["new_pid"] != w["pid"] and w["restarts_after"] == w["restarts_before"] + 1, w
    assert w["seconds_to_restart"] < 15, w
    assert any("Watchdog timeout" in str(e.get("MESSAGE")) for e in boot["journal"]), \
        [e.get("MESSAGE") for e in boot["journal"]][-20:]


def test_both_notify_implementations_ran_under_systemd(boot):
    """Which implementation each daemon used, from its own "vhubd ready" line
    (plain text without the systemd extra, a structured entry with it)."""
    w = _ok(boot, "watchdog")
    ready = {}
    for e in boot["journal"]:
        m = re.search(r"vhubd ready pid=(\d+) .* systemd=(\w+)", str(e.get("MESSAGE")))
        if m:
            ready[int(m.group(1))] = m.group(2)
    assert ready[w["pid"]] == "stdlib" and ready[w["new_pid"]] == "stdlib", ready
    first = ready[_ok(boot, "restart")["old_pid"]]
    assert first == ("libsystemd" if boot["host_impl"] == "libsystemd" else "stdlib"), ready


def test_restarts_under_load_drop_nothing(boot):
    """Restarts while clients hammer and agents stream: no client refused or
    cut off without a word, every line of the agents exactly once."""
    s = _ok(boot, "stress")
    o = s["outcomes"]
    assert all(rc == 0 for rc in s["systemctl_rcs"]) and len(set(s["pids"])) == s["restarts"] + 1, s
    assert o["refused"] == 0 and o["broken"] == 0 and not o["other"], o
    assert o["served_by_old"] > 0 and o["served_by_new"] > 0, o
    assert not s["follow_errors"], s["follow_errors"]
    for name, line in s["lines"].items():
        assert line["sent"] > 0 and line["missing"] == 0 and line["duplicates"] == 0 and line["in_order"], (name, s)


def test_journal_has_structured_entries(boot):
    _ok(boot, "watchdog")
    pytest.importorskip("systemd.journal", reason="the journal fields need systemd-python (the systemd extra)")
    entries = [e for e in boot["journal"] if "VHUB_EVENT" in e]
    assert entries, boot["journal"][-20:]
    assert all(e["SYSLOG_IDENTIFIER"] == "vhubd" for e in entries)
    events = {e["VHUB_EVENT"] for e in entries}
    assert {"vhubd_ready", "stopped"} <= events, events
    # the guest's and the client's arrival, with the session and the peer as fields
    guest = [e for e in entries if e.get("VHUB_SESSION") == "default" and e.get("VHUB_PEER", "").startswith("vhub:")]
    client = [e for e in entries if e.get("VHUB_PEER", "").startswith("control:")]
    assert guest and client, events
    assert guest[0]["PRIORITY"] == "6" and guest[0]["VHUB_EVENT"] in guest[0]["MESSAGE"].replace(" ", "_")
    assert any(e["PRIORITY"] == "4" for e in entries)  # warnings carry their priority
    # no stderr-format lines: the journal got entries, not text
    assert not [e for e in boot["journal"] if " vhubd INFO " in str(e.get("MESSAGE"))]


if __name__ == "__main__":
    if sys.argv[1:2] == ["scenario"]:
        sys.path.insert(0, HERE)
        scenario(sys.argv[2])
    else:
        sys.exit("usage: test_systemd_nspawn.py scenario OUT_DIR (run inside the container)")
