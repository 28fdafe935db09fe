"""The one place that picks the BLIN codec backend.

``BLINK_CODEC=auto`` (default) uses the C backend when it was built, else the
pure-Python one; ``c`` insists on C (ImportError if absent); ``python`` forces
the twin. ``BACKEND`` names the backend in use; both stay importable by name
(``vhubd._codec_c``, ``vhubd._codec_py``) for tests and benchmarks.
"""

from __future__ import annotations

from types import ModuleType

from . import _codec_py
from .paths import env


def _choose(choice: str) -> tuple[ModuleType, str]:
    if choice == "python":
        return _codec_py, "forced by BLINK_CODEC=python"
    if choice not in ("auto", "c"):
        raise ImportError(f"BLINK_CODEC must be auto, c or python, not {choice!r}")
    try:
        from . import _codec_c
    except ImportError as exc:
        if choice == "c":
            raise ImportError(f"BLINK_CODEC=c but the C codec is not built: {exc}") from exc
        return _codec_py, f"C codec not built ({exc}); using the pure-Python codec"
    return _codec_c, "C codec (cffi)"


_impl, REASON = _choose(env("BLINK_CODEC", "auto").strip().lower() or "auto")
BACKEND: str = _impl.NAME

Scanner = _impl.Scanner
check_header = _impl.check_header
parse_header = _impl.parse_header
pack_header = _impl.pack_header
pack_header_into = _impl.pack_header_into
rewrite_request_id = _impl.rewrite_request_id
frame_boundary = _impl.frame_boundary
Router = _impl.Router
route_method = _impl.route_method
Pump = _impl.Pump


def backends() -> dict[str, ModuleType]:
    """Every backend importable here, by name (tests run on each)."""
    found = {"python": _codec_py}
    try:
        from . import _codec_c

        found["c"] = _codec_c
    except ImportError:
        pass
    return found
