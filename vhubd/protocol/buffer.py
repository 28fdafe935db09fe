"""The connection's receive buffer: bytes arrive in place, events carry
slices of it, and a buffer that still has live slices is never overwritten."""

from __future__ import annotations

import sys

_getrefcount = sys.getrefcount
_probe = [bytearray(1)]
_SPARE_FREE = _getrefcount(_probe[0])  # refcount of a list-held bytearray with no live slices
del _probe
SPARES = 16  # retired buffers kept for reuse (most still pinned: a scrollback keeps bulk output by reference)
FREE_SPARES = 2  # of those, unpinned ones kept at each read (given back: the ring let go of them)


class ReceiveBuffer:
    """A growable receive buffer that never overwrites bytes a live slice
    still references (see the module docstring).

    Size follows the sender: a read that fills the whole offered space makes
    the next buffer 4x larger (up to ``grow_limit``); ``shrink()`` on idle
    goes back to ``initial``. A pinned buffer is retired to a small spare pool
    and reused once its slices are gone, so a busy stream does not allocate
    (and zero-fill) a fresh buffer per read, even while a session's scrollback
    keeps slices of its last few buffers.
    """

    __slots__ = ("buf", "start", "end", "initial", "grow_limit", "target", "_baseline", "_offered", "_spare")

    def __init__(self, initial: int = 4096, grow_limit: int = 256 * 1024):
        self.initial = initial
        self.grow_limit = max(grow_limit, initial)
        self.target = initial
        self.buf = bytearray(initial)
        self.start = 0  # first unconsumed byte
        self.end = 0  # end of received bytes
        self._rebase()
        self._offered = 0
        self._spare: list[bytearray] = []

    def pinned(self) -> bool:
        return _getrefcount(self.buf) > self._baseline

    def _fresh(self, size: int) -> bytearray:
        spare = self._spare
        for i in range(len(spare)):
            if len(spare[i]) >= size and _getrefcount(spare[i]) == _SPARE_FREE:
                return spare.pop(i)
        return bytearray(size)

    def _replace(self, size: int) -> None:
        """Move the live bytes to another buffer of at least ``size``."""
        old, start, end = self.buf, self.start, self.end
        new = self._fresh(size)
        live = end - start
        if live:
            new[:live] = old[start:end]
        self.buf = new
        del new
        self._rebase()
        if len(old) == self.target:
            self._retire(old)  # maybe pinned now; reused once its slices are gone
        self.start = 0
        self.end = live

    def _retire(self, old: bytearray) -> None:
        spare = self._spare
        spare.append(old)
        del old
        self._prune()
        if len(spare) > SPARES:
            del spare[0]  # the oldest (pinned: its slices keep it alive, not this list)

    def _prune(self) -> None:
        """Memory back: no more unpinned spares than a busy stream needs."""
        spare = self._spare
        free = [i for i in range(len(spare)) if _getrefcount(spare[i]) == _SPARE_FREE]
        for i in reversed(free[FREE_SPARES:]):
            del spare[i]

    def _rebase(self) -> None:
        # refcount of self.buf when nothing but this object holds it
        self._baseline = _getrefcount(self.buf)

    def reserve(self, need: int) -> None:
        """Make room for ``need`` bytes past ``start`` (a whole frame)."""
        if need > len(self.buf) - self.start:
            if need <= len(self.buf) and not self.pinned():
                self._compact()
            else:
                self._replace(max(need, self.target))

    def _compact(self) -> None:
        live = self.end - self.start
        if live:
            self.buf[:live] = self.buf[self.start:self.end]
        self.start = 0
        self.end = live

    def get_buffer(self, min_free: int = 1024) -> memoryview:
        self.make_room(min_free)
        return memoryview(self.buf)[self.end:]

    def make_room(self, min_free: int = 1024) -> None:
        """At least ``min_free`` bytes free past ``end`` (and the target size),
        for a read into ``buf[end:]``."""
        if len(self._spare) > FREE_SPARES:  # the ring may have let go of some since the last read
            self._prune()
        live = self.end - self.start
        size = len(self.buf)
        if self.pinned():
            if size - self.end < min_free or size < self.target:
                self._replace(max(self.target, live + min_free))
        elif live == 0:
            self.start = self.end = 0
            if size < self.target:
                self._replace(self.target)
        elif size - self.end < min_free or size < self.target:
            if live + min_free <= size and size >= self.target:
                self._compact()
            else:
                self._replace(max(self.target, live + min_free))
        self._offered = len(self.buf) - self.end

    def note_read(self, n: int) -> None:
        """A read that filled all the offered space hints at a fast sender."""
        if n >= self._offered and self.target < self.grow_limit:
            self.target = min(self.target * 4, self.grow_limit)

    def shrink(self) -> None:
        """Give memory back when idle: back to the initial size, spares dropped."""
        self.target = self.initial
        self._spare.clear()
        if self.start == self.end and len(self.buf) > self.initial:
            self.buf = bytearray(self.initial)
            self._rebase()
            self.start = self.end = 0
