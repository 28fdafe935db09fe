"""End-to-end relay benchmarks (DESIGN §6, §11), each beside references measured
in the same run:

- stream: a guest process sends Stdout frames (64 B .. 1 MiB payloads) as fast
  as it can; one subscriber on the control socket receives them. Transports:
  vhubd (C codec), vhubd with BLINK_CODEC=python, a direct Unix socket pair,
  ``socat -b 262144`` and plain ``socat`` as blind relays, and the C floor
  (bench/floor_relay.c: a BLIN relay in C with a scrollback ring, what a C
  data plane would come down to). Every byte is counted and checksummed at
  the sink.
- rpc: a guest sends RpcRequest ``bench.echo`` to a host handler that answers
  at once; concurrency 1, 16 and 64; p50/p99 latency and RPS. Transports:
  vhubd (raw handler), vhubd with the ``vhubd.client`` library as the
  handler, direct pair, socat.
- fanout: one guest streams 64 KiB (and 1 KiB) Stdout frames to 1, 4 and 16
  lossless subscribers of its session; aggregate and per-subscriber MB/s.
  Every sink gets every byte, checksummed on its own. Reference ("tee"): the
  guest writes every batch to each sink itself.

No timing assertions: only correctness. Ratios are printed at the end of the
run (bench/conftest.py, bench/report.py) from each benchmark's extra_info.
``VHUB_BENCH_QUICK=1`` shrinks everything for CI.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from _harness import (
    QUICK,
    Daemon,
    FanoutReceiver,
    FloorRelay,
    Socat,
    StreamReceiver,
    Worker,
    client_handshake,
    percentile,
    size_name,
)

from vhubd import codec

# payload size -> frames per round (full run: 128-256 MiB of payload for the big ones)
STREAM_SIZES = {
    64: 100_000 if QUICK else 1_000_000,
    1024: 16_384 if QUICK else 131_072,  # 16 / 128 MiB
    65536: 512 if QUICK else 4096,  # 32 / 256 MiB
    1 << 20: 32 if QUICK else 256,  # 32 / 256 MiB
}
STREAM_ROUNDS = 2 if QUICK else 5
STREAM_TRANSPORTS = ["vhubd", "vhubd-pycodec", "direct", "socat-b262144", "socat-plain", "c-floor"]

RPC_N = {1: 2_000 if QUICK else 10_000, 16: 10_000 if QUICK else 100_000, 64: 10_000 if QUICK else 100_000}
RPC_ROUNDS = 1 if QUICK else 3
RPC_TRANSPORTS = ["vhubd", "vhubd+client-lib", "direct", "socat-b262144", "socat-plain"]
SOCAT_BUF = {"socat-b262144": 262144, "socat-plain": None}
# VHUB_BENCH_BASE=DIR: another source tree (an older commit, say), measured as "vhubd-base" in the
# same run as this one, for before/after ratios
BASE = os.environ.get("VHUB_BENCH_BASE")
if BASE:
    STREAM_TRANSPORTS.append("vhubd-base")
    RPC_TRANSPORTS.append("vhubd-base")
DAEMON_OF = {"vhubd-pycodec": "daemon_py", "vhubd-base": "daemon_base"}

# payload -> frames per round (the same stream goes to every subscriber)
FANOUT_SIZES = {
    64: 50_000 if QUICK else 400_000,  # 3 / 26 MB per subscriber
    1024: 8_192 if QUICK else 65_536,  # 8 / 64 MiB per subscriber
    65536: 256 if QUICK else 1024,  # 16 / 64 MiB per subscriber
    1 << 20: 16 if QUICK else 64,  # 16 / 64 MiB per subscriber
}
FANOUT_SUBS = [1, 4, 16]
FANOUT_TRANSPORTS = ["vhubd", "tee"]
FANOUT_ROUNDS = 2 if QUICK else 3


# --- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vb"))


def _daemon(bench_dir, name, codec_choice, tree=None):
    d = os.path.join(bench_dir, name)
    os.makedirs(d, exist_ok=True)
    return Daemon(d, {"BLINK_CODEC": codec_choice}, tree=tree).start()


@pytest.fixture(scope="session")
def daemon_c(bench_dir):
    choice = "c" if "c" in codec.backends() else "auto"
    d = _daemon(bench_dir, "dc", choice)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def daemon_base(bench_dir):
    d = _daemon(bench_dir, "dbase", "c", tree=BASE)
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="session")
def daemon_py(bench_dir):
    d = _daemon(bench_dir, "dpy", "python")
    yield d
    assert d.stop() == 0, d.log()


def _worker(name):
    w = Worker(name)
    yield w
    w.close()


@pytest.fixture(scope="session")
def sender():
    yield from _worker("sender")


@pytest.fixture(scope="session")
def rpc_guest():
    yield from _worker("rpc-guest")


@pytest.fixture(scope="session")
def handler():
    yield from _worker("handler")


@pytest.fixture(scope="session")
def built():
    return {}


def _peak_kib(daemon) -> dict:
    """The daemon's peak RSS so far (VmHWM: over its whole life, every case it served)."""
    if daemon is None:
        return {}
    try:
        with open(f"/proc/{daemon.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"daemon_peak_kib": int(line.split()[1])}
    except OSError:
        pass
    return {}


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds of a (single-threaded) relay process, ns resolution."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _guest_connect(worker: Worker, path: str, handshake: bool) -> None:
    """Connect a guest; a previous round's guest may still be leaving the session."""
    deadline = time.monotonic() + 10
    while True:
        worker.send(cmd="connect", path=path, handshake=handshake)
        out = worker.read()
        if out.get("ok"):
            return
        if "session_busy" in str(out) and time.monotonic() < deadline:
            time.sleep(0.01)
            continue
        raise RuntimeError(f"guest connect failed: {out}")


# --- stream throughput ------------------------------------------------------------------

@pytest.mark.parametrize("transport", STREAM_TRANSPORTS)
@pytest.mark.parametrize("payload", list(STREAM_SIZES), ids=size_name)
def test_stream(benchmark, record, bench_dir, request, sender, built, payload, transport):
    count = STREAM_SIZES[payload]
    if built.get("key") != (payload, count):
        built.update(sender.call(cmd="build", payload=payload, count=count), key=(payload, count))
    nbytes, crc_expected = built["nbytes"], built["crc"]
    daemon = None
    if transport.startswith("vhubd"):
        daemon = request.getfixturevalue(DAEMON_OF.get(transport, "daemon_c"))
    sink_path = os.path.join(bench_dir, "sink.sock")
    relay_path = os.path.join(bench_dir, "relay.sock")
    listener = None
    if daemon is None:
        try:
            os.unlink(sink_path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sink_path)
        listener.listen(1)
        listener.settimeout(10)
    receiver = StreamReceiver()
    live: dict = {}
    checks: list = []

    def finish_round():
        """Untimed: the sender's report and 'nothing after the end' for the last round."""
        if live.pop("pending", None):
            sent = sender.read()
            extra = receiver.extra(live["sink"])
            checks[-1].update(ok=sent.get("ok"), extra=len(extra))

    def cleanup():
        finish_round()
        if live.get("sink") is not None:
            live.pop("sink").close()
        if live.get("socat") is not None:
            live.pop("socat").close()

    def setup():
        cleanup()
        if daemon is not None:
            sink = client_handshake(daemon.control, {"role": "client", "session": "default",
                                                     "subscribe": ["stdout"]})
            _guest_connect(sender, daemon.socket, True)
            relay_pid = daemon.pid
        else:
            target = sink_path
            relay_pid = None
            if transport in SOCAT_BUF or transport == "c-floor":
                live["socat"] = (FloorRelay(relay_path, sink_path) if transport == "c-floor"
                                 else Socat(relay_path, sink_path, SOCAT_BUF[transport]))
                relay_pid = live["socat"].pid
                target = relay_path
            _guest_connect(sender, target, False)
            sink, _ = listener.accept()
        live["sink"] = sink
        return (sink, relay_pid), {}

    def run(sink, relay_pid):
        # timed: from the command to send until the sink holds the last byte
        cpu0 = _proc_cpu(relay_pid) if relay_pid else None
        t0 = time.perf_counter()
        sender.send(cmd="send")
        got, crc = receiver.receive(sink, nbytes)
        dt = time.perf_counter() - t0
        cpu1 = _proc_cpu(relay_pid) if relay_pid else None
        cpu = (cpu1 - cpu0) / dt * 100 if cpu0 is not None and cpu1 is not None else None
        checks.append({"got": got, "crc": crc, "cpu": cpu, "dt": dt, "ok": None, "extra": None})
        live["pending"] = True

    benchmark.group = f"stream {size_name(payload)}"
    try:
        benchmark.pedantic(run, setup=setup, rounds=STREAM_ROUNDS, iterations=1, warmup_rounds=0)
    finally:
        cleanup()
        if listener is not None:
            listener.close()
            os.unlink(sink_path)
    for c in checks:
        assert c["ok"], "sender failed"
        assert c["got"] == nbytes, f"{transport}: sink got {c['got']} of {nbytes} bytes"
        assert c["crc"] == crc_expected, f"{transport}: checksum mismatch (bytes corrupted/reordered)"
        assert c["extra"] == 0, f"{transport}: {c['extra']} unexpected bytes after the stream"
    median = _median([c["dt"] for c in checks])
    payload_bytes = payload * count
    cpus = [c["cpu"] for c in checks if c["cpu"] is not None]
    row = {"mbps": payload_bytes / median / 1e6, "fps": count / median,
           "relay_cpu": _median(cpus) if cpus else None, "wire_bytes": nbytes, "frames": count,
           "seconds_median": median}
    if daemon is not None:
        row["codec"] = daemon.codec
    record(benchmark, "stream", transport=transport, payload=payload, **row, **_peak_kib(daemon))


def _median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# --- RPC round trip ---------------------------------------------------------------------

@pytest.mark.parametrize("transport", RPC_TRANSPORTS)
@pytest.mark.parametrize("conc", list(RPC_N))
def test_rpc(benchmark, record, bench_dir, request, rpc_guest, handler, conc, transport):
    n = RPC_N[conc]
    daemon = request.getfixturevalue(DAEMON_OF.get(transport, "daemon_c")) if transport.startswith("vhubd") else None
    handler_path = os.path.join(bench_dir, "handler.sock")
    relay_path = os.path.join(bench_dir, "rpcrelay.sock")
    live: dict = {}
    results: list = []
    answered: list = []

    def finish_handler():
        if live.pop("handler", None):
            handler.send(cmd="stop")
            done = handler.read()
            assert done.get("error") is None, done
            answered.append(done["done"])
        if live.get("socat") is not None:
            live.pop("socat").close()

    def setup():
        finish_handler()
        if transport in ("vhubd", "vhubd-base"):
            handler.call(cmd="serve", path=daemon.control, mode="vhubd")
            target, hs = daemon.socket, True
        elif transport == "vhubd+client-lib":
            handler.call(cmd="serve_client", path=daemon.control)
            target, hs = daemon.socket, True
        else:
            handler.call(cmd="serve", path=handler_path, mode="listen")
            target, hs = handler_path, False
            if transport in SOCAT_BUF:
                live["socat"] = Socat(relay_path, handler_path, SOCAT_BUF[transport])
                target = relay_path
        live["handler"] = True
        _guest_connect(rpc_guest, target, hs)
        relay_pid = daemon.pid if daemon is not None else live["socat"].pid if "socat" in live else None
        return (relay_pid,), {}

    def run(relay_pid):
        cpu0 = _proc_cpu(relay_pid) if relay_pid else None
        r = rpc_guest.call(cmd="rpc", n=n, conc=conc)
        cpu1 = _proc_cpu(relay_pid) if relay_pid else None
        # the relay's CPU per round trip (both frames of it), from the relay's schedstat
        r["relay_cpu_us"] = (cpu1 - cpu0) / n * 1e6 if cpu0 is not None and cpu1 is not None else None
        results.append(r)

    benchmark.group = f"rpc c={conc}"
    try:
        benchmark.pedantic(run, setup=setup, rounds=RPC_ROUNDS, iterations=1, warmup_rounds=0)
    finally:
        finish_handler()
    for r in results:
        assert r["ok"] and r["bad"] == 0 and len(r["lat_ns"]) == n, {k: v for k, v in r.items() if k != "lat_ns"}
    for a in answered:
        assert a in (n, -1), f"handler answered {a} of {n}"
    # each round's stats, then the median round (by RPS)
    rounds = []
    for r in results:
        lat = sorted(r["lat_ns"])
        rounds.append({"rps": n / r["seconds"], "p50_us": percentile(lat, 50) / 1e3,
                       "p99_us": percentile(lat, 99) / 1e3, "max_us": lat[-1] / 1e3,
                       "relay_cpu_us": r["relay_cpu_us"]})
    rounds.sort(key=lambda x: x["rps"])
    row = dict(rounds[len(rounds) // 2], n=n, conc=conc)
    record(benchmark, "rpc", transport=transport, **row, **_peak_kib(daemon))


# --- fan-out ----------------------------------------------------------------------------

@pytest.mark.parametrize("transport", FANOUT_TRANSPORTS)
@pytest.mark.parametrize("subs", FANOUT_SUBS)
@pytest.mark.parametrize("payload", list(FANOUT_SIZES), ids=size_name)
def test_fanout(benchmark, record, request, bench_dir, sender, built, payload, subs, transport):
    """``tee``, the reference: the guest itself writes every batch to each sink
    (a relay with no cost of its own); its 16/1 ratio is this machine's ceiling."""
    count = FANOUT_SIZES[payload]
    daemon = request.getfixturevalue("daemon_c") if transport == "vhubd" else None
    relay_pid = daemon.pid if daemon is not None else None
    listener = None
    if daemon is None:
        sink_path = os.path.join(bench_dir, "fan.sock")
        try:
            os.unlink(sink_path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sink_path)
        listener.listen(64)
        listener.settimeout(10)
    if built.get("key") != (payload, count):
        built.update(sender.call(cmd="build", payload=payload, count=count), key=(payload, count))
    nbytes, crc_expected = built["nbytes"], built["crc"]
    receiver = FanoutReceiver()
    live: list = []
    checks: list = []
    pending: list = []

    def finish_round():
        """Untimed: the sender's report and 'nothing after the end' at every sink."""
        if pending:
            pending.clear()
            sent = sender.read()
            checks[-1].update(ok=sent.get("ok"), extra=[len(receiver_extra(s)) for s in live])

    def cleanup():
        finish_round()
        while live:
            live.pop().close()

    def setup():
        cleanup()
        if daemon is not None:
            for _ in range(subs):
                live.append(client_handshake(daemon.control, {"role": "client", "session": "default",
                                                              "subscribe": ["stdout"]}))
            _guest_connect(sender, daemon.socket, True)
        else:
            sender.call(cmd="connect_many", path=sink_path, n=subs)
            for _ in range(subs):
                live.append(listener.accept()[0])
        return (), {}

    def run():
        # timed: from the command to send until every sink holds the last byte
        cpu0 = _proc_cpu(relay_pid) if relay_pid else None
        t0 = time.perf_counter()
        sender.send(cmd="send")
        got = receiver.receive(live, nbytes)
        dt = time.perf_counter() - t0
        cpu1 = _proc_cpu(relay_pid) if relay_pid else None
        cpu = (cpu1 - cpu0) / dt * 100 if cpu0 is not None and cpu1 is not None else None
        checks.append({"got": got, "cpu": cpu, "dt": dt, "ok": None, "extra": None})
        pending.append(True)

    benchmark.group = f"fanout {size_name(payload)}"
    try:
        benchmark.pedantic(run, setup=setup, rounds=FANOUT_ROUNDS, iterations=1, warmup_rounds=0)
    finally:
        cleanup()
        if listener is not None:
            listener.close()
            os.unlink(sink_path)
    for c in checks:
        assert c["ok"], "sender failed"
        assert len(c["got"]) == subs
        for i, (n, crc) in enumerate(c["got"]):
            assert n == nbytes, f"subscriber {i}/{subs}: got {n} of {nbytes} bytes"
            assert crc == crc_expected, f"subscriber {i}/{subs}: checksum mismatch"
        assert not any(c["extra"]), f"unexpected bytes after the stream: {c['extra']}"
    median = _median([c["dt"] for c in checks])
    per_sub = payload * count / median / 1e6
    cpus = [c["cpu"] for c in checks if c["cpu"] is not None]
    record(benchmark, "fanout", transport=transport, payload=payload, subscribers=subs, per_sub_mbps=per_sub,
           agg_mbps=per_sub * subs,
           relay_cpu=_median(cpus) if cpus else None, frames=count, seconds_median=median, **_peak_kib(daemon))


def receiver_extra(sock: socket.socket, wait: float = 0.02) -> bytes:
    sock.settimeout(wait)
    try:
        return sock.recv(65536)
    except (TimeoutError, BlockingIOError):
        return b""
