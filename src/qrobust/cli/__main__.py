"""``python -m qrobust.cli`` runs the ``qrobust`` command."""

import sys

from qrobust.cli import main

sys.exit(main())
