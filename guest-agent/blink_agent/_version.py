"""The version of blink-agent and of vhubd: the one place it is written (both
builds and ``vhubd.__version__`` read it)."""

__version__ = "0.1.0"
