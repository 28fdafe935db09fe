"""``python -m blink_agent``: the same as the ``blink-agent`` command."""

import sys

from .cli import main

sys.exit(main())
