"""`python -m smolora.clients ...` (see `clients/cli.py`)."""

from smolora.clients.cli import main

raise SystemExit(main())
