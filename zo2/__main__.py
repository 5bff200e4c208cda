"""``python -m zo2 train|replay ...``: the same command line as the ``zo2`` script."""

import sys

from zo2_launcher.cli import main

sys.exit(main())
