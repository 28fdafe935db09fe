"""Coverage-guided fuzzing of the C codec (libFuzzer + ASan + UBSan on
csrc/fuzz_blin.c) and the pure-Python codec checked against it on every input
libFuzzer found (tests/reliability.py has the machinery; the long run is
``python tests/reliability.py``)."""

from __future__ import annotations

import os
import shutil

import pytest
import reliability
from corpus import seeds


def test_libfuzzer_then_python_differential(tmp_path):
    if shutil.which("clang") is None:
        if os.environ.get("VHUBD_REQUIRE_C") == "1" and not os.environ.get("VHUB_MINIMAL"):
            pytest.fail("clang is missing (./dev setup installs it): the codec cannot be fuzzed")
        pytest.skip("clang (libFuzzer) not installed here")
    res = reliability.fuzz_codec(tmp_path, reliability.QUICK["fuzz_runs"])
    assert not res["failures"], "\n".join(res["failures"][:5])
    assert res["execs"] >= reliability.QUICK["fuzz_runs"]
    assert res["cov"] > 0 and res["corpus"] > 0
    assert res["diff_inputs"] >= res["corpus"]  # every corpus file went through both backends


def test_differential_on_the_seed_corpus(tmp_path):
    """Without libFuzzer too: valid, truncated and mutated frames give the same
    codec results and the same connection events on both backends, whole or
    split."""
    paths = []
    for i, data in enumerate(seeds(300, seed=8)):
        p = tmp_path / f"{i:04d}"
        p.write_bytes(data)
        paths.append(p)
    res = reliability.differential(paths)
    if "c" not in res["backends"]:
        pytest.skip("C codec not built on this host")
    assert not res["failures"], "\n".join(res["failures"][:5])
    assert res["inputs"] == len(paths) and res["comparisons"] > 10 * len(paths)


def test_differential_notices_a_difference(tmp_path, monkeypatch):
    """The comparison is not vacuous: a Python codec that misjudges one
    header is caught."""
    from vhubd import codec

    impls = codec.backends()
    if "c" not in impls:
        pytest.skip("C codec not built on this host")
    py = impls["python"]
    real = py.check_header

    def wrong(buf, offset=0, avail=None, max_payload=0xFFFFFFFF):
        status = real(buf, offset, avail, max_payload)
        return 0 if status == 2 else status  # pretend a bad version is fine

    monkeypatch.setattr(py, "check_header", wrong)
    p = tmp_path / "bad-version"
    p.write_bytes(b"NILB\x02\x01" + bytes(14))
    res = reliability.differential([p])
    assert res["failures"]
