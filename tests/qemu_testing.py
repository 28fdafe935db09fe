"""Shared by the QEMU and BoxLite tests and benchmarks: find (or build) the
qemu guest image and BoxLite's default OCI image, find QEMU, and say
clearly why a test cannot run when one is missing."""

from __future__ import annotations

import os
import shutil

import pytest

from vhubd import guest as guest_image


def guest_cache_dir() -> str:
    """Where the guest image lives: $BLINK_GUEST_CACHE, else the default
    state dir's (where `./dev setup` / `blink build-guest` put it)."""
    env = os.environ.get("BLINK_GUEST_CACHE")
    if env:
        return env
    from vhubd.paths import default_state_dir

    return guest_image.default_cache_dir(default_state_dir())


def require_guest_image() -> guest_image.GuestImage:
    """The guest image, built if needed; skips (with the reason) when QEMU or
    the Debian tooling to build the image is missing."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86; ./dev setup)")
    cache = guest_cache_dir()
    try:
        return guest_image.find(cache)
    except guest_image.GuestImageError:
        pass
    try:
        return guest_image.build(cache)
    except (guest_image.GuestImageError, OSError) as exc:
        pytest.skip(f"no guest image in {cache} and it cannot be built here: {exc}")


def image_state_dir() -> str:
    """The state dir whose caches `./dev setup` fills ($BLINK_IMAGE_STATE, else the default)."""
    from vhubd.paths import default_state_dir

    return os.environ.get("BLINK_IMAGE_STATE") or default_state_dir()


def require_rootfs_image():
    """BoxLite's default image (an OCI layout from Debian packages), built if
    it is not up to date for these sources; skips (with the reason) when the
    Debian tooling to build it is missing."""
    from vhubd.guest import oci

    state = image_state_dir()
    try:
        return oci.build(oci.default_cache_dir(state), debs_dir=oci.default_debs_dir(state))
    except (guest_image.GuestImageError, OSError) as exc:
        pytest.skip(f"BoxLite's default image cannot be built here: {exc}")


def share_image_cache(state_dir) -> None:
    """Make a daemon's fresh ``state_dir`` use the shared image cache and
    packages (``require_rootfs_image``'s), as a daemon on this host would."""
    from vhubd.guest import oci

    state = image_state_dir()
    os.makedirs(os.path.join(state_dir, "guest"), exist_ok=True)
    os.symlink(oci.default_cache_dir(state), oci.default_cache_dir(str(state_dir)))
    os.symlink(oci.default_debs_dir(state), oci.default_debs_dir(str(state_dir)))


def qemu_pids() -> set[int]:
    """Every QEMU process on the host (the tests' own have -name vhub-*)."""
    pids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and b"-name" in argv:
                name = argv[argv.index(b"-name") + 1]
                if name.startswith(b"vhub-"):
                    pids.add(int(d))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def require_guest_image_of_this_checkout() -> guest_image.GuestImage:
    """The guest image whose agent is this checkout's (the image ``current``
    points at may be another checkout's on a shared host), built if needed;
    skips like ``require_guest_image``."""
    image = require_guest_image()
    from vhubd.guest import cache
    from vhubd.guest import image as gi

    try:
        key = cache.key(gi.BUILDER_VERSION, gi.MODULES, gi.resolve_packages(), gi.agent_source_dir())
    except (guest_image.GuestImageError, OSError) as exc:
        pytest.skip(f"cannot tell which guest image this checkout needs: {exc}")
    path = os.path.join(guest_cache_dir(), key)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return gi.load(path)
    if image.dir == os.path.realpath(path):
        return image
    try:
        return guest_image.build(guest_cache_dir())
    except (guest_image.GuestImageError, OSError) as exc:
        pytest.skip(f"the guest image of this checkout cannot be built here: {exc}")
