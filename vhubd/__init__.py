"""vhubd: the host end of V-Hub's BLIN channel (daemon, codec, client)."""

__version__ = "0.1.0"
