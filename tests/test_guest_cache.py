"""The image caches' pruning: old builds go, but never one that a daemon or
another checkout on this host used recently (``load`` marks it used)."""

import os
import time

from vhubd.guest import cache


def _build(root, name, age):
    path = root / name
    path.mkdir()
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_prune_keeps_the_current_and_the_recently_used(tmp_path):
    day = 86400
    current = _build(tmp_path, "a" * 20, 3 * day)
    newest_other = _build(tmp_path, "b" * 20, 2 * day)
    old = _build(tmp_path, "c" * 20, 5 * day)
    used_lately = _build(tmp_path, "d" * 20, 6 * day)
    cache.used(str(used_lately))  # a daemon booted from it just now
    not_a_build = _build(tmp_path, "e" * 19, 9 * day)
    cache.prune(str(tmp_path), current.name)
    # kept: the current build, the newest other (used just now), what is not a build
    assert current.is_dir() and used_lately.is_dir() and not_a_build.is_dir()
    assert not old.exists() and not newest_other.exists()  # beyond the two newest, unused for days


def test_a_build_used_within_the_grace_is_kept_even_beyond_keep(tmp_path):
    builds = [_build(tmp_path, f"{i:x}" * 20, 60 * i) for i in range(1, 6)]
    cache.prune(str(tmp_path), builds[0].name, keep=2)
    assert all(b.is_dir() for b in builds)  # all used within the last day (another checkout's, say)
    cache.prune(str(tmp_path), builds[0].name, keep=2, unused_for=150)
    assert [b.is_dir() for b in builds] == [True, True, False, False, False]
