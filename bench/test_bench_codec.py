"""Codec throughput: headers scanned per second over 1M back-to-back frames
(0 B and 64 B payloads), pack and request_id rewrite; C beside pure Python."""

import pytest
from _harness import QUICK

from vhubd import codec

N = 200_000 if QUICK else 1_000_000


def make_stream(payload_size, n=N):
    one = codec.pack_header(0x30, 7, payload_size) + b"x" * payload_size
    return bytearray(one * n)


STREAMS = {}


@pytest.mark.parametrize("payload", [0, 64])
def test_scan_headers(benchmark, codec_impl, payload, record):
    data = STREAMS.setdefault(payload, make_stream(payload))
    sc = codec_impl.Scanner(4096)

    def scan_all():
        pos, total, end = 0, 0, len(data)
        while pos < end:
            count, pos, pending, status, _, _ = sc.scan(data, pos, end, 1 << 24)
            assert status == 0
            total += count
        return total

    assert benchmark.pedantic(scan_all, rounds=3, iterations=1) == N
    benchmark.group = f"codec scan {payload}B"
    record(benchmark, "codec", op=f"scan {payload}B", backend=codec_impl.NAME,
           rate=N / benchmark.stats.stats.median, headers=N)


# single calls: fixed rounds x iterations (pytest-benchmark reports the time per call)
CALL_ROUNDS = dict(rounds=10 if QUICK else 30, iterations=5000, warmup_rounds=1)


def test_pack(benchmark, codec_impl, record):
    benchmark.group = "codec pack"
    out = benchmark.pedantic(codec_impl.pack_header, args=(0x30, 12345, 64), **CALL_ROUNDS)
    assert len(out) == 20
    record(benchmark, "codec", op="pack", backend=codec_impl.NAME, rate=1 / benchmark.stats.stats.median)


def test_rewrite(benchmark, codec_impl, record):
    benchmark.group = "codec rewrite"
    buf = bytearray(codec.pack_header(0x10, 1, 0))
    benchmark.pedantic(codec_impl.rewrite_request_id, args=(buf, 0, 99), **CALL_ROUNDS)
    assert codec.parse_header(buf, 0, 1 << 24)[3] == 99
    record(benchmark, "codec", op="rewrite", backend=codec_impl.NAME, rate=1 / benchmark.stats.stats.median)
