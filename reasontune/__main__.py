"""``python -m reasontune``: the same command line as ``reasontune``."""

import sys

from reasontune.cli import main

sys.exit(main())
