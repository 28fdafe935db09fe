"""The control-plane API: Blink's ``blink-server`` REST surface and WebSocket
attach, served by the daemon itself on its own loop (``blink serve --http``).

- ``access``: its address (loopback unless public) and bearer token file (client-safe)
- ``records``: one execution's bounded output ring with seq numbers (sans-I/O)
- ``watch``: per session, the in-process control connection that feeds records
- ``app``: the aiohttp application (routes, auth, origins, bounds) and its listener
- ``attach``: the WebSocket attach (frames, cursor, input)

Everything reaches sessions through the relay, as an ordinary control client
(``Server.connect_in_process``). aiohttp is the ``http`` extra; only ``app`` and
``watch`` are daemon-side.
"""
