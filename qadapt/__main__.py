"""``python -m qadapt``: the ``qadapt`` command."""

import sys

from .cli import main

sys.exit(main())
