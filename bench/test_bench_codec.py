"""Codec throughput: headers scanned per second over 1M back-to-back frames
(0 B and 64 B payloads), pack and request_id rewrite; C beside pure Python."""

import pytest

from vhubd import codec

N = 1_000_000


def make_stream(payload_size, n=N):
    one = codec.pack_header(0x30, 7, payload_size) + b"x" * payload_size
    return bytearray(one * n)


STREAMS = {}


@pytest.mark.parametrize("payload", [0, 64])
def test_scan_headers(benchmark, codec_impl, payload, results):
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
    rate = N / benchmark.stats.stats.median
    benchmark.extra_info["headers_per_s"] = rate
    results[f"scan {payload}B {codec_impl.NAME}"] = f"{rate / 1e6:.1f} M headers/s"
    other = results.get(f"_scan{payload}")
    if other is not None:
        ratio = max(rate, other) / min(rate, other)
        results[f"scan {payload}B C/python ratio"] = f"{ratio:.1f}x"
    results[f"_scan{payload}"] = rate


def test_pack(benchmark, codec_impl, results):
    pack = codec_impl.pack_header
    benchmark(pack, 0x30, 12345, 64)
    results[f"pack {codec_impl.NAME}"] = f"{1 / benchmark.stats.stats.median / 1e6:.2f} M/s"


def test_rewrite(benchmark, codec_impl, results):
    buf = bytearray(codec.pack_header(0x10, 1, 0))
    benchmark(codec_impl.rewrite_request_id, buf, 0, 99)
    results[f"rewrite {codec_impl.NAME}"] = f"{1 / benchmark.stats.stats.median / 1e6:.2f} M/s"
