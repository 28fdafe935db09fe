"""vhubd.api.records: an execution's output ring as plain logic: seq numbers,
eviction, the agent's rebase after a reconnection (duplicates dropped, gaps
reported), and the file a daemon keeps it in across a restart."""

from __future__ import annotations

import pytest

from vhubd.api.records import STDERR, STDOUT, Record


def test_seqs_eviction_and_what_is_missing():
    r = Record("s", 3, tty=False, limit=10)
    for i in range(6):
        assert r.add(STDOUT if i % 2 else STDERR, b"%d%d%d" % (i, i, i))
    assert r.head == 6 and [c.seq for c in r.chunks] == [4, 5, 6] and r.bytes == 9
    assert [c.seq for c in r.after(4)] == [5, 6] and r.after(6) == []
    assert [c.seq for c in r.after(0)] == [4, 5, 6]
    assert r.missing_after(0) == (1, 3) and r.missing_after(3) is None and r.missing_after(5) is None
    r.add(STDOUT, b"x" * 50)  # alone over the limit: the newest is always kept
    assert [c.seq for c in r.chunks] == [7]


def test_rebase_drops_duplicates_and_reports_gaps():
    r = Record("s", 1, tty=True, limit=1 << 20)
    for data in (b"a", b"b", b"c"):
        r.add(STDOUT, data)
    r.rebase(1)  # the agent resends from seq 2: b and c are duplicates
    assert r.add(STDOUT, b"b") is False and r.add(STDOUT, b"c") is False
    assert r.add(STDOUT, b"d") is True and r.head == 4 and r.duplicates == 2
    r.rebase(6)  # seqs 5 and 6 never reached this daemon (the agent dropped them)
    assert r.lost == [(5, 6)] and r.head == 6
    r.add(STDOUT, b"g")
    assert [(c.seq, c.data) for c in r.chunks] == [(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d"), (7, b"g")]
    assert r.missing_after(4) is None  # the lost ones are reported once, by rebase, not as evicted


def test_dump_and_load_round_trip_and_refuse_garbage():
    r = Record("s", 9, tty=True, limit=100, command="sh -i")
    r.add(STDOUT, b"\x00\xffhello")
    r.finish(3, 123.0)
    back = Record.load(r.dump(), 100)
    assert back.summary() == r.summary() and list(back.chunks) == list(r.chunks) and back.ended_at == 123.0
    assert Record.load(r.dump(), 3).bytes == 7  # a smaller limit: still the newest chunk
    for bad in ([], {"session": 1}, {**r.dump(), "head": -1}, {**r.dump(), "chunks": "x"},
                {**r.dump(), "chunks": [[1, 1]]}, {**r.dump(), "chunks": [[1, 1, "%%%"]]}):
        with pytest.raises((ValueError, TypeError)):
            Record.load(bad, 100)
