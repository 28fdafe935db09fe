"""Guest memory and split virtqueues (virtio 1.x, "Split Virtqueues").

``GuestMemory`` holds the regions the VMM shares (mmap'ed memfds, or plain
buffers in tests) and translates guest-physical and VMM-virtual addresses to
memoryviews. ``SplitQueue`` reads the avail ring, walks descriptor chains
(``VRING_DESC_F_NEXT`` / ``VRING_DESC_F_WRITE``) and writes the used ring.
Everything here works on memory only: no fds are read or written, no
notifications sent (``needs_notify`` says whether the driver wants one).

Ordering: the driver (the guest) and we run concurrently. We read
``avail.idx`` before the ring entries it covers and write used elements before
``used.idx``; on x86-64 (TSO) plain loads and stores keep that order, which is
what this module relies on. The guest must not touch a buffer until we publish
it in the used ring, so views into a chain stay valid until ``push``.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

from ..errors import GuestMemoryError, VirtqError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class MemoryRegion:
    __slots__ = ("gpa", "size", "uva", "view", "_map")

    def __init__(self, gpa: int, size: int, uva: int, view: memoryview, backing=None):
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.view = view
        self._map = backing

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa=0x{self.gpa:x}, size=0x{self.size:x}, uva=0x{self.uva:x})"


class GuestMemory:
    """The guest's RAM as the VMM shared it: a few regions, each known by its
    guest-physical address (descriptors use those) and the VMM's user
    address (ring addresses from SET_VRING_ADDR use those)."""

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = sorted(regions, key=lambda r: r.gpa)

    @classmethod
    def from_fds(cls, table: list[tuple[int, int, int, int]], fds: list[int]) -> GuestMemory:
        """mmap each (gpa, size, uva, mmap_offset) region from its fd. The
        fds are closed here (the mappings keep the memory)."""
        regions = []
        try:
            if len(fds) != len(table):
                raise GuestMemoryError(f"{len(table)} memory regions but {len(fds)} file descriptors")
            for (gpa, size, uva, offset), fd in zip(table, fds, strict=True):
                if size <= 0:
                    raise GuestMemoryError(f"memory region at 0x{gpa:x} has size {size}")
                try:
                    m = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                except (OSError, ValueError) as exc:
                    raise GuestMemoryError(f"cannot map memory region at 0x{gpa:x} (+0x{size:x}): {exc}") from None
                regions.append(MemoryRegion(gpa, size, uva, memoryview(m)[offset:offset + size], m))
        except BaseException:
            for r in regions:
                _unmap(r)
            raise
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return cls(regions)

    @classmethod
    def from_buffers(cls, spec: list[tuple[int, int, bytearray]]) -> GuestMemory:
        """Regions over plain buffers: [(gpa, uva, buffer)] (tests)."""
        return cls([MemoryRegion(gpa, len(buf), uva, memoryview(buf)) for gpa, uva, buf in spec])

    def gpa(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at guest-physical ``addr`` (within one region)."""
        for r in self.regions:
            off = addr - r.gpa
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"guest address 0x{addr:x}+0x{length:x} is outside guest memory")

    def uva(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at the VMM's user address ``addr``."""
        for r in self.regions:
            off = addr - r.uva
            if 0 <= off and off + length <= r.size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"VMM address 0x{addr:x}+0x{length:x} is outside the shared memory")

    def close(self) -> None:
        """Unmap every region. Views handed out must be gone by now; if one
        is still alive the mapping is left to the garbage collector."""
        for r in self.regions:
            _unmap(r)
        self.regions = []


def _unmap(r: MemoryRegion) -> None:
    r.view.release()
    if r._map is not None:
        try:
            r._map.close()
        except BufferError:
            pass  # a view still exists; the mapping goes when it does


