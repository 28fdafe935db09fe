"""Profile the daemon during one stream or RPC case (not a test).

    python bench/profile_relay.py stream 65536 --seconds 10 [--codec python] [--py-spy out.svg|out.txt]
    python bench/profile_relay.py rpc 64 --seconds 10 --py-spy /tmp/rpc.txt
    python bench/profile_relay.py rpc 64 --handler lib --spy-on handler --py-spy /tmp/lib.txt
    python bench/profile_relay.py --top /tmp/rpc.txt      # self/inclusive % per function:line

Starts a daemon, keeps the guest -> daemon -> subscriber stream (or the RPC
loop at the given concurrency) going for ``--seconds``, and, with ``--py-spy``,
samples the daemon with ``py-spy record`` (``.svg`` flame graph, or ``.txt``
for a raw collapsed-stack file; summarise it with ``--top``). For C-level
costs, attach ``perf record -g -p <daemon pid>`` while it runs.

A/B a change without touching the checkout: copy ``vhubd/`` (with its built
``_blin*.so``) to DIR, patch it there, and run with ``VHUB_BENCH_TREE=DIR``
(the daemon is started from DIR; the same variable works for ``pytest bench``):

    VHUB_BENCH_TREE=/tmp/patched python bench/profile_relay.py rpc 64 --seconds 5
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import Daemon, Socat, StreamReceiver, Worker, client_handshake, wait_for  # noqa: E402


def top(collapsed: str, n: int = 25) -> None:
    """Self and inclusive sample counts per function from a collapsed-stack file."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(collapsed) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            c = int(count)
            total += c
            frames = stack.split(";")
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    print(f"{total} samples")
    print("-- self --")
    for fr, c in own.most_common(n):
        print(f"{100 * c / total:5.1f}%  {fr}")
    print("-- inclusive --")
    for fr, c in incl.most_common(n):
        print(f"{100 * c / total:5.1f}%  {fr}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def io_counts(pid: int) -> dict:
    """The kernel's read/write syscall and byte counts of process ``pid``."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def stream(args, d, guest: Worker, tmp: str) -> None:
    """Rounds of pre-built Stdout frames from the guest worker to a sink through
    ``args.relay``: the daemon (a subscriber), ``socat -b 262144``, or the C
    floor (bench/floor_relay.c); each relay's CPU and syscalls counted over the
    transfers only."""
    count = max(1, (32 << 20) // args.size) if args.size >= 1024 else 200_000
    built = guest.call(cmd="build", payload=args.size, count=count)
    rx = StreamReceiver()
    sink_path, relay_path = os.path.join(tmp, "sink.sock"), os.path.join(tmp, "relay.sock")
    listener = None
    if args.relay != "vhubd":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sink_path)
        listener.listen(1)
        listener.settimeout(10)
    floor = None
    if args.relay == "floor":
        floor = os.path.join(tmp, "floor_relay")
        subprocess.run(["cc", "-O2", "-o", floor, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                              "floor_relay.c")], check=True)
    moved = xfer = cpu = 0.0
    io = dict.fromkeys(("syscr", "rchar", "syscw", "wchar"), 0)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        proc = None
        if args.relay == "vhubd":
            sink = client_handshake(d.control, {"role": "client", "session": "default", "subscribe": ["stdout"]})
            while not guest.call(cmd="connect", path=d.socket, handshake=True).get("ok"):
                time.sleep(0.01)
            pid = d.pid
        else:
            if args.relay == "socat":
                proc = Socat(relay_path, sink_path, 262144)
            else:
                proc = subprocess.Popen([floor, relay_path, sink_path, str(args.ring)])
                wait_for(lambda: os.path.exists(relay_path), 10, what="floor_relay listening")
            if not guest.call(cmd="connect", path=relay_path, handshake=False).get("ok"):
                raise RuntimeError("the guest could not connect to the relay")
            sink, _ = listener.accept()
            pid = proc.pid
        cpu0, io0, ts = cpu_seconds(pid), io_counts(pid), time.monotonic()
        guest.send(cmd="send")
        got, crc = rx.receive(sink, built["nbytes"])
        xfer += time.monotonic() - ts
        cpu += cpu_seconds(pid) - cpu0
        for k, v in io_counts(pid).items():
            if k in io:
                io[k] += v - io0[k]
        guest.read()
        sink.close()
        if isinstance(proc, Socat):
            proc.close()
        elif proc is not None:
            proc.wait(10)
        assert (got, crc) == (built["nbytes"], built["crc"]), "stream corrupted"
        moved += args.size * count
    if listener is not None:
        listener.close()
    # CPU per byte is far less noisy than MB/s on a shared machine
    print(f"{args.relay}: {moved / xfer / 1e6:.1f} MB/s payload over {xfer:.1f} s of transfers; "
          f"CPU {cpu / (moved / 1e9):.3f} s/GB; {io['syscr']} reads ({io['rchar'] / max(1, io['syscr']) / 1024:.1f} "
          f"KiB each), {io['syscw']} writes ({io['wchar'] / max(1, io['syscw']) / 1024:.1f} KiB each)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", nargs="?", choices=["stream", "rpc"], default="stream")
    ap.add_argument("size", nargs="?", type=int, default=64, help="stream payload bytes, or RPC concurrency")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--codec", default="c")
    ap.add_argument("--relay", choices=["vhubd", "socat", "floor"], default="vhubd",
                    help="stream: the relay between guest and sink (socat -b 262144; floor: bench/floor_relay.c)")
    ap.add_argument("--ring", type=int, default=1 << 20, help="--relay floor: its scrollback ring's bytes")
    ap.add_argument("--py-spy", dest="pyspy", help="output file (.svg or .txt collapsed)")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--top", help="summarise a collapsed-stack file and exit")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra `vhubd serve` argument")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--handler", choices=["raw", "lib"], default="raw",
                    help="rpc: a raw-socket handler, or one written with vhubd.client")
    ap.add_argument("--spy-on", choices=["daemon", "handler"], default="daemon", help="the process py-spy samples")
    args = ap.parse_args()
    if args.top:
        top(args.top)
        return 0
    tmp = tempfile.mkdtemp(prefix="vprof")
    d = Daemon(tmp, {"BLINK_CODEC": args.codec}, *args.daemon_arg).start()
    print(f"daemon pid {d.pid} codec {d.codec}", flush=True)
    guest = Worker("guest")
    handler = Worker("handler") if args.kind == "rpc" else None
    spy = None
    if handler is not None:
        if args.handler == "lib":
            handler.call(cmd="serve_client", path=d.control)
        else:
            handler.call(cmd="serve", path=d.control, mode="vhubd")
    if args.pyspy:
        fmt = ["--format", "raw"] if args.pyspy.endswith(".txt") else []
        target = handler.proc.pid if args.spy_on == "handler" and handler is not None else d.pid
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(target), "--rate", str(args.rate),
                                "--duration", str(int(args.seconds)), "-o", args.pyspy, *([] if args.native else ["--nonblocking"]), *fmt,
                                *(["--native"] if args.native else [])])
    deadline = time.monotonic() + args.seconds
    moved = 0
    t0 = time.monotonic()
    cpu0 = cpu_seconds(d.pid)
    try:
        if args.kind == "stream":
            stream(args, d, guest, tmp)
        else:
            n = 20_000
            while time.monotonic() < deadline:
                while not guest.call(cmd="connect", path=d.socket, handshake=True).get("ok"):
                    time.sleep(0.01)
                r = guest.call(cmd="rpc", n=n, conc=args.size)
                moved += n
            dt = time.monotonic() - t0
            cpu = cpu_seconds(d.pid) - cpu0
            print(f"{moved / dt:.0f} RPC/s over {dt:.1f} s (last round {n / r['seconds']:.0f}/s); "
                  f"daemon CPU {cpu / moved * 1e6:.1f} µs/RPC")
            handler.send(cmd="stop")
            handler.read()
    finally:
        if spy is not None:
            spy.wait(60)
        guest.close()
        if handler is not None:
            handler.close()
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
