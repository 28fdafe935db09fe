"""Reliability of vhubd under fuzzing and adversarial load (issue 8).

One module, two users. The CI tests (``tests/test_fuzz_*.py``,
``tests/test_hardening*.py``) run each check at its ``QUICK`` size and assert
what must hold; run as a script, ``python tests/reliability.py`` runs every
check at ``FULL`` size and rewrites the "Reliability" section of README.md
with the figures (``--quick`` for a short rehearsal, ``--no-readme`` to only
print).

What must hold everywhere (DESIGN §11): the daemon never crashes or hangs;
every bad peer gets its ``Error`` and is closed within its timeout; a healthy
guest->subscriber stream running beside the attack loses no byte; the daemon's
RSS stays within ``RSS_BOUND_MIB`` (plus the scrollback its sessions keep) of
where it started; no fd, task, connection or pending-RPC leak once the attack
ends. Everything is loopback
TCP or Unix sockets, bounded and seeded; nothing here opens AF_VSOCK.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CSRC = ROOT / "csrc"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from attacks import AFTER_BOUND_MIB, PEAK_BOUND_MIB, SESSIONS_BOUND_MS, UNTRUSTED  # noqa: E402
from corpus import seeds  # noqa: E402
from harness import Daemon  # noqa: E402

from vhubd import _codec_py, codec  # noqa: E402
from vhubd.frames import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, KNOWN_TYPES, TYPE_BIT, MsgType  # noqa: E402
from vhubd.protocol import (  # noqa: E402
    Connection,
    Frame,
    Handshake,
    Ping,
    Pong,
    RemoteErrorEvent,
    Side,
    StreamChunk,
    StreamRun,
    StreamStart,
    Violation,
    encode_frame,
)

T = MsgType
READY = b"blink-vhub-ready"
HEADER = struct.Struct("<IBBHIQ")
MAGIC = 0x424C494E

# One daemon setting for every attack: short timeouts so bad peers end fast.
HANDSHAKE_TIMEOUT = 2.0
STALL_TIMEOUT = 2.0
HEARTBEAT = 1.0  # the daemon closes a peer that answered pongs and then went silent for 3x this
RPC_TIMEOUT = 1.0
SLACK = 2.5  # scheduling allowance on top of a timeout (tick granularity + a loaded 2-core host)
DAEMON_FLAGS = ["--tcp", "127.0.0.1:0", "--handshake-timeout", f"{HANDSHAKE_TIMEOUT:g}",
                "--stall-timeout", f"{STALL_TIMEOUT:g}", "--heartbeat", f"{HEARTBEAT:g}",
                "--rpc-timeout", f"{RPC_TIMEOUT:g}", "--lossy-limit", "256k", "--backend", "external",
                "--log-level", "info", "--max-attached", "100000", "--max-connections", "3000",
                "--max-sessions", "3000"]
MAX_SESSIONS = 3000
MAX_HANDSHAKE = 64 << 10  # the daemon's default: a handshake frame's payload, at most (from the header)
RSS_BOUND_MIB = 64  # the daemon's RSS after an attack, less new scrollback, stays within this of before
FUZZ_SESSIONS = 8

PROTOCOL_CODES = {"bad_magic", "bad_version", "unknown_type", "frame_too_large", "handshake_required",
                  "handshake_timeout", "stalled", "heartbeat_timeout"}
REFUSALS = {"bad_handshake", "wrong_role", "unknown_session", "bad_token", "token_required", "session_busy",
            "session_required", "bad_session_name", "session_stopping"}

QUICK = {
    "fuzz_runs": 300_000, "fuzz_cases": 240, "flood": 300, "slowloris": 6, "held": 24, "cycles": 2000,
    "rpc_calls": 300, "handlers": 20, "killed": 3, "slow_mib": 8, "shared_mib": 16, "baseline_s": 0.0,
    "healthy_rate": 32 << 20,
    "impostors": 50, "flood_s": 2.0, "inflight_calls": 3000, "session_flood": MAX_SESSIONS + 100,
    "lockout": 3000, "echo_tries": 30,
}
FULL = {
    "fuzz_runs": 20_000_000, "fuzz_cases": 5000, "flood": 5000, "slowloris": 60, "held": 200,
    "cycles": 2000, "cycle_rounds": 5, "rpc_calls": 5000, "handlers": 200, "killed": 20, "slow_mib": 64,
    "shared_mib": 256, "healthy_rate": 64 << 20,
    "baseline_s": 5.0,
    "impostors": 1000, "flood_s": 10.0, "inflight_calls": 100_000, "session_flood": MAX_SESSIONS + 1000,
    "lockout": 3000, "echo_tries": 300,
}


# =============================================================================
# Part 1: the C codec under libFuzzer, and the Python twin against it
# =============================================================================

FUZZ_FLAGS = ["-std=c99", "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer",
              "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all"]


def build_fuzzer(out_dir: Path) -> Path | None:
    """csrc/fuzz_blin.c as a libFuzzer target with ASan + UBSan; None when
    this host has no clang with libFuzzer."""
    if shutil.which("clang") is None:
        return None
    exe = Path(out_dir) / "fuzz_blin"
    r = subprocess.run(["clang", *FUZZ_FLAGS, f"-I{CSRC}", str(CSRC / "blin.c"), str(CSRC / "route.c"), str(CSRC / "pump.c"), str(CSRC / "fuzz_blin.c"),
                        "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        if "fuzzer" in r.stderr and ("cannot find" in r.stderr or "unsupported" in r.stderr):
            return None
        raise RuntimeError(f"fuzzer build failed:\n{r.stderr[-3000:]}")
    return exe


def write_seeds(dir_: Path, n: int = 400) -> int:
    dir_.mkdir(parents=True, exist_ok=True)
    data = seeds(n)
    for i, d in enumerate(data):
        (dir_ / f"seed-{i:05d}").write_bytes(d)
    return len(data)


_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+) .*?exec/s: (\d+) rss: (\d+)Mb")


def run_libfuzzer(exe: Path, corpus_dir: Path, seed_dir: Path, runs: int, timeout: float = 3600) -> dict:
    """Grow ``corpus_dir`` from ``seed_dir`` for ``runs`` inputs; the figures
    of the final libFuzzer line. A crash (sanitizer report or invariant) is
    a failure with its log tail."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    art = corpus_dir.parent / "artifacts"
    art.mkdir(exist_ok=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    t0 = time.monotonic()
    r = subprocess.run([str(exe), f"-runs={runs}", f"-dict={CSRC / 'fuzz_blin.dict'}", "-max_len=4096",
                        "-use_value_profile=1", "-print_final_stats=1", f"-artifact_prefix={art}/",
                        str(corpus_dir), str(seed_dir)],
                       capture_output=True, text=True, env=env, timeout=timeout)
    elapsed = time.monotonic() - t0
    m = _DONE.search(r.stderr)
    res = {"runs": runs, "seconds": round(elapsed, 1), "returncode": r.returncode, "failures": []}
    if r.returncode != 0 or m is None:
        res["failures"].append(f"libFuzzer exited {r.returncode}:\n{r.stderr[-4000:]}")
        return res
    res.update(execs=int(m.group(1)), cov=int(m.group(2)), ft=int(m.group(3)), corpus=int(m.group(4)),
               exec_per_s=int(m.group(6)), peak_rss_mb=int(m.group(7)))
    return res


# --- differential: C codec vs pure-Python codec on the same bytes ----------

def _scan_all(impl, data, start, end, max_payload, cap):
    sc = impl.Scanner(cap)
    out = []
    pos = start
    while True:
        res = sc.scan(data, pos, end, max_payload)
        out.append((res, tuple(sc.headers())))
        if res[3] != 0 or res[2] != 3:  # status != OK or pending != MORE
            return out
        pos = res[1]


def _parse(impl, data, max_payload):
    try:
        return ("ok", impl.parse_header(data, 0, max_payload))
    except Exception as exc:  # both must fail the same way
        return ("err", type(exc).__name__, getattr(exc, "code", None))


def _cuts(n: int, rnd: random.Random, every_up_to: int = 160, sample: int = 48) -> list[int]:
    if n <= every_up_to:
        return list(range(n + 1))
    return sorted({0, n, *(rnd.randrange(n + 1) for _ in range(sample))})


def codec_trace(impl, data: bytes, max_payload: int) -> list:
    """Everything the codec says about ``data``: batch scans (capacities 1, 3,
    4096; from 0 and from a third), scans of prefixes, partial header checks,
    parse_header and request_id rewrite."""
    rnd = random.Random(len(data))
    tr: list = []
    n = len(data)
    for cap in (1, 3, 4096):
        tr.append(_scan_all(impl, data, 0, n, max_payload, cap))
    tr.append(_scan_all(impl, data, n // 3, n, max_payload, 7))
    for cut in _cuts(n, rnd):
        tr.append(_scan_all(impl, data, 0, cut, max_payload, 64))
    for avail in range(0, min(n, HEADER_SIZE) + 1):
        tr.append(impl.check_header(data, 0, avail, max_payload))
    tr.append(_parse(impl, data, max_payload))
    if n >= HEADER_SIZE:
        buf = bytearray(data)
        tr.append((impl.rewrite_request_id(buf, 0, 0x1122334455667788), bytes(buf)))
    tr += _route_trace(impl, data, max_payload)
    return tr


def _route_trace(impl, data: bytes, max_payload: int) -> list:
    """The RPC hot loop on ``data`` (as csrc/fuzz_blin.c drives it): the payload
    rule, ``data`` as a guest's batch (whole and from a third), the handler
    answering what it got, ``data`` as a handler's answers, the releases."""
    tr: list = [impl.route_method(data)]
    r = impl.Router()
    g, h = r.add(True, 7, 16), r.add(False, 0, 16)
    for m in ("a", "tool.run", "x.y", "m"):
        r.learn(7, m, h)
    buf = bytearray(data)
    got = r.route(g, buf, 0, len(buf), max_payload, 1.0, 0)
    tr.append(got)
    for _, out in got[4]:
        answers = bytearray(out)
        pos = 0
        while pos < len(answers):
            answers[pos + 5] = 0x11
            pos += HEADER_SIZE + int.from_bytes(answers[pos + 8:pos + 12], "little")
        tr.append(r.route(h, answers, 0, len(answers), max_payload, 0.0, 0))
    tr.append(r.route(h, buf, 0, len(buf), max_payload, 0.0, 0))
    tr.append(r.route(g, buf, len(buf) // 3, len(buf), max_payload, 2.0, 15))
    tr.append((r.count(), r.earliest(), r.outstanding(g), r.release(h), r.release(g), r.count()))
    return tr


class _Collect:
    """Events of a server-side Connection, normalised so that the same bytes
    fed whole or in pieces compare equal: stream runs and cut-through frames
    become one entry per frame."""

    def __init__(self):
        self.items: list = []
        self.partial: list | None = None

    def add(self, ev) -> None:
        t = type(ev)
        if t is StreamRun:
            for f in ev.frames():
                self.items.append(("frame", f.msg_type, f.flags, f.request_id, bytes(f.data)))
        elif t is Frame:
            self.items.append(("frame", ev.msg_type, ev.flags, ev.request_id, bytes(ev.data)))
        elif t is StreamStart:
            self.partial = [ev.msg_type, ev.flags, ev.request_id, bytearray(ev.data)]
            if ev.remaining == 0:
                self._end()
        elif t is StreamChunk:
            self.partial[3] += ev.data
            if ev.remaining == 0:
                self._end()
        elif t is Handshake:
            self.items.append(("handshake", ev.request_id, bytes(ev.payload)))
        elif t is Ping:
            self.items.append(("ping", ev.request_id))
        elif t is Pong:
            self.items.append(("pong", ev.request_id))
        elif t is RemoteErrorEvent:
            self.items.append(("remote_error", ev.code, ev.message))
        elif t is Violation:
            self.items.append(("violation", ev.error.code, ev.error.message))
        else:
            self.items.append(("?", t.__name__))

    def _end(self) -> None:
        mt, fl, rid, d = self.partial
        self.items.append(("frame", mt, fl, rid, bytes(d)))
        self.partial = None


def connection_trace(impl, data: bytes, pieces: list[int], max_payload: int = 1024, cut_through: int = 64):
    """Feed ``data`` to a server Connection in pieces of the given sizes,
    accepting the peer's handshake; (normalised events, bytes it sends,
    state, mid_frame)."""
    c = Connection(Side.SERVER, max_payload=max_payload, cut_through=cut_through, codec_impl=impl)
    col = _Collect()
    pos = 0
    for size in pieces:
        chunk = data[pos:pos + size]
        pos += size
        evs = c.receive_data(chunk)
        i = 0
        while i < len(evs):
            ev = evs[i]
            col.add(ev)
            if type(ev) is Handshake:
                c.accept(READY, ev.request_id)
                evs[i + 1:i + 1] = c.resume()
            i += 1
    return col.items, b"".join(c.data_to_send()), c.state.value, c.mid_frame, bool(col.partial)


def _pieces(n: int, rnd: random.Random) -> list[list[int]]:
    out = [[n]]
    if n <= 600:
        out.append([1] * n)
    for _ in range(2):
        p, left = [], n
        while left > 0:
            k = min(left, rnd.randrange(1, 64))
            p.append(k)
            left -= k
        out.append(p)
    return out


def differential(paths: list[Path]) -> dict:
    """C codec vs pure-Python codec on every file: identical codec traces and
    identical connection events; and for each backend the same events
    whether the bytes come whole, byte by byte or in random pieces."""
    impls = codec.backends()
    res = {"inputs": 0, "bytes": 0, "comparisons": 0, "failures": [], "backends": sorted(impls)}
    if "c" not in impls:
        res["failures"].append("the C codec is not built: nothing to compare the Python codec with")
        return res
    c_impl, py_impl = impls["c"], impls["python"]
    for path in paths:
        data = path.read_bytes()
        rnd = random.Random(hashlib.sha256(data).digest())
        res["inputs"] += 1
        res["bytes"] += len(data)
        for max_payload in (0xFFFFFFFF, DEFAULT_MAX_PAYLOAD, 64):
            a, b = codec_trace(c_impl, data, max_payload), codec_trace(py_impl, data, max_payload)
            res["comparisons"] += len(a)
            if a != b:
                diff = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y) if len(a) == len(b) else "len"
                res["failures"].append(f"{path.name}: codec traces differ (max_payload {max_payload}, "
                                       f"item {diff}): {data[:64].hex()}")
        whole = None
        for pieces in _pieces(len(data), rnd):
            tc = connection_trace(c_impl, data, pieces)
            tp = connection_trace(py_impl, data, pieces)
            res["comparisons"] += 2
            if tc != tp:
                res["failures"].append(f"{path.name}: connection events differ between backends "
                                       f"(pieces {pieces[:5]}...): {data[:64].hex()}")
            if whole is None:
                whole = tc
            elif tc[:3] != whole[:3]:
                res["failures"].append(f"{path.name}: fed in pieces {pieces[:8]}... the events differ from "
                                       f"the whole: {data[:64].hex()}")
    return res


def fuzz_codec(work: Path, runs: int) -> dict:
    """Build, seed, run libFuzzer for ``runs`` inputs, then the differential
    over the corpus it grew. Skipped (``skipped`` set) without clang."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    exe = build_fuzzer(work)
    if exe is None:
        return {"skipped": "clang with libFuzzer not installed (./dev setup installs it)", "failures": []}
    seed_dir, corpus_dir = work / "seeds", work / "corpus"
    n_seeds = write_seeds(seed_dir)
    fz = run_libfuzzer(exe, corpus_dir, seed_dir, runs)
    if fz["failures"]:
        return fz
    t0 = time.monotonic()
    files = sorted(corpus_dir.iterdir()) + sorted(seed_dir.iterdir())
    diff = differential(files)
    return {**fz, "seeds": n_seeds, "diff_inputs": diff["inputs"], "diff_bytes": diff["bytes"],
            "diff_comparisons": diff["comparisons"], "diff_seconds": round(time.monotonic() - t0, 1),
            "failures": fz["failures"] + diff["failures"]}


# =============================================================================
# Part 2: a live daemon, a healthy stream beside every attack, and the checks
# =============================================================================

def hdr(msg_type: int, length: int, rid: int = 1, *, magic: int = MAGIC, version: int = 1, flags: int = 0) -> bytes:
    return HEADER.pack(magic, version, msg_type, flags, length, rid)


def frm(msg_type: int, rid: int = 0, payload=b"") -> bytes:
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return encode_frame(msg_type, rid, payload)


def parse_frames(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(type, request_id, payload) of every complete frame the daemon sent."""
    out, pos = [], 0
    while len(raw) - pos >= HEADER_SIZE:
        _, _, mt, _, n, rid = HEADER.unpack_from(raw, pos)
        if len(raw) - pos - HEADER_SIZE < n:
            break
        out.append((mt, rid, raw[pos + HEADER_SIZE:pos + HEADER_SIZE + n]))
        pos += HEADER_SIZE + n
    return out


def error_code(raw: bytes) -> str | None:
    for mt, _, payload in parse_frames(raw):
        if mt == T.ERROR:
            try:
                return json.loads(payload)["code"]
            except (ValueError, KeyError, TypeError):
                return "?"
    return None


class Raw:
    """One raw BLIN connection on a plain non-blocking socket: bytes out,
    bytes in. Writes go through a queue drained by a task, so a write that
    fails (the daemon already closed) never costs us what the daemon sent
    before closing: its Error stays readable, unlike with asyncio streams."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.got = bytearray()
        self.eof = False
        self.eof_at: float | None = None
        self.hs_end = 0  # offset in got just past the daemon's answer to our handshake
        self.send_error: OSError | None = None
        self.closed = False
        self._out: collections.deque = collections.deque()
        self._writer: asyncio.Future | None = None

    @classmethod
    async def open(cls, target, timeout: float = 10.0) -> Raw:
        sock = socket.socket(socket.AF_INET if isinstance(target, tuple) else socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, data: bytes) -> None:
        if self.closed or self.send_error is not None or not data:
            return
        self._out.append(data)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._out:
            data = self._out.popleft()
            try:
                await self.loop.sock_sendall(self.sock, data)
            except OSError as exc:
                self.send_error = exc
                self._out.clear()

    async def drain(self) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def half_close(self) -> None:
        await self.drain()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def read_some(self, timeout: float) -> bytes:
        """What arrives within ``timeout`` (b"" at EOF, which also sets eof)."""
        if self.eof:
            return b""
        try:
            d = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 18), timeout)
        except TimeoutError:
            return b""
        except OSError:  # reset: what was readable has been read
            d = b""
        if not d:
            self.eof = True
            self.eof_at = time.monotonic()
        self.got += d
        return d

    async def until_eof(self, limit: float) -> bool:
        """Read until EOF or ``limit`` seconds; True at EOF."""
        deadline = time.monotonic() + limit
        while not self.eof and time.monotonic() < deadline:
            await self.read_some(max(0.01, deadline - time.monotonic()))
        return self.eof

    async def quiet(self, quiet: float, limit: float) -> None:
        """Read until nothing came for ``quiet`` seconds, EOF, or ``limit``."""
        deadline = time.monotonic() + limit
        while not self.eof and time.monotonic() < deadline:
            if not await self.read_some(min(quiet, max(0.01, deadline - time.monotonic()))) and not self.eof:
                return

    async def frame(self, match, timeout: float = 10.0):
        """The first daemon frame (type, rid, payload) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            fs = parse_frames(bytes(self.got))
            for f in fs[seen:]:
                if match(f):
                    return f
            seen = len(fs)
            if self.eof or time.monotonic() > deadline:
                return None
            await self.read_some(max(0.01, deadline - time.monotonic()))

    async def handshake(self, payload=b"", rid: int = 1, timeout: float = 10.0):
        """('ok', payload) or ('error', code) or ('closed',)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        self.send(frm(T.HANDSHAKE, rid, payload))
        f = await self.frame(lambda f: f[0] in (T.HANDSHAKE, T.ERROR), timeout)
        if f is None:
            return ("closed",)
        self.hs_end = HEADER_SIZE + len(parse_frames(bytes(self.got))[0][2])
        if f[0] == T.HANDSHAKE:
            return ("ok", f[2])
        return ("error", json.loads(f[2])["code"])

    def abort(self) -> None:
        """Close at once, with a RST on TCP (SO_LINGER 0), like a killed process."""
        if self.sock.family == socket.AF_INET:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close_now()

    def _close_now(self) -> None:
        if not self.closed:
            self.closed = True
            if self._writer is not None:
                self._writer.cancel()
            self.sock.close()

    async def close(self) -> None:
        self._close_now()


class StreamHasher:
    """sha256 of the stream frames (header + payload, as the guest sent them)
    in a daemon->client byte stream; heartbeats and events are skipped, pings
    answered."""

    def __init__(self, kinds=(T.STDOUT, T.STDERR)):
        self.conn = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
        self.conn.send_handshake()
        self.conn.receive_data(frm(T.HANDSHAKE, 1, b"{}"))
        self.conn.data_to_send()
        self.kinds = {int(k) for k in kinds}
        self.mask = sum(TYPE_BIT[k] for k in self.kinds)
        self.h = hashlib.sha256()
        self.n = 0

    def feed(self, data) -> bytes:
        """Take bytes; returns what to send back (pongs)."""
        for ev in self.conn.receive_data(data):
            t = type(ev)
            if t is StreamRun and not ev.type_mask & ~self.mask:
                self.h.update(ev.data)
                self.n += len(ev.data)
            elif t is StreamRun:
                for f in ev.frames():
                    if f.msg_type in self.kinds:
                        self.h.update(f.data)
                        self.n += len(f.data)
        return b"".join(self.conn.data_to_send())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class Healthy:
    """The healthy guest->subscriber pair, in its own process (so the attack's
    CPU in this process does not count against it): ``python
    tests/reliability.py healthy``. It streams Stdout/Stderr frames as fast as
    the daemon takes them and reports sha256 of what it sent and of what the
    subscriber got, and a timeline of bytes received."""

    def __init__(self, env: Env, session: str, token: str, rate: int = 0):
        self.args = [sys.executable, str(Path(__file__).resolve()), "healthy", "--guest", env.d.socket,
                     "--control", env.d.control, "--session", session, f"--token={token}", "--rate", str(rate)]
        self.proc: subprocess.Popen | None = None
        self.result: dict | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError(f"healthy stream did not start: {line!r}")

    def stop(self, timeout: float = 60.0) -> dict:
        if self.result is None:
            out, _ = self.proc.communicate(timeout=timeout)  # closes its stdin: the stop signal
            self.result = json.loads(out.decode().strip().splitlines()[-1])
        return self.result


def rate_between(timeline: list, t0: float, t1: float) -> float | None:
    """Bytes/s the healthy subscriber received between two monotonic times."""
    pts = [(t, b) for t, b in timeline if t0 <= t <= t1]
    if len(pts) < 2 or pts[-1][0] - pts[0][0] < 0.2:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


class Env:
    """A daemon (``DAEMON_FLAGS``), an admin client, a pool of registered
    sessions for attackers, the healthy stream, and the resource figures
    before and after."""

    def __init__(self, tmp: Path, extra_flags=(), rate: int = 0):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.rate = rate  # of the healthy stream, bytes/s (0: as fast as the daemon takes it)
        self.d = Daemon(self.tmp, *DAEMON_FLAGS, *extra_flags)
        self.max_sessions = MAX_SESSIONS
        self.tokens: dict[str, str] = {}
        self.failures: list[str] = []
        self.windows: list[tuple[str, float, float]] = []
        self.healthy: Healthy | None = None

    # -- lifecycle --
    async def start(self, healthy: bool = True) -> None:
        from vhubd.client import Client

        await asyncio.to_thread(self.d.start)
        self.tcp = self.d.tcp
        self.admin = await Client.connect(self.d.control)
        for name in ["healthy", *(f"fz-{i}" for i in range(FUZZ_SESSIONS))]:
            self.tokens[name] = (await self.admin.register(name))["token"]
        if healthy:
            self.healthy = Healthy(self, "healthy", self.tokens["healthy"], self.rate)
            await asyncio.to_thread(self.healthy.start)
        await asyncio.sleep(0.3)
        self.before = await self.resources()
        self.started = time.monotonic()

    async def register(self, name: str) -> str:
        if name not in self.tokens:
            self.tokens[name] = (await self.admin.register(name))["token"]
        return self.tokens[name]

    async def stats(self) -> dict:
        return await self.admin.call("vhub.stats", timeout=20)

    async def resources(self) -> dict:
        s = await self.stats()
        return {"rss_kib": self.d.rss_kib(), "scrollback_kib": s.get("scrollback_bytes", 0) // 1024,
                "fds": self.d.fd_count(), "tasks": s.get("tasks"),
                "connections": s.get("connections"), "inflight": s.get("inflight_rpcs"),
                "guests": s.get("guests"), "clients": s.get("clients")}

    def alive(self) -> bool:
        return self.d.proc.poll() is None

    async def settle(self, timeout: float = 15.0) -> dict:
        """Wait (bounded) until fds, connections, tasks and pending RPCs are back
        where they were; the figures either way."""
        deadline = time.monotonic() + timeout
        keys = ("fds", "connections", "tasks", "inflight")
        while True:
            now = await self.resources()
            if all(now[k] is None or now[k] <= self.before[k] for k in keys) or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.2)

    async def finish(self) -> dict:
        """Stop the healthy stream, check everything that must hold, stop the daemon."""
        out: dict = {"alive": self.alive()}
        if not out["alive"]:
            self.failures.append(f"the daemon died (exit {self.d.proc.returncode}): {self.d.log()[-2000:]}")
        try:
            pong = await self.admin.call("vhub.ping", timeout=10)
            out["responsive"] = bool(pong.get("pong"))
        except Exception as exc:
            out["responsive"] = False
            self.failures.append(f"the daemon does not answer vhub.ping after the attack: {exc!r}")
        if self.healthy is not None:
            h = await asyncio.to_thread(self.healthy.stop)
            out["healthy"] = {k: h[k] for k in ("sent_bytes", "received_bytes", "seconds", "lossless", "error")}
            if not h["lossless"]:
                self.failures.append(f"healthy stream lost bytes: {h}")
            if h["sent_bytes"] <= 0:
                self.failures.append("healthy stream sent nothing")
            base = self.baseline_rate()
            out["healthy"]["undisturbed_bps"] = base
            out["healthy"]["overall_bps"] = h["received_bytes"] / h["seconds"] if h["seconds"] else None
            out["windows"] = []
            for name, t0, t1 in self.windows:
                r = rate_between(h["timeline"], t0, t1)
                out["windows"].append({"name": name, "seconds": round(t1 - t0, 1), "bps": r,
                                       "ratio": (r / base) if (r and base) else None})
        after = await self.settle()
        out["before"], out["after"] = self.before, after
        for k in ("fds", "connections", "tasks", "inflight"):
            if after[k] is not None and after[k] > self.before[k]:
                self.failures.append(f"leak: {k} {self.before[k]} before the attack, {after[k]} after")
        grow = (after["rss_kib"] - self.before["rss_kib"]) / 1024
        kept = max(0, after["scrollback_kib"] - self.before["scrollback_kib"]) / 1024
        out["rss_growth_mib"] = round(grow, 1)
        out["scrollback_growth_mib"] = round(kept, 1)  # accepted output the sessions keep, by design
        if grow - kept > RSS_BOUND_MIB:
            self.failures.append(f"daemon RSS grew by {grow:.0f} MiB, {kept:.0f} MiB of it scrollback "
                                 f"(bound: scrollback + {RSS_BOUND_MIB} MiB)")
        await self.admin.close()
        code = await asyncio.to_thread(self.d.stop)
        out["exit_code"] = code
        if code != 0:
            self.failures.append(f"daemon exit code {code} on SIGTERM")
        return out

    def cleanup(self) -> None:
        """Whatever happened: no daemon or healthy process outlives the run."""
        h = self.healthy
        if h is not None and h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(10)
        if self.d.proc is not None and self.d.proc.poll() is None:
            self.d.stop()

    def baseline_rate(self) -> float | None:
        for name, t0, t1 in self.windows:
            if name == "undisturbed":
                return rate_between(self.healthy.result["timeline"], t0, t1)
        return None

    @contextlib.asynccontextmanager
    async def window(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((name, t0, time.monotonic()))

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def target(self, listener: str):
        return {"guest": self.d.socket, "tcp": self.tcp, "control": self.d.control}[listener]

    def valid_handshake(self, listener: str, rnd: random.Random) -> dict:
        if listener == "control":
            return {"role": "client", "session": f"fz-{rnd.randrange(FUZZ_SESSIONS)}"}
        name = f"fz-{rnd.randrange(FUZZ_SESSIONS)}"
        return {"session": name, "token": self.tokens[name], "attach": True}

    async def open_handshaken(self, listener: str, rnd: random.Random) -> Raw:
        p = await Raw.open(self.target(listener))
        res = await p.handshake(self.valid_handshake(listener, rnd))
        if res[0] != "ok":
            raise AssertionError(f"valid handshake on {listener} refused: {res}")
        return p


def model(data: bytes, accepted: bool):
    """What a conforming daemon must do with ``data`` (Python codec, the
    daemon's limits): ('violation', code) | ('peer_error',) |
    ('mid_frame', handshaken) | ('refusal',) | ('clean',)."""
    c = Connection(Side.SERVER, max_payload=DEFAULT_MAX_PAYLOAD, codec_impl=_codec_py, max_handshake=MAX_HANDSHAKE)
    evs = c.receive_data(data)
    handshaken = False
    i = 0
    while i < len(evs):
        ev = evs[i]
        t = type(ev)
        if t is Handshake:
            if not accepted:
                return ("refusal",)
            c.accept(READY, ev.request_id)
            handshaken = True
            evs[i + 1:i + 1] = c.resume()
        elif t is Violation:
            return ("violation", ev.error.code)
        elif t is RemoteErrorEvent:
            return ("peer_error",)
        i += 1
    if c.mid_frame or not handshaken:
        return ("mid_frame", handshaken)
    return ("clean",)


def daemon_log_count(env: Env, pattern: str) -> int:
    return len(re.findall(pattern, env.d.log()))


# --- protocol fuzzing through the live listeners ------------------------------

def _valid_frames(listener: str, rnd: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        k = rnd.randrange(8)
        rid = rnd.randrange(1, 1 << 20)
        if listener == "control":
            if k < 3:
                out.append(frm(T.RPC_REQUEST, rid, {"method": rnd.choice(["vhub.ping", "vhub.sessions",
                                                                          "vhub.stats"]), "params": {}}))
            elif k == 3:
                out.append(frm(T.HEARTBEAT, rid))
            elif k == 4:
                out.append(frm(T.TTY_RESIZE, rid, {"rows": 24, "cols": 80}))
            elif k == 5:
                out.append(frm(T.STREAM_DATA, rid, rnd.randbytes(rnd.randrange(64))))
            elif k == 6:
                out.append(frm(T.RPC_REQUEST, rid, {"method": "agent.nothing", "params": {}}))
            else:
                out.append(frm(T.RPC_RESPONSE, rid, b"{}"))
        else:
            if k < 3:
                out.append(frm(rnd.choice([T.STDOUT, T.STDERR, T.STREAM_DATA]), rid,
                               rnd.randbytes(rnd.randrange(512))))
            elif k == 3:
                out.append(frm(T.HEARTBEAT, rid, rnd.choice([b"", b"pong"])))
            elif k == 4:
                out.append(frm(T.RPC_REQUEST, rid, {"method": "vhub.ping", "params": {}}))
            elif k == 5:
                out.append(frm(T.RPC_REQUEST, rid, {"method": "nobody.serves.this", "params": [1]}))
            elif k == 6:
                out.append(frm(T.RPC_REQUEST, 0, {"event": "progress", "pct": rnd.randrange(100)}))
            else:
                out.append(frm(T.RPC_ERROR, rid, {"code": "x", "message": "unknown id"}))
    return out


KINDS = ["valid", "prefix_garbage", "random_type", "lying_short", "lying_long", "flip", "garbage",
         "huge_length"]


def fuzz_case(env: Env, rnd: random.Random) -> dict:
    """One seeded attack: which listener, the bytes, how they are split, and
    whether the write side is half-closed at the end."""
    listener = rnd.choice(["guest", "tcp", "control"])
    kind = rnd.choice(KINDS)
    hs = frm(T.HANDSHAKE, rnd.randrange(1, 1000), env.valid_handshake(listener, rnd))
    body = b"".join(_valid_frames(listener, rnd, rnd.randrange(0, 6)))
    if kind == "valid":
        data = hs + body
    elif kind == "prefix_garbage":
        data = hs + body + rnd.randbytes(rnd.randrange(1, 64))
    elif kind == "random_type":
        data = hs + body + hdr(rnd.randrange(256), rnd.randrange(32), rnd.getrandbits(64)) + rnd.randbytes(31)
    elif kind == "lying_short":
        n = rnd.randrange(1, 4096)
        data = hs + body + hdr(rnd.choice([T.STDOUT, T.RPC_REQUEST, T.STDERR]), n) + rnd.randbytes(rnd.randrange(n))
    elif kind == "lying_long":
        n = rnd.randrange(0, 64)
        data = hs + body + hdr(rnd.choice([T.STDOUT, T.RPC_REQUEST]), n) + rnd.randbytes(n + rnd.randrange(1, 40))
    elif kind == "flip":
        b = bytearray(hs + body + b"".join(_valid_frames(listener, rnd, 2)))
        for _ in range(rnd.randrange(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        data = bytes(b)
    elif kind == "huge_length":
        data = hs + body + hdr(rnd.choice(sorted(KNOWN_TYPES)), rnd.choice([0xFFFFFFFF, DEFAULT_MAX_PAYLOAD + 1]))
    else:
        data = rnd.randbytes(rnd.randrange(1, 200))
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randrange(0, 6)))) if len(data) > 1 else []
    return {"listener": listener, "kind": kind, "data": data, "cuts": cuts, "handshake": hs,
            "half_close": rnd.random() < 0.2, "delay": rnd.choice([0, 0, 0.001, 0.02])}


async def run_fuzz_case(env: Env, case: dict) -> dict:
    p = await Raw.open(env.target(case["listener"]))
    data, pos = case["data"], 0
    for cut in [*case["cuts"], len(data)]:
        p.send(data[pos:cut])
        pos = cut
        await p.drain()
        if case["delay"]:
            await asyncio.sleep(case["delay"])
    if case["half_close"]:
        await p.half_close()
    sent_at = time.monotonic()
    await p.quiet(0.3, HANDSHAKE_TIMEOUT + SLACK + 1)
    raw = bytes(p.got)
    frames_ = parse_frames(raw)
    accepted = bool(frames_) and frames_[0][0] == T.HANDSHAKE
    exp = model(data, accepted)
    out = {"kind": case["kind"], "listener": case["listener"], "expect": exp[0], "failure": None, "raw": raw}
    limit = max(HANDSHAKE_TIMEOUT, STALL_TIMEOUT) + SLACK + 2
    if exp[0] == "clean" and not case["half_close"]:
        if p.eof or error_code(raw):
            out["failure"] = f"valid conversation closed: {error_code(raw)}"
        out["outcome"] = "open"
        await p.close()
        return out
    eof = await p.until_eof(limit - (time.monotonic() - sent_at))
    raw = bytes(p.got)
    code = error_code(raw)
    took = (p.eof_at or time.monotonic()) - sent_at
    out.update(outcome=code or ("eof" if eof else "open"), seconds=took, raw=raw)
    await p.close()
    if not eof:
        out["failure"] = f"not closed within {limit:.1f} s (expected {exp})"
    elif exp[0] == "violation" and code != exp[1]:
        out["failure"] = f"expected Error {exp[1]}, got {code}"
    elif exp[0] == "refusal" and code not in REFUSALS | PROTOCOL_CODES:
        out["failure"] = f"refused handshake without a refusal Error (got {code})"
    elif exp[0] == "mid_frame" and not case["half_close"]:
        want = "stalled" if exp[1] else "handshake_timeout"
        if code != want:
            out["failure"] = f"expected {want}, got {code}"
    elif exp[0] in ("clean", "peer_error") and code is not None and code not in REFUSALS:
        out["failure"] = f"unexpected Error {code}"
    if out["failure"]:
        out["failure"] += f" [{case['listener']} {case['kind']} half_close={case['half_close']} data={data[:80].hex()}]"
    return out


async def protocol_fuzz(env: Env, cases: int, seed: int = 8, concurrency: int = 64) -> dict:
    rnd = random.Random(seed)
    plan = [fuzz_case(env, rnd) for _ in range(cases)]
    sem = asyncio.Semaphore(concurrency)
    results: list = []
    t0 = time.monotonic()

    async def one(case):
        async with sem:
            try:
                results.append(await run_fuzz_case(env, case))
            except Exception as exc:
                results.append({"kind": case["kind"], "listener": case["listener"], "outcome": "exception",
                                "failure": f"{type(exc).__name__}: {exc}"})

    async with env.window("protocol fuzz"):
        await asyncio.gather(*(one(c) for c in plan))
    fails = [r["failure"] for r in results if r["failure"]]
    env.failures += fails[:20]
    outcomes: dict = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    closes = [r["seconds"] for r in results if "seconds" in r and r["outcome"] in ("stalled", "handshake_timeout")]
    return {"cases": len(results), "bytes": sum(len(c["data"]) for c in plan), "seconds": round(time.monotonic() - t0, 1),
            "failed": len(fails), "outcomes": dict(sorted(outcomes.items(), key=lambda kv: -kv[1])),
            "max_timeout_close_s": round(max(closes), 2) if closes else None, "seed": seed}


# --- adversarial load -------------------------------------------------------------

async def bad_headers(env: Env) -> dict:
    """A corrupt byte at every position of the header, before and after the
    handshake, on every listener, sent alone (only the bytes up to the bad
    one: magic, version, type and length are judged from a partial header)
    and as a whole frame; plus a 4 GiB length for every type."""
    rnd = random.Random(20)
    cases = []
    for listener in ("guest", "tcp", "control"):
        for handshaken in (False, True):
            hs = frm(T.HANDSHAKE, 5, env.valid_handshake(listener, rnd)) if handshaken else b""
            base = (frm(T.RPC_REQUEST, 77, {"method": "vhub.ping", "params": {}}) if handshaken
                    else frm(T.HANDSHAKE, 77, env.valid_handshake(listener, rnd)))
            for pos in range(HEADER_SIZE):
                for value in sorted({base[pos] ^ 0xFF, 0x00, 0x7F} - {base[pos]}):
                    bad = bytearray(base)
                    bad[pos] = value
                    for data, mode in ((bytes(bad[:pos + 1]), "alone"), (bytes(bad), "frame")):
                        cases.append({"listener": listener, "kind": f"byte {pos}={value:#04x} {mode}",
                                      "data": hs + data, "cuts": [len(hs)] if hs else [], "half_close": False,
                                      "delay": 0.05 if hs else 0, "ping": handshaken and mode == "frame",
                                      "rid": HEADER.unpack_from(bad)[5]})
            for t in sorted(KNOWN_TYPES) + [0x7F]:
                cases.append({"listener": listener, "kind": f"4GiB type {t:#04x}", "data": hs + hdr(t, 0xFFFFFFFF),
                              "cuts": [len(hs)] if hs else [], "half_close": False, "delay": 0.05 if hs else 0,
                              "ping": False})
    sem = asyncio.Semaphore(256)
    results = []

    async def one(case):
        async with sem:
            r = await run_fuzz_case(env, case)
            if case["ping"] and case["rid"] and r["expect"] == "clean" and not r["failure"]:
                # a whole ping with odd flags or request_id is still answered, its id kept
                if not any(f[0] == T.RPC_RESPONSE and f[1] == case["rid"] for f in parse_frames(r["raw"])):
                    r["failure"] = f"no answer to a valid ping ({case['kind']}) on {case['listener']}"
            results.append(r)

    t0 = time.monotonic()
    async with env.window("bad headers"):
        await asyncio.gather(*(one(c) for c in cases))
    bad = [r for r in results if r["failure"]]
    env.failures += [f"bad headers: {r['failure']}" for r in bad[:10]]
    fast = [r["seconds"] for r in results if r["expect"] == "violation" and "seconds" in r]
    outcomes: dict = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    return {"connections": len(results), "failed": len(bad), "seconds": round(time.monotonic() - t0, 1),
            "violations": len(fast), "outcomes": outcomes,
            "max_violation_close_s": round(max(fast), 3) if fast else None}


async def handshake_flood(env: Env, n: int, concurrency: int = 200) -> dict:
    """``n`` handshakes at once across the listeners: good ones accepted, and
    every way for a guest to reach another session or the control plane
    refused with its code and logged."""
    other = await env.register("flood-other")
    fz0 = env.tokens["fz-0"]
    kinds = [
        ("guest", {"session": "fz-0", "token": fz0, "attach": True}, "ok"),
        ("tcp", {"session": "fz-0", "token": fz0, "attach": True}, "ok"),
        ("control", {"role": "client", "session": "fz-1"}, "ok"),
        ("guest", {"session": "fz-0", "token": "0" * 32, "attach": True}, "bad_token"),  # wrong token
        ("tcp", {"session": "healthy", "token": other}, "bad_token"),  # forged: another session's token
        ("guest", {"session": "healthy", "token": fz0}, "bad_token"),
        ("guest", {"session": "no-such-session", "token": fz0}, "unknown_session"),
        ("guest", {"role": "client", "session": "healthy"}, "wrong_role"),  # client role on the guest socket
        ("tcp", {"role": "client", "session": "*"}, "wrong_role"),
        ("control", {"session": "healthy", "token": env.tokens["healthy"]}, "wrong_role"),  # guest on control
        ("control", b"", "wrong_role"),
        ("tcp", b"", "token_required"),
        ("guest", b"[1,2]", "bad_handshake"),
    ]
    refusals_logged_before = daemon_log_count(env, r"refused peer=")
    counted_before = sum((await env.stats()).get("refused_by_code", {}).values())
    sem = asyncio.Semaphore(concurrency)
    results: dict = {}
    wrong = []
    t0 = time.monotonic()

    async def one(i):
        listener, payload, want = kinds[i % len(kinds)]
        async with sem:
            p = await Raw.open(env.target(listener))
            res = await p.handshake(payload, rid=i + 1)
            got = "ok" if res[0] == "ok" else res[1] if res[0] == "error" else "closed"
            if want != "ok":
                eof = await p.until_eof(5)
                if not eof:
                    got += " (not closed)"
            results[got] = results.get(got, 0) + 1
            if got != want:
                wrong.append((listener, payload, want, got))
            await p.close()

    async with env.window("handshake flood"):
        await asyncio.gather(*(one(i) for i in range(n)))
    took = time.monotonic() - t0
    expected_refusals = sum(1 for i in range(n) if kinds[i % len(kinds)][2] != "ok")
    await asyncio.sleep(1.5)  # the rate-limited log's summary line comes within a second
    logged = daemon_log_count(env, r"refused peer=") - refusals_logged_before
    summarized = sum(int(m) for m in re.findall(r"(\d+) more refusals in the last", env.d.log()))
    counted = sum((await env.stats()).get("refused_by_code", {}).values()) - counted_before
    for w in wrong[:10]:
        env.failures.append(f"handshake flood: {w[0]} {w[1]!r}: expected {w[2]}, got {w[3]}")
    # every refusal is counted by code; the log shows them at a bounded rate, and says how many it left out
    env.check(counted >= expected_refusals, f"refusals counted {counted} < refused {expected_refusals}")
    env.check(logged <= 60 + 20 * took + 10, f"{logged} refusal lines for a {took:.1f} s flood: not rate-limited")
    env.check(logged + summarized >= expected_refusals,
              f"refusal lines {logged} + summarized {summarized} < refused {expected_refusals}")
    return {"handshakes": n, "seconds": round(took, 1), "per_s": round(n / took), "outcomes": results,
            "refused": expected_refusals, "refusals_logged": logged, "refusals_summarized": summarized,
            "refusals_counted": counted, "wrong": len(wrong)}


async def slowloris(env: Env, n: int) -> dict:
    """Peers that send one byte a second: before the handshake (a handshake
    frame, dripped), and after it (a frame, dripped). Each must get its
    Error within its timeout (+ tick and slack) while still dripping."""
    rnd = random.Random(3)
    results = []

    async def one(i):
        listener = ("guest", "tcp", "control")[i % 3]
        handshaken = i % 2 == 1
        if handshaken:
            p = await env.open_handshaken(listener, rnd)
            data = frm(T.RPC_REQUEST, 9, {"method": "vhub.ping", "params": {"pad": "x" * 40}})
            want, timeout = "stalled", STALL_TIMEOUT
        else:
            p = await Raw.open(env.target(listener))
            data = frm(T.HANDSHAKE, 9, env.valid_handshake(listener, rnd))
            want, timeout = "handshake_timeout", HANDSHAKE_TIMEOUT
        mark = len(p.got)
        t0 = time.monotonic()
        limit = timeout + STALL_TIMEOUT + SLACK + 1  # the stall rule looks at a whole window
        sent = 0
        while not p.eof and time.monotonic() - t0 < limit and sent < len(data):
            p.send(data[sent:sent + 1])
            sent += 1
            await p.read_some(1.0)
        await p.until_eof(max(0.1, limit - (time.monotonic() - t0)))
        took = (p.eof_at or time.monotonic()) - t0
        code = error_code(bytes(p.got[mark:]))
        results.append((listener, want, code, p.eof, took, sent))
        await p.close()

    async with env.window("slowloris"):
        await asyncio.gather(*(one(i) for i in range(n)))
    for r in results:
        env.check(r[3] and r[2] == r[1], f"slowloris on {r[0]}: expected {r[1]} and a close, got {r[2]} "
                                         f"(closed={r[3]}, {r[4]:.1f} s, {r[5]} bytes dripped)")
    pre = [r[4] for r in results if r[1] == "handshake_timeout"]
    post = [r[4] for r in results if r[1] == "stalled"]
    return {"connections": n, "max_close_before_handshake_s": round(max(pre), 1) if pre else None,
            "max_close_mid_frame_s": round(max(post), 1) if post else None,
            "max_bytes_dripped": max(r[5] for r in results), "failed": sum(1 for r in results if not (r[3] and r[2] == r[1]))}


async def held_mid_frame(env: Env, n: int) -> dict:
    """Headers that claim 16 MiB (RpcRequest, Stdout cut-through, Handshake),
    a few bytes of payload, then nothing: the daemon must not allocate what
    the header claims, and closes each one when its timeout passes (a handshake
    that large is refused from its header at once)."""
    rnd = random.Random(4)
    peers = []
    rss0 = env.d.rss_kib()
    for i in range(n):
        listener = ("guest", "tcp", "control")[i % 3]
        kind = i % 3
        if kind == 0:
            p = await Raw.open(env.target(listener))
            p.send(hdr(T.HANDSHAKE, DEFAULT_MAX_PAYLOAD, 1) + b"{" * 100)
            want = "frame_too_large"
        else:
            p = await env.open_handshaken(listener, rnd)
            t = T.RPC_REQUEST if kind == 1 else (T.STREAM_DATA if listener == "control" else T.STDOUT)
            p.send(hdr(t, DEFAULT_MAX_PAYLOAD, 5) + b"x" * 100)
            want = "stalled"
        peers.append((p, len(p.got), want, time.monotonic()))
    await asyncio.sleep(1.0)
    rss_held = env.d.rss_kib()
    growth = (rss_held - rss0) / 1024
    env.check(growth < RSS_BOUND_MIB, f"{n} headers claiming 16 MiB grew the daemon by {growth:.0f} MiB")
    results = []

    async def wait(p, mark, want, t0):
        eof = await p.until_eof(max(HANDSHAKE_TIMEOUT, STALL_TIMEOUT) + SLACK + 2)
        results.append((want, error_code(bytes(p.got[mark:])), eof, (p.eof_at or time.monotonic()) - t0))
        await p.close()

    async with env.window("held mid-frame"):
        await asyncio.gather(*(wait(*x) for x in peers))
    bad = [r for r in results if not (r[2] and r[1] == r[0])]
    for r in bad[:10]:
        env.failures.append(f"held mid-frame: expected {r[0]}, got {r[1]} (closed={r[2]})")
    return {"connections": n, "claimed_mib": n * 16, "rss_growth_while_held_mib": round(growth, 1),
            "max_close_s": round(max(r[3] for r in results), 1), "failed": len(bad)}


async def connect_close(env: Env, n: int, rounds: int = 1) -> dict:
    """``n`` connections opened at once across the listeners and closed in
    every way (right away, mid-header, after the handshake, mid-frame, with a
    RST), ``rounds`` times; the daemon's connection count comes back down."""
    rnd = random.Random(5)
    done = {"total": 0, "refused": 0}
    t0 = time.monotonic()

    async def one(i):
        listener = ("guest", "tcp", "control")[i % 3]
        how = (i // 3) % 5
        try:
            p = await Raw.open(env.target(listener), timeout=30)
        except OSError:
            done["refused"] += 1
            return
        if how == 1:
            p.send(frm(T.HANDSHAKE, 1)[:7])
        elif how >= 2:
            p.send(frm(T.HANDSHAKE, 1, env.valid_handshake(listener, rnd)))
            await p.frame(lambda f: f[0] in (T.HANDSHAKE, T.ERROR), 10)
            if how == 3:
                p.send(hdr(T.RPC_REQUEST, 100, 3) + b"{")
        await p.drain()
        if how == 4:
            p.abort()
        else:
            await p.close()
        done["total"] += 1

    async with env.window("connect/close"):
        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(n)))
    took = time.monotonic() - t0
    after = await env.settle(20)
    env.check(after["connections"] <= env.before["connections"],
              f"connections did not come back down: {env.before['connections']} -> {after['connections']}")
    return {"connections": n * rounds, "concurrent": n, "seconds": round(took, 1),
            "cycles_per_s": round(n * rounds / took), "refused_by_kernel": done["refused"],
            "connections_after": after["connections"]}


async def rpc_flood(env: Env, n: int) -> dict:
    """Unanswered ids both ways: ``n`` client calls to an agent that never
    answers, ``n`` guest calls to a handler that never answers, ``n`` answers
    to ids nobody asked. Every call gets RpcError timeout, or, past the
    1,024 calls a connection may have in flight, too_many_requests at once; the
    pending maps empty again."""
    token = await env.register("rpcsink")
    agent = await Raw.open(env.d.socket)
    assert (await agent.handshake({"session": "rpcsink", "token": token}))[0] == "ok"
    caller = await Raw.open(env.d.control)
    assert (await caller.handshake({"role": "client", "session": "rpcsink"}))[0] == "ok"
    handler = await Raw.open(env.d.control)
    assert (await handler.handshake({"role": "client", "session": "rpcsink", "serve": ["slow.*"]}))[0] == "ok"
    t0 = time.monotonic()
    async with env.window("rpc flood"):
        caller.send(b"".join(frm(T.RPC_REQUEST, i + 1, {"method": "agent.never", "params": {"i": i}})
                             for i in range(n)))
        agent.send(b"".join(frm(T.RPC_REQUEST, i + 1, {"method": "slow.never", "params": {"i": i}})
                            for i in range(n)))
        agent.send(b"".join(frm(T.RPC_RESPONSE, (1 << 40) + i, b"{}") for i in range(n)))
        handler.send(b"".join(frm(T.RPC_ERROR, (1 << 40) + i, {"code": "x", "message": "y"}) for i in range(n)))
        await asyncio.gather(caller.drain(), agent.drain(), handler.drain())
        peak = (await env.stats()).get("inflight_rpcs")

        def answered(p: Raw) -> tuple[int, int]:
            fs = [f for f in parse_frames(bytes(p.got)) if f[0] == T.RPC_ERROR]
            return (sum(1 for f in fs if b'"timeout"' in f[2]), sum(1 for f in fs if b'"too_many_requests"' in f[2]))

        async def timeouts(p: Raw, want: int) -> tuple[int, int]:
            deadline = time.monotonic() + RPC_TIMEOUT + 15
            while time.monotonic() < deadline:
                if sum(answered(p)) >= want:
                    break
                await p.read_some(0.5)
            return answered(p)

        # the agent and the handler must keep reading (they are not slow, only silent)
        reader = asyncio.ensure_future(handler.quiet(RPC_TIMEOUT + 5, RPC_TIMEOUT + 15))
        got_client, got_guest = await asyncio.gather(timeouts(caller, n), timeouts(agent, n))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    drained = await env.resources()  # the three peers are still connected: only the timeouts emptied it
    capped = min(n, 1024)  # Limits.max_inflight: the rest are refused at once
    for who, (tmo, tmr) in (("client calls to a silent agent", got_client), ("guest calls to a silent handler",
                                                                             got_guest)):
        env.check(tmo == capped and tmr == n - capped,
                  f"{who}: {tmo} RpcError timeout (want {capped}), {tmr} too_many_requests (want {n - capped})")
    env.check(not drained["inflight"], f"pending RPCs after the timeouts: {drained['inflight']}")
    env.check(peak <= 2 * capped, f"pending RPCs peaked at {peak}, past the caps (2 x {capped})")
    for p in (agent, caller, handler):
        await p.close()
    return {"calls": 2 * n, "stray_answers": 2 * n, "peak_inflight": peak,
            "timeouts": got_client[0] + got_guest[0], "too_many_requests": got_client[1] + got_guest[1],
            "inflight_after": drained["inflight"], "seconds": round(time.monotonic() - t0, 1)}


async def heartbeat_ignored(env: Env) -> dict:
    """A guest that answered pongs and then goes silent is closed with
    heartbeat_timeout after 3 heartbeat intervals; a Blink-style guest that
    never answered pings (and is idle) is kept."""
    token = await env.register("hb-silent")
    rnd = random.Random(6)
    g = await Raw.open(env.d.socket)
    assert (await g.handshake({"session": "hb-silent", "token": token}))[0] == "ok"
    mute = await env.open_handshaken("guest", rnd)
    mark = len(g.got)
    t_end = time.monotonic() + 2.5 * HEARTBEAT
    pongs = 0
    seen = 0
    while time.monotonic() < t_end:  # a good citizen: answer every ping
        await g.read_some(0.1)
        fs = parse_frames(bytes(g.got[mark:]))
        for mt, rid, payload in fs[seen:]:
            if mt == T.HEARTBEAT and payload != b"pong":
                g.send(frm(T.HEARTBEAT, rid, b"pong"))
                pongs += 1
        seen = len(fs)
    silent_at = time.monotonic()
    async with env.window("heartbeat ignored"):
        eof = await g.until_eof(3 * HEARTBEAT + SLACK + 2)  # reads, never answers
    took = (g.eof_at or time.monotonic()) - silent_at
    code = error_code(bytes(g.got[mark:]))
    env.check(pongs > 0, "the daemon never pinged an idle guest")
    env.check(eof and code == "heartbeat_timeout", f"silent guest: expected heartbeat_timeout, got {code} (closed={eof})")
    await mute.read_some(0.1)
    kept = not mute.eof
    env.check(kept, "a guest that never answered pings was closed")
    await g.close()
    await mute.close()
    return {"pongs_before_silence": pongs, "closed_after_s": round(took, 1), "code": code,
            "dead_after_s": 3 * HEARTBEAT, "never_ponged_guest_kept": kept}


async def slow_subscribers(env: Env, mib: int) -> dict:
    """A session whose guest streams ``mib`` MiB to three subscribers: one
    lossy that never reads (dropped with slow_consumer), one lossless that
    reads nothing for 2 s (the guest is paused, nothing lost) and one that
    reads at full speed; all of it beside the healthy stream of another
    session."""
    token = await env.register("slowsub")
    lossy = await Raw.open(env.d.control)
    res = await lossy.handshake({"role": "client", "session": "slowsub", "subscribe": ["stdout"], "flow": "lossy"})
    assert res[0] == "ok", res
    subs = []
    for _ in range(2):
        p = await Raw.open(env.d.control)
        assert (await p.handshake({"role": "client", "session": "slowsub", "subscribe": ["stdout"]}))[0] == "ok"
        subs.append(p)
    g = await Raw.open(env.d.socket)
    assert (await g.handshake({"session": "slowsub", "token": token}))[0] == "ok"
    rnd = random.Random(7)
    total = mib << 20
    sent = hashlib.sha256()
    state = {"payload": 0, "wire": 0, "at_2s": None, "done": False}

    async def produce():
        while state["payload"] < total:
            n = min(65536, total - state["payload"])
            f = frm(T.STDOUT, 1, rnd.randbytes(n))
            g.send(f)
            sent.update(f)
            state["payload"] += n
            state["wire"] += len(f)
            await g.drain()
        state["done"] = True

    async def read_all(p: Raw, start_after: float) -> StreamHasher:
        await asyncio.sleep(start_after)
        hs = StreamHasher(kinds=(T.STDOUT,))
        out = hs.feed(bytes(p.got[p.hs_end:]))
        p.got.clear()
        deadline = time.monotonic() + 120
        while not (state["done"] and hs.n >= state["wire"]) and not p.eof and time.monotonic() < deadline:
            d = await p.read_some(1.0)
            p.got.clear()
            out = hs.feed(d)
            if out:
                p.send(out)
        return hs

    async def watch():
        await asyncio.sleep(2.0)
        state["at_2s"] = state["payload"]

    t0 = time.monotonic()
    async with env.window("slow subscribers"):
        prod = asyncio.ensure_future(produce())
        lazy, fast, _ = await asyncio.gather(read_all(subs[0], 2.0), read_all(subs[1], 0), watch())
        await asyncio.wait_for(prod, 60)
    took = time.monotonic() - t0
    await lossy.until_eof(10)
    lossy_code = error_code(bytes(lossy.got))
    stats = await env.stats()
    env.check(lazy.hexdigest() == sent.hexdigest(), f"lossless subscriber that paused lost bytes ({lazy.n} received)")
    env.check(fast.hexdigest() == sent.hexdigest(), f"fast subscriber lost bytes ({fast.n} received)")
    env.check(lossy.eof, "the lossy subscriber that never reads was not disconnected")
    env.check(stats["counters"]["slow_consumers"] >= 1, "no slow_consumer recorded")
    env.check(state["at_2s"] is not None and state["at_2s"] < total,
              "the guest was not paused by a lossless subscriber that did not read")
    for p in (lossy, *subs, g):
        await p.close()
    return {"streamed_mib": mib, "subscribers": 3, "seconds": round(took, 1),
            "guest_sent_while_paused_mib": round((state["at_2s"] or 0) / (1 << 20), 1),
            "lossy_dropped": lossy.eof, "lossy_error": lossy_code,
            "lossless_intact": lazy.hexdigest() == sent.hexdigest() == fast.hexdigest()}


# The processes an attack starts stand for programs in other sandboxes, with CPUs
# of their own: niced, so that starting 20 Pythons at once on a 2-CPU host does
# not count against the daemon in the healthy stream's throughput.
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []

KILLED_CLIENT = r"""
import json, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from vhubd.protocol import encode_frame
path, method = sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(encode_frame(1, 1, json.dumps({"role": "client", "session": "vanish", "serve": [method]}).encode()))
got = s.recv(65536)
print("serving", flush=True)
while method.encode() not in got:  # its call
    got += s.recv(65536)
s.sendall(struct.pack("<IBBHIQ", 0x424C494E, 1, 0x11, 0, 4096, 7) + b"{")  # half an answer
print("answering", flush=True)
time.sleep(120)
"""

KILLED_GUEST = r"""
import hashlib, json, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from vhubd.protocol import encode_frame
path, session, token, frames = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(encode_frame(1, 1, json.dumps({"session": session, "token": token}).encode()))
s.recv(65536)
h = hashlib.sha256()
for i in range(frames):
    f = encode_frame(0x30, i, bytes([i % 251]) * (1 + (i * 7919) % 30000))
    s.sendall(f)
    h.update(f)
s.sendall(struct.pack("<IBBHIQ", 0x424C494E, 1, 0x30, 0, 50000, frames) + b"partial" * 100)
print(h.hexdigest(), flush=True)
time.sleep(120)
"""


async def vanishing_handlers(env: Env, n: int, killed: int) -> dict:
    """Host clients that serve a method, get a call and vanish: ``n`` close
    (half of them with a RST), ``killed`` are processes SIGKILLed while
    sending half an answer. The guest gets handler_lost for every call."""
    token = await env.register("vanish")
    agent = await Raw.open(env.d.socket)
    res = await agent.handshake({"session": "vanish", "token": token})
    env.check(res[0] == "ok", f"rpcsink agent refused: {res}")
    handlers = []
    for i in range(n):
        h = await Raw.open(env.d.control)
        await h.handshake({"role": "client", "session": "vanish", "serve": [f"gone.{i}"]})
        handlers.append(h)
    procs = []
    for i in range(killed):
        pr = subprocess.Popen([*NICE, sys.executable, "-c", KILLED_CLIENT, str(ROOT), env.d.control, f"killed.{i}"],
                              stdout=subprocess.PIPE)
        procs.append(pr)
    for pr in procs:
        await asyncio.wait_for(asyncio.to_thread(pr.stdout.readline), 30)  # serving
    t0 = time.monotonic()
    async with env.window("vanishing handlers"):
        calls = [f"gone.{i}" for i in range(n)] + [f"killed.{i}" for i in range(killed)]
        agent.send(b"".join(frm(T.RPC_REQUEST, 1000 + i, {"method": m, "params": {}}) for i, m in enumerate(calls)))
        await agent.drain()
        for i, h in enumerate(handlers):  # each got its call; now it vanishes without answering
            await h.frame(lambda f: f[0] == T.RPC_REQUEST, 10)
            if i % 2:
                h.abort()
            else:
                await h.close()
        for pr in procs:  # each got its call and wrote half an answer: killed mid-frame
            await asyncio.wait_for(asyncio.to_thread(pr.stdout.readline), 30)
            pr.send_signal(signal.SIGKILL)
            await asyncio.to_thread(pr.wait, 10)
            pr.stdout.close()
        want = len(calls)
        deadline = time.monotonic() + 15
        lost = 0
        while time.monotonic() < deadline:
            lost = sum(1 for f in parse_frames(bytes(agent.got)) if f[0] == T.RPC_ERROR and b"handler_lost" in f[2])
            if lost >= want:
                break
            await agent.read_some(0.5)
    env.check(lost == want, f"handler_lost for {lost}/{want} calls whose handler vanished")
    timeouts = sum(1 for f in parse_frames(bytes(agent.got)) if f[0] == T.RPC_ERROR and b'"timeout"' in f[2])
    await agent.close()
    return {"handlers": n, "killed_processes": killed, "calls": want, "handler_lost": lost,
            "timeouts_instead": timeouts, "seconds": round(time.monotonic() - t0, 1)}


async def killed_guests(env: Env, k: int) -> dict:
    """Guest processes that stream complete frames, then half a frame, and are
    SIGKILLed: a lossless subscriber gets exactly the complete frames (sha256),
    never the partial one; the scrollback replays a tail of whole frames."""
    results = []
    t0 = time.monotonic()

    async def one(i):
        name = f"killed-{i}"
        token = await env.register(name)
        sub = await Raw.open(env.d.control)
        await sub.handshake({"role": "client", "session": name, "subscribe": ["stdout"]})
        hs = StreamHasher(kinds=(T.STDOUT,))
        hs.feed(bytes(sub.got[sub.hs_end:]))
        sub.got.clear()
        frames_ = 50 + 10 * i
        want = sum(HEADER_SIZE + 1 + (j * 7919) % 30000 for j in range(frames_))
        pr = subprocess.Popen([*NICE, sys.executable, "-c", KILLED_GUEST, str(ROOT), env.d.socket, name, token,
                               str(frames_)], stdout=subprocess.PIPE)

        async def read_until_all():  # a lossless subscriber: the guest goes on only as it reads
            deadline = time.monotonic() + 60
            while hs.n < want and not sub.eof and time.monotonic() < deadline:
                d = await sub.read_some(1)
                sub.got.clear()
                sub.send(hs.feed(d))

        reader = asyncio.ensure_future(read_until_all())
        try:
            line = await asyncio.wait_for(asyncio.to_thread(pr.stdout.readline), 60)
        finally:
            pr.send_signal(signal.SIGKILL)  # it sent its complete frames and half of one more
            await asyncio.to_thread(pr.wait, 10)
            pr.stdout.close()
        sha = line.decode().strip()
        await reader
        while True:  # nothing more may come: the partial frame is dropped
            d = await sub.read_some(0.5)
            sub.got.clear()
            if not d:
                break
            sub.send(hs.feed(d))
        ok = hs.hexdigest() == sha and hs.n == want
        replay = await Raw.open(env.d.control)
        await replay.handshake({"role": "client", "session": name, "subscribe": ["stdout"], "replay": True})
        await replay.quiet(0.3, 5)
        tail = [f for f in parse_frames(bytes(replay.got)) if f[0] == T.STDOUT]
        tail_ok = bool(tail) and tail[-1][1] == frames_ - 1 and all(b"partial" not in f[2] for f in tail)
        results.append((name, ok, hs.n, want, tail_ok))
        for p in (sub, replay):
            await p.close()

    async with env.window("killed guests"):
        await asyncio.gather(*(one(i) for i in range(k)))
    for r in results:
        env.check(r[1], f"{r[0]}: the subscriber did not get exactly the complete frames ({r[2]} of {r[3]} bytes)")
        env.check(r[4], f"{r[0]}: the scrollback does not end with the last complete frame")
    return {"guests_killed": k, "bytes_delivered": sum(r[2] for r in results),
            "intact": sum(1 for r in results if r[1] and r[4]), "seconds": round(time.monotonic() - t0, 1)}


async def shared_session(env: Env, mib: int, guests: int = 4) -> dict:
    """One session, several guest connections at once (the agent and attached
    programs), each streaming small and cut-through-sized (> 256 KiB) frames
    in split writes, to a fast and a slow lossless subscriber: every
    subscriber gets every guest's frames whole and in that guest's order."""
    token = await env.register("shared")
    subs = []
    for _ in range(2):
        p = await Raw.open(env.d.control)
        assert (await p.handshake({"role": "client", "session": "shared", "subscribe": ["stdout", "stderr"]}))[0] == "ok"
        subs.append(p)
    peers = []
    for i in range(guests):
        g = await Raw.open(env.d.socket)
        hs = {"session": "shared", "token": token, **({"attach": True} if i else {})}
        assert (await g.handshake(hs))[0] == "ok"
        peers.append(g)
    budget = (mib << 20) // guests
    sent = [hashlib.sha256() for _ in range(guests)]
    counts = [0] * guests

    async def produce(i: int, g: Raw):
        rnd = random.Random(100 + i)
        n = 0
        while n < budget:
            size = rnd.choice([100, 5000, 60000, 300_000, 1_000_000])
            f = frm(T.STDOUT if rnd.random() < 0.8 else T.STDERR, i, bytes([rnd.randrange(256)]) * size)
            sent[i].update(f[HEADER_SIZE:])
            counts[i] += 1
            n += size
            pos = 0
            while pos < len(f):  # split writes, so frames of different guests overlap in time
                k = rnd.randrange(1, 200_000)
                g.send(f[pos:pos + k])
                pos += k
                await g.drain()
                if rnd.random() < 0.3:
                    await asyncio.sleep(0.002)

    async def consume(p: Raw, slow: bool):
        """Checks every guest's frames; the slow one also calls vhub.ping all
        along (its answers must not land inside a frame)."""
        conn = Connection(Side.CLIENT, cut_through=1 << 62, max_payload=0xFFFFFFFF)
        conn.send_handshake()
        conn.receive_data(bytes(p.got[:p.hs_end]))
        rest = bytes(p.got[p.hs_end:])
        p.got.clear()
        got = [hashlib.sha256() for _ in range(guests)]
        seen = [0] * guests
        bad = []
        calls = {"sent": 0, "answered": 0}

        def feed(d):
            for ev in conn.receive_data(d):
                items = ev.frames() if type(ev) is StreamRun else [ev] if type(ev) is Frame else []
                for f in items:
                    mt, rid, data = f.msg_type, f.request_id, f.data
                    if mt == T.RPC_RESPONSE:
                        calls["answered"] += 1
                    if mt in (T.STDOUT, T.STDERR):
                        if rid < guests:
                            got[rid].update(data[HEADER_SIZE:])
                            seen[rid] += 1
                        else:
                            bad.append(rid)
                if type(ev) is Violation:
                    bad.append(ev.error.code)
            out = conn.data_to_send()
            if out:
                p.send(b"".join(out))

        feed(rest)
        deadline = time.monotonic() + 120
        while not (done.is_set() and seen == counts) and not p.eof and not bad and time.monotonic() < deadline:
            d = await p.read_some(0.5)
            p.got.clear()
            feed(d)
            if slow:
                calls["sent"] += 1
                p.send(frm(T.RPC_REQUEST, calls["sent"], {"method": "vhub.ping", "params": {}}))
                await asyncio.sleep(0.003)
        deadline = time.monotonic() + 10
        while calls["answered"] < calls["sent"] and not p.eof and time.monotonic() < deadline:
            d = await p.read_some(0.5)
            p.got.clear()
            feed(d)
        if calls["answered"] != calls["sent"]:
            bad.append(f"{calls['answered']} of {calls['sent']} vhub.ping answered")
        return [h.hexdigest() for h in got], seen, bad

    done = asyncio.Event()
    t0 = time.monotonic()
    async with env.window("shared session"):
        readers = [asyncio.ensure_future(consume(p, i == 1)) for i, p in enumerate(subs)]
        await asyncio.gather(*(produce(i, g) for i, g in enumerate(peers)))
        done.set()
        results = await asyncio.gather(*readers)
    want = [h.hexdigest() for h in sent]
    for k, (shas, seen, bad) in enumerate(results):
        env.check(not bad, f"shared session: subscriber {k} got a corrupt stream ({bad[:3]})")
        env.check(shas == want and seen == counts,
                  f"shared session: subscriber {k} got {seen} frames of {counts}, per-guest sha equal: "
                  f"{[a == b for a, b in zip(shas, want, strict=True)]}")
    for p in (*subs, *peers):
        await p.close()
    return {"guests": guests, "subscribers": len(subs), "streamed_mib": mib, "frames": sum(counts),
            "seconds": round(time.monotonic() - t0, 1), "intact": all(r[0] == want and not r[2] for r in results)}


# =============================================================================
# Part 3: campaigns (CI: one scenario per test; script: all of them, full size)
# =============================================================================

SCENARIOS = {
    "protocol_fuzz": lambda env, s: protocol_fuzz(env, s["fuzz_cases"]),
    "bad_headers": lambda env, s: bad_headers(env),
    "handshake_flood": lambda env, s: handshake_flood(env, s["flood"]),
    "slowloris": lambda env, s: slowloris(env, s["slowloris"]),
    "held_mid_frame": lambda env, s: held_mid_frame(env, s["held"]),
    "connect_close": lambda env, s: connect_close(env, s["cycles"], s.get("cycle_rounds", 1)),
    "rpc_flood": lambda env, s: rpc_flood(env, s["rpc_calls"]),
    "heartbeat_ignored": lambda env, s: heartbeat_ignored(env),
    "slow_subscribers": lambda env, s: slow_subscribers(env, s["slow_mib"]),
    "vanishing_handlers": lambda env, s: vanishing_handlers(env, s["handlers"], s["killed"]),
    "killed_guests": lambda env, s: killed_guests(env, s["killed"]),
    "shared_session": lambda env, s: shared_session(env, s["shared_mib"]),
    **UNTRUSTED,
}


async def campaign(tmp: Path, names: list[str], size: dict, healthy: bool = True, rate: int | None = None) -> dict:
    """Run scenarios one after the other against one daemon, with the healthy
    stream beside them (at ``rate`` bytes/s, default the size's
    ``healthy_rate``; 0: unpaced); ``failures`` lists everything that did not hold."""
    env = Env(tmp, rate=size["healthy_rate"] if rate is None else rate)
    await env.start(healthy=healthy)
    results: dict = {}
    try:
        if healthy and size.get("baseline_s"):
            async with env.window("undisturbed"):
                await asyncio.sleep(size["baseline_s"])
        for name in names:
            t0 = time.monotonic()
            try:
                results[name] = await asyncio.wait_for(SCENARIOS[name](env, size), 300)
            except Exception as exc:
                env.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                results[name] = {"error": repr(exc)}
            results[name]["wall_s"] = round(time.monotonic() - t0, 1)
            if not env.alive():
                env.failures.append(f"the daemon died during {name}")
                break
    finally:
        try:
            summary = await env.finish() if env.alive() else {"alive": False}
        finally:
            env.cleanup()
    return {"scenarios": results, "summary": summary, "failures": env.failures, "log": env.d.logpath}


def run_campaign(tmp: Path, names: list[str], size: dict = QUICK, healthy: bool = True,
                 rate: int | None = None) -> dict:
    return asyncio.run(asyncio.wait_for(campaign(tmp, names, size, healthy, rate), 3600))


# =============================================================================
# The healthy stream worker (a subprocess of Healthy)
# =============================================================================

async def _healthy_main(args) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fd = sys.stdin.fileno()

    def on_stdin():
        if not os.read(fd, 1 << 16):
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, on_stdin)
    sub = await Raw.open(args.control)
    res = await sub.handshake({"role": "client", "session": args.session, "subscribe": ["stdout", "stderr"]})
    assert res[0] == "ok", res
    g = await Raw.open(args.guest)
    res = await g.handshake({"session": args.session, "token": args.token})
    assert res[0] == "ok", res
    rx = StreamHasher()
    pongs = StreamHasher(kinds=())  # the guest side: only answers the daemon's pings
    pongs.feed(bytes(g.got[g.hs_end:]))
    g.got.clear()
    rx.feed(bytes(sub.got[sub.hs_end:]))
    sub.got.clear()
    print("ready", flush=True)
    rnd = random.Random(11)
    sent = hashlib.sha256()
    state = {"sent": 0, "done_at": None}
    timeline: list = []
    t_start = time.monotonic()

    async def send():
        i = 0
        due = time.monotonic()
        while not stop.is_set():
            batch, n = [], 0
            while n < 256 * 1024:
                size = rnd.choice([64, 512, 4096, 32768, 65536])
                f = frm(T.STDOUT if i % 4 else T.STDERR, i, bytes([i % 251]) * size)
                batch.append(f)
                n += len(f)
                i += 1
            data = b"".join(batch)
            g.send(data)
            sent.update(data)
            state["sent"] += len(data)
            await g.drain()
            if args.rate:  # paced: a steady agent; a backlog of more than 0.5 s is not made up
                due += len(data) / args.rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > 0.5:
                    due = now

    async def guest_reader():
        while not g.eof:
            d = await g.read_some(1.0)
            g.got.clear()
            if d:
                out = pongs.feed(d)
                if out:
                    g.send(out)

    async def receive():
        last = 0.0
        while not sub.eof:
            if state["done_at"] is not None and (rx.n >= state["sent"] or time.monotonic() > state["done_at"] + 60):
                break
            d = await sub.read_some(0.5)
            sub.got.clear()
            if d:
                out = rx.feed(d)
                if out:
                    sub.send(out)
            now = time.monotonic()
            if now - last >= 0.05:
                timeline.append((now, rx.n))
                last = now
        timeline.append((time.monotonic(), rx.n))

    receiver = asyncio.ensure_future(receive())
    greader = asyncio.ensure_future(guest_reader())
    error = None
    try:
        await send()
    except Exception as exc:
        error = repr(exc)
    state["done_at"] = time.monotonic()
    await receiver
    greader.cancel()
    seconds = state["done_at"] - t_start
    print(json.dumps({"sent_bytes": state["sent"], "received_bytes": rx.n, "seconds": seconds,
                      "lossless": rx.n == state["sent"] and sent.hexdigest() == rx.hexdigest(),
                      "error": error, "timeline": timeline}), flush=True)


# =============================================================================
# The full run and the README section
# =============================================================================

BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def _mib(kib) -> str:
    return f"{kib / 1024:.0f} MiB"


def _rate(bps) -> str:
    return "n/a" if not bps else f"{bps / (1 << 20):.0f} MiB/s"


def _ratios(summary: dict) -> dict:
    return {w["name"]: w for w in summary.get("windows", [])}


def _pct(windows: dict, name: str) -> str:
    w = windows.get(name)
    return "n/a" if not w or w["ratio"] is None else f"{w['ratio'] * 100:.0f}%"


def render(report: dict) -> str:
    f = report["fuzz"]
    c = report["campaign"]
    s, sm = c["scenarios"], c["summary"]
    win = _ratios(sm)
    h = sm.get("healthy", {})
    size = report["size"]
    rate = size["healthy_rate"]
    lines = [
        BEGIN,
        "## Reliability",
        "",
        f"Regenerate with `{report['command']}` (this one ran {report['minutes']:.0f} minutes on {report['host']}, "
        f"{report['date']}); it rewrites this section. CI runs the same checks at small sizes through the normal "
        "test suite (`tests/test_fuzz_*.py`, `tests/test_hardening*.py`, about a minute). `./dev setup` installs "
        "what the fuzzing needs (`clang`, `libclang-rt-dev`).",
        "",
        "**Codec fuzzing.** `csrc/fuzz_blin.c` under libFuzzer (clang `-fsanitize=fuzzer,address,undefined`, "
        "value profiling, a BLIN dictionary), seeded with valid, truncated and mutated frames (`tests/corpus.py`). "
        "Besides memory safety the harness checks every reported header field against the bytes, the pending "
        "state against what is left, and that scanning any prefix never contradicts scanning the whole. The "
        "pure-Python codec is then compared with the C one on every input of the corpus libFuzzer grew: batch "
        "scans at every capacity, scans of every prefix, partial header checks, `parse_header`, request-id "
        "rewrite, the RPC hot loop (`csrc/route.c`: the payload rule, each input routed as a guest's batch, "
        "answered, and as a handler's answers), and a whole `protocol.Connection` fed at once, byte by byte "
        "and in random pieces.",
        "",
        "| run | size | coverage | time | result |",
        "|---|---|---|---|---|",
    ]
    if f.get("skipped"):
        lines.append(f"| libFuzzer | - | - | - | skipped: {f['skipped']} |")
    else:
        ok = not f["failures"]
        lines.append(f"| libFuzzer, ASan + UBSan | {f.get('execs', 0):,} inputs ({f.get('exec_per_s', 0):,}/s) | "
                     f"{f.get('cov')} edges, {f.get('ft')} features, corpus of {f.get('corpus')} | "
                     f"{f.get('seconds')} s | {'no crash, no sanitizer report, no invariant broken' if ok else 'FAILED'} |")
        lines.append(f"| C vs Python differential | {f.get('diff_inputs', 0):,} inputs ({f.get('diff_bytes', 0):,} "
                     f"bytes), {f.get('diff_comparisons', 0):,} comparisons | - | {f.get('diff_seconds')} s | "
                     f"{'identical' if ok else 'MISMATCH'} |")
    pf, bh, hf, sl = (s.get(k, {}) for k in ("protocol_fuzz", "bad_headers", "handshake_flood", "slowloris"))
    hm, cc, rf, hb = (s.get(k, {}) for k in ("held_mid_frame", "connect_close", "rpc_flood", "heartbeat_ignored"))
    ss, vh, kg, sh = (s.get(k, {}) for k in ("slow_subscribers", "vanishing_handlers", "killed_guests",
                                                "shared_session"))
    lines += [
        "",
        "**Live daemon.** One `blink serve` takes every attack below in turn on its three listeners (guest "
        "Unix socket, loopback TCP, control socket), with `" + " ".join(DAEMON_FLAGS) + "`. Beside every attack "
        f"a healthy agent (its own process) streams Stdout/Stderr at {rate >> 20} MiB/s to a lossless subscriber "
        "of another session; the last column is that stream's throughput during the attack as a share of its "
        f"undisturbed throughput ({_rate(h.get('undisturbed_bps'))}; n/a: the attack took under 0.2 s). "
        "A bad peer's time to close is measured "
        f"from its last byte; the timeouts are {HANDSHAKE_TIMEOUT:g} s (handshake), {STALL_TIMEOUT:g} s (stall), "
        f"{3 * HEARTBEAT:g} s (heartbeat), {RPC_TIMEOUT:g} s (RPC), checked once a second.",
        "",
        "| attack | size | result | healthy stream |",
        "|---|---|---|---|",
        f"| protocol fuzz: valid prefix then garbage, random types, lying lengths (short and long), bit flips, "
        f"4 GiB lengths, split writes, half-closes (seed {pf.get('seed')}) | {pf.get('cases', 0):,} connections, "
        f"{pf.get('bytes', 0):,} bytes, {pf.get('seconds')} s | {pf.get('failed', '?')} answered other than the wire "
        f"rules say; endings: {_outcomes(pf.get('outcomes'))}; timeouts closed within {pf.get('max_timeout_close_s')} s "
        f"| {_pct(win, 'protocol fuzz')} |",
        f"| bad magic / version / type / length at every header byte, before and after the handshake, the bytes "
        f"up to the bad one alone and in a whole frame; a 4 GiB length for every type | {bh.get('connections', 0):,} "
        f"connections | {bh.get('failed', '?')} wrong; the {bh.get('violations')} violations got their Error from "
        f"the partial header, closed within {bh.get('max_violation_close_s')} s | {_pct(win, 'bad headers')} |",
        f"| handshake flood, including wrong tokens, another session's token, unknown and invalid sessions, the "
        f"client role on the guest socket and TCP, the guest role on the control socket | {hf.get('handshakes', 0):,} "
        f"handshakes in {hf.get('seconds')} s ({hf.get('per_s')}/s) | {hf.get('wrong', '?')} wrong; "
        f"{hf.get('refused', 0):,} refused, each counted by code in vhub.stats ({hf.get('refusals_counted', 0):,}) "
        f"and logged at a bounded rate ({hf.get('refusals_logged', 0):,} `refused peer=` lines, the other "
        f"{hf.get('refusals_summarized', 0):,} in summary lines) | {_pct(win, 'handshake flood')} |",
        f"| slowloris, one byte a second, before the handshake and in the middle of a frame | "
        f"{sl.get('connections')} connections | {sl.get('failed', '?')} survived; closed after "
        f"{sl.get('max_close_before_handshake_s')} s (handshake_timeout) and {sl.get('max_close_mid_frame_s')} s "
        f"(stalled) at most | {_pct(win, 'slowloris')} |",
        f"| headers claiming 16 MiB, a little payload, then nothing | {hm.get('connections')} connections "
        f"({hm.get('claimed_mib', 0):,} MiB claimed) | RSS +{hm.get('rss_growth_while_held_mib')} MiB while held; "
        f"all closed within {hm.get('max_close_s')} s | {_pct(win, 'held mid-frame')} |",
        f"| connect/close: right away, mid-header, after the handshake, mid-frame, RST | "
        f"{cc.get('connections', 0):,} connections, {cc.get('concurrent', 0):,} at once, in {cc.get('seconds')} s | "
        f"daemon connections back to {cc.get('connections_after')} | {_pct(win, 'connect/close')} |",
        f"| RPC flood: client calls to an agent that never answers, guest calls to a handler that never answers, "
        f"answers to ids nobody asked | {rf.get('calls', 0):,} calls + {rf.get('stray_answers', 0):,} stray answers | "
        f"{rf.get('timeouts', 0):,} RpcError timeout, {rf.get('too_many_requests', 0):,} too_many_requests at once "
        f"(past the 1,024 a connection may have in flight); pending RPCs peaked at {rf.get('peak_inflight')}, "
        f"{rf.get('inflight_after')} after | {_pct(win, 'rpc flood')} |",
        f"| a guest that answered pings, then goes silent (and a Blink guest that never answers) | 2 guests | "
        f"{hb.get('code')} {hb.get('closed_after_s')} s after its last pong; the never-answering guest kept: "
        f"{hb.get('never_ponged_guest_kept')} | {_pct(win, 'heartbeat ignored')} |",
        f"| subscribers that never read (lossy) or pause (lossless), beside a fast one | {ss.get('streamed_mib')} MiB "
        f"to {ss.get('subscribers')} subscribers | lossy dropped with {ss.get('lossy_error')}; the guest paused "
        f"after {ss.get('guest_sent_while_paused_mib')} MiB; both lossless got every byte: "
        f"{ss.get('lossless_intact')} | {_pct(win, 'slow subscribers')} |",
        f"| handlers that vanish: close, RST, process SIGKILLed mid-answer | {vh.get('handlers')} clients + "
        f"{vh.get('killed_processes')} processes | handler_lost for {vh.get('handler_lost')} of {vh.get('calls')} "
        f"calls | {_pct(win, 'vanishing handlers')} |",
        f"| guest processes SIGKILLed after half a frame | {kg.get('guests_killed')} processes, "
        f"{kg.get('bytes_delivered', 0):,} bytes | {kg.get('intact')} of {kg.get('guests_killed')} subscribers got "
        f"exactly the complete frames, the scrollback ends on the last one | {_pct(win, 'killed guests')} |",
        f"| several guests in one session (agent + attached), small and cut-through frames in split writes, a fast "
        f"and a slow subscriber calling vhub.ping all along | {sh.get('guests')} guests, {sh.get('streamed_mib')} MiB, "
        f"{sh.get('frames')} frames | every frame whole, in each guest's order: {sh.get('intact')} | "
        f"{_pct(win, 'shared session')} |",
    ]
    lines += untrusted_rows(s, win, h)
    b, a = sm.get("before", {}), sm.get("after", {})
    u = report.get("unpaced", {}).get("summary", {})
    uw = _ratios(u)
    lines += [
        "",
        f"**Afterwards.** The daemon stayed up and answered throughout; SIGTERM exit code {sm.get('exit_code')}. "
        f"Healthy stream: {h.get('sent_bytes', 0):,} bytes sent, {h.get('received_bytes', 0):,} received, sha256 "
        f"equal: {h.get('lossless')}. Daemon RSS {_mib(b.get('rss_kib', 0))} before, {_mib(a.get('rss_kib', 0))} "
        f"after, of which {sm.get('scrollback_growth_mib')} MiB is scrollback the new sessions keep (bound: "
        f"scrollback + {RSS_BOUND_MIB} MiB). Open fds {b.get('fds')} -> {a.get('fds')}, connections "
        f"{b.get('connections')} -> {a.get('connections')}, asyncio tasks {b.get('tasks')} -> {a.get('tasks')}, "
        f"pending RPCs {b.get('inflight')} -> {a.get('inflight')} (the healthy pair and its subscriber had left).",
        "",
        "**Unpaced.** The same daemon code with the healthy stream as fast as it goes "
        f"({_rate(u.get('healthy', {}).get('undisturbed_bps'))} undisturbed, sha256 equal: "
        f"{u.get('healthy', {}).get('lossless')}) keeps this share during the CPU-heavy attacks, which run in a "
        "third process on the same CPUs: " + ", ".join(f"{n} {_pct(uw, n)}" for n in
                                                         ("protocol fuzz", "handshake flood", "connect/close",
                                                          "rpc flood")) + ".",
        "",
        "Result: " + ("**everything held.**" if not report["failures"] else
                      "**FAILURES:** " + "; ".join(report["failures"][:10])),
        END,
    ]
    return "\n".join(lines)


UNTRUSTED_TEXT = {
    "hijack": "impostors: a guest naming a registered session with no token, a wrong or empty one, attach with "
              "no credential (Unix socket and TCP), clients naming sessions that do not exist",
    "unknown_methods": "a guest sends RPCs with a 60 KB unknown method name and never reads the errors",
    "ping_flood": "a guest floods pings and never reads the pongs",
    "lossy_events": "a `flow: lossy` `events` subscriber stops reading while a guest publishes notifications",
    "star_writer": "a `*` client writes 60 KB calls to an agent that does not read",
    "unread_replies": "a client asks `vhub.sessions` over and over and never reads the answers",
    "inflight_flood": "a guest calls a handler that never answers, far past the in-flight cap (1,024)",
    "session_flood": "a client registers sessions past the cap, then removes them",
    "lockout": "a guest holds connections up to the guest limit",
    "echo_and_log": "60 KB session names, handshakes claiming 16 MiB, JSON nested 30,000 deep",
}


def untrusted_rows(s: dict, win: dict, h: dict) -> list[str]:
    """One row per attack of the untrusted-guest issue (tests/attacks.py)."""
    rows = [
        "",
        "**Untrusted guests.** The attacks of the issue \"a guest is untrusted\", against the same daemon "
        "(`tests/attacks.py`). Per attack: the daemon's RSS and open fds before, at the peak and after the attacker "
        "left; the slowest of the `blink sessions` commands run over and over meanwhile (a process each, Python "
        "start included); the healthy stream's share of its undisturbed throughput. The healthy stream is "
        "checked byte for byte over the whole run (sha256 at the end: "
        f"{h.get('lossless')}). Targets: no hijack; RSS growth within {PEAK_BOUND_MIB} MiB and back within "
        f"{AFTER_BOUND_MIB} MiB of the baseline once a single attacking connection left (plus 2 KiB per session "
        "it made and removed); `blink sessions` "
        f"answered throughout (each within {SESSIONS_BOUND_MS // 1000} s: a lockout check, not a speed target; "
        "the slowest is in the table).",
        "",
        "| attack | outcome | RSS MiB (before / peak / after) | fds | blink sessions, slowest | healthy stream |",
        "|---|---|---|---|---|---|",
    ]
    for name, text in UNTRUSTED_TEXT.items():
        r = s.get(name)
        if not r:
            continue
        rss, fds = r.get("rss_mib", ["?"] * 3), r.get("fds", ["?"] * 3)
        rows.append(f"| {text} | {_untrusted_outcome(name, r)} | {' / '.join(map(str, rss))} | "
                    f"{' / '.join(map(str, fds))} | {r.get('sessions_ms_max')} ms ({r.get('sessions_calls')} calls) | "
                    f"{_pct(win, name)} |")
    return rows


def _untrusted_outcome(name: str, r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    if name == "hijack":
        return (f"{r['impostors']} impostors, none in ({_outcomes(r['outcomes'])}); sessions created: "
                f"{r['sessions_created']}; the agent is still the owner: {r['agent_still_the_owner']}")
    if name in ("unknown_methods", "ping_flood", "unread_replies"):
        return (f"the daemon took {r.get('bytes_taken', r.get('requests_taken', 0)):,} "
                f"{'requests' if name == 'unread_replies' else 'bytes'}, stopped reading it, closed it with "
                f"slow_consumer {r['closed_after_s']} s later: {r['closed']}")
    if name == "lossy_events":
        return f"dropped with slow_consumer: {r['subscriber_closed']} ({r['bytes_published']:,} bytes published)"
    if name == "star_writer":
        return f"the client was paused after {r['bytes_taken']:,} bytes"
    if name == "inflight_flood":
        return (f"{r['calls']:,} calls: {r['too_many_requests']:,} answered too_many_requests at once; "
                f"in flight at most {r['peak_inflight']}")
    if name == "session_flood":
        return f"{r['registrations']:,} registrations: {_outcomes(r['outcomes'])}; {r['sessions']:,} sessions listed"
    if name == "lockout":
        return (f"{r['held']:,} held, the next refused with {r['refused_with']}; the control socket counts apart, "
                f"so blink kept working")
    if name == "echo_and_log":
        return (f"{r['tries']} tries: {_outcomes(r['outcomes'])}; longest Error message {r['longest_echo']} "
                f"characters; log +{r['log_growth_kib']} KiB; tracebacks: {r['tracebacks']}")
    return json.dumps(r)


def _outcomes(o) -> str:
    if not o:
        return "?"
    return ", ".join(f"{k} {v:,}" for k, v in o.items())


def write_readme(section: str, path: Path = ROOT / "README.md") -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


UNPACED = ["protocol_fuzz", "handshake_flood", "connect_close", "rpc_flood"]


def full_run(quick: bool, readme: bool) -> int:
    size = QUICK if quick else FULL
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhub-reliability-") as tmp:
        tmp = Path(tmp)
        print(f"codec fuzzing: {size['fuzz_runs']:,} inputs...", flush=True)
        fuzz = fuzz_codec(tmp / "fuzz", size["fuzz_runs"])
        print(json.dumps({k: v for k, v in fuzz.items() if k != "failures"}), flush=True)
        print("live daemon, every attack, paced healthy stream...", flush=True)
        camp = run_campaign(tmp / "daemon", list(SCENARIOS), {**size, "baseline_s": size["baseline_s"] or 2.0})
        for name, r in camp["scenarios"].items():
            print(f"  {name}: {json.dumps(r)}", flush=True)
        print(f"  summary: {json.dumps({k: v for k, v in camp['summary'].items()})}", flush=True)
        print("live daemon, CPU-heavy attacks, unpaced healthy stream...", flush=True)
        small = {**size, "fuzz_cases": min(size["fuzz_cases"], 2000), "cycle_rounds": 1,
                 "baseline_s": size["baseline_s"] or 2.0}
        fast = run_campaign(tmp / "unpaced", UNPACED, small, rate=0)
        print(f"  summary: {json.dumps({k: v for k, v in fast['summary'].items()})}", flush=True)
    failures = fuzz["failures"] + camp["failures"] + [f"(unpaced run) {f}" for f in fast["failures"]]
    report = {"fuzz": fuzz, "campaign": camp, "unpaced": fast, "failures": failures, "size": size,
              "command": "python tests/reliability.py" + (" --quick" if quick else ""),
              "minutes": (time.monotonic() - t0) / 60, "date": time.strftime("%Y-%m-%d"),
              "host": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, codec {codec.BACKEND}"}
    section = render(report)
    print(section)
    if readme:
        write_readme(section)
        print("README.md: Reliability section rewritten", flush=True)
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    h = sub.add_parser("healthy", help="(internal) the healthy stream worker")
    h.add_argument("--guest", required=True)
    h.add_argument("--control", required=True)
    h.add_argument("--session", required=True)
    h.add_argument("--token", required=True)
    h.add_argument("--rate", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI sizes (a rehearsal of the full run)")
    p.add_argument("--no-readme", action="store_true", help="print the section, leave README.md alone")
    args = p.parse_args(argv)
    if args.cmd == "healthy":
        asyncio.run(_healthy_main(args))
        return 0
    return full_run(args.quick, not args.no_readme)


if __name__ == "__main__":
    sys.exit(main())