class Chain:
    """One descriptor chain: readable then writable buffers (views into
    guest memory), and its head index for the used ring."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_len(self) -> int:
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(b) for b in self.writable)

    def read_all(self):
        """The readable bytes: a view when there is one buffer, else a copy."""
        if len(self.readable) == 1:
            return self.readable[0]
        return b"".join(self.readable)

    def write(self, pieces) -> int:
        """Scatter ``pieces`` into the writable buffers; returns bytes written
        (VirtqError if they do not fit)."""
        bufs = self.writable
        bi = 0
        boff = 0
        total = 0
        for piece in pieces:
            p = memoryview(piece) if not isinstance(piece, memoryview) else piece
            poff = 0
            plen = len(p)
            while poff < plen:
                if bi >= len(bufs):
                    raise VirtqError("packet larger than the guest's receive buffer")
                b = bufs[bi]
                n = min(len(b) - boff, plen - poff)
                b[boff:boff + n] = p[poff:poff + n]
                boff += n
                poff += n
                total += n
                if boff == len(b):
                    bi += 1
                    boff = 0
        return total


class SplitQueue:
    """One split virtqueue: ``pop`` the next available chain, ``push`` it back
    as used. ``last_avail`` is the ring position (SET/GET_VRING_BASE)."""

    def __init__(self, mem: GuestMemory, num: int, desc: memoryview, avail: memoryview, used: memoryview,
                 last_avail: int = 0):
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.mem = mem
        self.num = num
        self.desc = desc
        self.avail = avail
        self.used = used
        self.last_avail = last_avail & 0xFFFF
        self.used_idx = _U16.unpack_from(used, 2)[0]
        self.popped = 0
        self.pushed = 0

    @classmethod
    def from_uva(cls, mem: GuestMemory, num: int, desc_uva: int, avail_uva: int, used_uva: int,
                 last_avail: int = 0) -> SplitQueue:
        """A queue whose rings are at VMM user addresses (SET_VRING_ADDR)."""
        return cls(mem, num, mem.uva(desc_uva, 16 * num), mem.uva(avail_uva, 6 + 2 * num),
                   mem.uva(used_uva, 6 + 8 * num), last_avail)

    @classmethod
    def from_gpa(cls, mem: GuestMemory, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int,
                 last_avail: int = 0) -> SplitQueue:
        return cls(mem, num, mem.gpa(desc_gpa, 16 * num), mem.gpa(avail_gpa, 6 + 2 * num),
                   mem.gpa(used_gpa, 6 + 8 * num), last_avail)

    def available(self) -> int:
        """Chains the driver made available that we have not popped."""
        return (_U16.unpack_from(self.avail, 2)[0] - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        avail_idx = _U16.unpack_from(self.avail, 2)[0]
        if avail_idx == self.last_avail:
            return None
        if (avail_idx - self.last_avail) & 0xFFFF > self.num:
            raise VirtqError(f"avail index {avail_idx} runs more than {self.num} ahead of {self.last_avail}")
        head = _U16.unpack_from(self.avail, 4 + 2 * (self.last_avail % self.num))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.popped += 1
        return self._walk(head)

    def unpop(self) -> None:
        """Give back the chain just popped (nothing was written to it)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF
        self.popped -= 1

    def _walk(self, head: int) -> Chain:
        num = self.num
        desc = self.desc
        gpa = self.mem.gpa
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        for _ in range(num):
            if i >= num:
                raise VirtqError(f"descriptor index {i} out of range (queue size {num})")
            addr, length, flags, nxt = _DESC.unpack_from(desc, 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqError("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
            if flags & VRING_DESC_F_WRITE:
                writable.append(gpa(addr, length))
            else:
                if writable:
                    raise VirtqError("readable descriptor after a writable one")
                readable.append(gpa(addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return Chain(head, readable, writable)
            i = nxt
        raise VirtqError(f"descriptor chain at {head} is longer than the queue (a loop?)")

    def push(self, head: int, length: int) -> None:
        """Return a chain to the driver; ``length`` = bytes we wrote into it."""
        idx = self.used_idx
        _USED_ELEM.pack_into(self.used, 4 + 8 * (idx % self.num), head, length)
        idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        _U16.pack_into(self.used, 2, idx)  # after the element: the driver reads idx first
        self.pushed += 1

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for used buffers."""
        return not _U16.unpack_from(self.avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    def release(self) -> None:
        """Drop the views into guest memory (before it is unmapped)."""
        for v in (self.desc, self.avail, self.used):
            v.release()


class DriverQueue:
    """The driver's side of a split queue over the same memory: what a guest
    kernel does (tests use it to play the guest)."""

    def __init__(self, mem: GuestMemory, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int,
                 buffers_gpa: int, buffer_size: int):
        self.mem = mem
        self.num = num
        self.desc = mem.gpa(desc_gpa, 16 * num)
        self.avail = mem.gpa(avail_gpa, 6 + 2 * num)
        self.used = mem.gpa(used_gpa, 6 + 8 * num)
        self.buffers_gpa = buffers_gpa
        self.buffer_size = buffer_size
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def add(self, readable: Sequence[bytes] = (), writable: Sequence[int] = ()) -> int:
        """Post a chain: readable buffers with these bytes, writable buffers of
        these sizes. Returns the head."""
        parts: list[tuple[bytes | None, int]] = [(bytes(b), len(b)) for b in readable]
        parts += [(None, n) for n in writable]
        if len(parts) > len(self.free):
            raise VirtqError("driver queue full")
        idx = [self.free.pop(0) for _ in parts]
        for k, ((data, length), i) in enumerate(zip(parts, idx, strict=True)):
            addr = self.buffers_gpa + i * self.buffer_size
            flags = VRING_DESC_F_WRITE if data is None else 0
            if data is not None:
                self.mem.gpa(addr, length)[:] = data
            if length > self.buffer_size:
                raise VirtqError("buffer larger than the test's slot")
            nxt = idx[k + 1] if k + 1 < len(idx) else 0
            _DESC.pack_into(self.desc, 16 * i, addr, length, flags | (VRING_DESC_F_NEXT if k + 1 < len(idx) else 0),
                            nxt)
        head = idx[0]
        self.chains[head] = idx
        _U16.pack_into(self.avail, 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self.avail, 2, self.avail_idx)
        return head

    def release(self) -> None:
        for v in (self.desc, self.avail, self.used):
            v.release()

    def set_no_interrupt(self, on: bool) -> None:
        _U16.pack_into(self.avail, 0, VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def take_used(self) -> list[tuple[int, int, bytes]]:
        """Chains the device returned: (head, length written, the written bytes)."""
        out = []
        used_idx = _U16.unpack_from(self.used, 2)[0]
        while self.last_used != used_idx:
            head, length = _USED_ELEM.unpack_from(self.used, 4 + 8 * (self.last_used % self.num))
            self.last_used = (self.last_used + 1) & 0xFFFF
            idx = self.chains.pop(head)
            data = bytearray()
            left = length
            for i in idx:
                addr, dlen, flags, _ = _DESC.unpack_from(self.desc, 16 * i)
                if flags & VRING_DESC_F_WRITE and left:
                    n = min(dlen, left)
                    data += self.mem.gpa(addr, n)
                    left -= n
            self.free.extend(idx)
            out.append((head, length, bytes(data)))
        return out
