"""``python -m reasontune`` (and ``torchrun … -m reasontune``): the same command line as ``reasontune``."""

import os
import sys

# `python -m` puts the working directory first on sys.path. It may be a run directory someone else
# wrote, so nothing is imported from it implicitly (a reward module comes from PYTHONPATH, explicitly).
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from reasontune.cli import main  # noqa: E402
from reasontune.process_exit import exit_process  # noqa: E402

exit_process(main())
