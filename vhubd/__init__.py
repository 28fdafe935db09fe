"""vhubd: the host end of V-Hub's BLIN channel (daemon, codec, client).

``vhubd.__version__`` comes from the one version file the guest agent and
this package share (see ``vhubd.shipped``).
"""


def __getattr__(name: str) -> str:
    if name == "__version__":
        from .shipped import version

        return version()
    raise AttributeError(f"module 'vhubd' has no attribute {name!r}")
