"""Benchmark helpers: results land in pytest-benchmark's JSON through
``benchmark.extra_info``; ratios are computed from numbers of the same run."""

import pytest

from vhubd import codec

RESULTS: dict = {}


@pytest.fixture(scope="session")
def results():
    return RESULTS


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("vhubd benchmark ratios (same run)")
    for key in sorted(RESULTS):
        terminalreporter.write_line(f"{key}: {RESULTS[key]}")


@pytest.fixture(params=sorted(codec.backends()))
def codec_impl(request):
    return codec.backends()[request.param]
