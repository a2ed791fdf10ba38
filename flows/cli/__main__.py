"""``python -m cohortflow.flows.cli``: the ``cohortflow`` command (as ``python -m cohortflow``)."""

import sys

from cohortflow.flows.cli import main

sys.exit(main())
