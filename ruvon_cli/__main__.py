"""`python -m ruvon_cli ...` is the same as the `ruvon` command."""

from ruvon_cli.main import main

raise SystemExit(main())
