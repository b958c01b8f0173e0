"""`python -m attnc.bench ...` runs `attnc bench ...`."""

from attnc.bench.cli import main

raise SystemExit(main())
