"""``python -m flows.cli``: the ``cohortflow`` command."""

import sys

from flows.cli import main

sys.exit(main())
