"""``python -m experiments`` runs the ``uniprobe`` command."""

import sys

from experiments.cli import main

sys.exit(main())
