"""The report's merge of several passes of the relay benchmarks (no timing)."""

from __future__ import annotations

import report


def bench(name: str, **info) -> dict:
    return {"fullname": name, "extra_info": info}


def test_each_number_is_its_median_over_the_passes():
    first = {"benchmarks": [bench("stream[vhubd]", kind="stream", transport="vhubd", mbps=100.0, relay_cpu=None,
                                  rows=[{"kind": "x", "rps": 1}]),
                            bench("qemu[boot]", kind="qemu", ms=50.0)]}
    p2 = {"benchmarks": [bench("stream[vhubd]", kind="stream", transport="vhubd", mbps=900.0, relay_cpu=80.0,
                               rows=[{"kind": "x", "rps": 5}])]}
    p3 = {"benchmarks": [bench("stream[vhubd]", kind="stream", transport="vhubd", mbps=300.0, relay_cpu=60.0,
                               rows=[{"kind": "x", "rps": 3}])]}
    data = report.merge_passes(first, [p2, p3])
    stream, qemu = (b["extra_info"] for b in data["benchmarks"])
    assert stream["mbps"] == 300.0 and stream["transport"] == "vhubd"  # the median, not the first pass
    assert stream["relay_cpu"] is None  # missing in the first pass: left as it was
    assert stream["rows"] == [{"kind": "x", "rps": 3}]
    assert qemu == {"kind": "qemu", "ms": 50.0}  # run once: untouched
    assert data["vhub_machine"]["passes"] == 3 and data["vhub_machine"]["merged"] == 1
    assert "3 passes" in report.machine_line(data["vhub_machine"])
