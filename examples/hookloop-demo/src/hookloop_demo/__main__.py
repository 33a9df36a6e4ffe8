"""``python -m hookloop_demo``: the same as ``hookloop demo``."""

import sys

from hookloop_demo import main

sys.exit(main())
