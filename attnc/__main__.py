"""`python -m attnc` is the `attnc` command."""

from attnc.cli import main

raise SystemExit(main())
