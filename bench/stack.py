"""The production-shape deployment the stress, fault and serving benches start; it lives in ruvon_cli/stack.py
(`ruvon showcase` starts it too), and this name stays for the benches and tests that import it."""

from ruvon_cli.stack import PG_ADMIN_URL, ROOT, Stack, StackConfig, free_port, postgres_available, rss_bytes

__all__ = ["PG_ADMIN_URL", "ROOT", "Stack", "StackConfig", "free_port", "postgres_available", "rss_bytes"]
