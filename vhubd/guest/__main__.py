"""``python -m vhubd.guest``: the same as ``blink build-guest``."""

import sys

from .image import main

sys.exit(main())
