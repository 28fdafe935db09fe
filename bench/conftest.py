"""Benchmark plumbing.

Every benchmark stores its numbers with ``record(benchmark, kind, **fields)``:
they land in the benchmark's ``extra_info`` (so in the pytest-benchmark JSON)
and in ROWS, from which the summary at the end of the run is rendered by the
same code as bench/report.py's Markdown (ratios of the same run only). The
machine line (CPU, cores, kernel, Python, load average at start and end) goes
into the JSON as ``vhub_machine``.
"""

from __future__ import annotations

import os

import pytest
from report import machine_info, render

from vhubd import codec

ROWS: list[dict] = []
MACHINE: dict = {}


def pytest_configure(config):
    MACHINE.clear()
    MACHINE.update(machine_info())


def _finish_machine() -> dict:
    if "loadavg_end" not in MACHINE:
        MACHINE["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return MACHINE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["vhub_machine"] = dict(_finish_machine())


@pytest.fixture
def record(request):
    def rec(benchmark, kind: str, *, secondary: bool = False, **fields) -> dict:
        """Store one row. ``secondary`` (or ``benchmark=None``): one more row
        measured by this test's benchmark, kept in its extra_info["rows"]."""
        row = {"kind": kind, **fields}
        if benchmark is None:
            benchmark = request.node.funcargs.get("benchmark")
            secondary = True
        if benchmark is not None:
            if "kind" in benchmark.extra_info:
                secondary = True  # a second row of the same test: never overwrite the first
            if secondary:
                benchmark.extra_info.setdefault("rows", []).append(row)
            else:
                benchmark.extra_info.update(row)
        ROWS.append(row)
        return row

    return rec


def pytest_terminal_summary(terminalreporter):
    if not ROWS or os.environ.get("VHUB_BENCH_NO_SUMMARY"):
        return  # bench/report.py prints the same report from the JSON
    terminalreporter.section("vhubd benchmarks: absolute numbers and ratios (same run)")
    for line in render(ROWS, _finish_machine()).splitlines():
        terminalreporter.write_line(line)


@pytest.fixture(params=sorted(codec.backends()))
def codec_impl(request):
    return codec.backends()[request.param]
