"""`python -m smolora.training ...` (see `cli.py`)."""

import sys

from smolora.training.cli import main

sys.exit(main())
