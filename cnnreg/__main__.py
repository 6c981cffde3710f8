"""``python -m cnnreg``: the same as the ``cnnreg`` command (and what torchrun starts)."""

import sys

from cnnreg.cli import main

sys.exit(main())
