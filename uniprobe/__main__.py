"""``python -m uniprobe`` runs the ``uniprobe`` command (also under ``torchrun -m uniprobe``)."""

import sys

from uniprobe.experiments.cli import main

if __name__ == "__main__":  # importing it (the docs' API reader does) runs nothing
    sys.exit(main())
