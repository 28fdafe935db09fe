"""Logging: journald entries with structured fields under systemd, plain
lines with ``<N>`` priority prefixes on stderr otherwise.

Under systemd (``JOURNAL_STREAM`` names our stderr, or ``--log journal``) each
log line becomes a journal entry with ``VHUB_EVENT``, ``VHUB_SESSION``,
``VHUB_PEER`` and the other ``key=value`` parts of the message as ``VHUB_KEY``
fields (systemd-python, the ``systemd`` extra).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable

LOG_MODES = ("auto", "journal", "stderr")
STDERR_FORMAT = "%(asctime)s vhubd %(levelname)s %(message)s"

_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    """syslog priority of a logging level."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def journal_stream_is_stderr(env=None) -> bool:
    """Whether stderr is the journal stream systemd gave us (``JOURNAL_STREAM``
    names its device and inode)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


# "guest attached session=%s peer=%s" -> event "guest_attached", arg 0 -> VHUB_SESSION, arg 1 -> VHUB_PEER
_CONVERSION = re.compile(r"%[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_KEY_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=$")


@functools.lru_cache(maxsize=1024)
def parse_format(fmt: str) -> tuple[str, tuple[tuple[int, str], ...]]:
    """``(event, ((arg index, FIELD), ...))`` for a log format string: the
    event is its leading words, each ``key=%x`` names its argument
    ``VHUB_KEY``. Cached: format strings are constants."""
    fields = []
    index = 0
    for m in _CONVERSION.finditer(fmt):
        if m.group(1) == "%":
            continue
        key = _KEY_BEFORE.search(fmt, 0, m.start())
        if key:
            fields.append((index, "VHUB_" + key.group(1).upper()))
        index += 1 + m.group(0).count("*")
    head = re.split(r"[%:(;,\[]|\b[A-Za-z_]+=", fmt, maxsplit=1)[0]
    words = re.findall(r"[A-Za-z0-9]+", head)[:4]
    return "_".join(w.lower() for w in words) or "log", tuple(fields)


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The VHUB_* journal fields of a ``vhubd`` log record (other loggers'
    records get none). Explicit ``extra=`` attributes (``vhub_event``,
    ``vhub_session``, ``vhub_peer``) win over what the format string implies."""
    fields: dict[str, str] = {}
    if isinstance(record.msg, str) and (record.name == "vhubd" or record.name.startswith("vhubd.")):
        event, keyed = parse_format(record.msg)
        fields["VHUB_EVENT"] = event
        args = record.args if isinstance(record.args, tuple) else ()
        for i, name in keyed:
            if i < len(args):
                fields[name] = str(args[i])
    for attr in ("vhub_event", "vhub_session", "vhub_peer"):
        value = record.__dict__.get(attr)
        if value is not None:
            fields[attr.upper()] = str(value)
    return fields


class JournalHandler(logging.Handler):
    """Structured journal entries through systemd-python's ``journal.send``:
    MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_*, VHUB_* fields."""

    def __init__(self, identifier: str = "vhubd", send: Callable | None = None):
        super().__init__()
        if send is None:
            send = importlib.import_module("systemd.journal").send  # ImportError without the systemd extra
        self._send = send
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.format(record), PRIORITY=str(priority(record.levelno)),
                       SYSLOG_IDENTIFIER=self.identifier, LOGGER=record.name, CODE_FILE=record.pathname,
                       CODE_LINE=record.lineno, CODE_FUNC=record.funcName, **record_fields(record))
        except Exception:
            self.handleError(record)


class PrefixFormatter(logging.Formatter):
    """``<N>message``: stderr lines that journald files under priority N
    (systemd's SyslogLevelPrefix=), for hosts without systemd-python."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"<{priority(record.levelno)}>" + text.replace("\n", f"\n<{priority(record.levelno)}>")


def configure_logging(mode: str = "auto", level: str = "info") -> str:
    """Set up the ``vhubd`` logs; returns what was chosen: ``journal``
    (systemd-python), ``stderr-prefixed`` (under systemd without it) or
    ``stderr``. ``mode=journal`` without systemd-python raises ImportError."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    under_systemd = journal_stream_is_stderr()
    handler: logging.Handler
    if mode == "journal" or (mode == "auto" and under_systemd):
        try:
            handler = JournalHandler()
            chosen = "journal"
        except ImportError:
            if mode == "journal":
                raise
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(PrefixFormatter("%(message)s"))
            chosen = "stderr-prefixed"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
        chosen = "stderr"
    root.addHandler(handler)
    return chosen


