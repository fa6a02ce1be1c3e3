"""`python -m smolora.server serve ...` (see `server/cli.py`)."""

from smolora.server.cli import main

raise SystemExit(main())
