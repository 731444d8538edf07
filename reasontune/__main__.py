"""``python -m reasontune …`` (and ``torchrun … -m reasontune …``): the reasontune command."""

import sys

from reasontune.cli import main

if __name__ == "__main__":
    sys.exit(main())
