"""Split virtqueues over guest memory (vhubd.vhost.virtq): the device side
(SplitQueue) against a driver (DriverQueue) on the same bytes."""

import struct

import pytest

from vhubd.vhost.virtq import (
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DriverQueue,
    GuestMemory,
    GuestMemoryError,
    SplitQueue,
    VirtqError,
)

NUM = 16
GPA, UVA = 0x10000, 0x7F0000000000


def setup(num=NUM, last_avail=0):
    ram = bytearray(1 << 20)
    mem = GuestMemory.from_buffers([(GPA, UVA, ram)])
    drv = DriverQueue(mem, num, GPA, GPA + 0x1000, GPA + 0x2000, GPA + 0x4000, 4096)
    dev = SplitQueue.from_uva(mem, num, UVA, UVA + 0x1000, UVA + 0x2000, last_avail)
    return mem, drv, dev


def test_translation_by_guest_physical_and_vmm_address():
    ram = bytearray(range(256)) * 16
    extra = bytearray(b"\xaa" * 4096)
    mem = GuestMemory.from_buffers([(0x1000, 0x5000, ram), (0x100000, 0x9000, extra)])
    assert bytes(mem.gpa(0x1002, 3)) == b"\x02\x03\x04"
    assert bytes(mem.uva(0x5002, 3)) == b"\x02\x03\x04"
    assert bytes(mem.gpa(0x100000, 2)) == b"\xaa\xaa"
    mem.gpa(0x1000, 4)[:] = b"abcd"
    assert ram[:4] == b"abcd"
    for bad in [(0x0, 1), (0x1000 + len(ram) - 1, 2), (0x100000 + 4096, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.gpa(*bad)
    with pytest.raises(GuestMemoryError):
        mem.uva(0x1000, 1)


def test_pop_walks_chains_and_push_reports_used():
    mem, drv, dev = setup()
    assert dev.pop() is None and dev.available() == 0
    h1 = drv.add(readable=[b"hello", b" world"])
    h2 = drv.add(writable=[10, 20])
    assert dev.available() == 2
    c1 = dev.pop()
    assert c1.head == h1 and bytes(c1.read_all()) == b"hello world" and c1.writable == []
    c2 = dev.pop()
    assert c2.head == h2 and c2.readable == [] and c2.writable_len == 30
    assert c2.write([b"0123456789ab", memoryview(b"cdef")]) == 16
    dev.push(c2.head, 16)
    dev.push(c1.head, 0)
    used = drv.take_used()
    assert [(h, n) for h, n, _ in used] == [(h2, 16), (h1, 0)]
    assert used[0][2] == b"0123456789abcdef"
    assert dev.pop() is None


def test_write_that_does_not_fit_is_refused():
    _, drv, dev = setup()
    drv.add(writable=[4, 4])
    with pytest.raises(VirtqError):
        dev.pop().write([b"123456789"])


def test_indices_wrap_at_65536():
    mem, drv, dev = setup(last_avail=0xFFFE)
    drv.avail_idx = 0xFFFE
    struct.pack_into("<H", drv.used, 2, 0xFFFE)
    dev.used_idx = drv.last_used = 0xFFFE
    for i in range(5):
        drv.add(readable=[bytes([i])])
    got = []
    while (c := dev.pop()) is not None:
        got.append(bytes(c.read_all()))
        dev.push(c.head, 0)
    assert got == [bytes([i]) for i in range(5)]
    assert dev.last_avail == 3 and len(drv.take_used()) == 5


def test_unpop_gives_the_chain_back():
    _, drv, dev = setup()
    drv.add(writable=[8])
    c = dev.pop()
    dev.unpop()
    assert dev.pop().head == c.head


def test_bad_rings_are_the_guests_fault():
    _, drv, dev = setup()
    drv.add(readable=[b"x"])
    struct.pack_into("<QIHH", drv.desc, 0, GPA + 0x4000, 1, VRING_DESC_F_NEXT, 0)  # points at itself
    with pytest.raises(VirtqError, match="loop"):
        dev.pop()
    _, drv, dev = setup()
    drv.add(readable=[b"x"])
    struct.pack_into("<QIHH", drv.desc, 0, GPA + 0x4000, 1, VRING_DESC_F_NEXT, NUM + 3)
    with pytest.raises(VirtqError, match="out of range"):
        dev.pop()
    _, drv, dev = setup()
    drv.add(writable=[1])
    struct.pack_into("<QIHH", drv.desc, 0, 0xDEAD0000, 1, VRING_DESC_F_WRITE, 0)
    with pytest.raises(GuestMemoryError):
        dev.pop()
    _, drv, dev = setup()
    head = drv.add(readable=[b"a"])
    struct.pack_into("<QIHH", drv.desc, 16 * head, GPA + 0x4000, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5)
    struct.pack_into("<QIHH", drv.desc, 16 * 5, GPA + 0x4000, 1, 0, 0)
    with pytest.raises(VirtqError, match="readable descriptor after a writable"):
        dev.pop()
    _, drv, dev = setup()
    struct.pack_into("<H", drv.avail, 2, NUM + 5)
    with pytest.raises(VirtqError, match="ahead"):
        dev.pop()
    with pytest.raises(VirtqError):
        SplitQueue.from_gpa(GuestMemory.from_buffers([(0, 0, bytearray(1 << 16))]), 12, 0, 0x1000, 0x2000)


def test_notification_suppression_flag():
    _, drv, dev = setup()
    assert dev.needs_notify()
    drv.set_no_interrupt(True)
    assert not dev.needs_notify()
