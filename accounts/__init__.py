"""Tenants, their members, and their API keys (hashed at rest, shown once), plus the API's bearer auth."""
