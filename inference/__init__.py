"""The OpenAI-compatible API, usage records and their roll-ups, and the web tier's side of the job queue."""
