"""The C codec under ASan + UBSan over a corpus of valid, truncated and
mutated frames (the harness is csrc/fuzz_blin.c)."""

import os
import pathlib
import shutil
import subprocess

import pytest
from corpus import seeds

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def compiler():
    for cc in ("clang", "gcc", "cc"):
        if shutil.which(cc):
            return cc
    return None


def test_codec_under_asan_ubsan(tmp_path):
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler on this host")
    exe = tmp_path / "fuzz_blin"
    subprocess.run([cc, "-std=c99", "-g", "-O1", "-Wall", "-Wextra", "-Werror",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                    "-DBLIN_CORPUS_MAIN", f"-I{CSRC}", str(CSRC / "blin.c"), str(CSRC / "route.c"), str(CSRC / "pump.c"), str(CSRC / "fuzz_blin.c"),
                    "-o", str(exe)], check=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = []
    for i, data in enumerate(seeds(2000)):
        p = corpus / f"{i:05d}"
        p.write_bytes(data)
        files.append(str(p))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    r = subprocess.run([str(exe), *files], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(files)} inputs ok" in r.stdout
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr
