"""Scale: 1,000 idle guest connections (anonymous session, ``--multiple-agents``)
+ 1,000 idle clients (subscribed to the session's stdout) held by one daemon.

Measures the daemon's RSS growth per connection (right after accepting, and
after 3 s idle, once the tick has shrunk idle receive buffers) and the time
to accept and handshake them all (connections opened back to back, answers
collected after). RLIMIT_NOFILE is raised in this process before the daemon
is spawned (it inherits it), so both sides can hold > 2,000 descriptors.

Correctness: every handshake is answered and the daemon's ``vhub.stats``
counts every guest and client.
"""

from __future__ import annotations

import json
import selectors
import socket
import time

import pytest
from _harness import Daemon, control_call, proc_fds, proc_nofile, proc_rss_kib, raise_nofile

from vhubd.frames import HEADER, MsgType

GUESTS = 1000
CLIENTS = 1000
SETTLE_S = 3.0


def _hs_frame(payload: bytes) -> bytes:
    return HEADER.pack(0x424C494E, 1, MsgType.HANDSHAKE, 0, len(payload), 1) + payload


def open_many(path: str, n: int, hello: bytes, check) -> list[socket.socket]:
    """Open ``n`` connections and send each its handshake, then wait for every answer."""
    frame = _hs_frame(hello)
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(30)
            s.connect(path)
            s.sendall(frame)
        sel = selectors.DefaultSelector()
        bufs = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        pending = n
        deadline = time.monotonic() + 60
        while pending:
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{pending} of {n} handshakes unanswered")
            for key, _ in ready:
                s = key.fileobj
                d = s.recv(4096)
                if not d:
                    raise ConnectionError(f"daemon closed a connection during the handshake: {bufs[s]!r}")
                b = bufs[s] = bufs[s] + d
                if len(b) >= HEADER.size:
                    _, _, mtype, _, length, _ = HEADER.unpack_from(b)
                    if len(b) >= HEADER.size + length:
                        check(mtype, b[HEADER.size:HEADER.size + length])
                        sel.unregister(s)
                        pending -= 1
        sel.close()
        for s in socks:
            s.setblocking(True)
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def _guest_ok(mtype, body):
    assert mtype == MsgType.HANDSHAKE and body == b"blink-vhub-ready", (mtype, body[:200])


def _client_ok(mtype, body):
    assert mtype == MsgType.HANDSHAKE and json.loads(body).get("ok"), (mtype, body[:200])


def test_idle_connections(benchmark, record, tmp_path_factory):
    need = GUESTS + CLIENTS + 256
    soft = raise_nofile(need + 512)
    if soft < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {soft} < {need}: cannot hold {GUESTS}+{CLIENTS} connections")
    d = Daemon(str(tmp_path_factory.mktemp("vs")), {}, "--multiple-agents").start()
    held: list = []
    try:
        assert proc_nofile(d.pid) >= need, f"daemon RLIMIT_NOFILE {proc_nofile(d.pid)} < {need}"
        # warm up the code paths (imports, first allocations) before the baseline
        warm = open_many(d.socket, 20, b"", _guest_ok) + open_many(
            d.control, 20, json.dumps({"role": "client", "session": "default", "subscribe": ["stdout"]}).encode(),
            _client_ok)
        for s in warm:
            s.close()
        time.sleep(SETTLE_S)
        rss0 = proc_rss_kib(d.pid)
        fds0 = proc_fds(d.pid)
        times: dict = {}

        def run():
            t0 = time.perf_counter()
            held.extend(open_many(d.socket, GUESTS, b"", _guest_ok))
            t1 = time.perf_counter()
            hello = json.dumps({"role": "client", "session": "default", "subscribe": ["stdout"]}).encode()
            held.extend(open_many(d.control, CLIENTS, hello, _client_ok))
            t2 = time.perf_counter()
            times.update(guests_s=t1 - t0, clients_s=t2 - t1)

        benchmark.group = "scale"
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        rss1 = proc_rss_kib(d.pid)
        time.sleep(SETTLE_S)
        rss2 = proc_rss_kib(d.pid)
        fds = proc_fds(d.pid)
        stats = control_call(d.control, "vhub.stats")
        assert stats["guests"] == GUESTS, stats
        assert stats["clients"] == CLIENTS + 1, stats  # + the stats call itself
        n = GUESTS + CLIENTS
        assert fds - fds0 >= n, (fds0, fds)
        record(benchmark, "scale", guests=GUESTS, clients=CLIENTS, rss_base_kib=rss0, rss_conn_kib=rss1,
               rss_settled_kib=rss2, kib_per_conn=(rss2 - rss0) / n, kib_per_conn_peak=(rss1 - rss0) / n,
               fds=fds, accept_s=times["guests_s"] + times["clients_s"], **times)
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0, d.log()[-2000:]
