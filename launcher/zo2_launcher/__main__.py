"""``python -m zo2_launcher``: the ``zo2`` command line."""

import sys

from zo2_launcher.cli import main

sys.exit(main())
