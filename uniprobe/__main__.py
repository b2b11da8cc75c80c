"""``python -m uniprobe`` runs the ``uniprobe`` command (also under ``torchrun -m uniprobe``)."""

import sys

from uniprobe.experiments.cli import main

sys.exit(main())
