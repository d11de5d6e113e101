"""``python -m pdserve``: the CLI."""

from pdserve.cli import main

raise SystemExit(main())
