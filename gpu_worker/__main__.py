"""`python -m gpu_worker ...` is the same as the `ruvon` command."""

from gpu_worker.cli import main

raise SystemExit(main())
