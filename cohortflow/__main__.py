"""``python -m cohortflow``: the ``cohortflow`` command."""

import sys

from cohortflow.flows.cli import main

sys.exit(main())
